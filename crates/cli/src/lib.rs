//! Library side of the `sqil` command line: the pieces its subcommands share with tests.

pub mod allocate;
pub mod bench;
pub mod build;
pub mod compile;
pub mod feeds;
pub mod inspect;
pub mod npy;
pub mod quantize;

use sqil_ir::Graph;
use std::path::Path;

/// Loads an ONNX model or IR text (`.sqil`), by extension, and verifies it.
pub fn load_model(path: &Path) -> Result<Graph, String> {
    let g = if path.extension().is_some_and(|e| e == "sqil") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        sqil_ir::parse_graph(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        sqil_onnx::load_model(path).map_err(|e| e.to_string())?
    };
    sqil_ir::verify(&g).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(g)
}
