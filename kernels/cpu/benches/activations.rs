//! The exact f32 sigmoid (`sigmoid_f32`: the definition's f64 logistic rounded to f32, by the
//! screened vector form with the definition for the lanes it cannot vouch for) on one core,
//! against the definition computed value by value, measured in the same run; outputs compared bit
//! for bit. Sizes: an EfficientNet-B0 block's depthwise output at 84 x 84 input (48 channels x 42
//! x 42) and a squeeze-and-excitation gate (1 152 channels). Then Erf and Gelu's erf form (against
//! `libm::erf`), Tanh, Elu and Softplus the same way (a transformer's feed-forward activations: 64 x 8 x 128
//! values; Erf and Gelu also on values spread about normally, Erf on the narrower spread of a
//! transformer's Gelu input).
//!
//!     cargo bench -p sqil-kernels-cpu --bench activations

mod common;
use common::best_per_call_us;
use sqil_kernels_cpu::generic::{
    elu, elu_f32, erf_f32, gelu_erf, gelu_erf_f32, sigmoid, sigmoid_f32, softplus, softplus_f32, tanh, tanh_f32,
};

fn main() {
    println!("exact sigmoid, one core, kernels {:?}", sqil_kernels_cpu::isa());
    for (n, what) in [(48 * 42 * 42, "48 x 42 x 42 activations"), (1152, "1 152 gates")] {
        // Pre-activations spread as a network's are: mostly within a few units of 0, some far.
        let x: Vec<f32> = (0..n).map(|i| (((i * 7919) % 10007) as f32 / 10007.0 - 0.5) * 12.0).collect();
        compare(what, &x, (50, 200), sigmoid_f32, sigmoid);
    }
    silu_levels();
    let n = 64 * 8 * 128;
    let x: Vec<f32> = (0..n).map(|i| (((i * 7919) % 10007) as f32 / 10007.0 - 0.5) * 8.0).collect();
    let elu1 = |x: &[f32], y: &mut [f32]| elu_f32(x, 1.0, y);
    type Pair = (fn(&[f32], &mut [f32]), fn(f64) -> f64);
    let forms: [(&str, Pair); 5] = [
        ("Erf", (erf_f32, libm::erf)),
        ("Gelu (erf)", (gelu_erf_f32, gelu_erf)),
        ("Tanh", (tanh_f32, tanh)),
        ("Elu", (elu1, |x| elu(x, 1.0))),
        ("Softplus", (softplus_f32, softplus)),
    ];
    for (what, (fast, def)) in forms {
        compare(&format!("{what}, {n} values in (-4, 4)"), &x, (20, 100), fast, def);
    }
    // A feed-forward layer's pre-activations as they mostly are: about normal, mean 0, sd 1
    // (twelve uniforms' sum less 6), where most of Erf's lanes are below 1.25.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let xn: Vec<f32> = (0..n).map(|_| (0..12).map(|_| uniform()).sum::<f32>() - 6.0).collect();
    for (what, (fast, def)) in forms.into_iter().take(2) {
        compare(&format!("{what}, {n} values about normal (0, 1)"), &xn, (20, 100), fast, def);
    }
    // Erf's input in Gelu's erf form after a layer norm (testdata's transformer: x / sqrt 2 with
    // x about normal, sd 0.4): every lane below 1.25, fdlibm's rational forms only.
    let xs: Vec<f32> = xn.iter().map(|v| v * 0.4).collect();
    compare(&format!("Erf, {n} values about normal (0, 0.4)"), &xs, (20, 100), forms[0].1 .0, forms[0].1 .1);
}

/// The vector form `fast` against the definition `def` value by value (`reps` calls each), the
/// outputs compared bit for bit.
fn compare(
    what: &str,
    x: &[f32],
    (def_reps, fast_reps): (usize, usize),
    fast: fn(&[f32], &mut [f32]),
    def: fn(f64) -> f64,
) {
    let n = x.len();
    let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
    let t_def = best_per_call_us(def_reps, || {
        for (o, &v) in want.iter_mut().zip(x) {
            *o = def(v as f64) as f32;
        }
    });
    let t_fast = best_per_call_us(fast_reps, || fast(x, &mut got));
    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "  {what}: definition {t_def:8.1} us, vector form {t_fast:7.1} us ({:.2} ns a value): {:.2}x, {}",
        t_fast * 1e3 / n as f64,
        t_def / t_fast,
        if same { "same bits" } else { "BITS DIFFER" }
    );
}

/// SiLU then the next layer's activation FakeQuant over an expansion's output (96 x 21 x 21, a
/// MobileNet / EfficientNet block at 84 x 84 input): `silu_fake_quant_in_place` (through the
/// quantized level where its estimate is sure) against the two ops one after the other
/// (`post_in_place`), outputs compared bit for bit.
fn silu_levels() {
    use sqil_kernels_cpu::generic::{post_in_place, silu_fake_quant_in_place, Post};
    let n = 96 * 21 * 21;
    let x: Vec<f32> = (0..n).map(|i| (((i * 7919) % 10007) as f32 / 10007.0 - 0.5) * 12.0).collect();
    let q = (0.05f32, 3.0f32, -128.0f32, 127.0f32);
    let ops = [Post::Silu, Post::FakeQuant { scale: q.0, zero: q.1, lo: q.2, hi: q.3 }];
    let (mut got, mut want) = (x.clone(), x.clone());
    let t_def = best_per_call_us(20, || {
        want.copy_from_slice(&x);
        // One at a time (the pair together would take the level form).
        post_in_place(&mut want, &ops[..1]);
        post_in_place(&mut want, &ops[1..]);
    });
    let t_fast = best_per_call_us(100, || {
        got.copy_from_slice(&x);
        silu_fake_quant_in_place(&mut got, q);
    });
    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "  SiLU then FakeQuant, 96 x 21 x 21: two ops {t_def:8.1} us, through the level {t_fast:7.1} us ({:.2} ns a value): {:.2}x, {}",
        t_fast * 1e3 / n as f64,
        t_def / t_fast,
        if same { "same bits" } else { "BITS DIFFER" }
    );
}
