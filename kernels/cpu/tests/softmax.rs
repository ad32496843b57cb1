//! sqil's softmax exponential and row softmax (and LogSoftmax): accuracy against libm, and the
//! dispatched (AVX2, AVX-512) rows equal to the plain definition bit for bit.

use sqil_kernels_cpu::generic::{
    exp_nonpos, generic_log_softmax_rows, generic_softmax_rows, log_softmax_rows, softmax_rows,
};

/// Uniform values in [0, 1) from a xorshift generator seeded with `state`.
fn uniform(mut state: u64) -> impl FnMut() -> f64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn exp_nonpos_is_within_two_ulps_of_libm() {
    let mut worst = 0u64;
    for i in 0..=2_000_000u64 {
        let x = -707.9 * i as f64 / 2_000_000.0;
        let (a, b) = (exp_nonpos(x), x.exp());
        worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
    }
    assert!(worst <= 2, "worst difference {worst} ulps");
    assert_eq!(exp_nonpos(0.0), 1.0);
    assert_eq!(exp_nonpos(-0.0), 1.0);
    assert_eq!(exp_nonpos(-708.0), 0.0);
    assert_eq!(exp_nonpos(f64::NEG_INFINITY), 0.0);
    assert!(exp_nonpos(f64::NAN).is_nan());
}

#[test]
fn dispatched_softmax_rows_equal_the_definition() {
    let mut next = uniform(0x2545_f491_4f6c_dd1d);
    // Rows: one block, and several (blocks of 2048 values, the last short, rows not a multiple of
    // four).
    for (dim, rows) in
        [(1, 3), (3, 3), (4, 3), (7, 3), (8, 3), (9, 3), (31, 3), (1225, 3), (49, 107), (5, 1031), (64, 70), (3000, 3)]
    {
        for scale in [0.1, 5.0, 300.0] {
            let mut x: Vec<f32> = (0..rows * dim).map(|_| ((next() - 0.5) * scale) as f32).collect();
            if dim > 2 {
                x[1] = f32::NAN;
                x[dim + 2] = f32::NEG_INFINITY;
            }
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            softmax_rows(&x, dim, &mut a);
            generic_softmax_rows(&x, dim, &mut b);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                    "dim {dim} scale {scale} at {i}: {p} vs {q}"
                );
            }
            // LogSoftmax: the same rows.
            let (mut la, mut lb) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            log_softmax_rows(&x, dim, &mut la);
            generic_log_softmax_rows(&x, dim, &mut lb);
            for (i, (p, q)) in la.iter().zip(&lb).enumerate() {
                assert!(
                    p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                    "log: dim {dim} scale {scale} at {i}: {p} vs {q}"
                );
            }
            // A row without NaN sums to one.
            let row = &b[2 * dim..3 * dim];
            let total: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((total - 1.0).abs() < 1e-5 * dim as f64, "dim {dim}: sum {total}");
        }
    }
}

/// The vectorized sigmoid and tanh against their scalar definitions, bit for bit (NaN as NaN),
/// around tanh's polynomial threshold, at tiny, huge and special values; and against the textbook
/// forms with the platform's exp / tanh.
#[test]
fn sigmoid_and_tanh_f32_equal_their_definitions() {
    use sqil_kernels_cpu::generic::{sigmoid, sigmoid_f32, tanh, tanh_f32, TANH_SMALL};
    let t = TANH_SMALL as f32;
    let mut vals = spread(0x2545f4914f6cdd1d, 6000, 40.0);
    vals.extend([709.0, -709.0, t, -t, t * 0.999, t * 1.001]);
    let libm_sigmoid = |v: f64| if v >= 0.0 { 1.0 / (1.0 + (-v).exp()) } else { v.exp() / (1.0 + v.exp()) };
    check_map("sigmoid", &vals, sigmoid_f32, sigmoid, libm_sigmoid, 5);
    check_map("tanh", &vals, tanh_f32, tanh, f64::tanh, 6);
}

/// HardSwish's vector forms against its scalar definition, bit for bit (special values, every
/// remainder length of the four- and eight-lane loops).
#[test]
fn hard_swish_f32_equals_its_definition() {
    use sqil_kernels_cpu::generic::{hard_swish, hard_swish_f32};
    let mut vals = spread(11, 4000, 8.0);
    vals.extend([-3.0, 3.0, -2.9999998, 3.0000002, 6.0, -6.0]);
    for len in [vals.len(), 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33] {
        let x = &vals[..len];
        let mut got = vec![0f32; len];
        hard_swish_f32(x, &mut got);
        for (&g, &v) in got.iter().zip(x) {
            let want = hard_swish(v as f64) as f32;
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "hard_swish({v}): {g} vs {want}");
        }
    }
}

/// HardSwish's vector forms (`x / 6` as `x * (1/6)`) equal the definition on every f32. Half a
/// minute per ISA on one core: `cargo test --release -p sqil-kernels-cpu --test softmax --
/// --ignored` (and with `SQIL_ISA=avx2`).
#[test]
#[ignore]
fn hard_swish_f32_equals_its_definition_on_every_f32() {
    use sqil_kernels_cpu::generic::{hard_swish, hard_swish_f32};
    every_f32("hard_swish", hard_swish_f32, |v| hard_swish(v as f64) as f32);
}

/// Random f32 values: a third near zero (log-uniform down to 1e-12, both signs), the rest across
/// [-range, range], plus the special values.
fn spread(seed: u64, n: usize, range: f64) -> Vec<f32> {
    let mut s = seed;
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        30.0,
        -30.0,
        400.0,
        -400.0,
        800.0,
        -800.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
    ];
    for i in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 11) as f64 / (1u64 << 53) as f64;
        let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
        vals.push(if i % 3 == 0 { (10f64.powf(-12.0 * u) * sign) as f32 } else { ((u * 2.0 - 1.0) * range) as f32 });
    }
    vals
}

/// `simd` against `scalar` bit for bit (NaN as NaN) on every tail length, and the scalar
/// definition against `libm` (the textbook formula in f64 with the platform's functions): the
/// same f32 on all but `max_off` of the finite values.
fn check_map(
    name: &str,
    vals: &[f32],
    simd: impl Fn(&[f32], &mut [f32]),
    scalar: impl Fn(f64) -> f64,
    libm: impl Fn(f64) -> f64,
    max_off: usize,
) {
    // (8, 9, 40, 41: the eight-lane loops of the AVX-512 forms and their remainders.)
    for len in [vals.len(), 1, 3, 4, 5, 8, 9, 15, 16, 17, 33, 40, 41] {
        let x = &vals[..len];
        let mut got = vec![0f32; len];
        simd(x, &mut got);
        for (i, (&g, &v)) in got.iter().zip(x).enumerate() {
            let want = scalar(v as f64) as f32;
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{name} x[{i}] = {v}: {g} vs {want}"
            );
        }
    }
    let off: Vec<f32> = vals
        .iter()
        .copied()
        .filter(|&v| v.is_finite() && (libm(v as f64) as f32).to_bits() != (scalar(v as f64) as f32).to_bits())
        .collect();
    assert!(
        off.len() <= max_off,
        "{name}: {} values round differently from libm's, e.g. {:?}",
        off.len(),
        &off[..off.len().min(5)]
    );
}

#[test]
fn softplus_and_elu_f32_equal_their_definitions() {
    use sqil_kernels_cpu::generic::{elu, elu_f32, softplus, softplus_f32};
    let vals = spread(0x9e3779b97f4a7c15, 6000, 40.0);
    check_map("softplus", &vals, softplus_f32, softplus, |x| x.max(0.0) + (-x.abs()).exp().ln_1p(), 6);
    for alpha in [1.0f32, 0.3] {
        check_map(
            "elu",
            &vals,
            |x, y| elu_f32(x, alpha, y),
            |x| elu(x, alpha as f64),
            |x| if x < 0.0 { alpha as f64 * x.exp_m1() } else { x },
            6,
        );
    }
}

/// f32 values whose [`sigmoid`] in f64 lies within 4 units of the last place of an f32 halfway
/// point (the hardest cases for a faster form to round the same way), found by the exhaustive
/// search below over every f32 in (-80, 80).
/// (318 of them: mostly tiny values, where the result is nearly `0.5 + x / 4`; these are every
/// sixteenth of those, and the six others.)
const SIGMOID_NEAR_HALFWAY: [u32; 26] = [
    0x34000000, 0x36840000, 0x37020000, 0x37420000, 0x37810000, 0x37a10000, 0x37c10000, 0x37e10000, 0xb5100000,
    0xb6240000, 0xb6920000, 0xb6d20000, 0xb7090000, 0xb7290000, 0xb7490000, 0xb7690000, 0xb7848000, 0xb7948000,
    0xb7a48000, 0xb7b48000, 0x3a689801, 0x3b128604, 0x3d21bc81, 0xba928601, 0xbe104170, 0xbf1964d0,
];

/// The screened sigmoids (the AVX2 kernel's fast form, `sigmoid_screened`, and the AVX-512
/// kernel's, `sigmoid_screened_table`): each within 2^12 units of the last place of the definition
/// over a sweep of (-90, 90), so the margin of 2^16 holds with room; each screens out the values
/// whose definition lies nearly halfway between two f32 (a margin of 0 fails this); inside |x| < 80
/// each recomputes about one value in 4 096 (fewer than one in 1 000); and `sigmoid_f32` equals the
/// definition on the sweep bit for bit.
#[test]
fn screened_sigmoid_keeps_the_definitions_bits() {
    use sqil_kernels_cpu::generic::{sigmoid, sigmoid_f32, sigmoid_screened, sigmoid_screened_table, SCREEN_MARGIN};
    // Every 257th bit pattern from -90 to 90: about 8.4 million values.
    let (lo, hi) = (90f32.to_bits(), 90f32.to_bits());
    let mut vals: Vec<f32> = (0..lo).step_by(257).map(|b| -f32::from_bits(b)).collect();
    vals.extend((0..hi).step_by(257).map(f32::from_bits));
    type Screened = fn(f64) -> (f64, bool);
    let forms: [(&str, Screened); 2] = [("degree 10", sigmoid_screened), ("table", sigmoid_screened_table)];
    for (form, screened) in forms {
        let (mut worst, mut unsure) = (0u64, 0usize);
        for &v in &vals {
            let (y, sure) = screened(v as f64);
            let want = sigmoid(v as f64);
            if v.abs() < 80.0 {
                worst = worst.max(y.to_bits().abs_diff(want.to_bits()));
                unsure += !sure as usize;
            }
            if sure {
                assert_eq!((y as f32).to_bits(), (want as f32).to_bits(), "{form}: sigmoid({v:e}) screened as sure");
            }
        }
        assert!(worst < 1 << 12, "{form}: screened sigmoid {worst} units from the definition");
        assert!((SCREEN_MARGIN as u64) >= worst << 4, "{form}: margin {SCREEN_MARGIN} against {worst}");
        // Beyond |x| = 80 every value is recomputed (f32's subnormal outputs, infinities, NaN).
        let inside = vals.iter().filter(|v| v.abs() < 80.0).count();
        assert!((unsure as f64) < 1e-3 * inside as f64, "{form}: {unsure} of {inside} recomputed");
        for &b in &SIGMOID_NEAR_HALFWAY {
            let v = f32::from_bits(b);
            assert!(!screened(v as f64).1, "{form}: sigmoid({v:e}) is nearly halfway and was not screened");
        }
        eprintln!("screened sigmoid ({form}): worst {worst} units, {unsure} of {inside} recomputed");
    }
    vals.extend(SIGMOID_NEAR_HALFWAY.iter().map(|&b| f32::from_bits(b)));
    let mut got = vec![0f32; vals.len()];
    sigmoid_f32(&vals, &mut got);
    for (&g, &v) in got.iter().zip(&vals) {
        let want = sigmoid(v as f64) as f32;
        assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "sigmoid({v:e}): {g:e} vs {want:e}");
    }
}

/// ELU and softplus (screened: an estimate taken where the screen vouches for every lane of a
/// step, else the definition's vector form) and tanh equal to their definitions bit for bit on every 257th f32
/// from -90 to 90 (about 8.4 million values, so steps of both kinds), NaN as NaN, and at the edges
/// of the estimate's range.
#[test]
fn elu_softplus_and_tanh_keep_the_definitions_bits_on_a_dense_sweep() {
    use sqil_kernels_cpu::generic::{elu, elu_f32, softplus, softplus_f32, tanh, tanh_f32};
    let top = 90f32.to_bits();
    let mut vals: Vec<f32> = (0..top).step_by(257).map(|b| -f32::from_bits(b)).collect();
    vals.extend((0..top).step_by(257).map(f32::from_bits));
    vals.extend([0.0, -0.0, -0.5, 0.25, -0.25, 700.0, -700.0, -701.0, 351.0, f32::NAN, f32::INFINITY, -f32::INFINITY]);
    vals.extend([1e-40, -1e-40, 2e-38, -2e-38, 1.0 / 1024.0, -1.0 / 1024.0]);
    let mut got = vec![0f32; vals.len()];
    tanh_f32(&vals, &mut got);
    for (&g, &v) in got.iter().zip(&vals) {
        let want = tanh(v as f64) as f32;
        assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "tanh({v:e}): {g:e} vs {want:e}");
    }
    vals.extend([87.0, -87.0, 86.99999, -86.99999, 88.0, -88.0, 1e30, -1e30]);
    let mut got = vec![0f32; vals.len()];
    softplus_f32(&vals, &mut got);
    for (&g, &v) in got.iter().zip(&vals) {
        let want = softplus(v as f64) as f32;
        assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "softplus({v:e}): {g:e} vs {want:e}");
    }
    for alpha in [1.0f32, 0.3, 0.0] {
        elu_f32(&vals, alpha, &mut got);
        for (&g, &v) in got.iter().zip(&vals) {
            let want = elu(v as f64, alpha as f64) as f32;
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "elu {alpha} ({v:e}): {g:e} vs {want:e}"
            );
        }
    }
}

/// Every f32: `sigmoid_f32` equal to the definition, and the values within 4 units of halfway
/// listed (for `SIGMOID_NEAR_HALFWAY`). Minutes on one core: `cargo test --release -p
/// sqil-kernels-cpu --test softmax -- --ignored`.
#[test]
#[ignore]
fn sigmoid_f32_equals_the_definition_on_every_f32() {
    use sqil_kernels_cpu::generic::{sigmoid, sigmoid_f32};
    let (mut near, mut differ) = (vec![], 0u64);
    let chunk = 1 << 20;
    let mut got = vec![0f32; chunk];
    for start in (0..=u32::MAX as u64).step_by(chunk) {
        let vals: Vec<f32> = (start..start + chunk as u64).map(|b| f32::from_bits(b as u32)).collect();
        sigmoid_f32(&vals, &mut got);
        for (&g, &v) in got.iter().zip(&vals) {
            let y = sigmoid(v as f64);
            let want = y as f32;
            if !(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan())) {
                differ += 1;
            }
            let low = (y.to_bits() & ((1 << 29) - 1)) as i64;
            if v.abs() < 80.0 && (low - (1 << 28)).abs() <= 4 {
                near.push(v.to_bits());
            }
        }
    }
    eprintln!("near halfway: {near:#x?}");
    assert_eq!(differ, 0, "{differ} values differ from the definition");
}

/// Erf and Gelu (erf form) on f32 against their definitions with `libm::erf`, bit for bit:
/// a sweep of every 97th f32 across (-8, 8) (each regime of fdlibm's erf, the vectorized ones
/// and the fallback), tiny values, signed zeros, infinities, NaN, every tail length.
#[test]
fn erf_and_gelu_f32_equal_their_definitions() {
    use sqil_kernels_cpu::generic::{erf_f32, erf_lanes, gelu_erf_f32};
    // In f64 first: the vectorized regimes are fdlibm's operations, so every f64 result is
    // libm's bit for bit (a coefficient off by one unit fails this).
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        let x: [f64; 8] = std::array::from_fn(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 3.0 * if s & 2 == 0 { 1.0 } else { 1e-3 }
        });
        let got = erf_lanes(&x);
        for (g, v) in got.iter().zip(x) {
            assert_eq!(g.to_bits(), libm::erf(v).to_bits(), "erf({v:e}) in f64");
        }
    }
    let top = 8f32.to_bits();
    let mut vals: Vec<f32> = (0..top).step_by(97).flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)]).collect();
    vals.extend([0.0, -0.0, 1e-30, -1e-30, 3e-9, -3e-9, 0.84375, -0.84375, 1.25, -1.25, 6.0, -6.0, 40.0, -40.0]);
    vals.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::MIN]);
    let erf = |v: f32| libm::erf(v as f64) as f32;
    let gelu = |v: f32| {
        let x = v as f64;
        (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
    };
    check_tails("erf", &vals, erf_f32, erf);
    check_tails("gelu", &vals, gelu_erf_f32, gelu);
}

/// Every f32: Erf and Gelu's vector forms equal their definitions (minutes on one core: `cargo
/// test --release -p sqil-kernels-cpu --test softmax -- --ignored`).
#[test]
#[ignore]
fn erf_and_gelu_f32_equal_their_definitions_on_every_f32() {
    use sqil_kernels_cpu::generic::{erf_f32, gelu_erf_f32};
    every_f32("erf", erf_f32, |v| libm::erf(v as f64) as f32);
    every_f32("gelu", gelu_erf_f32, |v| {
        let x = v as f64;
        (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
    });
}

/// Gelu's tanh form on f32 against its definition (`gelu_tanh`, the platform's tanh), bit for
/// bit: a sweep of every 97th f32 across (-12, 12), tiny values, signed zeros, infinities, NaN,
/// huge values, the two nearest-halfway inputs, every tail length. The sweep fails if the
/// cancellation guard (`1 + tanh >= 0.5`) is dropped; a margin of 0 does not fail it (the
/// screened values stay on the definition's side of every halfway point met), and is caught by
/// the sigmoid's test through the shared screen (`far_from_halfway`).
#[test]
fn gelu_tanh_f32_equals_its_definition() {
    use sqil_kernels_cpu::generic::{gelu_tanh, gelu_tanh_f32};
    let top = 12f32.to_bits();
    let mut vals: Vec<f32> = (0..top).step_by(97).flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)]).collect();
    vals.extend([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 3e-9, -3e-9, 40.0, -40.0, 1e20, -1e20]);
    vals.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::MIN]);
    // The only f32 (a search over all of them) where 1 + tanh >= 0.5 and the definition lies within
    // 2 units of an f32 halfway point.
    vals.extend([f32::from_bits(0x37b0_a46f), f32::from_bits(0xb7b0_a46f)]);
    check_tails("gelu_tanh", &vals, gelu_tanh_f32, |v| gelu_tanh(v as f64) as f32);
}

/// Every f32: tanh's vector form (eight f64 lanes on AVX-512, four on AVX2) equals its definition
/// (minutes on one core, `--ignored`).
#[test]
#[ignore]
fn tanh_f32_equals_its_definition_on_every_f32() {
    use sqil_kernels_cpu::generic::{tanh, tanh_f32};
    every_f32("tanh", tanh_f32, |v| tanh(v as f64) as f32);
}

/// Every f32: ELU's screened vector form (alpha 1) equals its definition (minutes on one core,
/// `--ignored`).
#[test]
#[ignore]
fn elu_f32_equals_its_definition_on_every_f32() {
    use sqil_kernels_cpu::generic::{elu, elu_f32};
    every_f32("elu", |x, o| elu_f32(x, 1.0, o), |v| elu(v as f64, 1.0) as f32);
}

/// Every f32: Gelu's tanh form equals its definition (minutes on one core, `--ignored`).
#[test]
#[ignore]
fn gelu_tanh_f32_equals_its_definition_on_every_f32() {
    use sqil_kernels_cpu::generic::{gelu_tanh, gelu_tanh_f32};
    every_f32("gelu_tanh", gelu_tanh_f32, |v| gelu_tanh(v as f64) as f32);
}

/// `f` against `def` bit for bit (NaN as NaN) on `vals` and on tails of it of every remainder
/// length of the vector loops.
fn check_tails(name: &str, vals: &[f32], f: fn(&[f32], &mut [f32]), def: impl Fn(f32) -> f32) {
    for len in [vals.len(), 1, 7, 8, 9, 17] {
        let x = &vals[vals.len() - len..];
        let mut got = vec![0f32; len];
        f(x, &mut got);
        for (&g, &v) in got.iter().zip(x) {
            let want = def(v);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{name}({v:e}): {g:e} vs {want:e}");
        }
    }
}

/// `f` against `def` on every f32, bit for bit (NaN as NaN).
fn every_f32(name: &str, f: fn(&[f32], &mut [f32]), def: impl Fn(f32) -> f32) {
    let chunk = 1 << 20;
    let mut got = vec![0f32; chunk];
    let mut differ = 0u64;
    for start in (0..=u32::MAX as u64).step_by(chunk) {
        let vals: Vec<f32> = (start..start + chunk as u64).map(|b| f32::from_bits(b as u32)).collect();
        f(&vals, &mut got);
        for (&a, &v) in got.iter().zip(&vals) {
            let w = def(v);
            differ += !(a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan())) as u64;
        }
    }
    assert_eq!(differ, 0, "{name}: {differ} values differ from the definition");
}

/// The dispatched LayerNorm rows (AVX2: four rows' sums interleaved, four outputs per vector)
/// against the definition, bit for bit (NaN as NaN): every remainder of rows by four and of
/// values by four, a NaN and an infinity in some rows, the statistics too.
#[test]
fn dispatched_layer_norm_equals_the_definition() {
    use sqil_kernels_cpu::generic::{layer_norm_f32, layer_norm_rows};
    let vals = spread(0x9e37_79b9, 40_000, 30.0);
    let same =
        |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()));
    for inner in [1, 3, 4, 5, 7, 8, 49, 255, 256] {
        for outer in [1, 3, 4, 5, 9] {
            let mut x = vals[..inner * outer].to_vec();
            if outer > 3 {
                x[inner] = f32::NAN;
                x[3 * inner + inner / 2] = f32::INFINITY;
            }
            let s: Vec<f64> = (0..inner).map(|j| vals[40_000 - 1 - j] as f64 / 7.0).collect();
            let b: Vec<f64> = (0..inner).map(|j| vals[30_000 + j] as f64 / 3.0).collect();
            let (mut got, mut want) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            let (gm, gi) = layer_norm_f32(&x, (inner, outer), (&s, &b), 1e-5, &mut got);
            let (wm, wi) = layer_norm_rows(&x, (inner, outer), (&s, &b), 1e-5, &mut want, |t| t as f32);
            assert!(same(&got, &want), "inner {inner} outer {outer}: outputs differ");
            let same64 = |a: &[f64], b: &[f64]| {
                a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
            };
            assert!(same64(&gm, &wm) && same64(&gi, &wi), "inner {inner} outer {outer}: statistics differ");
        }
    }
}

/// SiLU then a FakeQuant in one pass (`silu_fake_quant_in_place`: with AVX-512 the level from an
/// f32 estimate, taken only where its error cannot move it) equals the two ops' definitions
/// (`post_one`), bit for bit: around every half-way point of the quantizer's levels that
/// `x sigmoid(x) / scale` crosses (the roots found in f64 on both monotonic branches, then the
/// 129 f32 values around each), random values, the clamp's bounds, and NaN, infinities, zeros,
/// subnormals and |x| near 30, for quantizers from saturating (tiny scales) to all-zero (huge),
/// at lengths off the vector width.
#[test]
fn silu_then_fake_quant_equals_the_two_ops() {
    use sqil_kernels_cpu::generic::silu_fake_quant_in_place;
    use sqil_kernels_cpu::Post;
    let silu = |x: f64| x / (1.0 + (-x).exp());
    // Bisection for silu(x) = t on [a, b] where silu is monotonic.
    let root = |t: f64, (mut a, mut b): (f64, f64)| {
        let up = silu(b) > silu(a);
        for _ in 0..200 {
            let m = 0.5 * (a + b);
            if (silu(m) < t) == up {
                a = m;
            } else {
                b = m;
            }
        }
        0.5 * (a + b)
    };
    let quantizers = [
        (0.013f32, -3.0f32, -128.0f32, 127.0f32),
        (0.05, 128.0, 0.0, 255.0),
        (0.002, 0.0, -8.0, 7.0),
        (0.4, 1.0, -128.0, 127.0),
        (3e-7, 0.0, -128.0, 127.0),
        (1e30, 0.0, -128.0, 127.0),
    ];
    let mut checked = 0;
    for &(scale, zero, lo, hi) in &quantizers {
        let mut xs: Vec<f32> = SPECIAL.to_vec();
        xs.extend([29.99, 30.0, 30.01, -29.99, -30.0, -30.01, 1e30, -1e30, 88.0, -88.0, 104.0, -104.0]);
        // The estimate's domain ends at |x| = 80; around it, and tiny products near its negative end.
        xs.extend([79.99, 80.0, 80.01, -79.99, -80.0, -80.01, -50.0, -65.5, -75.25]);
        xs.extend(evenly(4_000, 80.0));
        // Half-way points k + 1/2 (in quotient units) of the levels in and around the clamp.
        for k in (lo - zero - 3.0) as i64..=(hi - zero + 3.0) as i64 {
            let t = (k as f64 + 0.5) * scale as f64;
            let mut roots = vec![];
            if t > -0.2784 {
                roots.push(root(t, (-1.2785, 40.0)));
            }
            if (-0.2784..0.0).contains(&t) {
                roots.push(root(t, (-60.0, -1.2785)));
            }
            for r in roots {
                let c = r as f32;
                for d in -64i32..=64 {
                    xs.push(f32::from_bits(c.to_bits().wrapping_add_signed(d)));
                }
            }
        }
        xs.extend(evenly(20_000, 12.0));
        checked += op_then_quant_equals_the_two_ops(&xs, Post::Silu, (scale, zero, lo, hi), silu_fake_quant_in_place);
    }
    assert!(checked > 300_000, "{checked} values checked");
}

/// The values every through-the-level test starts from: NaN, the infinities, signed zeros and
/// subnormals.
const SPECIAL: [f32; 9] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39];

/// `n` values spread evenly at random over (-half, half) ([`uniform`] from a fixed seed).
fn evenly(n: usize, half: f64) -> Vec<f32> {
    let mut u = uniform(0x9e37_79b9_7f4a_7c15);
    (0..n).map(|_| (u() * 2.0 * half - half) as f32).collect()
}

/// `fused` (an op then the FakeQuant `q`, through the level) on `xs`, on all of them, all but 7
/// and the first 15, against `op` then the FakeQuant one value at a time (`post_one`), bit for
/// bit (NaN as NaN); returns how many values were checked.
fn op_then_quant_equals_the_two_ops(
    xs: &[f32],
    op: sqil_kernels_cpu::Post,
    q: (f32, f32, f32, f32),
    fused: fn(&mut [f32], (f32, f32, f32, f32)),
) -> usize {
    let (scale, zero, lo, hi) = q;
    let post = [op, sqil_kernels_cpu::Post::FakeQuant { scale, zero, lo, hi }];
    let bits = |v: f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
    let want: Vec<u32> = xs.iter().map(|&x| bits(sqil_kernels_cpu::post_one(x, &post))).collect();
    let mut checked = 0;
    for len in [xs.len(), xs.len() - 7, 15] {
        let mut got = xs[..len].to_vec();
        fused(&mut got, q);
        for (i, (g, w)) in got.iter().zip(&want[..len]).enumerate() {
            assert_eq!(
                bits(*g),
                *w,
                "{op:?}: x = {:e} ({:#x}), scale {scale}: got {g:e}, want {:e}",
                xs[i],
                xs[i].to_bits(),
                f32::from_bits(*w)
            );
        }
        checked += len;
    }
    checked
}

/// HardSwish then FakeQuant through the quantized level (`hard_swish_fake_quant_in_place`) equals
/// the two ops one value at a time (`post_one`), bit for bit: around every half-way point of the
/// quantizer's levels that `hard_swish(x) / scale` crosses (both roots of `x (x + 3) / 6 = t` on
/// (-3, 3) and `x = t` above 3, then the 129 f32 values around each), around -3 and 3 (the
/// clamp's corners), random values, and NaN, infinities, zeros, subnormals and huge values, for
/// quantizers from saturating (tiny scales) to all-zero (huge), at lengths off the vector width.
#[test]
fn hard_swish_then_fake_quant_equals_the_two_ops() {
    use sqil_kernels_cpu::generic::hard_swish_fake_quant_in_place;
    use sqil_kernels_cpu::Post;
    let quantizers = [
        (0.013f32, -3.0f32, -128.0f32, 127.0f32),
        (0.05, 128.0, 0.0, 255.0),
        (0.002, 0.0, -8.0, 7.0),
        (0.4, 1.0, -128.0, 127.0),
        (0.0235, -128.0, -128.0, 127.0),
        (3e-7, 0.0, -128.0, 127.0),
        (1e30, 0.0, -128.0, 127.0),
    ];
    let around = |xs: &mut Vec<f32>, c: f32| {
        for d in -64i32..=64 {
            xs.push(f32::from_bits(c.to_bits().wrapping_add_signed(d)));
        }
    };
    let mut checked = 0;
    for &(scale, zero, lo, hi) in &quantizers {
        let mut xs: Vec<f32> = SPECIAL.to_vec();
        xs.extend([1e30, -1e30, f32::MAX, f32::MIN]);
        for c in [3.0f32, -3.0, -1.5] {
            around(&mut xs, c);
        }
        for k in (lo - zero - 3.0) as i64..=(hi - zero + 3.0) as i64 {
            let t = (k as f64 + 0.5) * scale as f64;
            if t >= 3.0 {
                around(&mut xs, t as f32);
            } else if t > -0.375 {
                let d = (9.0 + 24.0 * t).sqrt();
                for r in [(-3.0 + d) / 2.0, (-3.0 - d) / 2.0] {
                    if r.abs() < 3.0 {
                        around(&mut xs, r as f32);
                    }
                }
            }
        }
        xs.extend(evenly(20_000, 8.0));
        checked += op_then_quant_equals_the_two_ops(
            &xs,
            Post::HardSwish,
            (scale, zero, lo, hi),
            hard_swish_fake_quant_in_place,
        );
    }
    assert!(checked > 300_000, "{checked} values checked");
}

/// Per-plane f64 sums (GlobalAveragePool's) equal the in-order fold from the same start, bit for
/// bit: 1-70 planes (the 32- and 8-plane vector blocks and the rest), 1-50 values per plane (the
/// 8-position blocks and the rest), -0.0 as the start, signed zeros, infinities, NaN and values
/// whose sums round.
#[test]
fn plane_sums_equal_the_fold() {
    use sqil_kernels_cpu::generic::plane_sums_f64;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for planes in 1..70usize {
        for il in [1usize, 2, 7, 8, 9, 15, 16, 17, 36, 49, 50] {
            let v: Vec<f32> = (0..planes * il)
                .map(|_| match next() % 97 {
                    0 => -0.0,
                    1 => f32::INFINITY,
                    2 if planes % 5 == 0 => f32::NAN,
                    _ => {
                        ((next() >> 11) as f64 / (1u64 << 53) as f64 * 2e3 - 1e3) as f32
                            * [1.0, 1e-7, 3e5][(next() % 3) as usize]
                    }
                })
                .collect();
            let init = -0.0f64;
            let want: Vec<u64> = v.chunks(il).map(|c| c.iter().fold(init, |a, &e| a + e as f64).to_bits()).collect();
            let mut got = vec![7.0f64; planes];
            plane_sums_f64(&v, il, init, &mut got);
            let canon = |x: f64| if x.is_nan() { u64::MAX } else { x.to_bits() };
            let want: Vec<u64> = want.iter().map(|&b| canon(f64::from_bits(b))).collect();
            assert_eq!(got.iter().map(|&x| canon(x)).collect::<Vec<_>>(), want, "{planes} planes of {il}");
        }
    }
}

/// The dispatched softmax against the definition, bit for bit, on 40 000 rows of attention-like
/// lengths and spreads (8 to 9 000 values), a row of one value repeated and rows spanning 75 below
/// their maximum. (Written for a screened AVX-512 form, which it caught with a shortened
/// polynomial; that form was slower than the exact one and was dropped.)
#[test]
fn softmax_rows_equal_the_definition_on_attention_rows() {
    let mut next = uniform(0x9e37_79b9_7f4a_7c15);
    for (dim, rows, scale) in [
        (49, 12000, 6.0),
        (50, 8000, 20.0),
        (8, 8000, 3.0),
        (17, 6000, 1.0),
        (300, 1000, 12.0),
        (1225, 200, 9.0),
        (9000, 4, 5.0),
    ] {
        let mut x: Vec<f32> = (0..rows * dim).map(|_| ((next() - 0.5) * scale) as f32).collect();
        x[..dim].iter_mut().for_each(|v| *v = 0.25);
        if rows > 2 {
            x[dim] = 40.0;
            x[dim + 1] = -34.9;
            x[2 * dim] = 40.0;
            x[2 * dim + 1] = -35.1;
        }
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        softmax_rows(&x, dim, &mut a);
        generic_softmax_rows(&x, dim, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!(p.to_bits() == q.to_bits(), "dim {dim} at row {} column {}: {p:e} vs {q:e}", i / dim, i % dim);
        }
    }
}

/// An f32 map over a slice (input, output).
type Form = fn(&[f32], &mut [f32]);

/// A screened f32 map's forms, `(name, function)`: the dispatched one, the scalar one, and the AVX2
/// and AVX-512 kernels where the CPU has them (wrapped, their instructions checked first).
macro_rules! forms {
    ($dispatched:ident, $generic:ident, $avx2:ident, $avx512:ident) => {{
        let mut forms: Vec<(&str, Form)> = vec![("dispatched", $dispatched), ("generic", $generic)];
        #[cfg(target_arch = "x86_64")]
        {
            fn avx2(x: &[f32], y: &mut [f32]) {
                // SAFETY: pushed only where the CPU has AVX2 and FMA; equal lengths.
                unsafe { sqil_kernels_cpu::x86_64::avx2::$avx2(x, y) }
            }
            fn avx512(x: &[f32], y: &mut [f32]) {
                // SAFETY: pushed only where the CPU has AVX-512 F, AVX2 and FMA; equal lengths.
                unsafe { sqil_kernels_cpu::x86_64::avx512::$avx512(x, y) }
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                forms.push(("avx2", avx2));
                if is_x86_feature_detected!("avx512f") {
                    forms.push(("avx512", avx512));
                }
            }
        }
        forms
    }};
}

/// Every form on `vals` and on every remainder length of the vector loops (its first values)
/// against `def` in f64 rounded to f32, bit for bit (NaN as NaN).
fn check_forms(vals: &[f32], def: fn(f64) -> f64, forms: Vec<(&str, Form)>) {
    for (name, f) in forms {
        for len in [vals.len(), 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 41] {
            let x = &vals[..len];
            let mut got = vec![0f32; len];
            f(x, &mut got);
            for (i, (&g, &v)) in got.iter().zip(x).enumerate() {
                let want = def(v as f64) as f32;
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{name} x[{i}] = {v:e}: {g:e} vs {want:e}"
                );
            }
        }
    }
}

/// `exp_f32` (dispatched), the AVX2 and AVX-512 forms where the CPU has them, and the scalar form
/// against the definition (libm's `exp` in f64, rounded to f32), bit for bit: one f32 in 331 of
/// each sign up to 104 (past both ends of the screen: subnormal, zero and infinite results), the
/// screen's ends, specials, and every remainder length of the vector loops.
#[test]
fn exp_f32_equals_its_definition() {
    use sqil_kernels_cpu::generic::{exp_f32, generic_exp_f32, EXP_SCREEN_HI, EXP_SCREEN_LO};
    let top = 104f32.to_bits();
    let mut vals: Vec<f32> = (0..top).step_by(331).flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)]).collect();
    let (lo, hi) = (EXP_SCREEN_LO as f32, EXP_SCREEN_HI as f32);
    vals.extend([lo, hi, lo.next_up(), hi.next_down(), 88.72, 88.73, -103.97, -104.0, 1e-40, -1e-40]);
    vals.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 0.0, -0.0]);
    check_forms(&vals, f64::exp, forms!(exp_f32, generic_exp_f32, avx2_exp_f32, avx512_exp_f32));
    // Most values in the screen's range are taken by it (the screen is not a fallback in disguise).
    let inside: Vec<f32> = vals.iter().copied().filter(|v| (lo..hi).contains(v)).collect();
    let taken = inside.iter().filter(|&&v| sqil_kernels_cpu::generic::exp_screened(v as f64).1).count();
    assert!(taken * 1000 >= inside.len() * 999, "{taken} of {}", inside.len());
}

/// `log_f32` (dispatched), the AVX2 and AVX-512 forms where the CPU has them, and the scalar form
/// against the definition (libm's `ln` in f64, rounded to f32), bit for bit: one positive f32 in
/// 577 over the whole range (subnormal to the largest), values around 1 and the halving point
/// sqrt(2), zeros, negatives and specials, every remainder length of the vector loops.
#[test]
fn log_f32_equals_its_definition() {
    use sqil_kernels_cpu::generic::{generic_log_f32, log_f32, log_screened};
    let mut vals: Vec<f32> = (1..f32::INFINITY.to_bits()).step_by(577).map(f32::from_bits).collect();
    let s2 = std::f32::consts::SQRT_2;
    for c in [1.0f32, s2, s2 / 2.0, 2.0, 0.5] {
        let mut v = c;
        for _ in 0..40 {
            vals.extend([v, v.next_up(), v.next_down()]);
            v = v.next_up().next_up();
        }
    }
    vals.extend([
        0.0,
        -0.0,
        -1.0,
        -1e-30,
        f32::MIN_POSITIVE,
        1e-45,
        f32::MAX,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    check_forms(&vals, f64::ln, forms!(log_f32, generic_log_f32, avx2_log_f32, avx512_log_f32));
    // Most positive finite values are taken by the screen.
    let pos: Vec<f32> = vals.iter().copied().filter(|v| *v > 0.0 && v.is_finite()).collect();
    let taken = pos.iter().filter(|&&v| log_screened(v as f64).1).count();
    assert!(taken * 1000 >= pos.len() * 999, "{taken} of {}", pos.len());
}
