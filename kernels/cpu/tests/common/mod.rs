//! Helpers the kernel tests share.

/// A xorshift stream from `seed`.
#[allow(dead_code)] // not every test binary draws values
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// `n` values from a xorshift of `seed`: uniform in [-2, 2), and with `specials` now and then a
/// NaN, an infinity of either sign, a signed zero or a zero.
#[allow(dead_code)] // not every test binary draws values
pub fn values(seed: u64, n: usize, specials: bool) -> Vec<f32> {
    let mut next = xorshift(seed);
    (0..n)
        .map(|_| {
            let s = next();
            match (specials, s % 61) {
                (true, 0) => f32::NAN,
                (true, 1) => f32::INFINITY,
                (true, 2) => -0.0,
                (true, 4) => f32::NEG_INFINITY,
                (_, 3) => 0.0,
                _ => ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 * 4.0 - 2.0,
            }
        })
        .collect()
}

/// Runs `tests` (exact names) of this test binary again in a child process with
/// `SQIL_ISA=avx2`, so the 8-lane forms are checked on a CPU that would dispatch to AVX-512; does
/// nothing inside that child or on a CPU without AVX2.
#[allow(dead_code)] // not every test binary reruns itself
pub fn rerun_under_avx2(tests: &[&str]) {
    if std::env::var_os("SQIL_ISA").is_some() || !std::is_x86_feature_detected!("avx2") {
        return;
    }
    let me = std::env::current_exe().expect("the test binary");
    let status = std::process::Command::new(me)
        .arg("--exact")
        .args(tests)
        .env("SQIL_ISA", "avx2")
        .status()
        .expect("the test binary runs");
    assert!(status.success(), "the AVX2 forms differ (SQIL_ISA=avx2): {tests:?}");
}
