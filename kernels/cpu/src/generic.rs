//! Portable reference kernels: dense GEMM (through `matrixmultiply`, which has its own
//! AVX2/FMA paths and runtime dispatch) and the im2col transform used for convolutions.

/// `c = alpha * a @ b + beta * c` on f32 matrices with explicit strides (in elements).
///
/// `a` is `m x k`, `b` is `k x n`, `c` is `m x n`. Strides may be any non-negative values that
/// keep every accessed element in bounds; a transposed operand is expressed by swapping strides.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    check_bounds(m, k, a.len(), rsa, csa, "a");
    check_bounds(k, n, b.len(), rsb, csb, "b");
    check_bounds(m, n, c.len(), rsc, csc, "c");
    // SAFETY: the bounds of every operand were checked above against its slice length.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        )
    }
}

/// `c = alpha * a @ b + beta * c` on f64 matrices; see [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub fn dgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: &[f64],
    (rsa, csa): (usize, usize),
    b: &[f64],
    (rsb, csb): (usize, usize),
    beta: f64,
    c: &mut [f64],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    check_bounds(m, k, a.len(), rsa, csa, "a");
    check_bounds(k, n, b.len(), rsb, csb, "b");
    check_bounds(m, n, c.len(), rsc, csc, "c");
    // SAFETY: the bounds of every operand were checked above against its slice length.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        )
    }
}

fn check_bounds(rows: usize, cols: usize, len: usize, rs: usize, cs: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last < len,
        "gemm operand {what}: {rows}x{cols} with strides ({rs},{cs}) needs {} elements, slice has {len}",
        last + 1
    );
}

/// Geometry of an N-d convolution or pooling window over one image (channels excluded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input spatial extent per axis.
    pub input: Vec<usize>,
    /// Kernel extent per axis.
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Padding at the start of each axis (negative: the window starts inside the input).
    pub pads_begin: Vec<isize>,
    /// Output spatial extent per axis (already resolved from pads / ceil mode).
    pub output: Vec<usize>,
}

impl ConvGeometry {
    pub fn kernel_len(&self) -> usize {
        self.kernel.iter().product()
    }
    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }

    /// For each (kernel offset, output position) the flat input index, or `None` in padding.
    /// Layout: `kernel_len` rows of `output_len` entries.
    pub fn gather_table(&self) -> Vec<Option<usize>> {
        let rank = self.input.len();
        let (kl, ol) = (self.kernel_len(), self.output_len());
        let mut table = Vec::with_capacity(kl * ol);
        let mut kpos = vec![0usize; rank];
        for _ in 0..kl {
            let mut opos = vec![0usize; rank];
            for _ in 0..ol {
                let mut flat = 0usize;
                let mut inside = true;
                for d in 0..rank {
                    let p = (opos[d] * self.strides[d] + kpos[d] * self.dilations[d]) as isize - self.pads_begin[d];
                    if p < 0 || p >= self.input[d] as isize {
                        inside = false;
                        break;
                    }
                    flat = flat * self.input[d] + p as usize;
                }
                table.push(inside.then_some(flat));
                increment(&mut opos, &self.output);
            }
            increment(&mut kpos, &self.kernel);
        }
        table
    }
}

/// Advances a row-major multi-index; wraps to zero after the last position.
fn increment(pos: &mut [usize], extent: &[usize]) {
    for d in (0..pos.len()).rev() {
        pos[d] += 1;
        if pos[d] < extent[d] {
            return;
        }
        pos[d] = 0;
    }
}

/// im2col for one image with `channels` planes laid out `[C, spatial...]`.
///
/// Writes a `[channels * kernel_len, output_len]` row-major matrix into `out`; padded taps are 0.
pub fn im2col(input: &[f32], channels: usize, table: &[Option<usize>], geo: &ConvGeometry, out: &mut [f32]) {
    let (kl, ol, il) = (geo.kernel_len(), geo.output_len(), geo.input_len());
    debug_assert_eq!(out.len(), channels * kl * ol);
    for c in 0..channels {
        let plane = &input[c * il..(c + 1) * il];
        for (r, taps) in table.chunks_exact(ol).enumerate() {
            let row = &mut out[(c * kl + r) * ol..(c * kl + r + 1) * ol];
            for (o, t) in row.iter_mut().zip(taps) {
                *o = t.map_or(0.0, |i| plane[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_naive_with_transposed_b() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32).sin()).collect(); // n x k
        let mut c = vec![1.0f32; m * n];
        sgemm(m, k, n, 2.0, &a, (k, 1), &bt, (1, k), 0.5, &mut c, (n, 1));
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 2.0 * (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>() + 0.5;
                assert!((c[i * n + j] - want).abs() < 1e-5, "{i},{j}");
            }
        }
    }

    #[test]
    fn im2col_pads_with_zero() {
        let geo = ConvGeometry {
            input: vec![2, 2],
            kernel: vec![2, 2],
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![1, 1],
            output: vec![1, 1],
        };
        let table = geo.gather_table();
        let mut out = vec![9.0; 4];
        im2col(&[1.0, 2.0, 3.0, 4.0], 1, &table, &geo, &mut out);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 1.0]);
    }
}
