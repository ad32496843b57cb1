//! The CUDA back end's errors.

/// What can go wrong lowering or running a policy on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A step the GPU lowering does not support, or a policy it cannot take (one output,
    /// static shapes): names the step or the reason.
    #[error("{0}")]
    Unsupported(String),
    /// The CUDA driver, NVRTC or cuBLAS failed (or is absent): the call and its error.
    #[error("{0}")]
    Device(String),
    /// An IR error while tracing the plan's values.
    #[error(transparent)]
    Ir(#[from] sqil_ir::IrError),
}

impl From<String> for Error {
    fn from(s: String) -> Error {
        Error::Device(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Error {
        Error::Device(s.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
