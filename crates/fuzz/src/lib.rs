//! Mutation fuzzing of the readers sqil runs on files it did not make, on stable Rust (no
//! libFuzzer, so it runs on this project's machines and in CI): each target takes bytes and must
//! answer with a value or an error, never a panic, an abort or a hang.
//!
//! Inputs are the seed corpus (`testdata/fuzz/<target>/`) mutated: bit flips, interesting bytes,
//! truncation, inserted and duplicated runs, splices of two seeds, and for text targets numbers
//! replaced by huge ones. A panic is caught (`catch_unwind`) and the input saved; every input is
//! also written to `<out>/<target>.current` before it runs, so an abort or a hang (a watchdog
//! thread stops the process after a time limit) leaves it behind. The address space is capped
//! (`RLIMIT_AS`) so an allocation a size check missed fails fast instead of swapping.
//! `testdata/fuzz/regressions/<target>/` keeps inputs that once failed (replayed by the tests).

use std::path::{Path, PathBuf};

/// The fuzz targets, by name.
pub const TARGETS: &[&str] = &["onnx", "ir", "npy", "demos", "artifact"];

/// Runs target `name` on `bytes` (a file `scratch` for the readers that take paths). Errors are
/// fine; only panics, aborts and hangs are failures.
pub fn run_target(name: &str, bytes: &[u8], scratch: &Path) {
    match name {
        "onnx" => {
            if let Ok(mut g) = sqil_onnx::load_model_bytes(bytes, None) {
                if sqil_ir::verify(&g).is_ok() {
                    // What quantize and compile run first (constant folding evaluates ops).
                    let _ = sqil_passes::cleanup_pipeline().run(&mut g, &mut sqil_passes::PassCtx::default());
                }
            }
        }
        "ir" => {
            if let Ok(g) = sqil_ir::parse_graph(&String::from_utf8_lossy(bytes)) {
                if sqil_ir::verify(&g).is_ok() {
                    let _ = sqil_ir::print_graph(&g, &sqil_ir::PrintOptions::default());
                }
            }
        }
        "npy" => {
            let p = scratch.with_extension("npy");
            if std::fs::write(&p, bytes).is_ok() {
                let _ = sqil_driver::npy::read(&p);
            }
        }
        "demos" => {
            let p = scratch.with_extension("npz");
            if std::fs::write(&p, bytes).is_ok() {
                if let Ok(d) = sqil_data::Demos::load(&p) {
                    let _ = d.action_box(d.actions.as_ref().map_or(1, |a| a.ncols()));
                    let _ = d.episodes();
                }
            }
        }
        "artifact" => {
            if let Ok(p) = sqil_runtime::Policy::from_bytes(bytes, "fuzz") {
                // Run it once on zeros (shapes from the artifact's own graph).
                let sizes = p.input_sizes();
                if sizes.len() == 1 && sizes[0] > 0 && sizes[0] < 1 << 20 {
                    let _ = p.act(&vec![0.0; sizes[0]], 1);
                }
            }
        }
        _ => panic!("unknown fuzz target `{name}`"),
    }
}

/// xorshift64*: the fuzzer's only randomness (reproducible from `--seed`).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed` (with `other` for splices).
pub fn mutate(r: &mut Rng, seed: &[u8], other: &[u8], text: bool) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        let n = v.len();
        match r.below(if text { 9 } else { 8 }) {
            0 if n > 0 => {
                let i = r.below(n);
                v[i] ^= 1 << r.below(8);
            }
            1 if n > 0 => {
                let i = r.below(n);
                v[i] = [0u8, 0xff, 0x7f, 0x80, 0x01, b'9', b'-', b'{'][r.below(8)];
            }
            2 if n > 0 => v.truncate(r.below(n)),
            3 => {
                let at = r.below(n + 1);
                let k = 1 + r.below(16);
                let ins: Vec<u8> = (0..k).map(|_| r.next_u64() as u8).collect();
                v.splice(at..at, ins);
            }
            4 if n > 1 => {
                // Duplicate a run.
                let a = r.below(n);
                let b = (a + 1 + r.below(64)).min(n);
                let run = v[a..b].to_vec();
                let at = r.below(n + 1);
                v.splice(at..at, run);
            }
            5 if n > 1 => {
                let a = r.below(n);
                let b = (a + 1 + r.below(64)).min(n);
                v.drain(a..b);
            }
            6 if !other.is_empty() => {
                // Splice: this input's head, the other's tail.
                let a = r.below(n + 1);
                let b = r.below(other.len());
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            7 if n >= 8 => {
                // A little-endian integer field set to an extreme.
                let i = r.below(n - 7);
                let x: u64 = [u64::MAX, 1 << 40, 1 << 31, 0, u32::MAX as u64][r.below(5)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ if text => {
                // A number in the text made huge.
                let digits: Vec<usize> = (0..n).filter(|&i| v[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let at = digits[r.below(digits.len())];
                    let big = ["1000000000000", "99999999999999999999", "0", "-1", "4294967296"][r.below(5)];
                    v.splice(at..at + 1, big.bytes());
                }
            }
            _ => {}
        }
    }
    v
}

/// The seed files of a target.
pub fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b))).collect()
}

/// Caps this process's address space (bytes), so an unchecked huge allocation fails at once.
pub fn cap_memory(bytes: u64) {
    // SAFETY: setrlimit with a valid struct; lowering the soft limit only.
    unsafe {
        let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: libc::RLIM_INFINITY };
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}
