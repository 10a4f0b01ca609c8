//! The exporter's error type: every message is one line naming the file or tensor at fault.

use perceiver_edge_runtime::one_line;
use std::path::Path;

/// An export failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file is missing, unreadable or malformed.
    #[error("{}: {}", one_line(.path), one_line(.msg))]
    File {
        /// The file at fault.
        path: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// A checkpoint tensor is missing or has the wrong shape.
    #[error("tensor `{}`: {}", one_line(.name), one_line(.msg))]
    Tensor {
        /// Full tensor name as stored in the checkpoint.
        name: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// The configuration or an option is unsupported or inconsistent.
    #[error("{}", one_line(.0))]
    Invalid(String),
    /// An output file could not be written.
    #[error("{path}: cannot write: {reason}")]
    Write {
        /// The file that was to be written.
        path: String,
        /// The I/O failure (text, so that an error chain does not print it twice).
        reason: String,
    },
    /// Running a graph (calibration, analysis) or reading its data failed in the runtime.
    #[error(transparent)]
    Runtime(#[from] perceiver_edge_runtime::Error),
    /// A precision name that is not known.
    #[error(transparent)]
    Precision(#[from] perceiver_edge_runtime::precision::UnknownPrecision),
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

    /// A failed write of `path`.
    pub fn write(path: &Path, source: std::io::Error) -> Error {
        let reason = perceiver_edge_runtime::fsio::missing_folder(path, source).to_string();
        Error::Write { path: path.display().to_string(), reason }
    }

    /// An invalid configuration or option.
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }
}

/// Result alias for the exporter.
pub type Result<T> = std::result::Result<T, Error>;
