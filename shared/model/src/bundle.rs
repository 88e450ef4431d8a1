//! Model bundles: a base model directory (`config.json`, `model.safetensors`, optional `tokenizer.json`
//! and `tokenizer_config.json` — the chat template chat-formatted training data is rendered with) as one
//! blob, so a coordinator can serve it and a device can verify it against the one SHA-256 a signed
//! manifest names (`base_digest`), then unpack it.
//!
//! Layout (little-endian): the magic `starling-bundle/1\0`, a `u32` file count, then per file a `u8` name
//! length, the name, a `u64` size and the bytes. Names come from a fixed list, strictly sorted, each at most
//! once; `config.json` and `model.safetensors` are required. Packing is deterministic, so the same directory
//! always gives the same digest. Every field is checked before it is used: a truncated, oversized or
//! malformed bundle is a typed error. What must never live here: fetching, hashing policy, model loading.

use std::path::Path;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::io::{read_bounded, write_atomic, MAX_WEIGHTS_BYTES};

/// The bundle's magic bytes (format and version).
pub const MAGIC: &[u8] = b"starling-bundle/1\0";
/// The files a bundle may carry, in their canonical (sorted) order.
pub const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];
/// Files every bundle must carry.
const REQUIRED: [&str; 2] = ["config.json", "model.safetensors"];
/// Largest JSON file in a bundle (configs and tokenizers).
const MAX_JSON_BYTES: u64 = 64 << 20;

fn bad(message: impl Into<String>) -> ModelError {
    ModelError::Safetensors {
        path: "<model bundle>".into(),
        message: message.into(),
    }
}

/// Packs the model files of `dir` into one bundle.
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>> {
    let mut files = Vec::new();
    for name in FILES {
        let path = dir.join(name);
        if path.is_file() {
            let max = if name.ends_with(".json") {
                MAX_JSON_BYTES
            } else {
                MAX_WEIGHTS_BYTES
            };
            files.push((name, read_bounded(&path, max)?));
        } else if REQUIRED.contains(&name) {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model file missing"),
            ));
        }
    }
    let total: usize = files.iter().map(|(n, b)| 9 + n.len() + b.len()).sum();
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(files.len() as u32).to_le_bytes());
    for (name, bytes) in &files {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// The files of a bundle as `(name, bytes)` in canonical order, after checking every field.
pub fn unpack(bundle: &[u8]) -> Result<Vec<(&'static str, &[u8])>> {
    let rest = bundle
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("not a Starling model bundle (bad magic)"))?;
    let (count, mut rest) = rest
        .split_at_checked(4)
        .ok_or_else(|| bad("truncated file count"))?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count > FILES.len() {
        return Err(bad(format!(
            "{count} files; a bundle holds at most {}",
            FILES.len()
        )));
    }
    let mut out: Vec<(&'static str, &[u8])> = Vec::with_capacity(count);
    for _ in 0..count {
        let (&len, r) = rest.split_first().ok_or_else(|| bad("truncated name"))?;
        let (name, r) = r
            .split_at_checked(len as usize)
            .ok_or_else(|| bad("truncated name"))?;
        let name = FILES.iter().find(|f| f.as_bytes() == name).ok_or_else(|| {
            bad(format!(
                "unexpected file {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        if out.last().is_some_and(|(prev, _)| prev >= name) {
            return Err(bad("files out of order or repeated"));
        }
        let (size, r) = r.split_at_checked(8).ok_or_else(|| bad("truncated size"))?;
        let size = u64::from_le_bytes(size.try_into().map_err(|_| bad("truncated size"))?);
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s <= r.len())
            .ok_or_else(|| bad(format!("{name} declares {size} bytes, {} remain", r.len())))?;
        let (bytes, r) = r.split_at(size);
        out.push((name, bytes));
        rest = r;
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last file", rest.len())));
    }
    for required in REQUIRED {
        if !out.iter().any(|(n, _)| *n == required) {
            return Err(bad(format!("{required} missing")));
        }
    }
    Ok(out)
}

/// The model configuration a bundle carries, read without unpacking the weights (to size a model before
/// loading it).
pub fn config(bundle: &[u8]) -> Result<LlamaConfig> {
    let files = unpack(bundle)?;
    let (_, json) = files
        .iter()
        .find(|(n, _)| *n == "config.json")
        .ok_or_else(|| bad("config.json missing"))?;
    LlamaConfig::from_hf_json(json, Path::new("<model bundle>/config.json"))
}

/// Writes a bundle's files into `dir` (created if needed; each file written atomically).
pub fn unpack_to_dir(bundle: &[u8], dir: &Path) -> Result<()> {
    let files = unpack(bundle)?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    for (name, bytes) in files {
        write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), b"{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), b"weights").unwrap();
        d
    }

    #[test]
    fn packs_deterministically_and_round_trips() {
        let d = sample_dir();
        let a = pack_dir(d.path()).unwrap();
        assert_eq!(a, pack_dir(d.path()).unwrap());
        let files = unpack(&a).unwrap();
        assert_eq!(
            files,
            vec![
                ("config.json", &b"{}"[..]),
                ("model.safetensors", &b"weights"[..])
            ]
        );
        let out = tempfile::tempdir().unwrap();
        unpack_to_dir(&a, out.path()).unwrap();
        assert_eq!(
            std::fs::read(out.path().join("model.safetensors")).unwrap(),
            b"weights"
        );
    }

    #[test]
    fn malformed_bundles_are_typed_errors() {
        let d = sample_dir();
        let good = pack_dir(d.path()).unwrap();
        // Every truncation, a trailing byte, a huge declared size and a bad magic are refused.
        for cut in 0..good.len() {
            assert!(unpack(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(unpack(&long).is_err());
        let mut huge = good.clone();
        let size_at = MAGIC.len() + 4 + 1 + "config.json".len();
        huge[size_at..size_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(unpack(&huge).is_err());
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(unpack(&magic).is_err());
        // A missing required file.
        std::fs::remove_file(d.path().join("config.json")).unwrap();
        assert!(pack_dir(d.path()).is_err());
    }
}
