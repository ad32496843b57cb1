//! `dequant_gemm` (a float layer's GEMM from its weight levels and scales) against the policy
//! GEMM (`sgemm_chain`) on the dequantized rows, bit for bit: random shapes, per-column scales or
//! groups (a last group cut short), inputs with NaN, infinities and signed zeros; again in a
//! child process with `SQIL_ISA=avx2` (the 8-lane form).

mod common;
use proptest::prelude::*;
use sqil_kernels_cpu::dequant::{dequant_gemm, DequantRows};
use sqil_kernels_cpu::sgemm_chain;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn levels_give_the_chains_of_the_dequantized_rows(
        seed in any::<u64>(), m in 1usize..6, k in 1usize..150, n in 1usize..300, group in prop::sample::select(vec![0usize, 32, 64]),
    ) {
        let groups = if group == 0 { 1 } else { k.div_ceil(group) };
        // The top four bits of a multiplicative hash: a level's low bits alone would repeat with
        // period 16 along i, and so from one group of 16 columns to the next.
        let q: Vec<i8> = (0..n * k).map(|i| ((((i as u64) ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as i8) - 8).collect();
        let scales: Vec<f32> = (0..n * groups).map(|i| 1e-3 + (((i as u64 * 40503) ^ seed) % 1000) as f32 * 1.7e-4).collect();
        let d = DequantRows::new(&q, &scales, n, k, group).expect("valid shapes");
        let rows: Vec<f32> = (0..k * n).map(|i| d.value(i / n, i % n)).collect();
        prop_assert!(d.reproduces(&rows));
        // Specials in one case of four: a NaN or an infinity turns a whole output row into NaN,
        // whatever the weights, so cases with them check little else.
        let x = common::values(seed, m * k, seed.is_multiple_of(4));
        let mut want = vec![0f32; m * n];
        sgemm_chain(m, k, n, &x, (k, 1), &rows, (n, 1), &mut want, (n, 1));
        let mut got = vec![f32::NAN; m * n];
        dequant_gemm(&d, &x, m, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "m{m} k{k} n{n} g{group}: {i}: {a} vs {b}");
        }
    }
}

#[test]
fn a_value_off_by_one_bit_is_not_reproduced() {
    let d = DequantRows::new(&[3, -8, 7, 1], &[0.1, 0.37], 2, 2, 0).expect("valid shapes");
    let mut rows: Vec<f32> = (0..4).map(|i| d.value(i / 2, i % 2)).collect();
    assert!(d.reproduces(&rows));
    rows[3] = f32::from_bits(rows[3].to_bits() + 1);
    assert!(!d.reproduces(&rows));
    assert!(DequantRows::new(&[1, 2, 3], &[0.5], 2, 2, 0).is_none(), "levels of the wrong length");
}

#[test]
fn the_avx2_form_agrees_too() {
    common::rerun_under_avx2(&["levels_give_the_chains_of_the_dequantized_rows"]);
}
