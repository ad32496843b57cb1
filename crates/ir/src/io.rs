//! File output shared by every crate that writes results: nothing is half-written.

use crate::error::{IrError, Result};
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file beside it (`<name>.<ext>.tmp`), then a
/// rename, so readers see the old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tmp = path.with_extension(format!("{ext}.tmp"));
    // On any failure (a full disk, a vanished folder) the temporary file goes too.
    let fail = |e: std::io::Error, shown: &Path| {
        std::fs::remove_file(&tmp).ok();
        IrError::Invalid(format!("{}: {e}", shown.display()))
    };
    std::fs::write(&tmp, bytes).map_err(|e| fail(e, path))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(e, path))
}
