//! The driver's error: what went wrong, typed by where it came from, each printing one line that
//! names the file, node or field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The graph, an op, a pass, the runtime or a back end (they all report `IrError`).
    #[error(transparent)]
    Ir(#[from] sqil_ir::IrError),
    /// A demonstration file.
    #[error(transparent)]
    Demos(#[from] sqil_data::DemosError),
    /// A file that could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// JSON written or read by the driver (reports, configs).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Anything else: bad arguments, inconsistent inputs, a failed check.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for Error {
    fn from(s: String) -> Error {
        Error::Invalid(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Error {
        Error::Invalid(s.to_string())
    }
}

/// The driver's result.
pub type Result<T> = std::result::Result<T, Error>;

/// For callers that report errors as text (the `sqil-policy` runner's plain `String` errors).
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}
