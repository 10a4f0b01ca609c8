//! The exporter's error type: every message is one line naming the file or tensor at fault.

use std::path::Path;

/// An export failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file is missing, unreadable or malformed.
    #[error("{path}: {msg}")]
    File {
        /// The file at fault.
        path: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// A checkpoint tensor is missing or has the wrong shape.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// Full tensor name as stored in the checkpoint.
        name: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// The configuration or an option is unsupported or inconsistent.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A file error.
    pub fn file(path: &Path, msg: impl Into<String>) -> Error {
        Error::File { path: path.display().to_string(), msg: msg.into() }
    }

    /// A tensor error.
    pub fn tensor(name: &str, msg: impl Into<String>) -> Error {
        Error::Tensor { name: name.to_string(), msg: msg.into() }
    }

    /// An invalid configuration or option.
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }
}

/// Result alias for the exporter.
pub type Result<T> = std::result::Result<T, Error>;
