//! One error type for the library. Each variant names the file (or tool) and what was
//! expected, so the CLI can print a single actionable line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are not what the format promises (truncated, malformed).
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },

    #[error("{path}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("{path}: unknown architecture `{arch}` (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    /// Two parts of a model disagree (vocabulary vs embedding rows, tensor shapes, ...).
    #[error("{path}: {what}")]
    Mismatch { path: PathBuf, what: String },

    /// An external program the harness shells out to (pip, npm) is missing or failed.
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            what: what.into(),
        }
    }

    pub fn mismatch(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Mismatch {
            path: path.into(),
            what: what.into(),
        }
    }
}
