//! A float layer's low-bit weights kept as levels and scales, for the chains that multiply its
//! dequantized values: `f32(level) * scale` rounded once is exactly the FakeQuant's value (zero
//! point 0), so a GEMV that rebuilds each weight in a register computes `sgemm_chain` on the
//! dequantized matrix bit for bit while reading a quarter of its bytes (one per weight, not
//! four). A layer whose float input keeps the simulation's arithmetic (the first layer on a raw
//! state) runs this at small batches, where its weights are read from memory on every call.

/// Columns per panel of [`DequantRows`]: a pass of the AVX-512 kernel (eight 16-lane vectors).
pub const PANEL: usize = 128;

/// The levels (int8) and the scales (`group` = k: one per column) of a `[k, n]` weight in rows,
/// in panels of [`PANEL`] columns (columns padded with zeros to a multiple of 16; the last panel
/// is narrower where n is): panel `b`, of width `wb`, holds its `[k][wb]` levels at `PANEL * b * k`
/// and its `[k.div_ceil(group)][wb]` scales at `PANEL * b * groups`. A pass over a panel reads
/// one contiguous run of memory, not `k` rows `n` bytes apart (which the hardware prefetcher
/// followed poorly at batch 1, where the levels come from L3 on every call).
#[derive(Clone, Debug)]
pub struct DequantRows {
    pub k: usize,
    pub n: usize,
    pub n_pad: usize,
    pub group: usize,
    pub levels: Vec<i8>,
    pub scales: Vec<f32>,
}

impl DequantRows {
    /// From levels `q` (`[n][k]`, the form `q4_weight` returns) and scales per column (`group`
    /// 0) or per column and group of `group` rows of k (`[n][k.div_ceil(group)]`).
    pub fn new(q: &[i8], scales: &[f32], n: usize, k: usize, group: usize) -> Option<DequantRows> {
        let group = if group == 0 { k.max(1) } else { group };
        let groups = k.div_ceil(group);
        if n == 0 || k == 0 || q.len() != n * k || scales.len() != n * groups {
            return None;
        }
        let n_pad = n.next_multiple_of(16);
        let mut d =
            DequantRows { k, n, n_pad, group, levels: vec![0i8; k * n_pad], scales: vec![0f32; groups * n_pad] };
        for j in 0..n {
            let (l, s, w) = d.panel(j);
            for p in 0..k {
                d.levels[l + p * w] = q[j * k + p];
            }
            for g in 0..groups {
                d.scales[s + g * w] = scales[j * groups + g];
            }
        }
        Some(d)
    }

    /// For column `j`: the index of its level in row 0 and of its scale in group 0, and the width
    /// of its panel (the distance between its rows).
    pub fn panel(&self, j: usize) -> (usize, usize, usize) {
        let (b, c) = (j / PANEL, j % PANEL);
        let w = (self.n_pad - b * PANEL).min(PANEL);
        (PANEL * b * self.k + c, PANEL * b * self.k.div_ceil(self.group) + c, w)
    }

    /// The dequantized weight `(p, j)`: `f32(level) * scale`, one rounding.
    pub fn value(&self, p: usize, j: usize) -> f32 {
        let (l, s, w) = self.panel(j);
        self.levels[l + p * w] as f32 * self.scales[s + (p / self.group) * w]
    }

    /// Whether every value equals `rows` (`[k, n]`, row-major) bit for bit: the check a plan makes
    /// before it runs the layer from the levels instead of its folded constant.
    pub fn reproduces(&self, rows: &[f32]) -> bool {
        rows.len() == self.k * self.n
            && (0..self.k).all(|p| (0..self.n).all(|j| self.value(p, j).to_bits() == rows[p * self.n + j].to_bits()))
    }
}

/// `y = x @ W` for `m` rows of `x` (`[m, k]`, row-major) and the dequantized `W` (`[k, n]`):
/// `y[i][j]` the FMA chain over `p` from +0 of `x[i][p] * value(p, j)`, as `sgemm_chain` computes it on
/// the dequantized rows (the same bits); sixteen columns per vector with AVX-512, eight with AVX2.
pub fn dequant_gemm(w: &DequantRows, x: &[f32], m: usize, y: &mut [f32]) {
    assert!(x.len() >= m * w.k && y.len() >= m * w.n, "dequant_gemm: buffer sizes");
    for i in 0..m {
        let (xr, yr) = (&x[i * w.k..(i + 1) * w.k], &mut y[i * w.n..(i + 1) * w.n]);
        #[cfg(target_arch = "x86_64")]
        match crate::isa() {
            // SAFETY: isa() checked the instructions; the row lengths are asserted above and the
            // levels and scales hold k and groups rows of n_pad values (DequantRows::new).
            crate::Isa::Avx512Vnni => {
                unsafe { crate::x86_64::avx512::avx512_dequant_gemv(w, xr, yr) };
                continue;
            }
            crate::Isa::Avx2 => {
                unsafe { crate::x86_64::avx2::avx2_dequant_gemv(w, xr, yr) };
                continue;
            }
            crate::Isa::Generic => {}
        }
        for (j, yj) in yr.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (p, &xp) in xr.iter().enumerate() {
                acc = xp.mul_add(w.value(p, j), acc);
            }
            *yj = acc;
        }
    }
}
