//! Training text: reading files (plain text, or chat conversations as JSONL), tokenizing, splitting
//! into train/eval, and drawing batches of fixed-length windows. Nothing here touches tensors or the
//! model.
//!
//! Chat data (`*.jsonl`, one `{"messages": [{"role": …, "content": …}, …]}` per line) is rendered with
//! the model's chat template and trained on its assistant turns only: every other token carries
//! [`NO_LOSS`], which the training losses read as "input, never a target".

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use crate::chat::{ChatTemplate, Message};
use crate::error::{ModelError, Result};
use crate::io::read_bounded;
use crate::tokenizer::Tokenizer;

/// Largest text file read for training.
const MAX_TEXT_BYTES: u64 = 256 << 20;

/// Bit set on a token id that the model reads but is never trained to predict (system and user
/// turns of chat data, the template's framing). Vocabularies stay far below it (at most 2^21 ids).
pub const NO_LOSS: u32 = 1 << 31;

/// The token a (possibly [`NO_LOSS`]-marked) training id stands for.
#[inline]
pub fn token(id: u32) -> u32 {
    id & !NO_LOSS
}

/// Whether predicting this training id counts in the loss.
#[inline]
pub fn is_target(id: u32) -> bool {
    id & NO_LOSS == 0
}

/// The tokens of training ids (their [`NO_LOSS`] marks removed): what the model reads.
pub fn tokens(ids: &[u32]) -> Vec<u32> {
    ids.iter().map(|&i| token(i)).collect()
}

/// The positions of one sequence whose next id is trained on (all but the last, unless marked).
pub fn counted_targets(sequence: &[u32]) -> usize {
    sequence.iter().skip(1).filter(|&&i| is_target(i)).count()
}

/// One line of chat training data.
#[derive(serde::Deserialize)]
struct Conversation {
    messages: Vec<Message>,
}

/// Whether `path` holds chat conversations (JSONL) rather than plain text.
pub fn is_chat(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "jsonl")
}

/// The training ids of chat data `text` (JSONL, `path` names it in errors): each conversation
/// rendered by `template`, its assistant turns as plain ids, everything else marked [`NO_LOSS`].
pub fn chat_ids(
    text: &str,
    path: &Path,
    template: &ChatTemplate,
    tok: &Tokenizer,
) -> Result<Vec<u32>> {
    let bad = |line: usize, m: String| {
        ModelError::Data(format!("{} line {}: {m}", path.display(), line + 1))
    };
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let conv: Conversation =
            serde_json::from_str(line).map_err(|e| bad(n, format!("not a conversation: {e}")))?;
        if !conv.messages.iter().any(|m| m.role == "assistant") {
            return Err(bad(n, "no assistant turn to train on".into()));
        }
        let pieces = template
            .render_spans(&conv.messages)
            .map_err(|e| bad(n, e.to_string()))?;
        for (piece, trained) in pieces {
            let mark = if trained { 0 } else { NO_LOSS };
            ids.extend(tok.encode(&piece)?.into_iter().map(|i| i | mark));
        }
    }
    if ids.is_empty() {
        return Err(ModelError::Data(format!(
            "{} holds no conversations",
            path.display()
        )));
    }
    Ok(ids)
}

/// The training ids of `text` (`path` names it in errors): chat conversations when `conversations`
/// (JSONL, rendered with `template`, which they need), else plain text.
pub fn training_ids(
    text: &str,
    path: &Path,
    tok: &Tokenizer,
    conversations: bool,
    template: Option<&ChatTemplate>,
) -> Result<Vec<u32>> {
    if !conversations {
        return tok.encode(text);
    }
    let template = template.ok_or_else(|| {
        ModelError::Data(format!(
            "{} is chat data, and the model has no chat template (tokenizer_config.json)",
            path.display()
        ))
    })?;
    chat_ids(text, path, template, tok)
}

/// The text files under `paths` (files as given, directories searched for `*.txt` and `*.jsonl`),
/// sorted.
pub fn text_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| ModelError::io(p, e))?;
            for entry in rd {
                let path = entry.map_err(|e| ModelError::io(p, e))?.path();
                if path.extension().is_some_and(|e| e == "txt" || e == "jsonl") && path.is_file() {
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
        return Err(ModelError::Data("no .txt or .jsonl files found".into()));
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
    /// Tokenizes `files`; the last `eval_fraction` of each file becomes evaluation data. Chat files
    /// (`*.jsonl`) need the model's chat template (`chat`) and train on assistant turns only.
    pub fn load(
        files: &[PathBuf],
        tok: &Tokenizer,
        eval_fraction: f64,
        chat: Option<&ChatTemplate>,
    ) -> Result<Self> {
        let mut train = Vec::new();
        let mut eval = Vec::new();
        for f in files {
            let bytes = read_bounded(f, MAX_TEXT_BYTES)?;
            let text = String::from_utf8_lossy(&bytes);
            let ids = training_ids(&text, f, tok, is_chat(f), chat)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chat_jsonl_trains_on_assistant_turns_only() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let text = concat!(
            r#"{"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}]}"#,
            "\n\n",
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "So."}]}"#,
            "\n"
        );
        let ids = chat_ids(text, Path::new("c.jsonl"), &t, &Tokenizer::Byte).unwrap();
        let trained: Vec<u8> = ids
            .iter()
            .filter(|&&i| is_target(i))
            .map(|&i| i as u8)
            .collect();
        assert_eq!(
            String::from_utf8(trained).unwrap(),
            "Me.<|im_end|>\nSo.<|im_end|>\n"
        );
        let all: Vec<u8> = ids.iter().map(|&i| token(i) as u8).collect();
        let whole = String::from_utf8(all).unwrap();
        assert!(whole.starts_with("<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\nMe."));
        // Bad lines are errors that name the file and the line.
        for (bad, what) in [
            ("{\"messages\": 3}", "not a conversation"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}",
                "no assistant turn",
            ),
            ("not json", "not a conversation"),
        ] {
            let e = chat_ids(bad, Path::new("c.jsonl"), &t, &Tokenizer::Byte).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("c.jsonl line 1") && e.contains(what), "{e}");
        }
        // Chat data needs the model's template.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.jsonl");
        std::fs::write(&f, text).unwrap();
        let e = TextData::load(std::slice::from_ref(&f), &Tokenizer::Byte, 0.0, None).unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
        let d = TextData::load(&[f], &Tokenizer::Byte, 0.0, Some(&t)).unwrap();
        assert_eq!(d.train, ids);
        assert_eq!(text_files(&[dir.path().to_path_buf()]).unwrap().len(), 1);
    }
}
