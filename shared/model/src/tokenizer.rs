//! Tokenizers: the byte-level default (every model without a `tokenizer.json`) and HuggingFace
//! `tokenizer.json` files through the `tokenizers` crate.
//!
//! The byte-level tokenizer maps each UTF-8 byte to its own id (0–255) and reserves 256 = `<s>`,
//! 257 = `</s>`, 258 = `<pad>`; Starling's default base model uses exactly these ids. This module
//! turns text into ids and back; it never sees tensors.

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::io::read_bounded;

/// Largest tokenizer.json read.
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Beginning-of-sequence id of the byte-level tokenizer.
pub const BYTE_BOS: u32 = 256;
/// End-of-sequence id of the byte-level tokenizer.
pub const BYTE_EOS: u32 = 257;
/// Padding id of the byte-level tokenizer.
pub const BYTE_PAD: u32 = 258;
/// Vocabulary size of the byte-level tokenizer.
pub const BYTE_VOCAB: usize = 259;

/// Turns text into token ids and back.
pub enum Tokenizer {
    /// One id per byte plus three specials.
    Byte,
    /// A HuggingFace tokenizer loaded from `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Byte => f.write_str("Tokenizer::Byte"),
            Self::Hf(t) => write!(f, "Tokenizer::Hf({} tokens)", t.get_vocab_size(true)),
        }
    }
}

impl Tokenizer {
    /// Loads a HuggingFace `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read_bounded(path, MAX_TOKENIZER_BYTES)?;
        Self::from_json(&bytes, path)
    }

    /// Parses the contents of a HuggingFace `tokenizer.json` (`path` names it in errors).
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self::Hf(Box::new(tok)))
    }

    /// The `tokenizer.json` text of a HuggingFace tokenizer (`None` for the byte-level one).
    pub fn to_json(&self) -> Option<String> {
        match self {
            Self::Byte => None,
            Self::Hf(t) => t.to_string(false).ok(),
        }
    }

    /// The tokenizer of a model directory: its `tokenizer.json` if present, else byte-level.
    ///
    /// Refuses a tokenizer whose ids would not fit the model's vocabulary.
    pub fn for_model_dir(dir: &Path, vocab_size: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let (tok, what) = if path.is_file() {
            (Self::from_file(&path)?, "tokenizer")
        } else {
            (
                Self::Byte,
                "model has no tokenizer.json and the byte-level tokenizer",
            )
        };
        if tok.vocab_size() > vocab_size {
            return Err(ModelError::Tokenizer {
                path,
                message: format!(
                    "{what} has {} tokens but the model's vocabulary has only {vocab_size}",
                    tok.vocab_size()
                ),
            });
        }
        Ok(tok)
    }

    /// Number of distinct ids this tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte => BYTE_VOCAB,
            Self::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Encodes text without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte => Ok(text.bytes().map(u32::from).collect()),
            Self::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer {
                    path: "tokenizer.json".into(),
                    message: e.to_string(),
                }),
        }
    }

    /// Decodes ids to text, skipping special tokens; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Byte => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Self::Hf(t) => t.decode(ids, true).unwrap_or_default(),
        }
    }

    /// The id of a named special token (`<s>`, `</s>`, …), if the tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Byte => match token {
                "<s>" => Some(BYTE_BOS),
                "</s>" => Some(BYTE_EOS),
                "<pad>" => Some(BYTE_PAD),
                _ => None,
            },
            Self::Hf(t) => t.token_to_id(token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_any_text() {
        let t = Tokenizer::Byte;
        let s = "To be, or not — naïve ✓";
        let ids = t.encode(s).unwrap();
        assert_eq!(ids.len(), s.len());
        assert_eq!(t.decode(&ids), s);
        let mut with_specials = vec![BYTE_BOS];
        with_specials.extend(&ids);
        with_specials.push(BYTE_EOS);
        assert_eq!(t.decode(&with_specials), s);
    }

    #[test]
    fn hf_tokenizer_matches_the_python_library() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer");
        let t = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        for case in expected.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(t.encode(text).unwrap(), ids, "{text}");
            assert_eq!(t.decode(&ids), text);
        }
        assert_eq!(t.token_id("</s>"), Some(1));
    }

    #[test]
    fn malformed_tokenizer_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/tokenizer.json"),
        )
        .unwrap();
        for (i, bad) in [
            &good[..good.len() / 2],
            b"{}",
            b"\xff\xfe",
            b"{\"model\": 3}",
        ]
        .iter()
        .enumerate()
        {
            let p = dir.path().join(format!("t{i}.json"));
            std::fs::write(&p, bad).unwrap();
            match Tokenizer::from_file(&p) {
                Err(ModelError::Tokenizer { path, .. }) => assert_eq!(path, p),
                other => panic!("case {i}: {other:?}"),
            }
        }
        // A tokenizer larger than the model's vocabulary is refused.
        std::fs::write(dir.path().join("tokenizer.json"), &good).unwrap();
        assert!(Tokenizer::for_model_dir(dir.path(), 100).is_err());
    }
}
