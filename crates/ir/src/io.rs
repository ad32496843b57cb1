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

/// The FNV-1a 64 offset basis: the state to start [`fnv1a`] from.
pub const FNV1A_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bit, continuing from state `h` (start from [`FNV1A_START`]): the artifact checksum
/// and the checkpoint fingerprints.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
