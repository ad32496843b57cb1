//! File output shared by every crate that writes results: nothing is half-written.

use crate::error::{IrError, Result};
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file beside it (`<name>.<ext>.tmp`), then a
/// rename, so readers see the old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tmp = path.with_extension(format!("{ext}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| IrError::Invalid(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| IrError::Invalid(format!("{}: {e}", path.display())))
}
