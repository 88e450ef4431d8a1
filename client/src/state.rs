//! A device's state directory and what it persists, so that a device killed at any instant resumes without
//! losing acknowledged work or training a round twice.
//!
//! ```text
//! STATE/client.toml            settings (crate::config)
//! STATE/device.pk8             the device's Ed25519 key (PKCS#8, owner-only)
//! STATE/progress.json          the session's Progress (held model, pending update, ledger, rounds joined)
//! STATE/pending/<round>.bin    an encoded update computed but not yet acknowledged
//! STATE/models/base-<digest>/  the base model, unpacked from the bundle whose SHA-256 is <digest>
//! STATE/models/adapter-<digest>.bin  adapter blobs by SHA-256 (only a verified one is ever held)
//! ```
//!
//! Every write is atomic (temporary file, fsync, rename, fsync of the directory); `progress.json` is written
//! last, after the files it names, so it never refers to something that is not on disk. Reads are bounded.
//! What must never live here: protocol decisions (crate::session) or sockets (crate::driver).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use starling_protocol::{Digest, SigningIdentity};

use crate::session::Progress;

/// Largest progress file read.
const MAX_PROGRESS_BYTES: u64 = 64 << 20;
/// Largest key file read.
const MAX_KEY_BYTES: u64 = 4096;

/// What can go wrong with the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read or written (a full disk shows here, naming the file).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file's contents are not what this build wrote.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The directory holds no enrolled device.
    #[error("{0} holds no enrolled device: run `starling-client enrol --dir {0}` first")]
    NotEnrolled(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The files of one device's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// client.toml.
    pub fn config(&self) -> PathBuf {
        self.root.join("client.toml")
    }

    /// The device key.
    pub fn key(&self) -> PathBuf {
        self.root.join("device.pk8")
    }

    /// progress.json.
    pub fn progress(&self) -> PathBuf {
        self.root.join("progress.json")
    }

    /// The encoded update of `round`, while it is not acknowledged.
    pub fn pending(&self, round: u64) -> PathBuf {
        self.root.join("pending").join(format!("{round}.bin"))
    }

    /// The unpacked base model whose bundle has `digest`.
    pub fn base(&self, digest: &Digest) -> PathBuf {
        self.root.join("models").join(format!("base-{digest}"))
    }

    /// The adapter blob whose SHA-256 is `digest`.
    pub fn adapter(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("models")
            .join(format!("adapter-{digest}.bin"))
    }

    /// Whether `enrol` has run here.
    pub fn is_enrolled(&self) -> bool {
        self.config().is_file() && self.key().is_file()
    }

    /// Creates the directory and a fresh device key (owner-only), refusing to overwrite an existing one.
    pub fn create_key(&self) -> Result<SigningIdentity, StateError> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let path = self.key();
        let key = SigningIdentity::generate().map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path).map_err(io(&path))?;
        f.write_all(&key.pkcs8_der()).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        sync_dir(&self.root)?;
        Ok(key)
    }

    /// Reads the device key.
    pub fn load_key(&self) -> Result<SigningIdentity, StateError> {
        let path = self.key();
        if !path.is_file() {
            return Err(StateError::NotEnrolled(self.root.display().to_string()));
        }
        let der = read_bounded(&path, MAX_KEY_BYTES)?;
        SigningIdentity::from_pkcs8_der(&der).map_err(|e| StateError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// The persisted progress (a fresh one before the first run).
    pub fn load_progress(&self) -> Result<Progress, StateError> {
        let path = self.progress();
        if !path.exists() {
            return Ok(Progress::default());
        }
        let bytes = read_bounded(&path, MAX_PROGRESS_BYTES)?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// Persists `progress` atomically (after every file it names is on disk).
    pub fn save_progress(&self, progress: &Progress) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(progress).map_err(|e| StateError::Corrupt {
            path: self.progress(),
            message: e.to_string(),
        })?;
        write_atomic(&self.progress(), &text)
    }

    /// Reads a file of at most `max` bytes.
    pub fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, StateError> {
        read_bounded(path, max)
    }
}

/// Reads a whole file, refusing one larger than `max` before allocating for it.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, StateError> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    if len > max {
        return Err(StateError::Corrupt {
            path: path.to_path_buf(),
            message: format!("{len} bytes, more than the {max} allowed"),
        });
    }
    std::fs::read(path).map_err(io(path))
}

/// Writes `bytes` to `path` atomically and durably: a sibling temporary file, fsync, rename, fsync of the
/// directory. A failure (a full disk) leaves the previous file as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("tmp-write");
    let result = (|| {
        // Owner-only: progress holds a secure round's secret keys, pending files the device's deltas.
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Flushes a directory's entries (a rename is durable only once its directory is).
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_owner_only_and_never_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(&d.path().join("state"));
        assert!(matches!(s.load_key(), Err(StateError::NotEnrolled(_))));
        let k = s.create_key().unwrap();
        assert_eq!(s.load_key().unwrap().public_key(), k.public_key());
        assert!(s.create_key().is_err(), "an existing key is kept");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(s.key()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn progress_round_trips_and_garbage_is_a_typed_error() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let mut p = Progress::default();
        p.rounds_joined.push(3);
        s.save_progress(&p).unwrap();
        assert_eq!(s.load_progress().unwrap(), p);
        std::fs::write(s.progress(), b"{not json").unwrap();
        assert!(matches!(s.load_progress(), Err(StateError::Corrupt { .. })));
    }
}
