//! The state-importance score (SQIL): `S(s, k) = 1/2 ||pi(s) - pi(phi(s, k))||^2` and
//! `SIS(s) = mean_k S(s, k)`, with the full-precision policy. Perturbations `phi(s, k)`
//! ([`SisConfig`]):
//! - a vector input `[B, D]` (or a history `[B, H, D]`): position k is one dimension, or one named
//!   group of dimensions (`groups`), replaced by its dataset mean (default), or shifted by seeded
//!   Gaussian noise `scale * std_k * z` (`VectorPerturb::Noise`), in every history step;
//! - an image input `[B, C, H, W]`: position k is the k-th `patch x patch` square, occluded with
//!   the dataset's per-channel mean (default) or replaced by the same square of the image blurred
//!   with a Gaussian of `sigma` pixels (`ImagePerturb::Blur`).
//!
//! For a multi-input policy the positions of all inputs are enumerated in turn. All
//! perturbations of a batch of states run in one interpreter call.

use sqil_ir::interp::Interpreter;
use sqil_ir::{Graph, IrError, Result, Tensor};
use std::collections::HashMap;

pub type Feeds = HashMap<String, Tensor>;

/// What replaces an image patch.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum ImagePerturb {
    /// The dataset's per-channel mean.
    Occlude,
    /// The patch of the image blurred by a Gaussian of `sigma` pixels (separable, clamped edges).
    Blur { sigma: f32 },
}

/// What replaces a vector dimension (or group).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum VectorPerturb {
    /// The dataset mean of each dimension.
    Mean,
    /// `x_k + scale * std_k * z`, `z` standard normal from a generator seeded by `seed` (one draw
    /// per state and position, the same on every run).
    Noise { scale: f32, seed: u64 },
}

/// How SIS perturbs states.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SisConfig {
    /// Side of the square image patches.
    pub patch: usize,
    pub image: ImagePerturb,
    pub vector: VectorPerturb,
    /// Groups of vector dimensions perturbed together (each group one position); dimensions in
    /// no group are their own position. Empty: every dimension alone.
    pub groups: Vec<Vec<usize>>,
}

impl Default for SisConfig {
    fn default() -> Self {
        SisConfig { patch: 12, image: ImagePerturb::Occlude, vector: VectorPerturb::Mean, groups: vec![] }
    }
}

/// Parses vector groups such as `0-2,3,4-6` (inclusive ranges, comma separated; `;` also separates).
pub fn parse_groups(spec: &str) -> Result<Vec<Vec<usize>>> {
    let mut out = vec![];
    for part in spec.split([',', ';']).map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || IrError::Invalid(format!("SIS groups: `{part}` is not an index or a range like 3-5"));
        let g: Vec<usize> = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if b < a {
                    return Err(bad());
                }
                (a..=b).collect()
            }
            None => vec![part.parse().map_err(|_| bad())?],
        };
        out.push(g);
    }
    Ok(out)
}

/// How one input is perturbed.
#[derive(Clone, Debug)]
enum Perturb {
    /// Groups of columns of the last axis; `mean` and `std` per column.
    Columns { groups: Vec<Vec<usize>>, mean: Vec<f32>, std: Vec<f32>, how: VectorPerturb },
    /// Square patches of an image; `mean` per channel.
    Patches { mean: Vec<f32>, patch: usize, how: ImagePerturb },
}

/// A standard normal draw from `(seed, a, b)` (Box-Muller on a splitmix64 hash).
fn normal(seed: u64, a: u64, b: u64) -> f32 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let h = mix(seed ^ mix(a ^ mix(b)));
    let u1 = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((mix(h) >> 11) as f64) / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// The image blurred by a separable Gaussian of `sigma` pixels per channel, edges clamped.
fn blur(img: &[f32], c: usize, h: usize, w: usize, sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil().max(1.0) as isize;
    let taps: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / norm).collect();
    let mut tmp = vec![0f32; img.len()];
    let mut out = vec![0f32; img.len()];
    for ch in 0..c {
        let base = ch * h * w;
        for y in 0..h {
            for x in 0..w {
                tmp[base + y * w + x] = (-r..=r)
                    .map(|i| {
                        taps[(i + r) as usize] * img[base + y * w + (x as isize + i).clamp(0, w as isize - 1) as usize]
                    })
                    .sum();
            }
        }
        for y in 0..h {
            for x in 0..w {
                out[base + y * w + x] = (-r..=r)
                    .map(|i| {
                        taps[(i + r) as usize] * tmp[base + (y as isize + i).clamp(0, h as isize - 1) as usize * w + x]
                    })
                    .sum();
            }
        }
    }
    out
}

impl Perturb {
    fn positions(&self, shape: &[usize]) -> usize {
        match self {
            Perturb::Columns { groups, .. } => groups.len(),
            Perturb::Patches { patch, .. } => shape[2].div_ceil(*patch) * shape[3].div_ceil(*patch),
        }
    }

    /// Applies perturbation `k` to state `state` (`row`: a flat slice of one sample; `blurred`:
    /// the blurred sample, for `Blur`).
    fn apply(&self, shape: &[usize], k: usize, state: u64, row: &mut [f32], blurred: Option<&[f32]>) {
        match self {
            Perturb::Columns { groups, mean, std, how } => {
                let d = mean.len();
                for h in 0..row.len() / d {
                    for &j in &groups[k] {
                        row[h * d + j] = match how {
                            VectorPerturb::Mean => mean[j],
                            VectorPerturb::Noise { scale, seed } => {
                                row[h * d + j] + scale * std[j] * normal(*seed, state, (k * d + j) as u64)
                            }
                        };
                    }
                }
            }
            Perturb::Patches { mean, patch, how } => {
                let (c, hh, ww) = (shape[1], shape[2], shape[3]);
                let per_row = ww.div_ceil(*patch);
                let (py, px) = (k / per_row * patch, k % per_row * patch);
                for (ch, &m) in mean.iter().enumerate().take(c) {
                    for y in py..(py + patch).min(hh) {
                        for x in px..(px + patch).min(ww) {
                            let i = (ch * hh + y) * ww + x;
                            row[i] = match (how, blurred) {
                                (ImagePerturb::Blur { .. }, Some(b)) => b[i],
                                _ => m,
                            };
                        }
                    }
                }
            }
        }
    }
}

fn sample_len(t: &Tensor) -> usize {
    t.shape[1..].iter().product()
}

/// SIS of every state of `batches` (in order) with the default perturbations (means, occlusion)
/// and `patch`-pixel image patches.
pub fn sis(fp: &Graph, batches: &[Feeds], patch: usize) -> Result<Vec<f64>> {
    sis_with(fp, batches, &SisConfig { patch, ..SisConfig::default() })
}

/// SIS of every state of `batches` (in order) under `cfg`.
pub fn sis_with(fp: &Graph, batches: &[Feeds], cfg: &SisConfig) -> Result<Vec<f64>> {
    let it = Interpreter::new(fp)?;
    sis_run(fp, batches, cfg, &mut |f: &Feeds| it.run(f).map(|mut o| o.remove(0)))
}

/// [`sis_with`] with the float policy's forward pass given as `run` (the policy's first output
/// for a batch of feeds): the interpreter, or the same graph lowered for a GPU.
pub fn sis_run(
    fp: &Graph,
    batches: &[Feeds],
    cfg: &SisConfig,
    run: &mut dyn FnMut(&Feeds) -> Result<Tensor>,
) -> Result<Vec<f64>> {
    let names: Vec<String> = fp.inputs.iter().map(|&i| fp.node(i).outputs[0].name.clone()).collect();
    // Dataset means (and standard deviations of vector dimensions) per input.
    let mut perturb = vec![];
    for n in &names {
        let first = &batches.first().ok_or_else(|| IrError::Invalid("SIS: no states".into()))?[n];
        let image = first.rank() == 4;
        let (groups, inner): (usize, usize) = if image {
            (first.shape[1], first.shape[2] * first.shape[3])
        } else {
            (*first.shape.last().expect("rank >= 1"), 1)
        };
        let (mut sum, mut sq) = (vec![0f64; groups], vec![0f64; groups]);
        let mut count = 0f64;
        for b in batches {
            let v = b[n].data.to_f32_vec();
            for (i, x) in v.iter().enumerate() {
                let gidx = if image { (i / inner) % groups } else { i % groups };
                sum[gidx] += *x as f64;
                sq[gidx] += (*x as f64).powi(2);
            }
            count += (v.len() / groups) as f64;
        }
        let c = count.max(1.0);
        let mean: Vec<f32> = sum.iter().map(|s| (s / c) as f32).collect();
        let std: Vec<f32> =
            sum.iter().zip(&sq).map(|(s, q)| ((q / c - (s / c).powi(2)).max(0.0).sqrt()) as f32).collect();
        perturb.push(if image {
            Perturb::Patches { mean, patch: cfg.patch.max(1), how: cfg.image }
        } else {
            let d = mean.len();
            if let Some(bad) = cfg.groups.iter().flatten().find(|&&j| j >= d) {
                return Err(IrError::Invalid(format!(
                    "SIS groups: dimension {bad} of input `{n}` with {d} dimensions"
                )));
            }
            let mut gs: Vec<Vec<usize>> = cfg.groups.clone();
            let grouped: std::collections::HashSet<usize> = gs.iter().flatten().copied().collect();
            gs.extend((0..d).filter(|j| !grouped.contains(j)).map(|j| vec![j]));
            Perturb::Columns { groups: gs, mean, std, how: cfg.vector }
        });
    }
    let mut out = vec![];
    let mut state0 = 0u64;
    // A live bar on a terminal (hidden elsewhere): SIS runs the float policy once per perturbed
    // position of every state, the longest CPU step of a compile for image policies.
    let states: usize = batches.iter().map(|b| b[&names[0]].shape[0]).sum();
    let bar = indicatif::ProgressBar::new(states as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("SIS {bar:30} {pos}/{len} states  {per_sec}  ETA {eta}")
            .expect("valid progress template"),
    );
    for b in batches {
        let bsz = b[&names[0]].shape[0];
        bar.inc(bsz as u64);
        let base = run(b)?;
        let positions: Vec<usize> = names.iter().zip(&perturb).map(|(n, p)| p.positions(&b[n].shape)).collect();
        let total: usize = positions.iter().sum();
        // Row r = sample i, position k (over all inputs): sample i with only that position perturbed.
        let mut feeds = Feeds::new();
        for (ni, n) in names.iter().enumerate() {
            let t = &b[n];
            let len = sample_len(t);
            let v = t.data.to_f32_vec();
            let mut big = vec![0f32; bsz * total * len];
            let offset: usize = positions[..ni].iter().sum();
            // Sample i's `total` rows; samples are independent, so they are written on every
            // core (an image batch's rows are hundreds of megabytes; the bits do not depend on it).
            let fill = |i: usize, rows: &mut [f32]| {
                let sample = &v[i * len..(i + 1) * len];
                let blurred = match (&perturb[ni], cfg.image) {
                    (Perturb::Patches { .. }, ImagePerturb::Blur { sigma }) => {
                        Some(blur(sample, t.shape[1], t.shape[2], t.shape[3], sigma))
                    }
                    _ => None,
                };
                for (k, row) in rows.chunks_exact_mut(len.max(1)).enumerate() {
                    row.copy_from_slice(sample);
                    if k >= offset && k < offset + positions[ni] {
                        perturb[ni].apply(&t.shape, k - offset, state0 + i as u64, row, blurred.as_deref());
                    }
                }
            };
            let threads = sqil_ir::par::cores().min(bsz).max(1);
            let per = bsz.div_ceil(threads).max(1);
            let sample_rows = (total * len).max(1);
            std::thread::scope(|s| {
                for (c, chunk) in big.chunks_mut(per * sample_rows).enumerate() {
                    let fill = &fill;
                    s.spawn(move || {
                        for (j, rows) in chunk.chunks_exact_mut(sample_rows).enumerate() {
                            fill(c * per + j, rows);
                        }
                    });
                }
            });
            let mut shape = t.shape.clone();
            shape[0] = bsz * total;
            feeds.insert(n.clone(), Tensor::from_f32(shape, big)?);
        }
        let pert = run(&feeds)?.data.to_f32_vec();
        let bv = base.data.to_f32_vec();
        let a = bv.len() / bsz;
        for i in 0..bsz {
            let mut s = 0f64;
            for k in 0..total {
                let r = i * total + k;
                s += 0.5 * (0..a).map(|j| ((bv[i * a + j] - pert[r * a + j]) as f64).powi(2)).sum::<f64>();
            }
            out.push(s / total as f64);
        }
        state0 += bsz as u64;
        sqil_ir::progress::report("SIS", state0, states as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// QRD weights: `beta` for the states at or above the `top` quantile of SIS (e.g. 0.2 = top
/// 20%, over the whole dataset), 1 elsewhere. Returns the weights and the threshold.
pub fn qrd_alpha(sis: &[f64], top: f64, beta: f64) -> (Vec<f32>, f64) {
    let mut sorted = sis.to_vec();
    sorted.sort_by(f64::total_cmp);
    let k = ((1.0 - top) * sorted.len() as f64).floor() as usize;
    let thr = sorted.get(k.min(sorted.len().saturating_sub(1))).copied().unwrap_or(0.0);
    (sis.iter().map(|&s| if s >= thr { beta as f32 } else { 1.0 }).collect(), thr)
}
