//! `sgemm`'s direct path (no packing, alpha 1, beta 0, k <= SGEMM_DIRECT_K) against matrixmultiply
//! itself, bit for bit: its FMA kernel sums each output in one chain over k from zero there; and the
//! policy GEMM (`sgemm_chain`) against its definition.

use proptest::prelude::*;
use sqil_kernels_cpu::generic::{sgemm_packed, SGEMM_DIRECT_K};
use sqil_kernels_cpu::{sgemm, sgemm_chain};

/// Uniform values in [-2, 2) from a xorshift of `seed`.
fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 * 4.0 - 2.0
    }
}

/// The policy GEMM's definition: `c[i][j]` one `mul_add` chain over p from +0 of `a[i * rsa +
/// p] * b[p * sb.0 + j * sb.1]` (c dense, `[m, n]`).
fn chain_definition(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    rsa: usize,
    b: &[f32],
    sb: (usize, usize),
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc = a[i * rsa + p].mul_add(b[p * sb.0 + j * sb.1], acc);
            }
            c[i * n + j] = acc;
        }
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn direct_sgemm_equals_matrixmultiply(seed in any::<u64>(), m in 1usize..13, k in 0usize..SGEMM_DIRECT_K + 1,
                                          n in 1usize..300, a_transposed in any::<bool>(), pad in 0usize..3) {
        let mut s = seed | 1;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Now and then a signed zero or an infinity among ordinary values.
            match s % 97 {
                0 => -0.0,
                1 => f32::INFINITY,
                _ => ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 * 4.0 - 2.0,
            }
        };
        let (rsa, csa) = if a_transposed { (1, m) } else { (k + pad, 1) };
        let a: Vec<f32> = (0..(m * k + pad * m).max(1)).map(|_| r()).collect();
        let rsb = n + pad;
        let b: Vec<f32> = (0..(k * rsb).max(1)).map(|_| r()).collect();
        let rsc = n + pad;
        let mut want = vec![7f32; m * rsc];
        let mut got = want.clone();
        sgemm_packed(m, k, n, 1.0, &a, (rsa, csa), &b, (rsb, 1), 0.0, &mut want, (rsc, 1));
        sgemm(m, k, n, 1.0, &a, (rsa, csa), &b, (rsb, 1), 0.0, &mut got, (rsc, 1));
        let bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }

    /// The policy GEMM on this CPU's kernels against its definition (one `mul_add` chain per
    /// output over k from +0), any k and any strides (b transposed included): bit for bit.
    #[test]
    fn policy_gemm_is_one_fma_chain_per_output(seed in any::<u64>(), m in 1usize..9, k in 0usize..600,
                                               n in 1usize..300, b_transposed in any::<bool>()) {
        let mut r = uniform(seed);
        let a: Vec<f32> = (0..(m * k).max(1)).map(|_| r()).collect();
        let b: Vec<f32> = (0..(k * n).max(1)).map(|_| r()).collect();
        let sb = if b_transposed { (1, k.max(1)) } else { (n, 1) };
        let want = chain_definition((m, k, n), &a, k, &b, sb);
        let mut got = vec![7f32; m * n];
        sgemm_chain(m, k, n, &a, (k, 1), &b, sb, &mut got, (n, 1));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Few columns and many rows (a GEMV: a squeeze-and-excitation 1 x 1 convolution, a float
    /// layer at batch 1): rows in blocks of eight through the register-transposed path and the
    /// rows past a multiple of eight by the narrow kernel, against the definition, bit for bit.
    #[test]
    fn policy_gemv_is_one_fma_chain_per_output(seed in any::<u64>(), m in 1usize..70, k in 0usize..300,
                                               n in 1usize..4, pad in 0usize..3) {
        let mut r = uniform(seed);
        let rsa = k + pad;
        let a: Vec<f32> = (0..(m * rsa).max(1)).map(|_| r()).collect();
        let b: Vec<f32> = (0..(k * n).max(1)).map(|_| r()).collect();
        let want = chain_definition((m, k, n), &a, rsa, &b, (n, 1));
        let mut got = vec![7f32; m * n];
        sgemm_chain(m, k, n, &a, (rsa, 1), &b, (n, 1), &mut got, (n, 1));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}
