//! Chat templates: how a conversation becomes the text a chat model was trained on (ChatML's
//! `<|im_start|>user\n…<|im_end|>`, Llama 3's headers, …). The template is the model's own Jinja source —
//! HuggingFace's `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`), which a GGUF import
//! writes from the file's `tokenizer.chat_template` — rendered by a real Jinja engine (minijinja, with
//! Python's string and dict methods that HF templates call), never re-implemented per model.
//!
//! What must never live here: tokenization (the rendered text goes to [`crate::Tokenizer`], which
//! splits special tokens as llama.cpp does) or generation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The file that holds a model directory's chat template (HF's name for it).
pub const CONFIG_FILE: &str = "tokenizer_config.json";

/// Largest template accepted (real ones are a few KB).
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (whatever roles the template knows).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A turn of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// `bos_token`/`eos_token` in tokenizer_config.json: a string, or an object with `content`.
fn token_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from its Jinja source and the texts of the model's BOS and EOS tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let t = Self {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        // A template that does not parse is refused when it is read, not when it is first used.
        t.environment()?;
        Ok(t)
    }

    /// The chat template of model directory `dir` (its tokenizer_config.json), if it has one.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = crate::io::read_bounded(&path, MAX_TEMPLATE_BYTES * 4)?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ModelError::Json {
                path: path.clone(),
                message: e.to_string(),
            })?;
        // A string, or (newer HF files) a list of named templates of which "default" is the chat one.
        let source = match &v["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(named) => match named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
            {
                Some(s) => s.to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        Self::new(
            &source,
            &token_text(&v["bos_token"]),
            &token_text(&v["eos_token"]),
        )
        .map(Some)
    }

    /// tokenizer_config.json text holding this template (what a GGUF import writes).
    pub fn config_json(&self) -> String {
        serde_json::json!({
            "chat_template": self.source,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        })
        .to_string()
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // HF templates refuse conversations they cannot render by calling raise_exception.
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", self.source.clone())
            .map_err(|e| ModelError::ChatTemplate(format!("does not parse: {e}")))?;
        Ok(env)
    }

    /// The text of a whole conversation in pieces, each marked `true` when it is an assistant turn
    /// (what chat fine-tuning trains on: the turn's text and the template's end-of-turn after it) or
    /// `false` (system and user turns, the template's framing). Each assistant turn is located by
    /// rendering the conversation up to it with the generation prompt and up to its end without:
    /// any template whose renderings of a conversation's beginnings are beginnings of the whole
    /// works (ChatML, Llama 3, Qwen2); one that is not is refused rather than mislabelled.
    pub fn render_spans(&self, messages: &[Message]) -> Result<Vec<(String, bool)>> {
        let full = self.render(messages, false)?;
        let mut pieces = Vec::new();
        let mut at = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let start = self.render(&messages[..i], true)?;
            let end = self.render(&messages[..=i], false)?;
            if !(full.starts_with(&end) && end.starts_with(&start) && start.len() >= at) {
                return Err(ModelError::ChatTemplate(format!(
                    "cannot locate assistant turn {i}: the template does not render the \
                     conversation's beginnings as beginnings of the whole"
                )));
            }
            pieces.push((full[at..start.len()].to_string(), false));
            pieces.push((full[start.len()..end.len()].to_string(), true));
            at = end.len();
        }
        pieces.push((full[at..].to_string(), false));
        pieces.retain(|(text, _)| !text.is_empty());
        Ok(pieces)
    }

    /// The text of `messages`, followed by the opening of the assistant's turn when
    /// `add_generation_prompt` (what a model continues to answer).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let t = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages
                .iter()
                .map(|m| {
                    minijinja::Value::from_pairs([
                        ("role", minijinja::Value::from(m.role.as_str())),
                        ("content", minijinja::Value::from(m.content.as_str())),
                    ])
                })
                .collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| ModelError::ChatTemplate(format!("rendering failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF and tokenizer_config.json hold it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn assistant_turns_are_located_for_training() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let conv = [
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
            Message::new("assistant", "Farewell."),
        ];
        let pieces = t.render_spans(&conv).unwrap();
        let whole: String = pieces.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(whole, t.render(&conv, false).unwrap());
        let trained: Vec<&str> = pieces
            .iter()
            .filter(|(_, a)| *a)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(trained, ["Hello!<|im_end|>\n", "Farewell.<|im_end|>\n"]);
        assert!(pieces[0]
            .0
            .starts_with("<|im_start|>system\nYou are a helpful"));
        assert!(pieces[0].0.ends_with("<|im_start|>assistant\n"));
        // A template that renders the last turn differently cannot be labelled: refused.
        let odd = ChatTemplate::new(
            "{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(
            odd.render_spans(&conv),
            Err(ModelError::ChatTemplate(_))
        ));
    }

    #[test]
    fn chatml_renders_as_transformers_does() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let text = t
            .render(&[Message::new("user", "Name three colours.")], true)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                    Message::new("assistant", "Hello."),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            with_system,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_exceptions_and_bad_templates() {
        let t = ChatTemplate::new(
            "{% if messages[0].role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\
             {{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content.strip() }}\n{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  padded  ")], false)
                .unwrap(),
            "<s>[USER] padded\n"
        );
        let e = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tools here"), "{e}");
        assert!(ChatTemplate::new("{% for m in messages %}", "", "").is_err());
    }

    #[test]
    fn templates_load_from_tokenizer_config_in_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ChatTemplate::load(dir.path()).unwrap(), None);
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), t.config_json()).unwrap();
        assert_eq!(ChatTemplate::load(dir.path()).unwrap(), Some(t));
        let named = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ eos_token }}"}],
            "eos_token": {"content": "</s>"},
        });
        std::fs::write(dir.path().join(CONFIG_FILE), named.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "</s>");
    }
}
