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
    // A plain product (alpha 1, beta 0) over at most SGEMM_DIRECT_K terms with contiguous rows of
    // b and c: each output is matrixmultiply's own arithmetic there, one FMA chain over k from
    // zero (its packed kernel with a single k block), which is the policy GEMM's definition:
    // computed by it, without packing either operand.
    if alpha == 1.0 && beta == 0.0 && k <= SGEMM_DIRECT_K && csb == 1 && csc == 1 && crate::isa() != crate::Isa::Generic
    {
        return sgemm_chain(m, k, n, a, (rsa, csa), b, (rsb, csb), c, (rsc, csc));
    }
    sgemm_packed(m, k, n, alpha, a, (rsa, csa), b, (rsb, csb), beta, c, (rsc, csc))
}

/// The policy GEMM, one arithmetic definition on every CPU: `c[i, j]` is one fused multiply-add
/// chain over `p = 0..k` in order from +0, `acc = fma(a[i, p], b[p, j], acc)` (one rounding per
/// step, `f32::mul_add`). The SIMD kernels vectorize over `j`, each lane its own chain, so every
/// ISA gives these bits; the C back end prints the same chain with `fmaf`. (A chain from +0 never
/// ends at -0, so a term that is exactly zero, such as a padding tap, may be skipped.) Any strides;
/// `b` with non-unit column stride is copied to rows first on the SIMD path.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_chain(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    check_bounds(m, k, a.len(), rsa, csa, "a");
    check_bounds(k, n, b.len(), rsb, csb, "b");
    check_bounds(m, n, c.len(), rsc, csc, "c");
    #[cfg(target_arch = "x86_64")]
    if n < 8 && crate::isa() != crate::Isa::Generic {
        // Few columns (a spatial softmax's keypoint MatMul: 2 columns, 1225 terms): the same
        // chains computed as c^T = b^T a^T, vectorized over a's rows (a transposed in blocks of
        // eight rows, each read sequentially); with fewer than eight rows, eight outputs' chains
        // interleaved.
        if n == 1 && csa == 1 && m >= 8 && k >= 8 {
            // A GEMV on row-major a (a squeeze-and-excitation 1 x 1 convolution, a float layer
            // at batch 1): eight rows' chains in the lanes of one vector, a read in 8 x 8 blocks
            // transposed in registers; rows past a multiple of eight by the narrow kernel.
            let m8 = m / 8 * 8;
            // SAFETY: isa() checked AVX2 and FMA; the bounds were checked above (rows < m8 <= m,
            // columns < k, b's k entries at stride rsb, c's m8 entries at stride rsc).
            unsafe { gemv_rows8(m8, k, a, rsa, b, rsb, c, rsc) };
            if m8 < m {
                // SAFETY: as above, for the last rows.
                unsafe {
                    crate::x86_64::avx2::avx2_sgemm_chain_narrow(
                        m - m8,
                        k,
                        1,
                        &a[m8 * rsa..],
                        (rsa, csa),
                        b,
                        (rsb, csb),
                        &mut c[m8 * rsc..],
                        (rsc, csc),
                    )
                };
            }
            return;
        }
        if m >= 8 {
            // a^T [k, m], through the tiled strided copy (element by element, every write was a
            // new cache line: most of a 576 x 144 squeeze-and-excitation layer's time).
            let mut at = vec![0f32; k * m];
            copy_strided(a, (k, m), (csa, rsa), &mut at);
            let mut ct = vec![0f32; n * m];
            sgemm_chain(n, k, m, b, (csb, rsb), &at, (m, 1), &mut ct, (m, 1));
            for (j, row) in ct.chunks(m).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    c[i * rsc + j * csc] = v;
                }
            }
            return;
        }
        // SAFETY: isa() checked AVX2 and FMA; the bounds were checked above.
        return unsafe {
            crate::x86_64::avx2::avx2_sgemm_chain_narrow(m, k, n, a, (rsa, csa), b, (rsb, csb), c, (rsc, csc))
        };
    }
    #[cfg(target_arch = "x86_64")]
    if csc == 1 && crate::isa() != crate::Isa::Generic {
        // A transposed b (a Gemm's transB weights, an attention head's keys) copied to rows,
        // in the thread's buffer (a zeroed allocation per call had cost an attention head's
        // small products more than their copy).
        let copied = !(csb == 1 || n == 1);
        let mut rows = if copied { SGEMM_ROWS.take() } else { Vec::new() };
        let (b, rsb) = if copied {
            rows.resize(k * n, 0.0);
            rows.truncate(k * n);
            copy_strided(b, (k, n), (rsb, csb), &mut rows);
            (&rows[..], n)
        } else {
            (b, rsb)
        };
        // SAFETY: isa() checked AVX2 and FMA (and AVX-512 F for the wide form); the bounds were
        // checked above (a copied b is k x n with rows of n).
        unsafe {
            if crate::isa() == crate::Isa::Avx512Vnni {
                crate::x86_64::avx512::avx512_sgemm_direct(m, k, n, a, (rsa, csa), b, rsb, c, rsc)
            } else {
                crate::x86_64::avx2::avx2_sgemm_direct(m, k, n, a, (rsa, csa), b, rsb, c, rsc)
            }
        }
        if copied {
            SGEMM_ROWS.set(rows);
        }
        return;
    }
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc = a[i * rsa + p * csa].mul_add(b[p * rsb + j * csb], acc);
            }
            c[i * rsc + j * csc] = acc;
        }
    }
}

thread_local! {
    /// [`sgemm_chain`]'s copy of a transposed b.
    static SGEMM_ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The longest reduction [`sgemm`] computes directly: matrixmultiply's f32 k-block (`kc`), below
/// which its FMA kernel sums each output in one chain (a property test checks the two agree bit
/// for bit).
pub const SGEMM_DIRECT_K: usize = 256;

/// [`sgemm`] always through matrixmultiply (the reference the direct path is tested against).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed(
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
    /// A `k` x `k` window at stride `s` over a `side` x `side` image padded by `p` on every side,
    /// no dilation (an image encoder's layer; the output side follows).
    pub fn square(side: usize, k: usize, s: usize, p: usize) -> ConvGeometry {
        let o = (side + 2 * p - k) / s + 1;
        ConvGeometry {
            input: vec![side, side],
            kernel: vec![k, k],
            strides: vec![s, s],
            dilations: vec![1, 1],
            pads_begin: vec![p as isize, p as isize],
            output: vec![o, o],
        }
    }

    /// The window as the C and CUDA kernels take it (`geo` of `sqil_conv_q4q8`, `sqil_conv_f32`,
    /// `sqil_pool2d`, `sqil_conv2d_f32`): `channels`, then per axis the input extent, kernel
    /// extent, stride, dilation, padding at the start, output extent (each group axis-major).
    pub fn kernel_params(&self, channels: usize) -> Vec<i64> {
        std::iter::once(channels as i64)
            .chain(self.input.iter().map(|&v| v as i64))
            .chain(self.kernel.iter().map(|&v| v as i64))
            .chain(self.strides.iter().map(|&v| v as i64))
            .chain(self.dilations.iter().map(|&v| v as i64))
            .chain(self.pads_begin.iter().map(|&v| v as i64))
            .chain(self.output.iter().map(|&v| v as i64))
            .collect()
    }

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
    if matches!(geo.input.len(), 1 | 2) {
        return im2col_direct(input, channels, geo, out);
    }
    im2col_table(input, channels, table, geo, out)
}

/// [`im2col`] through the geometry's gather table, element by element (the definition; 3-D
/// geometries take it).
pub fn im2col_table(input: &[f32], channels: usize, table: &[Option<usize>], geo: &ConvGeometry, out: &mut [f32]) {
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

/// [`im2col`] of a 1-D or 2-D geometry computed from the geometry, no table: per tap and output
/// row, the input row's window (a contiguous copy at stride 1, a strided one otherwise) and
/// zeros where it falls outside the image. The same values (copies) as the table's gather.
fn im2col_direct(input: &[f32], channels: usize, geo: &ConvGeometry, out: &mut [f32]) {
    let Depthwise { h, w, kh, kw, sh, sw, dh, dw, oh, ow, ph, pw, .. } = Depthwise::of(geo, channels);
    let (il, kl, ol) = (h * w, kh * kw, oh * ow);
    assert!(out.len() >= channels * kl * ol && input.len() >= channels * il, "im2col: buffer sizes");
    for c in 0..channels {
        let plane = &input[c * il..(c + 1) * il];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &mut out[(c * kl + ky * kw + kx) * ol..(c * kl + ky * kw + kx + 1) * ol];
                // Input column of output column ox: ox * sw + off; in the image for lo <= ox < hi.
                let off = (kx * dw) as isize - pw;
                let ceil_div = |a: isize, b: usize| if a <= 0 { 0 } else { (a as usize).div_ceil(b) };
                let lo = ceil_div(-off, sw).min(ow);
                let hi = ceil_div(w as isize - off, sw).clamp(lo, ow);
                for oy in 0..oh {
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * sh) as isize - ph + (ky * dh) as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if hi == lo {
                        continue;
                    }
                    let s0 = ((lo * sw) as isize + off) as usize;
                    if sw == 1 {
                        dst[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
                    } else if sw == 2 {
                        // Every other value: pairs, their first (vectorized as shuffles); a last
                        // value in the row's last column (no pair) on its own.
                        let m = (hi - lo).min((src.len() - s0) / 2);
                        let pairs = src[s0..s0 + 2 * m].chunks_exact(2);
                        dst[lo..lo + m].iter_mut().zip(pairs).for_each(|(d, p)| *d = p[0]);
                        dst[lo + m..hi].iter_mut().zip(src[s0 + 2 * m..].iter().step_by(2)).for_each(|(d, &v)| *d = v);
                    } else {
                        dst[lo..hi].iter_mut().zip(src[s0..].iter().step_by(sw)).for_each(|(d, &v)| *d = v);
                    }
                }
            }
        }
    }
}

/// Depthwise convolution (one input channel per output channel: `group == C == M`) of one image
/// `[C, spatial...]` (1-D or 2-D) into `out` (`[C, output...]`), with the arithmetic of
/// [`im2col`] + [`sgemm_chain`] exactly: per output, one FMA chain from +0 over the taps in
/// (row, column) order, a padding tap multiplying 0. Computed directly: each channel's plane is
/// copied once, zero-padded and split by (row, column) phase of the strides, so that every tap
/// reads one contiguous run covering all output rows (rows of the phase's width; the columns
/// past the output's are computed and dropped); then each tap is one FMA pass over the run (the
/// lanes are separate chains, so the bits are the scalar chain's). Then, per output, `+ bias[c]`
/// (one f32 addition, none without a bias) and the `post` ops, before it is stored.
pub fn depthwise_conv(
    input: &[f32],
    weights: &[f32],
    geo: &ConvGeometry,
    bias: Option<&[f32]>,
    post: &[Post],
    out: &mut [f32],
) {
    assert!(matches!(geo.input.len(), 1 | 2), "depthwise_conv: 1-D or 2-D");
    let channels = weights.len() / geo.kernel_len().max(1);
    let g = Depthwise::of(geo, channels);
    let Depthwise { h, w, kh, kw, sh, sw, dh, dw, oh, ow, ph, pw, .. } = g;
    let (il, kl, ol) = (h * w, kh * kw, oh * ow);
    assert!(input.len() >= channels * il && out.len() >= channels * ol, "depthwise_conv: buffer sizes");
    assert!(bias.is_none_or(|b| b.len() >= channels), "depthwise_conv: bias size");
    if ol == 0 || channels == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if channels >= 8 && crate::isa() != crate::Isa::Generic {
        let wide = crate::isa() == crate::Isa::Avx512Vnni && kh * kw <= DEPTHWISE_WIDE_TAPS;
        // The ops the kernel applies in registers, then the rest over its outputs.
        let (reg, rest) = post_split(post);
        // SAFETY: isa() checked AVX2 and FMA; the buffer sizes were checked above.
        unsafe { depthwise_lanes_avx2(input, weights, &g, (bias, reg), out, wide) };
        post_in_place(&mut out[..channels * ol], rest);
        return;
    }
    // The padded plane's extent (every row and column a window reads), and each phase plane's:
    // phase (ry, rx) holds padded rows ry, ry + sh, ... and columns rx, rx + sw, ...
    let (hp, wp) = ((oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1);
    let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
    let pl = hq * wq;
    // One row of slack: a tap's run starts up to a row into its plane.
    let mut phases = vec![0f32; sh * sw * pl + wq];
    let mut acc = vec![0f32; oh * wq];
    // Per column phase rx: its columns j read input column rx + j sw - pw, inside for j in j0..j1
    // (the same for every row, so computed once: no divisions in the copy).
    let cols: Vec<(usize, usize, usize)> = (0..sw)
        .map(|rx| {
            let first = |bound: isize| ((bound - rx as isize).max(0) as usize).div_ceil(sw).min(wq);
            let (j0, j1) = (first(pw), first(w as isize + pw));
            (j0, j1.max(j0), ((rx + j0 * sw) as isize - pw).max(0) as usize)
        })
        .collect();
    // Where each tap's run starts, taps in (row, column) order.
    let starts: Vec<usize> = (0..kh)
        .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
        .map(|(ky, kx)| {
            let ((ry, oy0), (rx, ox0)) = (((ky * dh) % sh, (ky * dh) / sh), ((kx * dw) % sw, (kx * dw) / sw));
            (ry * sw + rx) * pl + oy0 * wq + ox0
        })
        .collect();
    for c in 0..channels {
        let plane = &input[c * il..(c + 1) * il];
        let (mut ry, mut i) = (0, 0);
        for y in 0..hp {
            let iy = y as isize - ph;
            let row = (iy >= 0 && (iy as usize) < h).then(|| &plane[iy as usize * w..(iy as usize + 1) * w]);
            for (rx, &(j0, j1, x0)) in cols.iter().enumerate() {
                let dst = &mut phases[(ry * sw + rx) * pl + i * wq..(ry * sw + rx) * pl + (i + 1) * wq];
                let Some(row) = row else {
                    dst.fill(0.0);
                    continue;
                };
                dst[..j0].fill(0.0);
                dst[j1..].fill(0.0);
                if j1 == j0 {
                } else if sw == 1 {
                    dst[j0..j1].copy_from_slice(&row[x0..x0 + j1 - j0]);
                } else {
                    dst[j0..j1].iter_mut().zip(row[x0..].iter().step_by(sw)).for_each(|(d, &v)| *d = v);
                }
            }
            ry += 1;
            if ry == sh {
                (ry, i) = (0, i + 1);
            }
        }
        taps_fma(&mut acc, &weights[c * kl..(c + 1) * kl], &starts, &phases);
        let o = &mut out[c * ol..(c + 1) * ol];
        for (oy, o) in o.chunks_exact_mut(ow).enumerate() {
            o.copy_from_slice(&acc[oy * wq..oy * wq + ow]);
        }
        if let Some(b) = bias {
            o.iter_mut().for_each(|v| *v += b[c]);
        }
        post_in_place(o, post);
    }
}

/// `dst.copy_from_slice(src)` by vector loads and stores where the CPU has AVX2: glibc's
/// `memcpy` copies large buffers with `rep movsb`, which on this project's AMD EPYC (Zen 3) runs
/// 7-10x slower when source and destination differ in alignment by other than a multiple of 32
/// bytes (a 384 KB copy 133 us at a 4 or 16 byte offset, 13-19 us at 0 or 32; this loop 14 us at
/// any) - as a batch's slice of samples and a pool buffer often do.
pub fn copy_f32(src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "copy_f32: lengths");
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic && src.len() >= 1024 {
        // SAFETY: isa() checked AVX2; the lengths are equal (asserted above).
        return unsafe { copy_f32_avx2(src, dst) };
    }
    dst.copy_from_slice(src);
}

/// [`copy_f32`] with AVX2: 32 values per step, the rest by `copy_from_slice`.
///
/// # Safety
/// AVX2; `src.len() == dst.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn copy_f32_avx2(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len() / 32 * 32;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for i in (0..n).step_by(32) {
        let v: [__m256; 4] = [
            _mm256_loadu_ps(sp.add(i)),
            _mm256_loadu_ps(sp.add(i + 8)),
            _mm256_loadu_ps(sp.add(i + 16)),
            _mm256_loadu_ps(sp.add(i + 24)),
        ];
        for (j, v) in v.iter().enumerate() {
            _mm256_storeu_ps(dp.add(i + 8 * j), *v);
        }
    }
    dst[n..].copy_from_slice(&src[n..]);
}

/// `dst[i * cols + j] = src[i * rs + j * cs]`: a strided (e.g. transposed) `rows x cols` matrix
/// copied to contiguous rows through 16 x 16 tiles. Element by element, a transposed source
/// touched a new cache line per element (and rows at a power-of-two stride share L1 sets); a
/// tile is read as 16 runs along whichever axis the source has contiguous, and written as 16
/// runs of `dst`.
pub fn copy_strided(src: &[f32], (rows, cols): (usize, usize), (rs, cs): (usize, usize), dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if rs == 1 && cs >= rows && cols >= 8 && crate::isa() != crate::Isa::Generic {
        assert!(src.len() >= (cols - 1) * cs + rows && dst.len() >= rows * cols, "copy_strided: buffer sizes");
        // SAFETY: isa() checked AVX2; the sizes are asserted above.
        return unsafe { transpose_avx2(src, (rows, cols), cs, dst) };
    }
    let mut tile = [[0f32; 16]; 16];
    for j0 in (0..cols).step_by(16) {
        let jn = (cols - j0).min(16);
        for i0 in (0..rows).step_by(16) {
            let im = (rows - i0).min(16);
            for (jj, t) in tile.iter_mut().enumerate().take(jn) {
                for (ii, v) in t.iter_mut().enumerate().take(im) {
                    *v = src[(i0 + ii) * rs + (j0 + jj) * cs];
                }
            }
            for ii in 0..im {
                let row = &mut dst[(i0 + ii) * cols + j0..(i0 + ii) * cols + j0 + jn];
                for (jj, v) in row.iter_mut().enumerate() {
                    *v = tile[jj][ii];
                }
            }
        }
    }
}

/// Input channels up to which [`conv_direct_f32`] takes a convolution (an image encoder's first
/// layer: RGB, RGB-D, grey): beyond, im2col's GEMM reuses each gathered row over more outputs.
pub const CONV_DIRECT_MAX_CHANNELS: usize = 4;

/// Whether [`conv_direct_f32`] runs a convolution of `taps` window positions to `m` output
/// channels: windows of 3 x 3 and up (9 taps or more), and with AVX2 only (eight lanes, six
/// channels per pass) windows of 5 x 5 and up, or 3 x 3 to at least 128 channels (`m * taps >=
/// 1152`). Measured on one core (`cargo bench -p sqil-kernels-cpu --bench stem`, both paths in one
/// run). AVX-512: ResNet-18's 7 x 7 / 2 to 64 channels at 96 x 96 261 -> 175 us, the 3 x 3 / 2
/// stems to 16 and 32 channels at 84 x 84 16.5 -> 10.9 and 22.7 -> 18.1 us, 3 x 3 / 1 to 64 and
/// 128 channels 1.04x and 1.09x, a grey 5 x 5 / 2 1.68x; a 1 x 1 convolution to 64 channels is
/// slower direct (25.0 -> 31.7 us: im2col is a copy there, and the GEMM reuses it over every
/// output), so it keeps im2col. AVX2 (AMD EPYC, three runs, with the vector phase split of stride
/// 2): ResNet-18's stem 1.23x, testdata's NHWC 5 x 5 / 2 to 16 channels 2.3-2.5x (91 -> 37 us), a
/// grey 5 x 5 / 2 to 32 1.1-1.2x, 3 x 3 / 1 to 128 channels 1.13x, but 3 x 3 / 1 to 64 0.96x and
/// the 3 x 3 / 2 stems to 16 and 32 channels 0.84-0.98x and 0.77-0.86x: their channels fill few
/// six-channel passes (16 in three) against nine taps, and 42 columns waste 6 of 48 lanes.
pub fn conv_direct_takes(taps: usize, m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() == crate::Isa::Avx2 {
        return taps >= 25 || (taps >= 9 && m * taps >= 1152);
    }
    let _ = m;
    taps >= 9
}

/// One image of a 1-D or 2-D convolution of one group and at most
/// [`CONV_DIRECT_MAX_CHANNELS`] input channels, computed without the im2col matrix: `out`
/// (`[m, output positions]`) gets what [`im2col`] then [`sgemm_chain`] (`m` rows of `w`, `[m,
/// channels * taps]`, against the gathered rows) write, bit for bit: each output the FMA chain over
/// `(c, ky, kx)` in im2col's order from +0, padding taps included as +0, then `+ bias[r]` (one
/// addition, as the convolution's bias pass adds it; none without a bias) as it is stored. The input
/// planes are copied once (through the input's quantizer `quant`, `(scale, zero, lo, hi)` as
/// [`fake_quant_into`] applies it, where there is one: the float first layer's FakeQuant, in the
/// same pass), zero-padded and split by column phase (stride 2: even and odd columns), so every
/// tap of a row of outputs is one contiguous vector load, and the weight is broadcast: the
/// gathered matrix (`channels * taps` times the output's size) is never written.
/// Returns false, having done nothing, where this path does not apply (no AVX2 and FMA, another
/// geometry, more channels, a weight that is not finite: a padding tap's `0 * w` must add
/// nothing, as it may be skipped elsewhere), or where [`conv_direct_takes`] declines.
pub fn conv_direct_f32(
    input: (&[f32], Option<FakeQuantArgs>),
    channels: usize,
    w: &[f32],
    m: usize,
    geo: &ConvGeometry,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> bool {
    conv_direct_takes(geo.kernel.iter().product(), m) && conv_direct_run(input, channels, w, m, geo, bias, out)
}

/// A FakeQuant's `(scale, zero, lo, hi)`, as [`fake_quant_into`] takes them.
pub type FakeQuantArgs = (f32, f32, f32, f32);

/// [`conv_direct_f32`] whether or not [`conv_direct_takes`] would take the layer (benchmarks and
/// tests); false only where the direct path cannot run it.
pub fn conv_direct_run(
    (input, quant): (&[f32], Option<FakeQuantArgs>),
    channels: usize,
    w: &[f32],
    m: usize,
    geo: &ConvGeometry,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let axes = geo.input.len();
        let same = |v: &[usize]| v.len() == axes;
        if !(matches!(axes, 1 | 2)
            && same(&geo.kernel)
            && same(&geo.strides)
            && same(&geo.dilations)
            && same(&geo.output))
            || geo.pads_begin.len() != axes
            || channels == 0
            || channels > CONV_DIRECT_MAX_CHANNELS
            || m == 0
            || crate::isa() == crate::Isa::Generic
        {
            return false;
        }
        let g = Depthwise::of(geo, channels);
        let (kl, ol, il) = (g.kh * g.kw, g.oh * g.ow, g.h * g.w);
        if kl == 0 || ol == 0 || g.sh == 0 || g.sw == 0 || g.dh == 0 || g.dw == 0 {
            return false;
        }
        assert!(
            input.len() >= channels * il && w.len() >= m * channels * kl && out.len() >= m * ol,
            "conv_direct_f32: buffer sizes"
        );
        assert!(bias.is_none_or(|b| b.len() >= m), "conv_direct_f32: bias size");
        if !w[..m * channels * kl].iter().all(|v| v.is_finite()) {
            return false;
        }
        let wide = crate::isa() == crate::Isa::Avx512Vnni;
        let lanes = if wide { 16 } else { 8 };
        let hp = (g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1;
        // Whole vectors per phase row, from a 64-byte boundary (the split's stores aligned).
        let jl = (g.ow.next_multiple_of(lanes) + (g.kw - 1) * g.dw / g.sw + 1).next_multiple_of(lanes);
        DIRECT_PLANES.with_borrow_mut(|(xp, quantized)| {
            xp.resize(channels * hp * g.sw * jl + 16, 0.0);
            let start = xp.as_ptr().align_offset(64).min(16);
            let xp = &mut xp[start..];
            // Each input row zero-padded (column x at x + pw, `sw * jl` values), then split by
            // phase: value j of phase f is padded column j * sw + f.
            let wp = g.sw * jl;
            let (lo, take) = if g.pw >= 0 {
                (g.pw as usize, g.w.min(wp.saturating_sub(g.pw as usize)))
            } else {
                (0, g.w.saturating_sub(g.pw.unsigned_abs()).min(wp))
            };
            let skip = if g.pw < 0 { g.pw.unsigned_abs() } else { 0 };
            let mut padded = vec![];
            for c in 0..channels {
                let mut plane = &input[c * il..(c + 1) * il];
                // Stride 1 quantizes each row into place below, and the vector split of stride 2
                // each vector as it loads it; the other strides' splits read the plane through
                // the quantizer first, in one pass.
                let split2 = g.sw == 2;
                if let (Some((qs, qz, qlo, qhi)), true) = (quant, g.sw > 1 && !split2) {
                    quantized.resize(il, 0.0);
                    fake_quant_into(plane, qs, qz, qlo, qhi, quantized);
                    plane = quantized;
                }
                for y in 0..hp {
                    let iy = y as isize - g.ph;
                    let at = (c * hp + y) * wp;
                    let dst = &mut xp[at..at + wp];
                    if iy < 0 || iy >= g.h as isize || take == 0 {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w + skip..iy as usize * g.w + skip + take];
                    if g.sw == 1 {
                        dst[..lo.min(wp)].fill(0.0);
                        match quant {
                            Some((qs, qz, qlo, qhi)) => fake_quant_into(src, qs, qz, qlo, qhi, &mut dst[lo..]),
                            None => dst[lo..lo + take].copy_from_slice(src),
                        }
                        dst[lo + take..].fill(0.0);
                        continue;
                    }
                    if split2 {
                        let (even, odd) = dst.split_at_mut(jl);
                        // SAFETY: isa() checked AVX-512 F where wide, else AVX2 and FMA (this path
                        // runs on one or the other); even and odd hold jl values each.
                        unsafe {
                            if wide {
                                crate::x86_64::avx512::avx512_phase_split2(src, lo, even, odd, quant)
                            } else {
                                crate::x86_64::avx2::avx2_phase_split2(src, lo, even, odd, quant)
                            }
                        };
                        continue;
                    }
                    padded.resize(wp, 0.0);
                    padded[lo..lo + take].copy_from_slice(src);
                    for (j, p) in padded.chunks_exact(g.sw).enumerate() {
                        for (f, &v) in p.iter().enumerate() {
                            dst[f * jl + j] = v;
                        }
                    }
                }
            }
            let d = crate::x86_64::common::DirectConv {
                c: channels,
                hp,
                jl,
                m,
                kernel: (g.kh, g.kw),
                strides: (g.sh, g.sw),
                dilations: (g.dh, g.dw),
                out: (g.oh, g.ow),
            };
            // SAFETY: isa() checked the instructions; the planes hold channels * hp * sw * jl
            // values with hp and jl as conv_direct needs, and the sizes of w and out were
            // asserted above.
            unsafe {
                if wide {
                    crate::x86_64::avx512::avx512_conv_direct(xp, w, d, bias, out)
                } else {
                    crate::x86_64::avx2::avx2_conv_direct(xp, w, d, bias, out)
                }
            }
        });
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (input, channels, w, m, geo, bias, out);
        false
    }
}

thread_local! {
    /// [`conv_direct_f32`]'s padded, phase-split input planes, and a plane through the input's
    /// quantizer.
    static DIRECT_PLANES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A 1-D or 2-D convolution's geometry per axis (1-D: one row) and its channels: the depthwise
/// kernels' and `im2col_direct`'s.
#[derive(Clone, Copy)]
struct Depthwise {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    oh: usize,
    ow: usize,
    ph: isize,
    pw: isize,
    channels: usize,
}

impl Depthwise {
    /// The geometry of a 1-D or 2-D convolution (1-D: one row).
    fn of(geo: &ConvGeometry, channels: usize) -> Depthwise {
        let two = |v: &[usize], one: usize| if v.len() == 1 { (one, v[0]) } else { (v[0], v[1]) };
        let (h, w) = two(&geo.input, 1);
        let (kh, kw) = two(&geo.kernel, 1);
        let (sh, sw) = two(&geo.strides, 1);
        let (dh, dw) = two(&geo.dilations, 1);
        let (oh, ow) = two(&geo.output, 1);
        let (ph, pw) =
            if geo.pads_begin.len() == 1 { (0, geo.pads_begin[0]) } else { (geo.pads_begin[0], geo.pads_begin[1]) };
        Depthwise { h, w, kh, kw, sh, sw, dh, dw, oh, ow, ph, pw, channels }
    }
}

/// A depthwise convolution (as [`depthwise_conv`] takes it) whose input another kernel writes.
#[derive(Clone, Copy, Debug)]
pub struct DepthwiseArgs<'a> {
    /// `[channels, taps]`.
    pub weights: &'a [f32],
    pub geo: &'a ConvGeometry,
    pub bias: Option<&'a [f32]>,
    /// Its epilogue.
    pub post: &'a [Post],
    /// `weights` already laid out by tap ([`DepthwiseTaps::new`] of these weights), made once
    /// when the layer was planned: without it every call lays them out again (a 576-channel 5 x
    /// 5 layer's 14 400 weights transposed per image).
    pub taps: Option<&'a DepthwiseTaps>,
}

/// A depthwise convolution's weights `[channels, taps]` laid out as the lanes kernel reads
/// them, `[tap][cp]` (`cp` the channels rounded up to the kernel's lanes, 16 with AVX-512, else
/// 8; zeros past them), from a 64-byte
/// boundary: what [`depthwise_fed`] otherwise builds on every call.
#[derive(Debug, PartialEq)]
pub struct DepthwiseTaps {
    data: Vec<f32>,
    at: usize,
    channels: usize,
    taps: usize,
    cp: usize,
}

impl DepthwiseTaps {
    /// The layout of `weights` (`[channels, taps]`), or `None` where the lanes kernel does
    /// not run such a layer (fewer than 8 channels, more than 25 taps, or sizes that disagree).
    pub fn new(weights: &[f32], channels: usize, taps: usize) -> Option<DepthwiseTaps> {
        if channels < 8 || taps == 0 || taps > DEPTHWISE_WIDE_TAPS || weights.len() != channels * taps {
            return None;
        }
        // The lanes of this CPU's kernel: sixteen with AVX-512, else eight.
        #[cfg(target_arch = "x86_64")]
        let cp = lane_channels(channels, crate::isa() == crate::Isa::Avx512Vnni);
        #[cfg(not(target_arch = "x86_64"))]
        let cp = channels.next_multiple_of(16);
        let mut data = vec![];
        let at = {
            let v = aligned64(&mut data, taps * cp);
            lay_out_by_tap(weights, channels, taps, v);
            v.as_ptr() as usize
        };
        let at = (at - data.as_ptr() as usize) / std::mem::size_of::<f32>();
        Some(DepthwiseTaps { data, at, channels, taps, cp })
    }

    /// The values, `[tap][cp]`.
    fn values(&self) -> &[f32] {
        &self.data[self.at..self.at + self.taps * self.cp]
    }

    /// `[tap][cp]`, if laid out for `channels` channels of `taps` taps at `cp` lanes.
    fn for_layer(&self, channels: usize, taps: usize, cp: usize) -> Option<&[f32]> {
        (self.channels == channels && self.taps == taps && self.cp == cp).then(|| self.values())
    }
}

/// Depthwise weights `[channels, taps]` into `wt` as `[tap][cp]` (`cp = wt.len() / taps`, at least
/// `channels`; zeros past the channels): the layout the lanes kernels read, made per call
/// ([`depthwise_compute`]) or once ([`DepthwiseTaps`]). `[channels, taps]` transposed through tiles
/// into the first `taps x channels` values, then each tap's row moved out to its stride `cp` (last
/// first, so no row is overwritten before it moves) and the lanes past `channels` zeroed. Element
/// by element, this copy was a fifth of the depthwise step.
fn lay_out_by_tap(weights: &[f32], channels: usize, taps: usize, wt: &mut [f32]) {
    let cp = wt.len() / taps;
    wt.fill(0.0);
    copy_strided(weights, (taps, channels), (1, taps), &mut wt[..taps * channels]);
    if cp > channels {
        for t in (1..taps).rev() {
            wt.copy_within(t * channels..(t + 1) * channels, t * cp);
        }
        for t in 0..taps {
            wt[t * cp + channels..(t + 1) * cp].fill(0.0);
        }
    }
}

/// A copy on a fresh 64-byte boundary (a derived clone would keep the offset into an allocation
/// aligned differently).
impl Clone for DepthwiseTaps {
    fn clone(&self) -> DepthwiseTaps {
        let mut data = vec![];
        let v = aligned64(&mut data, self.taps * self.cp);
        v.copy_from_slice(self.values());
        let at = (v.as_ptr() as usize - data.as_ptr() as usize) / std::mem::size_of::<f32>();
        DepthwiseTaps { data, at, ..*self }
    }
}

/// [`depthwise_conv`] of `channels` channels whose input image another kernel writes straight
/// into the depthwise kernel's padded channels-last buffer: `fill` gets the buffer (its padding
/// zeroed) and where each input position goes ([`PadMap`]), and writes every position the map
/// keeps (all `cp` lanes; zeros past the channels), the values `depthwise_conv` would have read at
/// `[c, iy, ix]`. The same outputs, bit for bit, as that image through [`depthwise_conv`] into
/// `out`. With `images` images, the buffer holds one padded image after another
/// ([`PadMap::len`] values each), `fill` writes them all, and the outputs are each image's one
/// after the other (as planes), or side by side (as levels: image `i`'s position `o` at word
/// `i * positions + o` of each row). Returns whether a [`DwOut::Levels`] output met a NaN
/// (nothing valid written then), or runs nothing and returns `None` where the 16-lane path does
/// not apply (a CPU without AVX2, fewer than 8 channels, more than 25 taps, a geometry other
/// than 1-D or 2-D; levels after an epilogue op not applied in registers).
#[cfg(target_arch = "x86_64")]
pub(crate) fn depthwise_fed(
    dw: &DepthwiseArgs,
    (channels, images): (usize, usize),
    fill: impl FnOnce(&mut [f32], &PadMap),
    out: DwOut,
) -> Option<bool> {
    let geo = dw.geo;
    let two_d = |v: &[usize]| matches!(v.len(), 1 | 2) && v.len() == geo.input.len();
    if !(two_d(&geo.input) && two_d(&geo.kernel) && two_d(&geo.strides) && two_d(&geo.dilations) && two_d(&geo.output))
        || geo.pads_begin.len() != geo.input.len()
        || channels < 8
        || crate::isa() == crate::Isa::Generic
    {
        return None;
    }
    // Sixteen channels per vector with AVX-512, eight with AVX2.
    let wide = crate::isa() == crate::Isa::Avx512Vnni;
    let g = Depthwise::of(geo, channels);
    let (kl, ol) = (g.kh * g.kw, g.oh * g.ow);
    if kl == 0 || kl > DEPTHWISE_WIDE_TAPS || ol == 0 || dw.weights.len() != channels * kl {
        return None;
    }
    assert!(dw.bias.is_none_or(|b| b.len() >= channels), "depthwise_fed: bias size");
    let (reg, rest) = post_split(dw.post);
    match out {
        DwOut::Planes(out) => {
            if out.len() < images * channels * ol {
                return None;
            }
            let planes = DwOut::Planes(&mut *out);
            // SAFETY: isa() checked AVX2 and FMA (and AVX-512 where `wide`); the sizes were
            // checked above.
            unsafe { depthwise_lanes_with(&g, (wide, images), fill, (dw.weights, dw.taps), (dw.bias, reg), planes) };
            post_in_place(&mut out[..images * channels * ol], rest);
            Some(false)
        }
        // The levels take every op in registers.
        DwOut::Levels { .. } if !rest.is_empty() => None,
        // SAFETY: as above; the levels' buffer is sized by the kernel.
        levels => Some(unsafe {
            depthwise_lanes_with(&g, (wide, images), fill, (dw.weights, dw.taps), (dw.bias, reg), levels)
        }),
    }
}

/// Where [`depthwise_fed`] puts the depthwise's outputs.
#[cfg(target_arch = "x86_64")]
pub(crate) enum DwOut<'a> {
    /// `[channel, position]` values, as [`depthwise_conv`] writes them.
    Planes(&'a mut [f32]),
    /// As the int8 levels of the pointwise convolution they feed, under its input quantizer
    /// `(scale, zero, lo, hi)`: `x4[q * p_pad + o]` holds channels `4q..4q + 4` of position `o`,
    /// each `+ 128` as a byte, as [`crate::x86_64::avx512::avx512_interleave_quads`] lays out
    /// [`quantize_i8_into`]'s levels of the `[channel, position]` values (`x4` holds at least
    /// `ceil(channels / 4)` rows of `p_pad >= positions` words; the words past the positions
    /// hold whatever was there: no output reads them). Several images' positions side by side
    /// (image `i`'s position `o` at word `i * positions + o`). Only with every epilogue op
    /// applied in registers.
    Levels { quant: (f32, i32, i32, i32), x4: &'a mut [u32], p_pad: usize },
}

/// [`depthwise_conv`] with channels in vector lanes, for layers of 8 channels or more (MobileNet
/// and EfficientNet blocks: many channels on small planes, where one channel's plane is too short
/// to fill vectors): the image copied once into a zero-padded `[row, column, channel]` buffer
/// (channels rounded up to 8), the weights into `[tap, channel]`; per output position, each
/// 8-channel vector is one FMA chain per lane from +0 over the taps in (row, column) order, a
/// padding tap multiplying 0, so every lane is the scalar chain's bits; then back to
/// `[channel, position]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `input` and `out` hold `channels` planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_lanes_avx2(
    input: &[f32],
    weights: &[f32],
    g: &Depthwise,
    epilogue: (Option<&[f32]>, &[Post]),
    out: &mut [f32],
    wide: bool,
) {
    // SAFETY: as this function's contract (AVX2 and FMA; `input` holds the planes).
    let fill = |buf: &mut [f32], m: &PadMap| unsafe { depthwise_image(input, g, m, buf) };
    depthwise_lanes_with(g, (wide, 1), fill, (weights, None), epilogue, DwOut::Planes(out));
}

/// `channels` rounded up to whole vectors of the depthwise lanes kernel: sixteen lanes on the
/// wide (AVX-512) path, eight on AVX2. The buffers ([`PadMap`]) and the weights by tap
/// ([`DepthwiseTaps`]) both hold this many lanes per position or tap.
#[cfg(target_arch = "x86_64")]
fn lane_channels(channels: usize, wide: bool) -> usize {
    channels.next_multiple_of(if wide { 16 } else { 8 })
}

/// Where a depthwise input lands in [`depthwise_lanes_avx2`]'s zero-padded buffer `[hp, wp, cp]`:
/// image row `iy` at buffer row `iy + ph`, column `ix` at column `ix + pw`, channel `c` at lane
/// `c` of the position's `cp` (channels rounded up to whole vectors). Only the rows and columns
/// some window reads are kept: image column `ix` is stored where `ix + pw` lies in `x0..x1`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PadMap {
    pub hp: usize,
    pub wp: usize,
    pub cp: usize,
    pub x0: usize,
    pub x1: usize,
    /// The image's extent.
    pub h: usize,
    pub w: usize,
    pub ph: isize,
    pub pw: isize,
}

#[cfg(target_arch = "x86_64")]
impl PadMap {
    fn of(g: &Depthwise, wide: bool) -> PadMap {
        let Depthwise { h, w, kh, kw, sh, sw, dh, dw, oh, ow, ph, pw, channels } = *g;
        // Every padded row and column a window reads; channels in whole vectors (sixteen lanes
        // on the wide path).
        let (hp, wp) = ((oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1);
        let cp = lane_channels(channels, wide);
        // The buffer columns that hold input columns: x in x0..x1 reads column x - pw.
        let x0 = (pw.max(0) as usize).min(wp);
        let x1 = ((w as isize + pw).clamp(0, wp as isize) as usize).max(x0);
        PadMap { hp, wp, cp, x0, x1, h, w, ph, pw }
    }

    /// The buffer offset of image position `(iy, ix)` (its first channel), if a window reads it.
    #[inline]
    pub fn at(&self, iy: usize, ix: usize) -> Option<usize> {
        let (y, x) = (iy as isize + self.ph, ix as isize + self.pw);
        (y >= 0 && (y as usize) < self.hp && x >= self.x0 as isize && (x as usize) < self.x1)
            .then(|| (y as usize * self.wp + x as usize) * self.cp)
    }

    /// The buffer's values for one image.
    pub fn len(&self) -> usize {
        self.hp * self.wp * self.cp
    }

    /// Image row `iy`'s buffer row, if a window reads it.
    #[inline]
    fn row(&self, iy: usize) -> Option<usize> {
        let y = iy as isize + self.ph;
        (y >= 0 && (y as usize) < self.hp).then_some(y as usize)
    }
}

thread_local! {
    /// [`depthwise_lanes_avx2`]'s buffers, kept between calls (the padded images, the weights by
    /// tap, the outputs by position): allocating and zeroing them was a tenth of MobileNetV2.
    /// (A padded buffer per map, whose padding would never need zeroing again, was slower:
    /// MobileNetV3 at batch 1 282 -> 297 us, EfficientNet-B0 692 -> 719, each layer's buffer
    /// cold where the shared one is in cache.)
    #[cfg(target_arch = "x86_64")]
    static DEPTHWISE_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// The padded buffer's start, the map and the number of images whose padding it holds zeroed
    /// (the last call's: `fill` writes only the positions its map keeps, so the padding stays zero
    /// for the next call of the same map, the next images of the same layer).
    #[cfg(target_arch = "x86_64")]
    static DEPTHWISE_ZEROED: std::cell::Cell<Option<(usize, PadMap, usize)>> = const { std::cell::Cell::new(None) };
}

/// [`depthwise_lanes_avx2`] on its reused buffers, `images` images written into the padded
/// buffers (one after the other, [`PadMap::len`] values each) by `fill` (given them, their padding
/// zero, and where each input position goes: `fill` writes every position [`PadMap::at`] keeps,
/// all `cp` lanes, zeros past the channels), then each image's taps. Only the padding is zeroed
/// here, and only when the last call's map, image count or buffer differed (the next images of a
/// layer find it zero): every other value is written before use. Returns whether a
/// [`DwOut::Levels`] output met a NaN (then its levels are not written).
///
/// # Safety
/// As [`depthwise_lanes_avx2`], `input` aside; `fill` writes within the buffers it is given, and
/// only where the map keeps positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_lanes_with(
    g: &Depthwise,
    (wide, images): (bool, usize),
    fill: impl FnOnce(&mut [f32], &PadMap),
    weights: (&[f32], Option<&DepthwiseTaps>),
    epilogue: (Option<&[f32]>, &[Post]),
    out: DwOut,
) -> bool {
    let m = PadMap::of(g, wide);
    let (channels, ol, len) = (g.channels, g.oh * g.ow, m.len());
    DEPTHWISE_SCRATCH.with_borrow_mut(|(buf, wt, acc)| {
        // Grown, never shrunk (a shrink then a growth would zero the growth again), from a
        // 64-byte boundary: every position's `cp` lanes (a multiple of 16) start on one, so no
        // 512-bit load of the taps splits a cache line (the allocator's 16-byte alignment split
        // every one).
        let buf = aligned64(buf, images * len);
        let row = m.wp * m.cp;
        // Where the last call was the same map and images on the same buffer, its padding is
        // still zero.
        let zeroed = Some((buf.as_ptr() as usize, m, images));
        if DEPTHWISE_ZEROED.get() != zeroed {
            for block in buf.chunks_exact_mut(len) {
                for y in 0..m.hp {
                    let iy = y as isize - m.ph;
                    if iy < 0 || iy as usize >= m.h {
                        block[y * row..(y + 1) * row].fill(0.0);
                    } else {
                        block[y * row..y * row + m.x0 * m.cp].fill(0.0);
                        block[y * row + m.x1 * m.cp..(y + 1) * row].fill(0.0);
                    }
                }
            }
            DEPTHWISE_ZEROED.set(zeroed);
        }
        fill(buf, &m);
        let blocks = buf.chunks_exact(len);
        match out {
            DwOut::Planes(out) => {
                for (block, out) in blocks.zip(out.chunks_exact_mut(channels * ol)) {
                    // SAFETY: as this function's contract.
                    unsafe { depthwise_compute(weights, g, epilogue, DwSink::Planes(out), wide, &m, block, wt, acc) };
                }
                false
            }
            DwOut::Levels { quant, x4, p_pad } => {
                assert!(p_pad >= images * ol, "depthwise levels: p_pad >= positions");
                LEVELS.with_borrow_mut(|stage| {
                    // Per position its cp channels' bytes (the images' positions one after the
                    // other), then the quads transposed to rows.
                    let stage = aligned64(stage, p_pad * m.cp / 4);
                    for (block, part) in blocks.zip(stage.chunks_exact_mut(ol * m.cp / 4)) {
                        // SAFETY: as this function's contract.
                        let sink = DwSink::Levels(quant, part);
                        if unsafe { depthwise_compute(weights, g, epilogue, sink, wide, &m, block, wt, acc) } {
                            return true;
                        }
                    }
                    let live = channels.div_ceil(4);
                    assert!(x4.len() >= live * p_pad, "depthwise levels: the levels' buffer");
                    // Words moved as f32 bit patterns (moves and shuffles keep every bit).
                    let src = std::slice::from_raw_parts(stage.as_ptr() as *const f32, stage.len());
                    let dst = std::slice::from_raw_parts_mut(x4.as_mut_ptr() as *mut f32, live * p_pad);
                    copy_strided(src, (live, p_pad), (1, m.cp / 4), dst);
                    false
                })
            }
        }
    })
}

/// [`depthwise_fed`]'s fill from an image `[channels, positions]` of the geometry `geo`: the copy
/// [`depthwise_conv`] makes.
#[cfg(target_arch = "x86_64")]
pub(crate) fn depthwise_image_into(input: &[f32], geo: &ConvGeometry, channels: usize, m: &PadMap, buf: &mut [f32]) {
    assert!(crate::isa() != crate::Isa::Generic, "depthwise_image_into: AVX2");
    // SAFETY: isa() checked AVX2 and FMA; depthwise_image asserts the sizes.
    unsafe { depthwise_image(input, &Depthwise::of(geo, channels), m, buf) }
}

/// The image `[channels, h, w]` into the padded buffer at the positions `m` keeps, eight channels
/// x eight columns per register transpose; lanes past the channels zeroed.
///
/// # Safety
/// AVX2 and FMA; `input` holds the planes, `buf` the buffer `m` describes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_image(input: &[f32], g: &Depthwise, m: &PadMap, buf: &mut [f32]) {
    use std::arch::x86_64::*;
    let Depthwise { h, w, channels, .. } = *g;
    let (il, wp, cp, x0, x1, pw) = (h * w, m.wp, m.cp, m.x0, m.x1, m.pw);
    assert!(input.len() >= channels * il && buf.len() >= m.hp * wp * cp);
    for iy in 0..h {
        let Some(y) = m.row(iy) else { continue };
        if channels < cp {
            for x in x0..x1 {
                buf[(y * wp + x) * cp + channels..(y * wp + x + 1) * cp].fill(0.0);
            }
        }
        let row = iy * w;
        for c0 in (0..channels).step_by(8) {
            let cn = (channels - c0).min(8);
            let mut x = x0;
            // Eight channels x eight columns through one register transpose.
            while cn == 8 && x + 8 <= x1 {
                let ix = (x as isize - pw) as usize;
                let v = transpose8(std::array::from_fn(|cc| {
                    _mm256_loadu_ps(input.as_ptr().add((c0 + cc) * il + row + ix))
                }));
                for (j, v) in v.iter().enumerate() {
                    _mm256_storeu_ps(buf.as_mut_ptr().add((y * wp + x + j) * cp + c0), *v);
                }
                x += 8;
            }
            // The last columns (fewer than eight) through one masked transpose: small planes
            // (a 6 x 6 or 11 x 11 image) are mostly such columns.
            if cn == 8 && x < x1 {
                let n = x1 - x;
                let ix = (x as isize - pw) as usize;
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                let v = transpose8(std::array::from_fn(|cc| {
                    _mm256_maskload_ps(input.as_ptr().add((c0 + cc) * il + row + ix), mask)
                }));
                for (j, v) in v.iter().enumerate().take(n) {
                    _mm256_storeu_ps(buf.as_mut_ptr().add((y * wp + x + j) * cp + c0), *v);
                }
                x = x1;
            }
            for x in x..x1 {
                let ix = (x as isize - pw) as usize;
                let dst = &mut buf[(y * wp + x) * cp + c0..(y * wp + x) * cp + c0 + cn];
                for (cc, d) in dst.iter_mut().enumerate() {
                    *d = input[(c0 + cc) * il + row + ix];
                }
            }
        }
    }
}

/// The first `len` values of `v` from a 64-byte boundary (`v` grown to `len` values plus a
/// boundary's worth, never shrunk; values are kept only while `v` is not reallocated): a
/// kernel's 512-bit loads and stores at multiples of 64 bytes from there never split a cache
/// line, as they did from the allocator's 16-byte alignment.
pub(crate) fn aligned64<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    let pad = 64 / std::mem::size_of::<T>().max(1);
    if v.len() < len + pad {
        v.resize(len + pad, T::default());
    }
    let at = v.as_ptr().align_offset(64).min(pad);
    &mut v[at..at + len]
}

/// Where [`depthwise_compute`] puts one image's outputs: `[channel, position]` values, or the
/// levels of the pointwise convolution they feed under its quantizer, by position (`[position][cp
/// / 4]` words, as [`crate::x86_64::avx512::avx512_depthwise_levels`] writes them).
#[cfg(target_arch = "x86_64")]
enum DwSink<'a> {
    Planes(&'a mut [f32]),
    Levels((f32, i32, i32, i32), &'a mut [u32]),
}

/// [`depthwise_lanes_avx2`] once the padded image is in `buf`: the weights by tap, the taps, and
/// the outputs back to `[channel, position]` with the bias and epilogue, or as levels by position
/// (returns whether one was NaN).
///
/// # Safety
/// As [`depthwise_lanes_avx2`]; `buf` is the buffer `m` describes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn depthwise_compute(
    weights: (&[f32], Option<&DepthwiseTaps>),
    g: &Depthwise,
    (bias, post): (Option<&[f32]>, &[Post]),
    out: DwSink,
    wide: bool,
    m: &PadMap,
    buf: &[f32],
    wt: &mut Vec<f32>,
    acc: &mut Vec<f32>,
) -> bool {
    let Depthwise { kh, kw, sh, sw, dh, dw, oh, ow, channels, .. } = *g;
    let (kl, ol, wp, cp) = (kh * kw, oh * ow, m.wp, m.cp);
    let (weights, planned) = weights;
    // The weights by tap: as planned, or laid out now.
    let wt: &[f32] = match planned.and_then(|t| t.for_layer(channels, kl, cp)) {
        Some(t) => t,
        None => {
            let wt = aligned64(wt, kl * cp);
            lay_out_by_tap(weights, channels, kl, wt);
            wt
        }
    };
    // Each tap's offset from a window's start (on the stack up to 5 x 5: a call per image and
    // layer allocated it).
    let tap_off = |t: usize| (t / kw * dh * wp + t % kw * dw) * cp;
    let mut on_stack = [0usize; DEPTHWISE_WIDE_TAPS];
    let on_heap: Vec<usize>;
    let offs: &[usize] = if kl <= DEPTHWISE_WIDE_TAPS {
        on_stack.iter_mut().take(kl).enumerate().for_each(|(t, o)| *o = tap_off(t));
        &on_stack[..kl]
    } else {
        on_heap = (0..kl).map(tap_off).collect();
        &on_heap
    };
    // Every element is written below (each position, every 8-channel vector up to cp).
    let acc = aligned64(acc, ol * cp);
    let (bp, wtp) = (buf.as_ptr(), wt.as_ptr());
    let geo = (oh, ow, sh, sw, wp, cp);
    if wide {
        depthwise_taps_avx512(bp, wtp, offs, geo, acc.as_mut_ptr());
    } else {
        depthwise_taps_avx2(bp, wtp, offs, geo, acc.as_mut_ptr());
    }
    let out = match out {
        DwSink::Planes(out) => out,
        DwSink::Levels(quant, stage) if wide => {
            return crate::x86_64::avx512::avx512_depthwise_levels((&*acc, cp, channels, ol), bias, post, quant, stage);
        }
        DwSink::Levels(quant, stage) => {
            return crate::x86_64::avx2::avx2_depthwise_levels((&*acc, cp, channels, ol), bias, post, quant, stage);
        }
    };
    // Back to [channel, position] with the epilogue, one copy per epilogue form.
    let f = PostForm::of(post);
    let a = (&*acc, cp, channels, ol);
    by_post_form!(f, depthwise_unpack(a, bias, (post, f), out));
    false
}

thread_local! {
    /// [`depthwise_lanes_with`]'s levels by position (`[p_pad][cp / 4]` words) before the transpose.
    #[cfg(target_arch = "x86_64")]
    static LEVELS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`depthwise_lanes_avx2`]'s outputs `acc` (`[position, cp]`) back to `[channel, position]`,
/// eight positions x eight channels per register transpose, each position's eight channels plus
/// their bias and through the epilogue on the way: `CHAIN` runs the ops one by one ([`post8`]),
/// else the form's clamp and FakeQuant as `CLAMP` and `FQ` say.
///
/// # Safety
/// AVX2 and FMA; `acc` holds `ol` positions of `cp >= channels` values, `out` `channels * ol`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_unpack<const CHAIN: bool, const CLAMP: bool, const FQ: bool>(
    (acc, cp, channels, ol): (&[f32], usize, usize, usize),
    bias: Option<&[f32]>,
    (post, form): (&[Post], PostForm),
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let pv = crate::x86_64::avx2::PostVec8::new(form);
    let mut bv = [0f32; 8];
    let o8 = ol / 8 * 8;
    for c0 in (0..channels).step_by(8) {
        let cn = (channels - c0).min(8);
        if let Some(b) = bias {
            bv[..cn].copy_from_slice(&b[c0..c0 + cn]);
        }
        let vb = _mm256_loadu_ps(bv.as_ptr());
        for o0 in (0..o8).step_by(8) {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (j, r) in rows.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(acc.as_ptr().add((o0 + j) * cp + c0));
                let v = if bias.is_some() { _mm256_add_ps(v, vb) } else { v };
                *r = if CHAIN { post8(v, post) } else { pv.apply::<CLAMP, FQ>(v) };
            }
            let v = transpose8(rows);
            for (cc, v) in v.iter().enumerate().take(cn) {
                _mm256_storeu_ps(out.as_mut_ptr().add((c0 + cc) * ol + o0), *v);
            }
        }
        // The last positions (fewer than eight): one vector of eight channels each.
        let mut t = [0f32; 8];
        for o in o8..ol {
            let v = _mm256_loadu_ps(acc.as_ptr().add(o * cp + c0));
            let v = if bias.is_some() { _mm256_add_ps(v, vb) } else { v };
            _mm256_storeu_ps(t.as_mut_ptr(), if CHAIN { post8(v, post) } else { pv.apply::<CLAMP, FQ>(v) });
            for (cc, &v) in t.iter().enumerate().take(cn) {
                out[(c0 + cc) * ol + o] = v;
            }
        }
    }
}

/// [`depthwise_lanes_avx2`]'s taps on eight channels per vector ([`crate::x86_64::common::depthwise_taps`],
/// one block of channels at a time: two would take all sixteen registers).
///
/// # Safety
/// The CPU must support AVX2 and FMA; the pointers hold the buffers [`depthwise_lanes_avx2`]
/// builds, `cp` a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_taps_avx2(
    bp: *const f32,
    wtp: *const f32,
    offs: &[usize],
    geo: (usize, usize, usize, usize, usize, usize),
    acc: *mut f32,
) {
    crate::x86_64::common::depthwise_taps::<std::arch::x86_64::__m256, false>(bp, wtp, offs, geo, acc)
}

/// Most taps the wide depthwise path keeps as weight vectors (5 x 5 kernels and smaller).
#[cfg(target_arch = "x86_64")]
const DEPTHWISE_WIDE_TAPS: usize = 25;

/// [`depthwise_lanes_avx2`]'s taps on sixteen channels per vector
/// ([`crate::x86_64::common::depthwise_taps`], two blocks of channels at a time where there are
/// two).
///
/// # Safety
/// The CPU must support AVX-512 F; `offs.len() <= DEPTHWISE_WIDE_TAPS`; the pointers hold the
/// buffers [`depthwise_lanes_avx2`] builds, `cp` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn depthwise_taps_avx512(
    bp: *const f32,
    wtp: *const f32,
    offs: &[usize],
    geo: (usize, usize, usize, usize, usize, usize),
    acc: *mut f32,
) {
    crate::x86_64::common::depthwise_taps::<std::arch::x86_64::__m512, true>(bp, wtp, offs, geo, acc)
}

/// `c[i * rsc] = chain over p of fma(a[i * rsa + p], b[p * rsb])` from +0 for rows i < m (a
/// multiple of 8), eight rows per vector: each 8 x 8 block of a loaded by rows and transposed in
/// registers, the columns past a multiple of eight gathered lane by lane. The same chains, in the
/// same order, as the scalar definition.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_rows8(m: usize, k: usize, a: &[f32], rsa: usize, b: &[f32], rsb: usize, c: &mut [f32], rsc: usize) {
    use std::arch::x86_64::*;
    let k8 = k / 8 * 8;
    let ap = a.as_ptr();
    for i0 in (0..m).step_by(8) {
        let mut acc = _mm256_setzero_ps();
        for p0 in (0..k8).step_by(8) {
            let rows: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(ap.add((i0 + i) * rsa + p0)));
            let cols = transpose8(rows);
            for (j, col) in cols.iter().enumerate() {
                acc = _mm256_fmadd_ps(*col, _mm256_set1_ps(*b.get_unchecked((p0 + j) * rsb)), acc);
            }
        }
        for p in k8..k {
            let col: [f32; 8] = std::array::from_fn(|i| *a.get_unchecked((i0 + i) * rsa + p));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(col.as_ptr()), _mm256_set1_ps(*b.get_unchecked(p * rsb)), acc);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        for (i, v) in out.iter().enumerate() {
            *c.get_unchecked_mut((i0 + i) * rsc) = *v;
        }
    }
}

/// [`copy_strided`] of a transposed source (`rs == 1`: `dst[i][j] = src[j * cs + i]`) through
/// 8 x 8 register transposes, the rows past a multiple of eight by gathers (three interleaved
/// rows, an RGB image's, by blends and permutes), the last columns value by value: the same
/// values moved.
///
/// # Safety
/// AVX2; `src` holds `(cols - 1) * cs + rows` values and `dst` `rows * cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_avx2(src: &[f32], (rows, cols): (usize, usize), cs: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for j0 in (0..c8).step_by(8) {
        for i0 in (0..r8).step_by(8) {
            let v = transpose8(std::array::from_fn(|jj| _mm256_loadu_ps(sp.add((j0 + jj) * cs + i0))));
            for (ii, v) in v.iter().enumerate() {
                _mm256_storeu_ps(dp.add((i0 + ii) * cols + j0), *v);
            }
        }
    }
    // The last rows (all of them where there are fewer than eight: an interleaved image's
    // channels, NHWC to NCHW), eight columns per gather (value by value, each was a load and a
    // store: 11 us for a 64 x 64 RGB image on one EPYC core), then the last columns of the other
    // rows.
    if rows == 3 && cs == 3 {
        // RGB: eight pixels' 24 values in three registers, each channel's eight from two blends
        // (the three registers hold a channel at disjoint positions) and one permute.
        let (p0, p1, p2) = (
            _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5),
            _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6),
            _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7),
        );
        for j0 in (0..c8).step_by(8) {
            let s = sp.add(3 * j0);
            let (a, b, c) = (_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8)), _mm256_loadu_ps(s.add(16)));
            let c0 = _mm256_blend_ps::<0x24>(_mm256_blend_ps::<0x92>(a, b), c);
            let c1 = _mm256_blend_ps::<0x49>(_mm256_blend_ps::<0x24>(a, b), c);
            let c2 = _mm256_blend_ps::<0x92>(_mm256_blend_ps::<0x49>(a, b), c);
            _mm256_storeu_ps(dp.add(j0), _mm256_permutevar8x32_ps(c0, p0));
            _mm256_storeu_ps(dp.add(cols + j0), _mm256_permutevar8x32_ps(c1, p1));
            _mm256_storeu_ps(dp.add(2 * cols + j0), _mm256_permutevar8x32_ps(c2, p2));
        }
        for i in 0..3 {
            for j in c8..cols {
                dst[i * cols + j] = src[j * 3 + i];
            }
        }
        return;
    }
    let gathered = if cs <= i32::MAX as usize / 8 { c8 } else { 0 };
    let at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(cs as i32));
    for i in r8..rows {
        for j0 in (0..gathered).step_by(8) {
            let v = _mm256_i32gather_ps::<4>(sp.add(j0 * cs + i), at);
            _mm256_storeu_ps(dp.add(i * cols + j0), v);
        }
        for j in gathered..cols {
            dst[i * cols + j] = src[j * cs + i];
        }
    }
    for i in 0..r8 {
        for j in c8..cols {
            dst[i * cols + j] = src[j * cs + i];
        }
    }
}

/// An 8 x 8 transpose of f32 rows in registers: `out[j][i] = rows[i][j]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// `acc[i] = chain over taps t of fma(w[t], src[starts[t] + i])` from +0, every i: blocks of 16
/// outputs kept in registers through all the taps (one load and one FMA per tap and vector).
fn taps_fma(acc: &mut [f32], w: &[f32], starts: &[usize], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic {
        // SAFETY: isa() checked AVX2 and FMA.
        return unsafe { taps_fma_avx2(acc, w, starts, src) };
    }
    taps_fma_impl(acc, w, starts, src)
}

#[inline(always)]
fn taps_fma_impl(acc: &mut [f32], w: &[f32], starts: &[usize], src: &[f32]) {
    const B: usize = 16;
    let n = acc.len();
    let mut b = 0;
    while b + B <= n {
        let mut a = [0f32; B];
        for (&wt, &s) in w.iter().zip(starts) {
            let x: &[f32; B] = src[s + b..s + b + B].try_into().expect("16 values");
            for l in 0..B {
                a[l] = wt.mul_add(x[l], a[l]);
            }
        }
        acc[b..b + B].copy_from_slice(&a);
        b += B;
    }
    for (i, o) in acc.iter_mut().enumerate().skip(b) {
        *o = w.iter().zip(starts).fold(0f32, |a, (&wt, &s)| wt.mul_add(src[s + i], a));
    }
}

/// [`taps_fma`] compiled for AVX2 + FMA (each lane its own chain: the scalar bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn taps_fma_avx2(acc: &mut [f32], w: &[f32], starts: &[usize], src: &[f32]) {
    taps_fma_impl(acc, w, starts, src)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `aligned64` gives `len` values from a 64-byte boundary for every length and element size,
    /// growing the vector as needed, and the same slice again while the vector is not
    /// reallocated.
    #[test]
    fn aligned_scratch_starts_on_a_cache_line() {
        let mut f: Vec<f32> = Vec::new();
        let mut w: Vec<u32> = Vec::with_capacity(3);
        for len in [0usize, 1, 15, 16, 17, 1000, 4099] {
            let s = aligned64(&mut f, len);
            assert_eq!((s.len(), s.as_ptr() as usize % 64), (len, 0), "f32, {len}");
            s.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            let again = aligned64(&mut f, len);
            assert!(again.iter().enumerate().all(|(i, &v)| v == i as f32), "f32 values kept, {len}");
            let s = aligned64(&mut w, len);
            assert_eq!((s.len(), s.as_ptr() as usize % 64), (len, 0), "u32, {len}");
        }
    }

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

/// Activations quantized to int8 for the W4A8 kernels: `q` (`k_pad` values, zero-padded),
/// the zero point and scale (`x ~ (q - zero) * scale`), per group of the weight's layout the sum
/// of `q`, and whether the input held a NaN.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedInput {
    pub q: Vec<i8>,
    pub zero: i32,
    pub scale: f32,
    pub sums: Vec<i32>,
    /// Whether any of the values quantized was NaN (the int8 levels cannot hold one; FakeQuant
    /// keeps it, and every output that sums it is NaN).
    pub nan: bool,
}

/// Quantizes `x` as FakeQuant does (divide in f32, round half to even, add the zero point,
/// clamp to [-128, 127]), padded to the packed weight's `k_pad`, with group sums.
pub fn quantize_input(x: &[f32], scale: f32, zero: i32, w: &crate::packed::PackedQ4) -> QuantizedInput {
    quantize_input_range(x, scale, zero, -128, 127, w)
}

/// [`quantize_input`] clamped to `[lo, hi]` (a sub-range of int8: 4-bit activations use [-8, 7]).
pub fn quantize_input_range(
    x: &[f32],
    scale: f32,
    zero: i32,
    lo: i32,
    hi: i32,
    w: &crate::packed::PackedQ4,
) -> QuantizedInput {
    let mut out = QuantizedInput::default();
    quantize_input_into(x, scale, zero, lo, hi, w, &mut out);
    out
}

/// [`quantize_input_range`] into `out`, reusing its buffers (no allocation once they are big
/// enough); the values through [`quantize_i8_into`] (AVX2 where the CPU has it).
pub fn quantize_input_into(
    x: &[f32],
    scale: f32,
    zero: i32,
    lo: i32,
    hi: i32,
    w: &crate::packed::PackedQ4,
    out: &mut QuantizedInput,
) {
    out.q.resize(w.k_pad, 0);
    let k = x.len().min(w.k_pad);
    out.nan = quantize_i8_into(&x[..k], scale, zero, lo, hi, &mut out.q[..k]);
    // Padding holds q = 0 against zero weights: it adds nothing to any sum the kernels use
    // (they subtract zero * the group's weight sum, which excludes padding).
    out.q[k..].fill(0);
    out.zero = zero;
    out.scale = scale;
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic && w.group.is_multiple_of(32) && w.k_pad.is_multiple_of(w.group) {
        // SAFETY: isa() checked AVX2; the group divides k_pad and is a multiple of 32.
        return unsafe { crate::x86_64::avx2::avx2_group_sums_i8(&out.q, w.group, &mut out.sums) };
    }
    out.sums.clear();
    out.sums.extend(out.q.chunks(w.group).map(|c| c.iter().map(|&v| v as i32).sum::<i32>()));
}

/// [`quantize_i8`] over a slice (`out[i]` for `x[i]`), with AVX-512 or AVX2 intrinsics where the
/// CPU has them (the same levels lane by lane, so the same bytes). Returns whether any value
/// quantized was NaN.
pub fn quantize_i8_into(x: &[f32], scale: f32, zero: i32, lo: i32, hi: i32, out: &mut [i8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        crate::Isa::Avx512Vnni => {
            // SAFETY: isa() checked AVX-512 F, AVX2 and FMA.
            return unsafe { crate::x86_64::avx512::avx512_quantize_i8(x, scale, zero, lo, hi, out) };
        }
        // SAFETY: isa() checked AVX2 and FMA.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_quantize_i8(x, scale, zero, lo, hi, out) },
        crate::Isa::Generic => {}
    }
    let (z, lo, hi) = (zero as f32, lo.max(-128) as f32, hi.min(127) as f32);
    let mut nan = false;
    for (d, &v) in out.iter_mut().zip(x) {
        *d = quantize_i8(v, scale, z, lo, hi);
        nan |= v.is_nan();
    }
    nan
}

/// FakeQuant with one scale and zero point, `out[i] = (clamp(round_half_even(x[i] / scale) + zero,
/// lo, hi) - zero) * scale` in f32 (`|lo|, |hi| <= 2^16`; NaN stays NaN), with AVX-512 or AVX2
/// intrinsics where the CPU has them: the same levels lane by lane, so the same bits.
pub fn fake_quant_into(x: &[f32], scale: f32, zero: f32, lo: f32, hi: f32, out: &mut [f32]) {
    let n = x.len().min(out.len());
    // SAFETY: n values each, disjoint buffers.
    if unsafe { fake_quant_vector(x.as_ptr(), out.as_mut_ptr(), n, (scale, zero, lo, hi)) } {
        return;
    }
    for (d, &v) in out.iter_mut().zip(x) {
        *d = fake_quant_one(v, scale, zero, lo, hi);
    }
}

/// [`fake_quant_into`] in place: the same operations on each value, the same bits.
pub fn fake_quant_in_place(v: &mut [f32], scale: f32, zero: f32, lo: f32, hi: f32) {
    let p = v.as_mut_ptr();
    // SAFETY: in place over v's values.
    if unsafe { fake_quant_vector(p, p, v.len(), (scale, zero, lo, hi)) } {
        return;
    }
    for e in v.iter_mut() {
        *e = fake_quant_one(*e, scale, zero, lo, hi);
    }
}

/// [`fake_quant_into`] of `n` values from `x` to `out` (the same buffer or disjoint ones) by this
/// CPU's vector form; false (nothing written) where it has none.
///
/// # Safety
/// `x` readable and `out` writable for `n` values, equal or disjoint.
unsafe fn fake_quant_vector(x: *const f32, out: *mut f32, n: usize, q: (f32, f32, f32, f32)) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match crate::isa() {
            // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the buffers as this function's contract.
            crate::Isa::Avx512Vnni => unsafe { crate::x86_64::avx512::avx512_fake_quant_ptr(x, out, n, q) },
            // SAFETY: isa() checked AVX2 and FMA; the buffers as this function's contract.
            crate::Isa::Avx2 => unsafe { crate::x86_64::avx2::fake_quant_ptr(x, out, n, q) },
            crate::Isa::Generic => return false,
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, out, n, q);
        false
    }
}

/// An element-wise op a kernel applies to its outputs before storing them (an epilogue), in
/// the order given: the same comparisons and IEEE operations as the op's own step, so the same
/// bits, without another pass over memory. NaN stays NaN through each of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Post {
    /// `x < 0 ? 0 : x` (NaN and -0 pass).
    Relu,
    /// `x < lo ? lo : x`, then `> hi ? hi :` (numpy's order; NaN passes).
    Clip(f32, f32),
    /// [`fake_quant_one`] with one scale and zero point (`|lo|, |hi| <= 2^16`).
    FakeQuant { scale: f32, zero: f32, lo: f32, hi: f32 },
    /// HardSwish: [`hard_swish`] in f64, rounded once.
    HardSwish,
    /// SiLU as its two steps compute it: the Sigmoid rounded to f32 ([`sigmoid_f32`]), then the
    /// f32 product with the value (either order: the same product).
    Silu,
    /// LeakyRelu with slope `alpha`: [`leaky_relu_f32`].
    LeakyRelu(f32),
}

impl Post {
    /// Whether vector kernels apply it in registers (the others run over the outputs after them,
    /// [`post_in_place`]).
    pub fn in_registers(self) -> bool {
        matches!(self, Post::Relu | Post::Clip(..) | Post::FakeQuant { .. } | Post::LeakyRelu(_))
    }
}

/// LeakyRelu of one f32 value: `x < 0 ? alpha x : x` (NaN and -0 pass). The interpreter's
/// definition forms `alpha x` in f64 and rounds it once: the product of two f32 is exact in f64,
/// so that is the correctly rounded f32 product, this one.
#[inline]
pub fn leaky_relu_f32(v: f32, alpha: f32) -> f32 {
    if v < 0.0 {
        alpha * v
    } else {
        v
    }
}

/// A chain split where vector kernels stop applying it in registers: the longest prefix of
/// [`Post::in_registers`] ops, and the rest (for [`post_in_place`] after the kernel).
pub fn post_split(post: &[Post]) -> (&[Post], &[Post]) {
    post.split_at(post.iter().position(|p| !p.in_registers()).unwrap_or(post.len()))
}

/// ReLU of one f32 value: `x < 0 ? 0 : x` (NaN and -0 pass).
#[inline]
pub fn relu_f32(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// Clip of one f32 value with f32 bounds: raised to `lo`, then capped at `hi` (numpy's order; NaN
/// passes through). The definition the interpreter's Clip and the epilogues share.
#[inline]
pub fn clip_f32(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

/// [`Post`] ops on one value, in order.
#[inline]
pub fn post_one(mut v: f32, post: &[Post]) -> f32 {
    for p in post {
        v = match *p {
            Post::Relu => relu_f32(v),
            Post::Clip(lo, hi) => clip_f32(v, lo, hi),
            Post::FakeQuant { scale, zero, lo, hi } => fake_quant_one(v, scale, zero, lo, hi),
            Post::HardSwish => hard_swish(v as f64) as f32,
            Post::Silu => v * sigmoid(v as f64) as f32,
            Post::LeakyRelu(a) => leaky_relu_f32(v, a),
        };
    }
    v
}

/// [`Post`] ops on every value of `v` in place: one pass per op (the in-place kernels the ops'
/// own steps run), for kernels that cannot apply them in registers.
pub fn post_in_place(v: &mut [f32], post: &[Post]) {
    let mut post = post;
    while let Some((p, rest)) = post.split_first() {
        post = rest;
        // A SiLU then a FakeQuant: through the quantized level ([`silu_fake_quant_in_place`]).
        if let (Post::Silu, Some((&Post::FakeQuant { scale, zero, lo, hi }, rest))) = (p, rest.split_first()) {
            silu_fake_quant_in_place(v, (scale, zero, lo, hi));
            post = rest;
            continue;
        }
        // A HardSwish then a FakeQuant: the same ([`hard_swish_fake_quant_in_place`]).
        if let (Post::HardSwish, Some((&Post::FakeQuant { scale, zero, lo, hi }, rest))) = (p, rest.split_first()) {
            hard_swish_fake_quant_in_place(v, (scale, zero, lo, hi));
            post = rest;
            continue;
        }
        // One loop per op (each a comparison or two: vectorized by the compiler, on AVX2's
        // registers where the CPU has them).
        match *p {
            Post::Relu | Post::Clip(..) | Post::LeakyRelu(_) => compare_in_place(v, *p),
            Post::FakeQuant { scale, zero, lo, hi } => fake_quant_in_place(v, scale, zero, lo, hi),
            // The vector kernels through a block in L1 at a time.
            Post::HardSwish | Post::Silu => {
                let mut t = [0f32; 256];
                for c in v.chunks_mut(256) {
                    let t = &mut t[..c.len()];
                    match *p {
                        Post::HardSwish => {
                            hard_swish_f32(c, t);
                            c.copy_from_slice(t);
                        }
                        _ => {
                            sigmoid_f32(c, t);
                            c.iter_mut().zip(t.iter()).for_each(|(x, s)| *x *= *s);
                        }
                    }
                }
            }
        }
    }
}

/// [`post_in_place`]'s comparison ops (a ReLU, Clip or LeakyRelu; others untouched) on every
/// value: the scalar definitions in one loop, compiled for AVX2 where the CPU has it (the
/// baseline's four-lane SSE form took 0.13 ns a value: 7% of bc_hopper's time at batch 64 for its
/// first layer's ReLU). The same operations per value, so the same bits.
pub fn compare_in_place(v: &mut [f32], p: Post) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic {
        // SAFETY: isa() checked AVX2 and FMA.
        return unsafe { compare_in_place_avx2(v, p) };
    }
    compare_loop(v, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn compare_in_place_avx2(v: &mut [f32], p: Post) {
    compare_loop(v, p)
}

/// (Inlined into its callers, so compiled with each one's target features; loops, not closures.)
#[inline(always)]
fn compare_loop(v: &mut [f32], p: Post) {
    match p {
        Post::Relu => {
            for e in v.iter_mut() {
                *e = relu_f32(*e);
            }
        }
        Post::Clip(lo, hi) => {
            for e in v.iter_mut() {
                *e = clip_f32(*e, lo, hi);
            }
        }
        Post::LeakyRelu(a) => {
            for e in v.iter_mut() {
                *e = leaky_relu_f32(*e, a);
            }
        }
        _ => {}
    }
}

/// `y[r * n + j] += row[j]` for every row `r` of `y` (`n = row.len()`): a Gemm's bias row, one f32
/// addition per value, compiled for AVX2 where the CPU has it. The same additions, so the same
/// bits.
pub fn add_row_in_place(y: &mut [f32], row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic {
        // SAFETY: isa() checked AVX2 and FMA.
        return unsafe { add_row_avx2(y, row) };
    }
    add_row_loop(y, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_row_avx2(y: &mut [f32], row: &[f32]) {
    add_row_loop(y, row)
}

#[inline(always)]
fn add_row_loop(y: &mut [f32], row: &[f32]) {
    if row.is_empty() {
        return;
    }
    for r in y.chunks_exact_mut(row.len()) {
        for (y, b) in r.iter_mut().zip(row) {
            *y += *b;
        }
    }
}

/// [`Post::Silu`] then [`Post::FakeQuant`] `(scale, zero, lo, hi)` over `v`, the two ops' bits:
/// with AVX-512, through the quantized level estimated in f32 and taken where its error cannot
/// change it (`avx512_silu_fake_quant`), the definition otherwise; without, the two ops one after
/// the other.
pub fn silu_fake_quant_in_place(v: &mut [f32], q: (f32, f32, f32, f32)) {
    op_fake_quant_in_place(v, Post::Silu, q);
}

/// `op` (SiLU or HardSwish) then the FakeQuant `q` over `v`: the AVX-512 kernel through the level
/// for the whole vectors it takes, then the two ops one after the other on the rest.
fn op_fake_quant_in_place(v: &mut [f32], op: Post, (scale, zero, lo, hi): (f32, f32, f32, f32)) {
    #[cfg(target_arch = "x86_64")]
    let done = match (crate::isa(), op) {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA.
        (crate::Isa::Avx512Vnni, Post::Silu) => unsafe {
            crate::x86_64::avx512::avx512_silu_fake_quant(v, (scale, zero, lo, hi))
        },
        // SAFETY: as above.
        (crate::Isa::Avx512Vnni, Post::HardSwish) => unsafe {
            crate::x86_64::avx512::avx512_hard_swish_fake_quant(v, (scale, zero, lo, hi))
        },
        // SAFETY: isa() checked AVX2 and FMA.
        (crate::Isa::Avx2, Post::Silu) => unsafe {
            crate::x86_64::avx2::avx2_silu_fake_quant(v, (scale, zero, lo, hi))
        },
        // SAFETY: as above.
        (crate::Isa::Avx2, Post::HardSwish) => unsafe {
            crate::x86_64::avx2::avx2_hard_swish_fake_quant(v, (scale, zero, lo, hi))
        },
        _ => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let rest = &mut v[done..];
    post_in_place(rest, &[op]);
    post_in_place(rest, &[Post::FakeQuant { scale, zero, lo, hi }]);
}

/// [`Post::HardSwish`] then [`Post::FakeQuant`] `(scale, zero, lo, hi)` over `v`, the two ops'
/// bits: with AVX-512 through the quantized level estimated in f32 and taken where its error
/// cannot change it (`avx512_hard_swish_fake_quant`), the definition otherwise; without, the two
/// ops one after the other.
pub fn hard_swish_fake_quant_in_place(v: &mut [f32], q: (f32, f32, f32, f32)) {
    op_fake_quant_in_place(v, Post::HardSwish, q);
}

/// Per plane of `v` (`[planes][il]`, `il > 0`), the f64 sum of its values in order from `init`
/// (`out[p] = fold(init, + v as f64)` over the plane): eight planes per f64 vector with AVX-512
/// (the same additions in the same order per plane), the rest one value at a time, eight planes
/// interleaved.
pub fn plane_sums_f64(v: &[f32], il: usize, init: f64, out: &mut [f64]) {
    assert!(il > 0 && out.len() >= v.len() / il, "plane_sums_f64: sizes");
    let planes = v.len() / il;
    #[cfg(target_arch = "x86_64")]
    let done = match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the sizes are asserted above.
        crate::Isa::Avx512Vnni => unsafe { crate::x86_64::avx512::avx512_plane_sums(v, il, init, out) },
        _ => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    const P: usize = 8;
    let mut p0 = done;
    while p0 + P <= planes {
        let rows: [&[f32]; P] = std::array::from_fn(|c| &v[(p0 + c) * il..(p0 + c + 1) * il]);
        let mut acc = [init; P];
        // Index by j over all eight rows (the chains advance together).
        #[allow(clippy::needless_range_loop)]
        for j in 0..il {
            for c in 0..P {
                acc[c] += rows[c][j] as f64;
            }
        }
        out[p0..p0 + P].copy_from_slice(&acc);
        p0 += P;
    }
    for p in p0..planes {
        out[p] = v[p * il..(p + 1) * il].iter().fold(init, |a, &e| a + e as f64);
    }
}

/// A [`Post`] chain in the form vector kernels specialize on: one clamp (a ReLU is the clamp to
/// `[0, inf]`: `x < 0 ? 0 : x` either way, -0 and NaN kept), then one FakeQuant, either absent;
/// any other chain is run op by op (`chain`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PostForm {
    pub clamp: Option<(f32, f32)>,
    /// `(scale, zero, lo, hi)`.
    pub fq: Option<(f32, f32, f32, f32)>,
    pub chain: bool,
}

/// Calls `$f::<CHAIN, CLAMP, FQ>(args)` with the const parameters of the [`PostForm`] `$form`:
/// `CHAIN` where its ops run one by one, else whether it has a clamp and a FakeQuant (each
/// epilogue form its own instance of the kernel, as the kernels take them).
#[cfg(target_arch = "x86_64")]
macro_rules! by_post_form {
    ($form:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let form: $crate::generic::PostForm = $form;
        match (form.chain, form.clamp.is_some(), form.fq.is_some()) {
            (true, ..) => $f::<true, false, false>($($arg),*),
            (_, false, false) => $f::<false, false, false>($($arg),*),
            (_, true, false) => $f::<false, true, false>($($arg),*),
            (_, false, true) => $f::<false, false, true>($($arg),*),
            (_, true, true) => $f::<false, true, true>($($arg),*),
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use by_post_form;

impl PostForm {
    pub fn of(post: &[Post]) -> PostForm {
        let mut f = PostForm::default();
        let mut rest = post;
        if let Some((p @ (Post::Relu | Post::Clip(..)), r)) = rest.split_first() {
            f.clamp = Some(match *p {
                Post::Clip(lo, hi) => (lo, hi),
                _ => (0.0, f32::INFINITY),
            });
            rest = r;
        }
        if let Some((Post::FakeQuant { scale, zero, lo, hi }, r)) = rest.split_first() {
            f.fq = Some((*scale, *zero, *lo, *hi));
            rest = r;
        }
        if !rest.is_empty() {
            return PostForm { chain: true, ..PostForm::default() };
        }
        f
    }
}

/// [`Post`] ops on eight lanes (the ops' scalar definitions lane by lane: `vmaxps(lo, v)` is
/// `v < lo ? lo : v` and `vminps(hi, v)` is `v > hi ? hi : v`, NaN in `v` returned as the second
/// operand; FakeQuant through the vector quantizer [`fake_quant_in_place`] runs).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn post8(mut v: std::arch::x86_64::__m256, post: &[Post]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    for p in post {
        v = match *p {
            Post::Relu => _mm256_max_ps(_mm256_setzero_ps(), v),
            Post::Clip(lo, hi) => _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v)),
            // `v < 0` ordered: NaN and -0 keep `v`.
            Post::LeakyRelu(a) => _mm256_blendv_ps(
                v,
                _mm256_mul_ps(v, _mm256_set1_ps(a)),
                _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps()),
            ),
            Post::FakeQuant { scale, zero, lo, hi } => crate::x86_64::avx2::fake_quant8(v, scale, zero, lo, hi),
            // Not in registers (see `post_split`): lane by lane.
            p => {
                let mut a = [0f32; 8];
                _mm256_storeu_ps(a.as_mut_ptr(), v);
                a.iter_mut().for_each(|x| *x = post_one(*x, std::slice::from_ref(&p)));
                _mm256_loadu_ps(a.as_ptr())
            }
        };
    }
    v
}

/// One value of [`fake_quant_into`]. Quotients beyond 2^22 saturate to lo or hi whatever their
/// rounding, so they are bounded first and rounded without the libm fallback.
#[inline]
pub fn fake_quant_one(v: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> f32 {
    (quantize_level(v, scale, zero, lo, hi) - zero) * scale
}

/// `1.5 * 2^52`: adding it rounds an f64 of magnitude below 2^51 to an integer (to nearest,
/// ties to even), which then sits in the low bits of the sum's representation.
pub const EXP_MAGIC: f64 = 6_755_399_441_055_744.0;
/// ln 2 split so that `n * EXP_LN2_HI` is exact for |n| < 2^11 (fdlibm's constants).
pub const EXP_LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
pub const EXP_LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// `1 / k!` for k = 0..=13: the Taylor polynomial of e^r on |r| <= ln 2 / 2 (truncation error
/// below 5e-18 relative).
pub const EXP_TAYLOR: [f64; 14] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
    1.0 / 39916800.0,
    1.0 / 479001600.0,
    1.0 / 6227020800.0,
];

/// sqil's exponential of softmax, e^x for x <= 0 (softmax subtracts the row's maximum first):
/// x = n ln 2 + r by Cody and Waite's two-constant reduction, e^r by a degree-13 Taylor
/// polynomial in Horner form, times 2^n built from its bits; 0 below -708 (beneath f64's normal
/// range, and every f32 output's); NaN stays NaN. Within an ulp or so of the true value and, being
/// a fixed sequence of IEEE double operations with no FMA, the same bits in the interpreter, the
/// runtime's vector code and the generated C (libm's `exp` differs from libc to libc).
#[inline]
pub fn exp_nonpos(x: f64) -> f64 {
    if x.is_nan() || x <= -708.0 {
        return if x.is_nan() { x } else { 0.0 };
    }
    let t = x * std::f64::consts::LOG2_E + EXP_MAGIC;
    let n = t - EXP_MAGIC;
    let r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    let mut p = EXP_TAYLOR[13];
    for c in EXP_TAYLOR[..13].iter().rev() {
        p = p * r + c;
    }
    p * f64::from_bits(t.to_bits().wrapping_sub(EXP_MAGIC.to_bits()).wrapping_add(1023) << 52)
}

/// sqil's logistic function, in f64 from [`exp_nonpos`] (the same bits on every CPU and in every
/// SIMD width): `e = exp_nonpos(-|x|)`, then `1 / (1 + e)` for `x >= 0` and `e / (1 + e)` below
/// (NaN: NaN).
pub fn sigmoid(x: f64) -> f64 {
    let e = exp_nonpos(-x.abs());
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// `1 / k!` for k = 0..=10: the shorter Taylor polynomial of the screened sigmoid
/// ([`sigmoid_screened`]; truncation below 2.3e-13 relative on |r| <= ln 2 / 2).
pub const SCREEN_TAYLOR: [f64; 11] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
];

/// A screened result is taken only for `|x|` below this (above: e^-|x| near f32's subnormal
/// outputs, infinities; NaN fails the comparison too).
pub const SCREEN_MAX_ABS: f64 = 80.0;

/// The screen's margin: an f64 result whose low 29 bits (the bits f32 rounding drops) lie
/// within this many units of the halfway pattern `2^28` is not taken. The screened value is
/// within 2^-41 relative of [`sigmoid`]'s (the degree-10 truncation, 2.3e-13, and a few
/// roundings on either side), i.e. within 2^12 units of the last place: a result farther than
/// 2^16 units from halfway rounds to the f32 that [`sigmoid`]'s result rounds to. About one
/// value in 4 096 is recomputed by the definition.
pub const SCREEN_MARGIN: i64 = 1 << 16;

/// The screened logistic function: the same form as [`sigmoid`] with fused multiply-adds and a
/// degree-10 polynomial, and whether its f32 rounding is certain to be `sigmoid(x) as f32`
/// (see [`SCREEN_MARGIN`]). The vector kernels compute exactly these operations per lane; a lane
/// that is not certain is recomputed by the definition, so `sigmoid_f32` keeps [`sigmoid`]'s
/// bits.
pub fn sigmoid_screened(x: f64) -> (f64, bool) {
    let a = x.abs();
    let e = exp_taylor10(-a);
    let y = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    (y, a < SCREEN_MAX_ABS && far_from_halfway(y))
}

/// `e^x = 2^n e^r` for `x = n ln 2 + r` (`|r| <= ln 2 / 2`; n's split product exact for |n| <
/// 2^11), e^r by the degree-10 Taylor polynomial (`SCREEN_TAYLOR`: truncation below 2.3e-13
/// relative): within 2^-41 of `e^x` for `|x| < 708`, as [`SCREEN_MARGIN`] needs. The estimate of
/// [`sigmoid_screened`] (at `-|x|`) and of the AVX2 exponential and sigmoid kernels, which compute
/// these operations per lane.
#[inline]
pub fn exp_taylor10(x: f64) -> f64 {
    let t = x.mul_add(std::f64::consts::LOG2_E, EXP_MAGIC);
    let n = t - EXP_MAGIC;
    let r = (-n).mul_add(EXP_LN2_LO, (-n).mul_add(EXP_LN2_HI, x));
    let mut p = SCREEN_TAYLOR[10];
    for &c in SCREEN_TAYLOR[..10].iter().rev() {
        p = p.mul_add(r, c);
    }
    p * f64::from_bits(t.to_bits().wrapping_sub(EXP_MAGIC.to_bits()).wrapping_add(1023) << 52)
}

/// `2^(j/16)` for j = 0..16, each the nearest f64 (computed to 60 digits): the table of
/// [`sigmoid_screened_table`].
pub const EXP2_16THS: [f64; 16] = [
    f64::from_bits(0x3ff0000000000000),
    f64::from_bits(0x3ff0b5586cf9890f),
    f64::from_bits(0x3ff172b83c7d517b),
    f64::from_bits(0x3ff2387a6e756238),
    f64::from_bits(0x3ff306fe0a31b715),
    f64::from_bits(0x3ff3dea64c123422),
    f64::from_bits(0x3ff4bfdad5362a27),
    f64::from_bits(0x3ff5ab07dd485429),
    f64::from_bits(0x3ff6a09e667f3bcd),
    f64::from_bits(0x3ff7a11473eb0187),
    f64::from_bits(0x3ff8ace5422aa0db),
    f64::from_bits(0x3ff9c49182a3f090),
    f64::from_bits(0x3ffae89f995ad3ad),
    f64::from_bits(0x3ffc199bdd85529c),
    f64::from_bits(0x3ffd5818dcfba487),
    f64::from_bits(0x3ffea4afa2a490da),
];

/// [`sigmoid_screened`] with the table exponential: `e^-|x|` by [`exp_table16`], then the same
/// division and screen. Within 2^-41 of [`sigmoid`]'s result, as the screen's margin needs; five
/// multiply-adds fewer than the degree-10 form, one table lookup more (a register permute with
/// AVX-512). The AVX-512 kernel computes exactly these operations per lane.
pub fn sigmoid_screened_table(x: f64) -> (f64, bool) {
    let a = x.abs();
    let e = exp_table16(-a);
    let y = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    (y, a < SCREEN_MAX_ABS && far_from_halfway(y))
}

/// `e^x = 2^k 2^(j/16) e^r` for `x = (16 k + j) ln 2 / 16 + r` (any sign, `|r| <= ln 2 / 32`),
/// e^r by its degree-5 Taylor polynomial (truncation below 1.4e-13 relative: 2^-42.7): within
/// 2^-41 of `e^x` (the truncation, the table's and the operations' roundings) for `|x| < 708`.
/// The estimate of [`exp_screened`] and of [`sigmoid_screened_table`] (at `-|x|`); the AVX-512
/// kernels compute these operations per lane.
#[inline]
pub fn exp_table16(x: f64) -> f64 {
    let t = x.mul_add(16.0 * std::f64::consts::LOG2_E, EXP_MAGIC);
    let n = t - EXP_MAGIC;
    // n (below 2^11 in magnitude where a screen passes) times the split ln 2 / 16 is exact.
    let r = (-n).mul_add(EXP_LN2_LO / 16.0, (-n).mul_add(EXP_LN2_HI / 16.0, x));
    let mut p: f64 = 1.0 / 120.0;
    for c in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    let ni = t.to_bits().wrapping_sub(EXP_MAGIC.to_bits()) as i64;
    p * f64::from_bits(EXP2_16THS[(ni & 15) as usize].to_bits().wrapping_add(((ni >> 4) << 52) as u64))
}

/// The screened exponential takes only `EXP_SCREEN_LO < x < EXP_SCREEN_HI`: there `e^x` is a
/// normal f32 (from about 1.6e-38 to 1.7e38), so f32 rounding drops the f64 result's low 29 bits
/// (below: a subnormal or zero f32, rounded at another place; above: near or past f32's largest).
pub const EXP_SCREEN_LO: f64 = -87.0;
/// See [`EXP_SCREEN_LO`].
pub const EXP_SCREEN_HI: f64 = 88.0;

/// The screened exponential of [`exp_f32`]: [`exp_table16`], and whether its f32 rounding is
/// certain to be `x.exp() as f32`: within 2^-41 of `e^x`, so, as [`SCREEN_MARGIN`] argues, a
/// result past the margin rounds to the f32 that `e^x` and libm's `exp` (within an
/// ulp of it) round to. The AVX-512 kernel computes these operations per lane.
pub fn exp_screened(x: f64) -> (f64, bool) {
    let y = exp_table16(x);
    (y, x > EXP_SCREEN_LO && x < EXP_SCREEN_HI && far_from_halfway(y))
}

/// `Exp` on f32 values as sqil defines it (libm's `exp` in f64, rounded to f32): the screened
/// exponential where its rounding is certain, else the definition, so the definition's bits.
/// Eight lanes at a time with AVX-512, four with AVX2 (a degree-10 polynomial, no table).
pub fn exp_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_exp_f32(x, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_exp_f32(x, out) },
        crate::Isa::Generic => {}
    }
    generic_exp_f32(x, out)
}

/// [`exp_f32`] one value at a time ([`exp_screened`], else the definition).
pub fn generic_exp_f32(x: &[f32], out: &mut [f32]) {
    screened_scalar(x, out, exp_screened, f64::exp)
}

/// A screened f32 map one value at a time: `screened`'s result where its rounding is certain,
/// else `def` (the definition), each in f64 rounded to f32.
fn screened_scalar(x: &[f32], out: &mut [f32], screened: fn(f64) -> (f64, bool), def: fn(f64) -> f64) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        let (y, sure) = screened(v as f64);
        *o = if sure { y as f32 } else { def(v as f64) as f32 };
    }
}

/// `1 / (2 i + 1)` for i = 0..8: [`log_screened`]'s series `log m = 2 s (1 + s^2 / 3 + s^4 / 5 +
/// ... + s^14 / 15)` in `z = s^2` (truncation below 2^-44.8 relative for `|s| <= 0.1716`).
pub const LOG_SERIES: [f64; 8] = [1.0, 1.0 / 3.0, 1.0 / 5.0, 1.0 / 7.0, 1.0 / 9.0, 1.0 / 11.0, 1.0 / 13.0, 1.0 / 15.0];

/// The screened natural logarithm of [`log_f32`] for `x` an f32 value in f64: `x = 2^e m` with `m`
/// in `[sqrt(1/2), sqrt(2))` (from the bits: the exponent field, then one halving), `s = (m - 1) /
/// (m + 1)` (the subtraction exact), `log m = 2 s P(s^2)` ([`LOG_SERIES`]), then `e ln 2_lo + log m`
/// and `e ln 2_hi` (exact for |e| < 2^11) added. Within 2^-41 of `ln x` (the truncation, the
/// division's and the series' roundings; where `e != 0`, `|log m| <= ln 2 / 2 <= |e ln 2| / 2`, so
/// the sum does not cancel), and whether its f32 rounding is certain to be `x.ln() as f32`: `x`
/// positive and finite and the result past [`SCREEN_MARGIN`]. The vector kernels compute these
/// operations per lane.
pub fn log_screened(x: f64) -> (f64, bool) {
    let bits = x.to_bits();
    // 2^52 + the exponent field, exactly; less 2^52 + 1023: the unbiased exponent as an f64.
    let mut e = f64::from_bits(0x4330_0000_0000_0000 | (bits >> 52)) - (LOG_TWO52 + 1023.0);
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1.0;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut p = LOG_SERIES[7];
    for &c in LOG_SERIES[..7].iter().rev() {
        p = p.mul_add(z, c);
    }
    let lm = (2.0 * s) * p;
    let y = e.mul_add(EXP_LN2_HI, e.mul_add(EXP_LN2_LO, lm));
    (y, x > 0.0 && x < f64::INFINITY && far_from_halfway(y))
}

/// `2^52`, for [`log_screened`]'s exponent (the exponent field placed below it as an integer).
pub const LOG_TWO52: f64 = 4_503_599_627_370_496.0;

/// `Log` on f32 values as sqil defines it (libm's natural logarithm in f64, rounded to f32): the
/// screened logarithm where its rounding is certain, else the definition, so the definition's
/// bits. Eight lanes at a time with AVX-512, four with AVX2.
pub fn log_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_log_f32(x, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_log_f32(x, out) },
        crate::Isa::Generic => {}
    }
    generic_log_f32(x, out)
}

/// [`log_f32`] one value at a time ([`log_screened`], else the definition).
pub fn generic_log_f32(x: &[f32], out: &mut [f32]) {
    screened_scalar(x, out, log_screened, f64::ln)
}

/// Whether `y`'s low 29 bits (the bits f32 rounding drops) lie more than [`SCREEN_MARGIN`]
/// units from the halfway pattern `2^28`: the screen every screened kernel applies to its f64
/// result (`far_from_halfway4` / `far_from_halfway8` on vector lanes).
pub fn far_from_halfway(y: f64) -> bool {
    let low = (y.to_bits() & ((1 << 29) - 1)) as i64;
    (low - (1 << 28)).abs() > SCREEN_MARGIN
}

/// Below this magnitude [`tanh`] is its Taylor polynomial (to x^7: relative error below 2^-70).
pub const TANH_SMALL: f64 = 1.0 / 1024.0;
/// The Taylor coefficients of tanh after x: x^3, x^5, x^7.
pub const TANH_TAYLOR: [f64; 3] = [-1.0 / 3.0, 2.0 / 15.0, -17.0 / 315.0];

/// sqil's hyperbolic tangent, in f64 from [`exp_nonpos`] (the same bits on every CPU and SIMD
/// width): `a = |x|`; below [`TANH_SMALL`], `a + a a^2 (c3 + a^2 (c5 + a^2 c7))`; above,
/// `(1 - e) / (1 + e)` with `e = exp_nonpos(-2a)` (1 - e loses at most 2^-43 relative there);
/// the sign of x put back (NaN: NaN; -0: -0).
pub fn tanh(x: f64) -> f64 {
    let a = x.abs();
    let t = if a < TANH_SMALL {
        let a2 = a * a;
        a + a * a2 * (TANH_TAYLOR[0] + a2 * (TANH_TAYLOR[1] + a2 * TANH_TAYLOR[2]))
    } else {
        let e = exp_nonpos(-2.0 * a);
        (1.0 - e) / (1.0 + e)
    };
    t.copysign(x)
}

/// [`tanh`] of every f32 value, rounded once to f32; four lanes at a time with AVX2 where the
/// CPU has it (the same operations).
pub fn tanh_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_tanh_f32(x, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_tanh_f32(x, out) },
        _ => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = tanh(v as f64) as f32);
}

/// `1 / (2n + 1)` for n = 0..18: the series of `atanh(s) / s` in `s^2`, used by [`log1p_unit`].
pub const ATANH_SERIES: [f64; 18] = {
    let mut c = [0f64; 18];
    let mut n = 0;
    while n < 18 {
        c[n] = 1.0 / (2 * n + 1) as f64;
        n += 1;
    }
    c
};

/// `ln(1 + t)` for `t` in [0, 1], as sqil defines it: `s = t / (2 + t)` (at most 1/3), then
/// `2 s P(s^2)` with `P` the atanh series to s^34 by Horner (truncation below 2^-56 relative).
/// Only `+`, `*`, `/`: the same bits in every SIMD width.
pub fn log1p_unit(t: f64) -> f64 {
    let s = t / (2.0 + t);
    let z = s * s;
    let mut p = ATANH_SERIES[17];
    for c in ATANH_SERIES[..17].iter().rev() {
        p = p * z + c;
    }
    2.0 * s * p
}

/// sqil's softplus `ln(1 + e^x)`: `max(x, 0) + log1p_unit(exp_nonpos(-|x|))` (NaN: NaN).
pub fn softplus(x: f64) -> f64 {
    let m = if x > 0.0 { x } else { 0.0 };
    m + log1p_unit(exp_nonpos(-x.abs()))
}

/// The Taylor coefficients of `e^x - 1` after x: x^2 .. x^5 (used by [`elu`] below 2^-10).
pub const EXPM1_TAYLOR: [f64; 4] = [1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0];

/// sqil's `e^x - 1` for `x <= 0`: above -2^-10 the Taylor polynomial
/// `x + x^2 (c2 + x (c3 + x (c4 + x c5)))`, below `exp_nonpos(x) - 1` (at most 2^-42 relative lost).
pub fn expm1_nonpos(x: f64) -> f64 {
    if x > -TANH_SMALL {
        x + x * x * (EXPM1_TAYLOR[0] + x * (EXPM1_TAYLOR[1] + x * (EXPM1_TAYLOR[2] + x * EXPM1_TAYLOR[3])))
    } else {
        exp_nonpos(x) - 1.0
    }
}

/// sqil's ELU: `x` at or above 0, else `alpha expm1_nonpos(x)` (NaN: NaN).
pub fn elu(x: f64, alpha: f64) -> f64 {
    if x < 0.0 {
        alpha * expm1_nonpos(x)
    } else {
        x
    }
}

/// fdlibm's erf (`s_erf.c`, Sun Microsystems 1993: "Permission to use, copy, modify, and
/// distribute this software is freely granted, provided that this notice is preserved"; the
/// `libm` crate's `erf` is its port, the reference semantics of Erf and Gelu) on |x| < 1.25, by
/// the bits of its constants: 0.84375 <= |x| < 1.25 uses erx and a rational form in |x| - 1.
pub(crate) const ERF_ERX: f64 = f64::from_bits(0x3FEB_0AC1_6000_0000);
/// |x| < 2^-28: `0.125 * (8 x + efx8 x)`.
pub(crate) const ERF_EFX8: f64 = f64::from_bits(0x3FF0_6EBA_8214_DB69);
/// The numerators (constant term first) of the rational forms on |x| < 0.84375 (in x^2; padded
/// with zeros: a zero innermost coefficient leaves every other Horner step as it was) and on
/// [0.84375, 1.25) (in |x| - 1).
pub(crate) const ERF_P: [[f64; 7]; 2] = [
    [
        f64::from_bits(0x3FC0_6EBA_8214_DB68),
        f64::from_bits(0xBFD4_CD7D_691C_B913),
        f64::from_bits(0xBF9D_2A51_DBD7_194F),
        f64::from_bits(0xBF77_A291_2366_68E4),
        f64::from_bits(0xBEF8_EAD6_1200_16AC),
        0.0,
        0.0,
    ],
    [
        f64::from_bits(0xBF63_59B8_BEF7_7538),
        f64::from_bits(0x3FDA_8D00_AD92_B34D),
        f64::from_bits(0xBFD7_D240_FBB8_C3F1),
        f64::from_bits(0x3FD4_5FCA_8051_20E4),
        f64::from_bits(0xBFBC_6398_3D3E_28EC),
        f64::from_bits(0x3FA2_2A36_5997_95EB),
        f64::from_bits(0xBF61_BF38_0A96_073F),
    ],
];
/// The denominators (1 first) of the same two forms.
pub(crate) const ERF_Q: [[f64; 7]; 2] = [
    [
        1.0,
        f64::from_bits(0x3FD9_7779_CDDA_DC09),
        f64::from_bits(0x3FB0_A54C_5536_CEBA),
        f64::from_bits(0x3F74_D022_C4D3_6B0F),
        f64::from_bits(0x3F21_5DC9_221C_1A10),
        f64::from_bits(0xBED0_9C43_42A2_6120),
        0.0,
    ],
    [
        1.0,
        f64::from_bits(0x3FBB_3E66_18EE_E323),
        f64::from_bits(0x3FE1_4AF0_92EB_6F33),
        f64::from_bits(0x3FB2_635C_D99F_E9A7),
        f64::from_bits(0x3FC0_2660_E763_351F),
        f64::from_bits(0x3F8B_EDC2_6B51_DD1C),
        f64::from_bits(0x3F88_8B54_5735_151D),
    ],
];

/// `libm::erf` of eight values, bit for bit: with AVX-512, fdlibm's operations on the lanes with
/// |x| < 1.25 (`avx512::erf8`) and `libm::erf` on the others (where fdlibm calls `exp`,
/// infinities, NaN); elsewhere `libm::erf` throughout. (The vector kernels' f64 results, for
/// tests.)
pub fn erf_lanes(x: &[f64; 8]) -> [f64; 8] {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() == crate::Isa::Avx512Vnni {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA.
        return unsafe { crate::x86_64::avx512::avx512_erf_lanes(x) };
    }
    x.map(libm::erf)
}

/// Erf of every f32 value: `libm::erf(x as f64) as f32` (the interpreter's definition), bit for
/// bit; eight lanes at a time with AVX-512, four with AVX2, where the CPU has them: fdlibm's
/// operations below 1.25, a screened estimate of the tail to 6, the definition elsewhere.
pub fn erf_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_erf_f32(x, out, false) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_erf_f32(x, out, false) },
        crate::Isa::Generic => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = libm::erf(v as f64) as f32);
}

/// Gelu's tanh form as the interpreter defines it, in f64 with the platform's `tanh`:
/// `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))`.
pub fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// [`gelu_tanh`] of every f32 value, rounded once, bit for bit. With AVX-512 (AVX2: four), eight lanes of a
/// screened form (sqil's tanh, within 2^-42 of the platform's; a lane is taken only where
/// `1 + tanh >= 0.5`, so the error stays below 2^-41 relative, and its f32 rounding is certain as
/// for [`sigmoid_screened`]); the other lanes by [`gelu_tanh`] itself.
pub fn gelu_tanh_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_gelu_tanh_f32(x, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_gelu_tanh_f32(x, out) },
        crate::Isa::Generic => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = gelu_tanh(v as f64) as f32);
}

/// Gelu's erf form as the interpreter defines it, in f64 with the `libm` crate's erf:
/// `0.5 * x * (1 + erf(x / sqrt 2))`.
pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// [`gelu_erf`] of every f32 value, rounded once, bit for bit; vectorized as [`erf_f32`].
pub fn gelu_erf_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_erf_f32(x, out, true) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_erf_f32(x, out, true) },
        crate::Isa::Generic => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = gelu_erf(v as f64) as f32);
}

/// [`softplus`] of every f32 value, rounded once to f32; four lanes at a time with AVX2 where the
/// CPU has it (the same operations).
pub fn softplus_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic {
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        return unsafe { crate::x86_64::avx2::avx2_softplus_f32(x, out) };
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = softplus(v as f64) as f32);
}

/// ONNX HardSwish as sqil computes it: `x * clamp(x / 6 + 1/2, 0, 1)` in f64 (the clamp keeps
/// NaN, as the C expression's comparisons do).
#[inline]
pub fn hard_swish(x: f64) -> f64 {
    x * (x / 6.0 + 0.5).clamp(0.0, 1.0)
}

/// [`hard_swish`] of every f32 value, rounded once to f32; eight f64 lanes at a time with AVX-512,
/// four with AVX2, where the CPU has them: the same operations except `x / 6`, computed as the
/// product `x * (1/6)` (no division in the loop). For an f32 `x` the two differ by an f64 unit
/// or two at most, which never reaches the f32 result: checked on every f32 with AVX-512 and
/// with AVX2 (`hard_swish_f32_equals_its_definition_on_every_f32`).
pub fn hard_swish_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_hard_swish_f32(x, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_hard_swish_f32(x, out) },
        crate::Isa::Generic => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = hard_swish(v as f64) as f32);
}

/// [`elu`] of every f32 value, rounded once to f32; four lanes at a time with AVX2 where the CPU
/// has it (the same operations).
pub fn elu_f32(x: &[f32], alpha: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_elu_f32(x, alpha, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_elu_f32(x, alpha, out) },
        _ => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = elu(v as f64, alpha as f64) as f32);
}

/// [`sigmoid`] of every f32 value, rounded once to f32 (`out[i] = sigmoid(x[i] as f64) as f32`);
/// four lanes at a time with AVX2, eight with AVX-512, where the CPU has them. The vector forms
/// first take [`sigmoid_screened`] (fused multiply-adds, a shorter polynomial) and recompute by
/// the definition the vectors with a lane whose rounding it cannot vouch for: the same bits
/// either way (every f32 checked, `kernels/cpu/tests/softmax.rs`).
pub fn sigmoid_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_sigmoid_f32(x, out) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_sigmoid_f32(x, out) },
        crate::Isa::Generic => {}
    }
    x.iter().zip(out).for_each(|(&v, o)| *o = sigmoid(v as f64) as f32);
}

/// A 2-D pooling window's geometry over one `h x w` plane: kernel `kh x kw`, strides, dilations,
/// the padding before the first row and column, and the `oh x ow` outputs.
#[derive(Clone, Copy, Debug)]
pub struct Pool2d {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sy: usize,
    pub sx: usize,
    pub dy: usize,
    pub dx: usize,
    pub py: usize,
    pub px: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Pool2d {
    /// The classic 2 x 2 window of stride 2 without padding or dilation, `h / 2 x w / 2` outputs
    /// (at least one column): each output reads rows `2r, 2r + 1` and columns `2o, 2o + 1`, all
    /// inside the plane. (A dilation of 2 with odd sides gives the same output size, and is not
    /// this window.)
    pub fn two_by_two(&self) -> bool {
        (self.kh, self.kw, self.sy, self.sx, self.dy, self.dx, self.py, self.px) == (2, 2, 2, 2, 1, 1, 0, 0)
            && self.oh == self.h / 2
            && self.ow == self.w / 2
            && self.ow > 0
    }

    /// The window's valid kernel positions along one axis for output `o` (a contiguous run:
    /// the input index grows with the kernel index): `lo..hi`.
    fn valid(o: usize, k: usize, st: usize, d: usize, p: usize, n: usize) -> (usize, usize) {
        let at = |kk: usize| (o * st + kk * d) as isize - p as isize;
        let lo = (0..k).find(|&kk| at(kk) >= 0).unwrap_or(k);
        let hi = (lo..k).find(|&kk| at(kk) >= n as isize).unwrap_or(k);
        (lo, hi)
    }
}

/// MaxPool of one plane as sqil defines it: per output, the first valid value of its window in
/// kernel order (rows, then columns; padding skipped), then each later one taken where `v >
/// best` (so a NaN first value stays, later NaNs are passed over, and of equal values the first
/// stays); an all-padding window gives -inf. With AVX2, eight outputs of a row whose windows lie
/// inside the plane at a time (`max(v, best)` is exactly that choice), the rest as here.
pub fn max_pool2d_f32(plane: &[f32], g: &Pool2d, dst: &mut [f32]) {
    assert!(plane.len() >= g.h * g.w && dst.len() >= g.oh * g.ow);
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic && g.ow >= 8 {
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted above.
        return unsafe { crate::x86_64::avx2::avx2_max_pool2d_f32(plane, g, dst) };
    }
    max_pool2d_cols(plane, g, dst, 0..g.oh, 0..g.ow)
}

/// [`max_pool2d_f32`] over `planes` planes stored one after another in `src` (`h * w` values
/// each) into `dst` (`oh * ow` each). The classic 2 x 2 window of stride 2 without padding or
/// dilation runs as pairs of input rows ([`row_pair_planes`] of [`max_pool_row_pairs`]); other
/// geometries plane by plane.
pub fn max_pool2d_planes(src: &[f32], planes: usize, g: &Pool2d, dst: &mut [f32]) {
    if g.two_by_two() {
        return row_pair_planes(src, planes, g, dst, max_pool_row_pairs);
    }
    let (il, ol) = (g.h * g.w, g.oh * g.ow);
    assert!(src.len() >= planes * il && dst.len() >= planes * ol, "max_pool2d_planes: buffer sizes");
    for (plane, out) in src.chunks_exact(il.max(1)).zip(dst.chunks_exact_mut(ol.max(1))).take(planes) {
        max_pool2d_f32(plane, g, out);
    }
}

/// A row-pair pool (`pool(rows, w, ow, out)`: [`max_pool_row_pairs`], [`avg_pool_row_pairs`])
/// over `planes` planes of the 2 x 2 / 2 geometry `g` ([`Pool2d::two_by_two`]) stored one after
/// another: every plane's rows in one call where the planes' rows pair up end to end (`h = 2
/// oh`), else plane by plane, each plane's odd last row unread.
pub fn row_pair_planes(
    src: &[f32],
    planes: usize,
    g: &Pool2d,
    dst: &mut [f32],
    pool: fn(&[f32], usize, usize, &mut [f32]),
) {
    assert!(g.two_by_two(), "row_pair_planes: not a 2 x 2 / 2 window");
    let (il, ol) = (g.h * g.w, g.oh * g.ow);
    assert!(src.len() >= planes * il && dst.len() >= planes * ol, "row_pair_planes: buffer sizes");
    if g.h == 2 * g.oh {
        return pool(&src[..planes * il], g.w, g.ow, &mut dst[..planes * ol]);
    }
    for (plane, out) in src.chunks_exact(il.max(1)).zip(dst.chunks_exact_mut(ol.max(1))).take(planes) {
        pool(&plane[..2 * g.oh * g.w], g.w, g.ow, out);
    }
}

/// The 2 x 2 / 2 max pool of rows of `w` values taken in pairs (rows `2r` and `2r + 1` give
/// output row `r` of `ow` values, `2 ow <= w`): per output the definition's order, the window's
/// first value, then each later one where it is greater (`x01`, `x10`, `x11`; NaN in the first
/// kept, later NaN passed over). Eight outputs per step with AVX2 (each row's sixteen values split
/// into even and odd, `vmaxps(v, best)` being `v > best ? v : best`), the rest one at a time.
pub fn max_pool_row_pairs(src: &[f32], w: usize, ow: usize, dst: &mut [f32]) {
    check_row_pairs(src, w, ow, dst);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic && ow >= 8 {
        // SAFETY: isa() checked AVX2; the sizes are checked above.
        done = unsafe { crate::x86_64::avx2::avx2_max_pool_row_pairs(src, w, ow, dst) };
    }
    row_pairs_from(src, (w, ow, done), dst, |[x00, x01, x10, x11]| {
        let mut best = x00;
        for v in [x01, x10, x11] {
            best = if v > best { v } else { best };
        }
        best
    });
}

/// The sizes the row-pair pools take: `2 ow <= w`, two rows of `src` per row of `dst`.
fn check_row_pairs(src: &[f32], w: usize, ow: usize, dst: &[f32]) {
    let rows = dst.len() / ow.max(1);
    assert!(2 * ow <= w && src.len() >= 2 * rows * w && dst.len() == rows * ow, "row-pair pool: sizes");
}

/// The row-pair pools' outputs from column `done` on, one at a time: `window([x00, x01, x10,
/// x11])` of each.
fn row_pairs_from(
    src: &[f32],
    (w, ow, done): (usize, usize, usize),
    dst: &mut [f32],
    window: impl Fn([f32; 4]) -> f32,
) {
    for (r, out) in dst.chunks_exact_mut(ow.max(1)).enumerate() {
        let (a, b) = (&src[2 * r * w..], &src[(2 * r + 1) * w..]);
        for o in done..ow {
            out[o] = window([a[2 * o], a[2 * o + 1], b[2 * o], b[2 * o + 1]]);
        }
    }
}

/// The 2 x 2 / 2 average pool (no padding, so four values in every window) of rows of `w` values
/// taken in pairs, as sqil's AveragePool defines it: per output the f64 chain `-0 + x00 + x01 +
/// x10 + x11` in kernel order, divided by 4, rounded once to f32. Four outputs per step with AVX2
/// (the same operations per lane), the rest one at a time.
pub fn avg_pool_row_pairs(src: &[f32], w: usize, ow: usize, dst: &mut [f32]) {
    check_row_pairs(src, w, ow, dst);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic && ow >= 4 {
        // SAFETY: isa() checked AVX2; the sizes are checked above.
        done = unsafe { crate::x86_64::avx2::avx2_avg_pool_row_pairs(src, w, ow, dst) };
    }
    row_pairs_from(src, (w, ow, done), dst, |x| (x.iter().fold(-0.0f64, |s, &v| s + v as f64) / 4.0) as f32);
}

/// [`max_pool2d_f32`]'s outputs in rows `rows` and columns `cols`, one at a time.
pub fn max_pool2d_cols(
    plane: &[f32],
    g: &Pool2d,
    dst: &mut [f32],
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    for oy in rows {
        let (ky0, ky1) = Pool2d::valid(oy, g.kh, g.sy, g.dy, g.py, g.h);
        for ox in cols.clone() {
            let (kx0, kx1) = Pool2d::valid(ox, g.kw, g.sx, g.dx, g.px, g.w);
            if ky0 >= ky1 || kx0 >= kx1 {
                dst[oy * g.ow + ox] = f32::NEG_INFINITY;
                continue;
            }
            let at = |ky: usize, kx: usize| plane[(oy * g.sy + ky * g.dy - g.py) * g.w + ox * g.sx + kx * g.dx - g.px];
            let mut best = at(ky0, kx0);
            for ky in ky0..ky1 {
                let start = if ky == ky0 { kx0 + 1 } else { kx0 };
                for kx in start..kx1 {
                    let v = at(ky, kx);
                    best = if v > best { v } else { best };
                }
            }
            dst[oy * g.ow + ox] = best;
        }
    }
}

/// LayerNorm row sums as sqil defines them, of `R` rows at once (their dependency chains
/// interleaved): per row four partial sums in f64 (term j into sum j mod 4, in order), added as
/// `(s0 + s1) + (s2 + s3)` (the Softmax row sum's order), of `x - c[r]` squared (`SQUARE`) or of
/// `x` itself; four terms per step, so the lanes vectorize exactly.
#[inline(always)]
fn sum4_rows<T: Copy + Into<f64>, const R: usize, const SQUARE: bool>(rows: [&[T]; R], c: [f64; R]) -> [f64; R] {
    let n = rows[0].len();
    let n4 = n / 4 * 4;
    let f = |x: T, c: f64| if SQUARE { (x.into() - c) * (x.into() - c) } else { x.into() };
    let mut s = [[0f64; 4]; R];
    for q in (0..n4).step_by(4) {
        for r in 0..R {
            for l in 0..4 {
                s[r][l] += f(rows[r][q + l], c[r]);
            }
        }
    }
    std::array::from_fn(|r| {
        for (l, &x) in rows[r][n4..].iter().enumerate() {
            s[r][l] += f(x, c[r]);
        }
        (s[r][0] + s[r][1]) + (s[r][2] + s[r][3])
    })
}

/// LayerNorm as sqil defines it, over `outer` rows of `inner` values of `v`: per row the mean
/// and the variance ([`sum4_rows`], four rows at a time) over `inner`, `r = 1 / sqrt(var + eps)`,
/// all in f64, and each output `(x - mean) r s_j + b_j` in f64, converted by `put` into `out`.
/// Returns the rows' means and `r`s.
#[inline(always)]
pub fn layer_norm_rows<T: Copy + Into<f64>, O>(
    v: &[T],
    (inner, outer): (usize, usize),
    (s, bias): (&[f64], &[f64]),
    eps: f32,
    out: &mut [O],
    put: impl Fn(f64) -> O,
) -> (Vec<f64>, Vec<f64>) {
    let (mut means, mut inv) = (Vec::with_capacity(outer), Vec::with_capacity(outer));
    let n = inner as f64;
    let mut push = |m: f64, var: f64| {
        means.push(m);
        inv.push(1.0 / (var + eps as f64).sqrt());
    };
    let rows = || v.chunks_exact(inner.max(1)).take(outer);
    let mut it = rows();
    loop {
        let r4: Vec<&[T]> = it.by_ref().take(4).collect();
        if let Ok(r4) = <[&[T]; 4]>::try_from(r4.as_slice()) {
            let m = sum4_rows::<T, 4, false>(r4, [0.0; 4]).map(|t| t / n);
            let var = sum4_rows::<T, 4, true>(r4, m).map(|t| t / n);
            m.into_iter().zip(var).for_each(|(m, v)| push(m, v));
            continue;
        }
        for r in r4 {
            let m = sum4_rows::<T, 1, false>([r], [0.0])[0] / n;
            push(m, sum4_rows::<T, 1, true>([r], [m])[0] / n);
        }
        break;
    }
    for (o, (row, y)) in rows().zip(out.chunks_exact_mut(inner.max(1))).enumerate() {
        let (mean, r) = (means[o], inv[o]);
        for (y, ((&x, &sj), &bj)) in y.iter_mut().zip(row.iter().zip(s).zip(bias)) {
            *y = put((x.into() - mean) * r * sj + bj);
        }
    }
    (means, inv)
}

/// [`layer_norm_rows`] of f32 values into f32 outputs, compiled for AVX2 where the CPU has it
/// (the same operations: the same bits).
pub fn layer_norm_f32(
    v: &[f32],
    shape: (usize, usize),
    params: (&[f64], &[f64]),
    eps: f32,
    out: &mut [f32],
) -> (Vec<f64>, Vec<f64>) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic {
        // SAFETY: isa() checked AVX2 and FMA.
        return unsafe { crate::x86_64::avx2::avx2_layer_norm_f32(v, shape, params, eps, out) };
    }
    layer_norm_rows(v, shape, params, eps, out, |t| t as f32)
}

/// Softmax of `rows` contiguous rows of `dim` values (`out` the same shape), as sqil defines it:
/// in f64, the row maximum (NaN ignored), `e_j = exp_nonpos(x_j - max)`, their sum in four
/// interleaved partial sums (element j into sum j mod 4, in order) added as `(s0 + s1) + (s2 +
/// s3)`, each `e_j / sum` rounded to f32. With AVX2 where the CPU has it: the same operations.
pub fn softmax_rows(x: &[f32], dim: usize, out: &mut [f32]) {
    softmax_rows_as(x, dim, out, false)
}

/// LogSoftmax of contiguous rows as sqil defines it: [`softmax_rows`]'s maximum and sum, then
/// each `(x_j - max) - ln(sum)` in f64, rounded to f32. The same operations with AVX2 or AVX-512.
pub fn log_softmax_rows(x: &[f32], dim: usize, out: &mut [f32]) {
    softmax_rows_as(x, dim, out, true)
}

/// [`softmax_rows`] (`log` false) or [`log_softmax_rows`] (`log` true), dispatched.
fn softmax_rows_as(x: &[f32], dim: usize, out: &mut [f32], log: bool) {
    assert_eq!(x.len(), out.len());
    if dim == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: isa() checked AVX-512 F/BW/VNNI, AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx512Vnni => return unsafe { crate::x86_64::avx512::avx512_softmax_rows(x, dim, out, log) },
        // SAFETY: isa() checked AVX2 and FMA; the lengths are asserted equal.
        crate::Isa::Avx2 => return unsafe { crate::x86_64::avx2::avx2_softmax_rows(x, dim, out, log) },
        crate::Isa::Generic => {}
    }
    generic_softmax_rows_as(x, dim, out, log)
}

/// [`softmax_rows`] in plain Rust (the definition the SIMD variant is tested against).
pub fn generic_softmax_rows(x: &[f32], dim: usize, out: &mut [f32]) {
    generic_softmax_rows_as(x, dim, out, false)
}

/// [`log_softmax_rows`] in plain Rust (the definition the SIMD variant is tested against).
pub fn generic_log_softmax_rows(x: &[f32], dim: usize, out: &mut [f32]) {
    generic_softmax_rows_as(x, dim, out, true)
}

fn generic_softmax_rows_as(x: &[f32], dim: usize, out: &mut [f32], log: bool) {
    assert_eq!(x.len(), out.len());
    if dim == 0 {
        return;
    }
    let mut e = vec![0f64; dim];
    for (row, y) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let mut s = [0f64; 4];
        for (j, (d, &v)) in e.iter_mut().zip(row).enumerate() {
            *d = exp_nonpos(v as f64 - m);
            s[j % 4] += *d;
        }
        let s = (s[0] + s[1]) + (s[2] + s[3]);
        if log {
            let ls = s.ln();
            for (d, &v) in y.iter_mut().zip(row) {
                *d = (v as f64 - m - ls) as f32;
            }
        } else {
            for (d, &v) in y.iter_mut().zip(&e) {
                *d = (v / s) as f32;
            }
        }
    }
}

/// `dst[c * rows + r] = src[r * cols + c]`: a `rows x cols` byte matrix transposed (the int8
/// image of a convolution from `[C, positions]` planes to channels innermost), in 8 x 8 tiles
/// transposed in 64-bit registers (three rounds of masked swaps), the edges byte by byte.
pub fn transpose_i8(src: &[i8], rows: usize, cols: usize, dst: &mut [i8]) {
    generic_transpose_i8_xor(src, rows, cols, dst, 0)
}

/// [`transpose_i8`] with every byte XORed with `xor` on the way (`0x80`: the sign bits flipped,
/// the channel-lane kernels' unsigned form), with AVX2 where the CPU has it (four tiles per
/// register, the same rounds).
pub fn transpose_i8_xor(src: &[i8], rows: usize, cols: usize, dst: &mut [i8], xor: u8) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if crate::isa() != crate::Isa::Generic {
        // SAFETY: isa() checked AVX2; the lengths are asserted above.
        return unsafe { crate::x86_64::avx2::avx2_transpose_i8_xor(src, rows, cols, dst, xor) };
    }
    generic_transpose_i8_xor(src, rows, cols, dst, xor)
}

/// [`transpose_i8_xor`] in plain Rust.
pub fn generic_transpose_i8_xor(src: &[i8], rows: usize, cols: usize, dst: &mut [i8], xor: u8) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    let splat = u64::from_le_bytes([xor; 8]);
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    let word = |r: usize, c: usize| {
        let b: [i8; 8] = src[r * cols + c..r * cols + c + 8].try_into().expect("8 bytes");
        u64::from_le_bytes(b.map(|v| v as u8)) ^ splat
    };
    for r in (0..r8).step_by(8) {
        for c in (0..c8).step_by(8) {
            let mut x: [u64; 8] = std::array::from_fn(|i| word(r + i, c));
            // Rounds swap 1-, 2- and 4-byte elements between rows 1, 2 and 4 apart: afterwards
            // byte j of x[i] is byte i of the original x[j].
            for (shift, mask, d) in
                [(8, 0x00ff_00ff_00ff_00ffu64, 1), (16, 0x0000_ffff_0000_ffff, 2), (32, 0x0000_0000_ffff_ffff, 4)]
            {
                for i in (0..8).filter(|i| i & d == 0) {
                    let t = ((x[i] >> shift) ^ x[i + d]) & mask;
                    x[i + d] ^= t;
                    x[i] ^= t << shift;
                }
            }
            for (i, v) in x.iter().enumerate() {
                let at = (c + i) * rows + r;
                dst[at..at + 8].copy_from_slice(&v.to_le_bytes().map(|b| b as i8));
            }
        }
    }
    for r in 0..rows {
        let cs = if r < r8 { c8 } else { 0 };
        for c in cs..cols {
            dst[c * rows + r] = src[r * cols + c] ^ xor as i8;
        }
    }
}

/// One value quantized as FakeQuant does: `clamp(round_half_even(v / scale) + zero, lo, hi)`,
/// `lo` and `hi` within int8.
#[inline]
pub fn quantize_i8(v: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> i8 {
    // NaN stays NaN and casts to 0.
    quantize_level(v, scale, zero, lo, hi) as i8
}

/// FakeQuant's integer level of `v` as an f32: `clamp(round_half_even(v / scale) + zero, lo,
/// hi)` (`|lo|, |hi| <= 2^16`; NaN stays NaN). Values beyond 2^22 clamp to lo or hi whatever
/// their rounding: bounding them first keeps the loop on the add-magic rounding (the fallback's
/// libm call vectorizes into one call per lane, half the time of a batch-64 run).
#[inline]
pub fn quantize_level(v: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> f32 {
    let t = (v / scale).clamp(-4_194_304.0, 4_194_304.0);
    (round_even_small(t) + zero).clamp(lo, hi)
}

/// Round half to even without the libm call of `f32::round_ties_even` on baseline x86-64
/// (exact for |x| < 2^22, larger values are integers or take the slow path).
#[inline]
pub fn round_even(x: f32) -> f32 {
    if x.abs() < 4_194_304.0 {
        round_even_small(x)
    } else {
        x.round_ties_even()
    }
}

/// [`round_even`] for |x| <= 2^22 (NaN passes through): no branch, no libm.
#[inline]
pub fn round_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    ((x.abs() + MAGIC) - MAGIC).copysign(x)
}

/// One input of the W4A8 kernels, borrowed: `q` (at least the weight's `k_pad` values), the
/// sums of `q` per group of the weight's layout, zero point and scale. A [`QuantizedInput`] is
/// one; so is a row of an int8 im2col matrix (convolutions).
#[derive(Clone, Copy, Debug)]
pub struct QRow<'a> {
    pub q: &'a [i8],
    pub sums: &'a [i32],
    pub zero: i32,
    pub scale: f32,
}

/// One input of a convolution read in place from its int8 image (`[positions, C]`, channels
/// innermost, with one extra run of C zero-point bytes for padding), **stored with the sign bit
/// flipped** (each byte `x + 128` as unsigned: the form the lane kernel multiplies, flipped once
/// per image rather than once per use): the window's `taps` runs of `run` bytes start at
/// `image[offsets[t]..]`. Equal to the im2col row of the window without gathering it. `run` is
/// C, or C padded to whole groups where the weights past C in each run are zero: the bytes read
/// there (the next position's, or past the padding run) then add nothing.
#[derive(Clone, Copy, Debug)]
pub struct QWindow<'a> {
    pub image: &'a [i8],
    pub offsets: &'a [u32],
    pub run: usize,
    pub zero: i32,
    pub scale: f32,
}

impl QuantizedInput {
    pub fn row(&self) -> QRow<'_> {
        QRow { q: &self.q, sums: &self.sums, zero: self.zero, scale: self.scale }
    }
}

/// Reference W4A8 output of row `r`: `sum_k (qx[k] - zero) * qw[r, k] * sw[r, g(k)] * sx +
/// bias[r]`. The integer sum of each group is exact; the float epilogue, which every W4A8 kernel
/// shares so that they agree bit for bit, is `isum[g] * scale[g]` (product rounded, then added)
/// accumulated over the groups in order, then `* x_scale + bias` (no FMA). SIMD kernels
/// vectorise it across rows, never across groups.
pub fn generic_q4q8_row(w: &crate::packed::PackedQ4, x: QRow, bias: Option<&[f32]>, r: usize) -> f32 {
    let groups = w.groups();
    let bpg = w.group / crate::packed::QK4;
    let mut acc = 0f32;
    for g in 0..groups {
        let mut s = 0i32;
        for b in 0..bpg {
            let blk = w.blocks[r * w.k_pad / crate::packed::QK4 + g * bpg + b].unpack();
            let xs = &x.q[(g * bpg + b) * crate::packed::QK4..];
            s += blk.iter().zip(xs).map(|(&a, &c)| a as i32 * c as i32).sum::<i32>();
        }
        s -= x.zero * w.sums[r * groups + g];
        acc += s as f32 * w.scales[r * groups + g];
    }
    acc * x.scale + bias.map_or(0.0, |b| b[r])
}

/// Reference W4A8 GEMV (see [`generic_q4q8_row`]).
pub fn generic_gemv_q4q8(w: &crate::packed::PackedQ4, x: &QuantizedInput, bias: Option<&[f32]>, y: &mut [f32]) {
    for (r, out) in y.iter_mut().enumerate().take(w.n) {
        *out = generic_q4q8_row(w, x.row(), bias, r);
    }
}

/// Reference weight-only W4 GEMV on float activations, the one arithmetic of every q4f32 kernel
/// (the AVX2 kernel's, lane for lane): eight lanes; per group, lane `l` sums from +0 by fused
/// multiply-add the elements `l, l + 8, l + 16, l + 24` of each block of 32 in order (`q * x`);
/// each lane's group sum is fused-multiply-added with the group's scale into the lane's total;
/// the totals are summed `((t0 + t4) + (t2 + t6)) + ((t1 + t5) + (t3 + t7))`; then the bias is
/// added (when there is one). `x` holds `w.k_pad` values, zero past `k`.
pub fn generic_gemv_q4f32(w: &crate::packed::PackedQ4, x: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let (groups, bpg) = (w.groups(), w.group / crate::packed::QK4);
    for (r, out) in y.iter_mut().enumerate().take(w.n) {
        let mut total = [0f32; 8];
        for g in 0..groups {
            let mut acc = [0f32; 8];
            for b in g * bpg..(g + 1) * bpg {
                let q = w.blocks[r * (w.k_pad / crate::packed::QK4) + b].unpack();
                for j in (0..32).step_by(8) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = (q[j + l] as f32).mul_add(x[b * 32 + j + l], *a);
                    }
                }
            }
            for (t, a) in total.iter_mut().zip(acc) {
                *t = a.mul_add(w.scales[r * groups + g], *t);
            }
        }
        let t = total;
        let h = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
        *out = bias.map_or(h, |b| h + b[r]);
    }
}
