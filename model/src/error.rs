//! The library's error type: every variant names the file or input it is about, so the CLI can print one
//! line a user can act on.

use std::path::PathBuf;

/// Errors from loading, preprocessing and running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `config.json` is missing, malformed or describes something we cannot run.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weight file is malformed, or a tensor is missing, unexpected or of the wrong shape.
    #[error("{path}: {message}")]
    Weights {
        /// The weight file (or the model folder when no single file is at fault).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer is missing or cannot be built.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file or model folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image cannot be decoded or used.
    #[error("{path}: {message}")]
    Image {
        /// The image file (or a description of where the bytes came from).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A prompt or generation request that cannot be run (too long, bad ids, …).
    #[error("{0}")]
    Input(String),
    /// The prompt does not fit the model's context.
    #[error(
        "context overflow: the prompt needs {needed} positions but the context holds {capacity}"
    )]
    ContextOverflow {
        /// Positions the prompt needs (image embeddings included).
        needed: usize,
        /// The context length.
        capacity: usize,
    },
    /// The model would not fit in the memory available.
    #[error("{path}: {message}")]
    Memory {
        /// The model folder.
        path: PathBuf,
        /// What it needs, what is available, and what would fit.
        message: String,
    },
    /// The selected device cannot be used.
    #[error("device: {0}")]
    Device(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    /// A config error about `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    /// A weights error about `path`.
    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
    /// A tokenizer error about `path`.
    pub fn tokenizer(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Tokenizer {
            path: path.into(),
            message: message.into(),
        }
    }
    /// An image error about `path`.
    pub fn image(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Image {
            path: path.into(),
            message: message.into(),
        }
    }
}
