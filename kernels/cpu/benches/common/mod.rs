//! Helpers the kernel benchmarks share: flags, timing, a seeded generator.

use std::time::Instant;

/// The value after `--name` on the command line, or `default`.
#[allow(dead_code)] // not every benchmark takes flags
pub fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Best of `reps` timings of `f` after one untimed call, in seconds.
#[allow(dead_code)] // not every benchmark times single calls
pub fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best of three timings of `reps` calls of `f` (after one untimed call), in microseconds per
/// call: for kernels too short to time one call at a time.
#[allow(dead_code)] // not every benchmark times runs of calls
pub fn best_per_call_us(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64 * 1e6
        })
        .fold(f64::INFINITY, f64::min)
}

/// A xorshift generator from a fixed seed (the same weights in every run).
#[allow(dead_code)] // not every benchmark draws random weights
pub fn xorshift() -> impl FnMut() -> u64 {
    let mut seed = 0x9e3779b97f4a7c15u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
