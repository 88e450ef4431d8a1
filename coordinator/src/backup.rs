//! Backups of a coordinator directory: one file holding everything a coordinator needs to come back —
//! coordinator.toml, its keys, the base model files version 0 signed, and every tree of the sled store —
//! followed by the SHA-256 of all that precedes it. A running `serve` writes it while holding the round
//! lock (no upload is stored, no round published or started meanwhile), so the store in it is the state
//! of one instant for everything an acknowledgement depends on.
//!
//! Format (all lengths big-endian and checked against the bytes that remain before anything is
//! allocated): `STARLING-BACKUP\n`, format version (u32), then records `kind (u8) | name length (u16) |
//! name | value length (u64) | value`, then the 32-byte digest. Kinds: 1 a file (name relative to the
//! coordinator directory), 2 a store tree (value: `count (u64)` then `key length (u32) | key | value
//! length (u32) | value` pairs).
//!
//! What must never live here: the meaning of the store's trees (that is [`crate::store`]) or how a
//! running coordinator pauses for the snapshot (that is [`crate::service`]).

use std::io::Write as _;
use std::path::{Component, Path};

use sha2::{Digest as _, Sha256};

use crate::store::{Store, StoreError, TreeDump};

const MAGIC: &[u8] = b"STARLING-BACKUP\n";
const VERSION: u32 = 1;
const KIND_FILE: u8 = 1;
const KIND_TREE: u8 = 2;

/// The files of a coordinator directory a backup holds besides the store (the base model's files are
/// listed from its folder).
const FILES: [&str; 3] = ["coordinator.toml", "keys/tls.pk8", "keys/signing.pk8"];

/// Why a backup could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file is not a backup this version can read, or it is damaged.
    #[error("not a usable backup: {0}")]
    Malformed(String),
    /// The target directory already holds a coordinator.
    #[error("{0} already exists: restore into a new directory")]
    Exists(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a backup holds.
#[derive(Debug, Default)]
pub struct Contents {
    /// Files by path relative to the coordinator directory.
    pub files: Vec<(String, Vec<u8>)>,
    /// The store's trees.
    pub trees: Vec<TreeDump>,
}

impl Contents {
    /// Bytes in keys, values and files.
    pub fn bytes(&self) -> u64 {
        let files: usize = self.files.iter().map(|(_, v)| v.len()).sum();
        let trees: usize = self
            .trees
            .iter()
            .flat_map(|(_, kv)| kv.iter().map(|(k, v)| k.len() + v.len()))
            .sum();
        (files + trees) as u64
    }
}

/// The files of coordinator directory `dir` that a backup holds (configuration, keys, base model).
pub fn directory_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    let mut out = Vec::new();
    for name in FILES {
        let p = dir.join(name);
        out.push((name.to_string(), std::fs::read(&p).map_err(io(&p))?));
    }
    let base = dir.join("base");
    let mut names: Vec<String> = std::fs::read_dir(&base)
        .map_err(io(&base))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for n in names {
        let p = base.join(&n);
        out.push((format!("base/{n}"), std::fs::read(&p).map_err(io(&p))?));
    }
    Ok(out)
}

/// Reads what a backup of `dir` holds from its files and `store` (the caller keeps the store still).
pub fn collect(dir: &Path, store: &Store) -> Result<Contents, BackupError> {
    Ok(Contents {
        files: directory_files(dir)?,
        trees: store.snapshot()?,
    })
}

fn record(out: &mut Vec<u8>, kind: u8, name: &str, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(value.len() as u64).to_be_bytes());
    out.extend_from_slice(value);
}

/// The bytes of a backup of `contents`.
pub fn encode(contents: &Contents) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.bytes() as usize + 4096);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    for (name, bytes) in &contents.files {
        record(&mut out, KIND_FILE, name, bytes);
    }
    for (name, kv) in &contents.trees {
        let mut value = Vec::new();
        value.extend_from_slice(&(kv.len() as u64).to_be_bytes());
        for (k, v) in kv {
            value.extend_from_slice(&(k.len() as u32).to_be_bytes());
            value.extend_from_slice(k);
            value.extend_from_slice(&(v.len() as u32).to_be_bytes());
            value.extend_from_slice(v);
        }
        record(&mut out, KIND_TREE, name, &value);
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// A reader whose every take checks the bytes that remain first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], BackupError> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.0.len())
            .ok_or_else(|| {
                BackupError::Malformed(format!("{what} needs {n} bytes, {} remain", self.0.len()))
            })?;
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn int<const N: usize>(&mut self, what: &str) -> Result<[u8; N], BackupError> {
        let b = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
}

/// Parses and checks a backup's bytes.
pub fn decode(bytes: &[u8]) -> Result<Contents, BackupError> {
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or_else(|| BackupError::Malformed("shorter than its digest".into()))?;
    let (body, digest) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != digest {
        return Err(BackupError::Malformed(
            "its digest does not match (the file is damaged or truncated)".into(),
        ));
    }
    let mut r = Reader(body);
    if r.take(MAGIC.len() as u64, "the header")? != MAGIC {
        return Err(BackupError::Malformed(
            "it does not start like a Starling backup".into(),
        ));
    }
    let version = u32::from_be_bytes(r.int("the format version")?);
    if version != VERSION {
        return Err(BackupError::Malformed(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let mut contents = Contents::default();
    while !r.0.is_empty() {
        let kind = r.int::<1>("a record kind")?[0];
        let name_len = u16::from_be_bytes(r.int("a name length")?);
        let name = std::str::from_utf8(r.take(name_len.into(), "a name")?)
            .map_err(|_| BackupError::Malformed("a name is not UTF-8".into()))?
            .to_string();
        let len = u64::from_be_bytes(r.int("a value length")?);
        let value = r.take(len, &name)?;
        match kind {
            KIND_FILE => {
                check_relative(&name)?;
                contents.files.push((name, value.to_vec()));
            }
            KIND_TREE => {
                let mut t = Reader(value);
                let count = u64::from_be_bytes(t.int("an entry count")?);
                // Each entry takes at least 8 bytes: a count beyond that is a lie, refused before use.
                if count > value.len() as u64 / 8 {
                    return Err(BackupError::Malformed(format!(
                        "tree {name} claims {count} entries"
                    )));
                }
                let mut kv = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let kl = u32::from_be_bytes(t.int("a key length")?);
                    let k = t.take(kl.into(), "a key")?.to_vec();
                    let vl = u32::from_be_bytes(t.int("a value length")?);
                    let v = t.take(vl.into(), "a value")?.to_vec();
                    kv.push((k, v));
                }
                if !t.0.is_empty() {
                    return Err(BackupError::Malformed(format!(
                        "tree {name} has trailing bytes"
                    )));
                }
                contents.trees.push((name, kv));
            }
            k => return Err(BackupError::Malformed(format!("unknown record kind {k}"))),
        }
    }
    for name in FILES {
        if !contents.files.iter().any(|(n, _)| n == name) {
            return Err(BackupError::Malformed(format!("{name} is missing")));
        }
    }
    Ok(contents)
}

/// A file name from a backup must stay inside the directory it is restored into.
fn check_relative(name: &str) -> Result<(), BackupError> {
    let p = Path::new(name);
    if name.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(BackupError::Malformed(format!(
            "file name {name:?} leaves the directory"
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` owner-only (a backup holds the coordinator's private keys), atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = path.with_extension("partial");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// Writes a backup of `contents` to `out` (owner-only, atomically) and returns what `backup` reports.
pub fn write(out: &Path, contents: &Contents) -> Result<serde_json::Value, BackupError> {
    write_file(out, &encode(contents))?;
    Ok(serde_json::json!({
        "backup": out.display().to_string(),
        "bytes": contents.bytes(),
        "trees": contents.trees.len(),
        "files": contents.files.len(),
    }))
}

/// Restores the backup in file `from` into a new coordinator directory `dir`; returns what it held.
///
/// A file already in place with exactly the backup's bytes is left alone (keys mounted read-only from a
/// Kubernetes Secret, a configuration from a ConfigMap); one with other bytes is refused, as is a
/// directory that already holds a store.
pub fn restore(from: &Path, dir: &Path) -> Result<Contents, BackupError> {
    if dir.join("store").exists() {
        return Err(BackupError::Exists(dir.display().to_string()));
    }
    let bytes = std::fs::read(from).map_err(io(from))?;
    let contents = decode(&bytes)?;
    for (name, value) in &contents.files {
        let p = dir.join(name);
        match std::fs::read(&p) {
            Ok(present) if present == *value => continue,
            Ok(_) => {
                return Err(BackupError::Malformed(format!(
                    "{} exists with other contents than the backup's",
                    p.display()
                )))
            }
            Err(_) => {}
        }
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        if name.starts_with("keys/") {
            write_file(&p, value)?;
        } else {
            std::fs::write(&p, value).map_err(io(&p))?;
        }
    }
    if let Err(e) = Store::restore(&dir.join("store"), &contents.trees) {
        // A half-written store must not pass for a restored one.
        let _ = std::fs::remove_dir_all(dir.join("store"));
        return Err(e.into());
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Contents {
        Contents {
            files: vec![
                ("coordinator.toml".into(), b"[rounds]\n".to_vec()),
                ("keys/tls.pk8".into(), vec![1, 2, 3]),
                ("keys/signing.pk8".into(), vec![4, 5]),
                ("base/config.json".into(), b"{}".to_vec()),
            ],
            trees: vec![
                (
                    "meta".into(),
                    vec![(b"format".to_vec(), 1u32.to_be_bytes().to_vec())],
                ),
                ("clients".into(), vec![]),
            ],
        }
    }

    #[test]
    fn a_backup_decodes_to_what_was_encoded() {
        let c = sample();
        let back = decode(&encode(&c)).unwrap();
        assert_eq!(back.files, c.files);
        assert_eq!(back.trees, c.trees);
    }

    #[test]
    fn damage_anywhere_is_refused() {
        let bytes = encode(&sample());
        for i in [0, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(
                matches!(decode(&b), Err(BackupError::Malformed(_))),
                "byte {i}"
            );
        }
        assert!(decode(&bytes[..bytes.len() - 7]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn lengths_beyond_the_file_and_escaping_names_are_refused() {
        // A record claiming more bytes than remain, with a valid digest over it.
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&VERSION.to_be_bytes());
        body.push(KIND_FILE);
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"a/b");
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut bytes = body.clone();
        bytes.extend_from_slice(&Sha256::digest(&body));
        assert!(matches!(decode(&bytes), Err(BackupError::Malformed(m)) if m.contains("needs")));

        let mut c = sample();
        c.files.push(("../outside".into(), vec![0]));
        assert!(
            matches!(decode(&encode(&c)), Err(BackupError::Malformed(m)) if m.contains("leaves"))
        );
        let mut c = sample();
        c.files.retain(|(n, _)| n != "keys/tls.pk8");
        assert!(
            matches!(decode(&encode(&c)), Err(BackupError::Malformed(m)) if m.contains("missing"))
        );
    }
}
