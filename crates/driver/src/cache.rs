//! A content-addressed cache of SIS scores, so that compiles of one policy on one set of
//! demonstrations at several widths or recipes (or a `--resume`) score the states once.
//!
//! The key is a SHA-256 of everything the scores depend on: the float graph (its structure and
//! every constant's bytes), the perturbation settings, the device that ran the forward passes
//! (GPUs pick their own summation orders), the batch size, and every state's bytes. A file holds
//! the scores as little-endian f64 after a header naming the key and the count; anything that
//! does not match is ignored (and recomputed), never trusted.

use sha2::{Digest, Sha256};
use sqil_ir::{Graph, Op};
use sqil_passes::quant::Feeds;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"sqilsis1";

/// The default cache folder: `$SQIL_CACHE_DIR`, else `$XDG_CACHE_HOME/sqil`, else
/// `~/.cache/sqil`; `None` when none of them is set.
pub fn default_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("SQIL_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("sqil")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("sqil")))
}

/// The key of the SIS scores of `batches` (in order) under `g`, with `settings` (the
/// perturbation settings, device and batch size, as text).
pub fn sis_key(g: &Graph, batches: &[Feeds], settings: &str) -> sqil_ir::Result<String> {
    let mut h = Sha256::new();
    h.update(b"sqil-sis-v1\0");
    let text = sqil_ir::text::print_graph(g, &sqil_ir::text::PrintOptions { elide_over: Some(0), splat: false })?;
    h.update((text.len() as u64).to_le_bytes());
    h.update(text.as_bytes());
    for n in g.topo_order()? {
        if let Op::Const(t) = &g.node(n).op {
            let b = t.data.to_le_bytes();
            h.update(format!("{:?} {:?}", t.dtype(), t.shape).as_bytes());
            h.update((b.len() as u64).to_le_bytes());
            h.update(&b);
        }
    }
    h.update((settings.len() as u64).to_le_bytes());
    h.update(settings.as_bytes());
    for b in batches {
        let mut names: Vec<&String> = b.keys().collect();
        names.sort();
        for n in names {
            let t = &b[n];
            h.update((n.len() as u64).to_le_bytes());
            h.update(n.as_bytes());
            h.update(format!("{:?} {:?}", t.dtype(), t.shape).as_bytes());
            let bytes = t.data.to_le_bytes();
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn file(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("sis-{key}.bin"))
}

/// The `n` scores stored under `key`, if a complete file with that key is there.
pub fn load(dir: &Path, key: &str, n: usize) -> Option<Vec<f64>> {
    let bytes = std::fs::read(file(dir, key)).ok()?;
    let head = MAGIC.len() + key.len() + 8;
    if bytes.len() != head + 8 * n || &bytes[..8] != MAGIC || &bytes[8..8 + key.len()] != key.as_bytes() {
        return None;
    }
    let count = u64::from_le_bytes(bytes[head - 8..head].try_into().ok()?);
    if count != n as u64 {
        return None;
    }
    Some(bytes[head..].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Stores `scores` under `key` (atomically). A cache that cannot be written is said once and
/// otherwise ignored: it only saves time.
pub fn store(dir: &Path, key: &str, scores: &[f64]) {
    let mut bytes = Vec::with_capacity(MAGIC.len() + key.len() + 8 + 8 * scores.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(key.as_bytes());
    bytes.extend_from_slice(&(scores.len() as u64).to_le_bytes());
    scores.iter().for_each(|s| bytes.extend_from_slice(&s.to_le_bytes()));
    if let Err(e) = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|_| sqil_ir::write_atomic(&file(dir, key), &bytes).map_err(|e| e.to_string()))
    {
        eprintln!("note: the SIS cache {} could not be written ({e}); continuing without it", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqil_ir::Tensor;

    fn feeds(v: f32) -> Vec<Feeds> {
        vec![[("x".to_string(), Tensor::from_f32(vec![2, 3], vec![v; 6]).unwrap())].into_iter().collect()]
    }

    #[test]
    fn keys_follow_states_and_settings_and_files_round_trip() {
        let g = Graph::new("g");
        let k = sis_key(&g, &feeds(1.0), "patch 12").unwrap();
        assert_eq!(k, sis_key(&g, &feeds(1.0), "patch 12").unwrap());
        assert_ne!(k, sis_key(&g, &feeds(1.5), "patch 12").unwrap());
        assert_ne!(k, sis_key(&g, &feeds(1.0), "patch 8").unwrap());
        let dir = std::env::temp_dir().join(format!("sqil-cache-test-{}", std::process::id()));
        assert!(load(&dir, &k, 2).is_none());
        store(&dir, &k, &[0.25, 1e-9]);
        assert_eq!(load(&dir, &k, 2), Some(vec![0.25, 1e-9]));
        assert!(load(&dir, &k, 3).is_none(), "a count that differs is a miss");
        std::fs::write(file(&dir, &k), b"sqilsis1truncated").unwrap();
        assert!(load(&dir, &k, 2).is_none(), "a damaged file is a miss");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
