//! Activation range calibration on observed values: min-max, percentile, and the clipping
//! that minimises the squared quantization error. Ranges always include 0 so that zero is
//! exact (padding, ReLU outputs).

use super::config::ActCalib;
use super::weights::Quantizer;

/// At most this many values are used for the percentile and MSE searches (taken evenly).
const MAX_SAMPLES: usize = 262_144;

fn sample(x: &[f32]) -> Vec<f32> {
    if x.len() <= MAX_SAMPLES {
        return x.to_vec();
    }
    (0..MAX_SAMPLES).map(|i| x[i * x.len() / MAX_SAMPLES]).collect()
}

/// Scale and zero point for a `[lo, hi]` range (`lo <= 0 <= hi`).
pub fn range_params(q: Quantizer, lo: f32, hi: f32) -> (f32, f32) {
    let (qmin, qmax) = q.range();
    if q.symmetric {
        let s = lo.abs().max(hi.abs()) / qmax;
        (if s > 0.0 && s.is_finite() { s } else { 1.0 }, 0.0)
    } else {
        let s = (hi - lo) / (qmax - qmin);
        let s = if s > 0.0 && s.is_finite() { s } else { 1.0 };
        (s, (qmin - lo / s).round_ties_even().clamp(qmin, qmax))
    }
}

/// The range of `x` chosen by `method`; `percentile` in (50, 100].
pub fn calibrate(x: &[f32], q: Quantizer, method: ActCalib, percentile: f64) -> (f32, f32) {
    let (lo, hi) = x.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    match method {
        ActCalib::MinMax => range_params(q, lo, hi),
        ActCalib::Percentile => {
            let mut s = sample(x);
            s.sort_by(f32::total_cmp);
            let at = |p: f64| s[((p / 100.0) * (s.len() - 1) as f64).round() as usize];
            range_params(q, at(100.0 - percentile).min(0.0), at(percentile).max(0.0))
        }
        ActCalib::Mse => {
            let s = sample(x);
            let mut best = (f64::INFINITY, range_params(q, lo, hi));
            for i in 0..=80 {
                let r = 1.0 - i as f32 * 0.01;
                let (sc, z) = range_params(q, lo * r, hi * r);
                let err: f64 = s.iter().map(|&v| ((v - q.fq(v, sc, z)) as f64).powi(2)).sum();
                if err < best.0 {
                    best = (err, (sc, z));
                }
            }
            best.1
        }
    }
}
