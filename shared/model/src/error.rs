//! Typed errors of the model crate.
//!
//! Every error that comes from a file names the file and what is wrong with it, so an operator can
//! fix the input. Nothing here panics on untrusted bytes; this module holds no I/O itself.

use std::path::PathBuf;

/// Everything that can go wrong while loading, converting, running or training a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// A file is larger than this crate agrees to read.
    #[error("{path}: file is {len} bytes, more than the limit of {max}")]
    FileTooLarge {
        /// The file concerned.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
        /// The limit in bytes.
        max: u64,
    },
    /// A JSON file (config, adapter config, tokenizer) is malformed or has wrong values.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A config file parsed but describes a model this crate cannot run or that is inconsistent.
    #[error("{path}: invalid config: {message}")]
    Config {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is truncated, malformed, or holds something not supported.
    #[error("{path}: invalid GGUF: {message}")]
    Gguf {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is truncated, malformed or inconsistent.
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is absent from a weights file.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The file concerned.
        path: PathBuf,
        /// The tensor name looked for.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file concerned.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape found in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor is stored in a dtype this crate does not read.
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file concerned.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// A tokenizer file could not be loaded.
    #[error("{path}: invalid tokenizer: {message}")]
    Tokenizer {
        /// The file concerned.
        path: PathBuf,
        /// What the tokenizer library said.
        message: String,
    },
    /// An adapter does not fit the model it is applied to, or is itself malformed.
    #[error("adapter {path}: {message}")]
    Adapter {
        /// The adapter directory or file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A chat template could not be read or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A token id is outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A request (generation, training, quantization) has arguments that cannot work.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Training data is unusable (empty, too short for one sequence, unreadable).
    #[error("training data: {0}")]
    Data(String),
    /// A differential-privacy parameter, mechanism or budget refused the operation.
    #[error(transparent)]
    Privacy(#[from] starling_privacy::PrivacyError),
    /// Training diverged: the loss or a gradient became NaN or infinite.
    #[error("training diverged at step {step}: {what} is not finite")]
    Diverged {
        /// The optimizer step at which it happened.
        step: usize,
        /// Which quantity was not finite.
        what: String,
    },
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
