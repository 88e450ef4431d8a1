//! Training text: reading files, tokenizing, splitting into train/eval, and drawing batches of
//! fixed-length windows. Nothing here touches tensors or the model.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};
use crate::io::read_bounded;
use crate::tokenizer::Tokenizer;

/// Largest text file read for training.
const MAX_TEXT_BYTES: u64 = 256 << 20;

/// The text files under `paths` (files as given, directories searched for `*.txt`), sorted.
pub fn text_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| ModelError::io(p, e))?;
            for entry in rd {
                let path = entry.map_err(|e| ModelError::io(p, e))?.path();
                if path.extension().is_some_and(|e| e == "txt") && path.is_file() {
                    out.push(path);
                }
            }
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(ModelError::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(ModelError::Data("no .txt files found".into()));
    }
    Ok(out)
}

/// Token streams for training and evaluation.
#[derive(Debug, Clone)]
pub struct TextData {
    /// Tokens to train on.
    pub train: Vec<u32>,
    /// Held-out tokens (the tail of every file).
    pub eval: Vec<u32>,
}

impl TextData {
    /// Tokenizes `files`; the last `eval_fraction` of each file becomes evaluation data.
    pub fn load(files: &[PathBuf], tok: &Tokenizer, eval_fraction: f64) -> Result<Self> {
        let mut train = Vec::new();
        let mut eval = Vec::new();
        for f in files {
            let bytes = read_bounded(f, MAX_TEXT_BYTES)?;
            let text = String::from_utf8_lossy(&bytes);
            let ids = tok.encode(&text)?;
            let cut = ((ids.len() as f64) * (1.0 - eval_fraction)) as usize;
            train.extend_from_slice(&ids[..cut]);
            eval.extend_from_slice(&ids[cut..]);
        }
        Ok(Self { train, eval })
    }

    /// Tokenizes one file entirely as evaluation data.
    pub fn eval_only(file: &Path, tok: &Tokenizer) -> Result<Vec<u32>> {
        let bytes = read_bounded(file, MAX_TEXT_BYTES)?;
        tok.encode(&String::from_utf8_lossy(&bytes))
    }
}

/// Draws random windows of `seq` tokens (seeded).
pub struct Batcher {
    rng: rand::rngs::StdRng,
    seq: usize,
    batch: usize,
}

impl Batcher {
    /// A batcher of `batch` windows of `seq` tokens.
    pub fn new(seq: usize, batch: usize, seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            seq,
            batch,
        }
    }

    /// One batch (row-major `[batch, seq]`) from `tokens`.
    pub fn sample(&mut self, tokens: &[u32]) -> Result<Vec<u32>> {
        if tokens.len() < self.seq + 1 {
            return Err(ModelError::Data(format!(
                "{} tokens are too few for one sequence of {}",
                tokens.len(),
                self.seq
            )));
        }
        let mut out = Vec::with_capacity(self.batch * self.seq);
        for _ in 0..self.batch {
            let start = self.rng.random_range(0..=tokens.len() - self.seq);
            out.extend_from_slice(&tokens[start..start + self.seq]);
        }
        Ok(out)
    }
}

/// Consecutive non-overlapping windows of `seq` tokens covering `tokens` (at most `max`).
pub fn eval_windows(tokens: &[u32], seq: usize, max: usize) -> Vec<&[u32]> {
    tokens.chunks_exact(seq).take(max).collect()
}
