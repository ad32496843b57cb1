//! sqil as a library (the driver): load a model, quantize it with a PTQ recipe, compile it (SIS,
//! QRD fine-tuning, candidate selection, lowering, artifacts), allocate bit widths, build back-end
//! outputs, benchmark. The `sqil` command line is clap over these functions; build scripts and the
//! Python package call them directly.

pub mod allocate;
pub mod bench;
pub mod build;
pub mod compile;
pub mod error;
pub mod feeds;
pub mod inspect;
pub mod npy;
pub mod quantize;

pub use error::{Error, Result};
use sqil_ir::Graph;
use std::path::Path;

/// Loads an ONNX model or IR text (`.sqil`), by extension, and verifies it.
pub fn load_model(path: &Path) -> crate::Result<Graph> {
    let g = if path.extension().is_some_and(|e| e == "sqil") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        sqil_ir::parse_graph(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        sqil_onnx::load_model(path)?
    };
    sqil_ir::verify(&g).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(g)
}
