//! Errors of the IR layer, in the three kinds of the house style: the user's input, unsupported
//! features, and internal bugs (verifier failures).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum IrError {
    /// The input (a model, a text file, a tensor) is malformed; the message names what and where.
    #[error("{0}")]
    Invalid(String),
    /// A well-formed input that sqil does not support (op, dtype, attribute value).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An invariant of the IR was broken: a bug in sqil, reported by the verifier.
    #[error("internal error: {0}")]
    Internal(String),
    /// An error with added context ("in node X", "after pass Y").
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<IrError>,
    },
}

impl IrError {
    /// Wraps the error with a context line.
    pub fn context(self, context: impl Into<String>) -> IrError {
        IrError::Context { context: context.into(), source: Box::new(self) }
    }

    /// The innermost error, past every context.
    pub fn root(&self) -> &IrError {
        match self {
            IrError::Context { source, .. } => source.root(),
            e => e,
        }
    }
}

pub type Result<T, E = IrError> = std::result::Result<T, E>;

/// Adds context to a `Result`'s error lazily.
pub trait ResultExt<T> {
    fn context_with(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context_with(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.context(f()))
    }
}

/// Returns early with an `IrError::Invalid` built from a format string.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::error::IrError::Invalid(format!($($t)*))) };
}
