//! MatMul, Gemm, Conv and ConvTranspose. Float work is done by the GEMM kernels of
//! `sqil-kernels-cpu` (f32, or f64 for f64 tensors); f16/bf16 are computed in f32.

use super::broadcast::{broadcast_indices, strided_indices};
use super::Cx;
use crate::attrs::{Attr, AttrMap};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::shape::broadcast_shapes;
use crate::shape::{broadcast_dims, Dim, ValueType};
use crate::tensor::{strides_of, Data, Tensor};
use sqil_kernels_cpu::{depthwise_conv, dgemm, im2col, sgemm, sgemm_chain, ConvGeometry};

/// Padding policy of convolutions and pools (ONNX `auto_pad`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

impl AutoPad {
    pub fn parse(s: &str) -> Result<AutoPad> {
        Ok(match s {
            "NOTSET" | "" => AutoPad::NotSet,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            "VALID" => AutoPad::Valid,
            o => {
                return Err(IrError::Invalid(format!("auto_pad `{o}` is not NOTSET, SAME_UPPER, SAME_LOWER or VALID")))
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            AutoPad::NotSet => "NOTSET",
            AutoPad::SameUpper => "SAME_UPPER",
            AutoPad::SameLower => "SAME_LOWER",
            AutoPad::Valid => "VALID",
        }
    }
}

/// Resolved spatial geometry: `(pads_begin, pads_end, output)`; an output is `None` where the
/// input dimension is not known.
pub type Geometry = (Vec<i64>, Vec<i64>, Vec<Option<usize>>);

/// Attributes of Conv and ConvTranspose. Empty lists mean the ONNX default (ones, zeros, or
/// taken from the weight's shape).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConvAttrs {
    pub auto_pad: AutoPad,
    pub dilations: Vec<i64>,
    pub group: i64,
    pub kernel_shape: Vec<i64>,
    /// `[begin..., end...]`.
    pub pads: Vec<i64>,
    pub strides: Vec<i64>,
    /// ConvTranspose only.
    pub output_padding: Vec<i64>,
    /// ConvTranspose only.
    pub output_shape: Vec<i64>,
}

impl ConvAttrs {
    pub fn from_attrs(a: &AttrMap) -> Result<ConvAttrs> {
        let c = ConvAttrs {
            auto_pad: AutoPad::parse(&a.string("auto_pad", "NOTSET")?)?,
            dilations: a.ints("dilations")?,
            group: a.int("group", 1)?,
            kernel_shape: a.ints("kernel_shape")?,
            pads: a.ints("pads")?,
            strides: a.ints("strides")?,
            output_padding: a.ints("output_padding")?,
            output_shape: a.ints("output_shape")?,
        };
        if c.group < 1 {
            return Err(IrError::Invalid(format!("group must be >= 1, got {}", c.group)));
        }
        Ok(c)
    }

    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        let mut v = vec![
            ("auto_pad", Attr::Str(self.auto_pad.name().into())),
            ("dilations", Attr::Ints(self.dilations.clone())),
            ("group", Attr::Int(self.group)),
            ("kernel_shape", Attr::Ints(self.kernel_shape.clone())),
            ("pads", Attr::Ints(self.pads.clone())),
            ("strides", Attr::Ints(self.strides.clone())),
        ];
        if !self.output_padding.is_empty() {
            v.push(("output_padding", Attr::Ints(self.output_padding.clone())));
        }
        if !self.output_shape.is_empty() {
            v.push(("output_shape", Attr::Ints(self.output_shape.clone())));
        }
        v
    }

    /// `v`, or `n` copies of `default` when `v` is empty (the ONNX convention for optional lists).
    pub(crate) fn list(v: &[i64], n: usize, default: i64, what: &str) -> Result<Vec<i64>> {
        if v.is_empty() {
            Ok(vec![default; n])
        } else if v.len() == n {
            Ok(v.to_vec())
        } else {
            Err(IrError::Invalid(format!("{what} has {} entries, expected {n}", v.len())))
        }
    }

    /// Spatial geometry of a convolution (or, with `transpose`, of a transposed convolution)
    /// for one input of spatial extent `input` and kernel `kernel`. Returns
    /// `(pads_begin, pads_end, output)`; a `None` input dimension gives a `None` output.
    pub fn geometry(&self, input: &[Option<usize>], kernel: &[usize], transpose: bool) -> Result<Geometry> {
        let n = kernel.len();
        if input.len() != n {
            return Err(IrError::Invalid(format!("the input has {} spatial dimensions, the kernel {n}", input.len())));
        }
        let strides = Self::list(&self.strides, n, 1, "strides")?;
        let dil = Self::list(&self.dilations, n, 1, "dilations")?;
        let pads = Self::list(&self.pads, 2 * n, 0, "pads")?;
        let opad = Self::list(&self.output_padding, n, 0, "output_padding")?;
        if strides.iter().chain(&dil).any(|&s| s < 1) {
            return Err(IrError::Invalid("strides and dilations must be >= 1".into()));
        }
        let mut pb = pads[..n].to_vec();
        let mut pe = pads[n..].to_vec();
        let mut out = Vec::with_capacity(n);
        for d in 0..n {
            let ext = dil[d] * (kernel[d] as i64 - 1) + 1;
            let Some(i) = input[d].map(|i| i as i64) else {
                out.push(None);
                continue;
            };
            let o = if !transpose {
                match self.auto_pad {
                    AutoPad::NotSet => (i + pb[d] + pe[d] - ext).div_euclid(strides[d]) + 1,
                    AutoPad::Valid => {
                        pb[d] = 0;
                        pe[d] = 0;
                        (i - ext).div_euclid(strides[d]) + 1
                    }
                    AutoPad::SameUpper | AutoPad::SameLower => {
                        let o = (i + strides[d] - 1) / strides[d];
                        let total = ((o - 1) * strides[d] + ext - i).max(0);
                        let small = total / 2;
                        (pb[d], pe[d]) = if self.auto_pad == AutoPad::SameUpper {
                            (small, total - small)
                        } else {
                            (total - small, small)
                        };
                        o
                    }
                }
            } else {
                // Follows the ONNX reference: explicit pads win; SAME splits the padding needed
                // for `output_shape` (default: input * stride); VALID pads nothing.
                let full = strides[d] * (i - 1) + opad[d] + ext;
                let given = (!self.output_shape.is_empty()).then(|| {
                    let os = &self.output_shape;
                    os[os.len() - n + d]
                });
                let same = matches!(self.auto_pad, AutoPad::SameUpper | AutoPad::SameLower);
                if self.pads.is_empty() && same {
                    let o = given.unwrap_or(i * strides[d]);
                    let total = full - o;
                    let small = total.div_euclid(2);
                    (pb[d], pe[d]) = if self.auto_pad == AutoPad::SameUpper {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    o
                } else {
                    if self.auto_pad == AutoPad::Valid {
                        pb[d] = 0;
                        pe[d] = 0;
                    }
                    given.unwrap_or(full - pb[d] - pe[d])
                }
            };
            if o < 1 {
                return Err(IrError::Invalid(format!(
                    "spatial axis {d}: input {i}, kernel extent {ext} and padding give an empty output"
                )));
            }
            out.push(Some(o as usize));
        }
        Ok((pb, pe, out))
    }
}

pub(crate) fn infer_matmul(cx: &Cx) -> Result<Vec<ValueType>> {
    let (a, b) = (cx.ty(0)?, cx.ty(1)?);
    if a.rank() == 0 || b.rank() == 0 {
        return Err(IrError::Invalid("MatMul inputs must have rank >= 1".into()));
    }
    let (ash, bsh) = (&a.shape, &b.shape);
    let (m, k1) = if a.rank() == 1 { (None, &ash[0]) } else { (Some(&ash[a.rank() - 2]), &ash[a.rank() - 1]) };
    let (k2, n) = if b.rank() == 1 { (&bsh[0], None) } else { (&bsh[b.rank() - 2], Some(&bsh[b.rank() - 1])) };
    if let (Some(x), Some(y)) = (k1.known(), k2.known()) {
        if x != y {
            return Err(IrError::Invalid(format!("MatMul inner dimensions differ: {a} @ {b}")));
        }
    }
    let ab = &ash[..a.rank().saturating_sub(2)];
    let bb = &bsh[..b.rank().saturating_sub(2)];
    let mut shape = broadcast_dims(&[ab, bb])
        .ok_or_else(|| IrError::Invalid(format!("MatMul batch dimensions do not broadcast: {a} @ {b}")))?;
    shape.extend(m.cloned());
    shape.extend(n.cloned());
    Ok(vec![ValueType::new(a.dtype, shape)])
}

pub(crate) fn infer_gemm(cx: &Cx, ta: bool, tb: bool) -> Result<Vec<ValueType>> {
    let (a, b) = (cx.ty(0)?, cx.ty(1)?);
    if a.rank() != 2 || b.rank() != 2 {
        return Err(IrError::Invalid(format!("Gemm needs 2-D inputs, got {a} and {b}")));
    }
    let m = a.shape[if ta { 1 } else { 0 }].clone();
    let n = b.shape[if tb { 0 } else { 1 }].clone();
    let (ka, kb) = (&a.shape[if ta { 0 } else { 1 }], &b.shape[if tb { 1 } else { 0 }]);
    if let (Some(x), Some(y)) = (ka.known(), kb.known()) {
        if x != y {
            return Err(IrError::Invalid(format!("Gemm inner dimensions differ: {a}, {b}")));
        }
    }
    Ok(vec![ValueType::new(a.dtype, vec![m, n])])
}

pub(crate) fn infer_conv(cx: &Cx, c: &ConvAttrs, transpose: bool) -> Result<Vec<ValueType>> {
    let (x, w) = (cx.ty(0)?, cx.ty(1)?);
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(IrError::Invalid(format!("Conv needs X of rank >= 3 and W of the same rank, got {x} and {w}")));
    }
    let kernel = kernel_of(c, &w.shape[2..])?;
    let input: Vec<Option<usize>> = x.shape[2..].iter().map(Dim::known).collect();
    let (_, _, out) = c.geometry(&input, &kernel, transpose)?;
    let channels = if transpose {
        w.shape[1].known().map_or(Dim::Unknown, |m| Dim::Known(m * c.group as usize))
    } else {
        w.shape[0].clone()
    };
    let mut shape = vec![x.shape[0].clone(), channels];
    shape.extend(out.into_iter().map(|o| o.map_or(Dim::Unknown, Dim::Known)));
    Ok(vec![ValueType::new(x.dtype, shape)])
}

fn kernel_of(c: &ConvAttrs, w_spatial: &[Dim]) -> Result<Vec<usize>> {
    if !c.kernel_shape.is_empty() {
        return Ok(c.kernel_shape.iter().map(|&k| k as usize).collect());
    }
    w_spatial.iter().map(|d| d.known().ok_or_else(|| IrError::Invalid("kernel shape must be known".into()))).collect()
}

/// Runs `f` on f32 views of float tensors and converts the result back to `dtype`.
fn via_f32(dtype: DType, shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
    let data = match dtype {
        DType::F32 => Data::F32(v),
        DType::F16 => Data::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => Data::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        d => return Err(IrError::Unsupported(format!("{d} result from an f32 kernel"))),
    };
    Tensor::new(shape, data)
}

fn float_input(t: &Tensor, op: &str) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(IrError::Unsupported(format!("{op} on {}", t.dtype())))
    }
}

/// A Gemm / MatMul layer's constant rank-2 weight as code generators store it: `(k, n, w)` with
/// `w` row-major `[k][n]` (`trans_b` undone, `alpha` folded in), and its constant bias broadcast
/// to `[n]` times `beta`.
pub fn dense_weight_kn(
    w: &Tensor,
    trans_b: bool,
    alpha: f32,
    bias: Option<&Tensor>,
    beta: f32,
) -> (usize, usize, Vec<f32>, Option<Vec<f32>>) {
    let (k, n) = if trans_b { (w.shape[1], w.shape[0]) } else { (w.shape[0], w.shape[1]) };
    let wv = w.data.to_f32_vec();
    let wk = (0..k * n).map(|i| alpha * if trans_b { wv[(i % n) * k + i / n] } else { wv[i] }).collect();
    let b = bias.map(|b| {
        let v = b.data.to_f32_vec();
        super::broadcast_indices(&b.shape, &[n]).into_iter().map(|i| v[i] * beta).collect()
    });
    (k, n, wk, b)
}

pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    float_input(a, "MatMul")?;
    if a.dtype() != b.dtype() {
        return Err(IrError::Invalid(format!("MatMul of mixed types {} and {}", a.dtype(), b.dtype())));
    }
    if a.rank() == 0 || b.rank() == 0 {
        return Err(IrError::Invalid("MatMul inputs must have rank >= 1".into()));
    }
    let ash: Vec<usize> = if a.rank() == 1 { vec![1, a.shape[0]] } else { a.shape.clone() };
    let bsh: Vec<usize> = if b.rank() == 1 { vec![b.shape[0], 1] } else { b.shape.clone() };
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return Err(IrError::Invalid(format!("MatMul inner dimensions differ: {:?} @ {:?}", a.shape, b.shape)));
    }
    let (ab, bb) = (&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]);
    let batch = broadcast_shapes(&[ab, bb]).ok_or_else(|| {
        IrError::Invalid(format!("MatMul batch dims do not broadcast: {:?} @ {:?}", a.shape, b.shape))
    })?;
    let nb: usize = batch.iter().product();
    let mut out_shape = batch.clone();
    if a.rank() > 1 {
        out_shape.push(m);
    }
    if b.rank() > 1 {
        out_shape.push(n);
    }
    // A [batch.., M, K] with a shared 2-D B is one GEMM of M' = batch * M rows.
    let fold = bb.iter().product::<usize>() == 1 && ab == batch.as_slice();
    let (ia, ib) = (broadcast_indices(ab, &batch), broadcast_indices(bb, &batch));
    macro_rules! run {
        ($x:expr, $y:expr, $gemm:ident, $zero:expr) => {{
            let (x, y) = ($x, $y);
            let mut out = vec![$zero; nb * m * n];
            if fold {
                $gemm(nb * m, k, n, 1.0, &x, (k, 1), &y, (n, 1), 0.0, &mut out, (n, 1));
            } else {
                for i in 0..nb {
                    let xa = &x[ia[i] * m * k..(ia[i] + 1) * m * k];
                    let yb = &y[ib[i] * k * n..(ib[i] + 1) * k * n];
                    $gemm(m, k, n, 1.0, xa, (k, 1), yb, (n, 1), 0.0, &mut out[i * m * n..(i + 1) * m * n], (n, 1));
                }
            }
            out
        }};
    }
    if let (Data::F64(x), Data::F64(y)) = (&a.data, &b.data) {
        let out = run!(x, y, dgemm, 0.0f64);
        return Tensor::new(out_shape, Data::F64(out));
    }
    // f32: the policy GEMM (one FMA chain per output; see `sgemm_chain`).
    let chain = |m, k, n, _: f32, a: &[f32], sa, b: &[f32], sb, _: f32, c: &mut [f32], sc| {
        sgemm_chain(m, k, n, a, sa, b, sb, c, sc)
    };
    let out = run!(a.data.f32_cow(), b.data.f32_cow(), chain, 0.0f32);
    via_f32(a.dtype(), out_shape, out)
}

/// An f32 value read through strides: element `(i_0, .., i_{r-1})` of the logical `shape` is
/// `data[sum of i_d strides[d]]` (a Transpose of a contiguous value, not materialized; a
/// contiguous value has `crate::tensor::strides_of(shape)`).
#[derive(Clone, Debug)]
pub struct StridedF32<'a> {
    pub data: &'a [f32],
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// MatMul of two f32 operands of rank 2 or more read through strides, as [`matmul`] on the
/// materialized operands computes it: each output the policy GEMM's chain (`sgemm_chain`, any
/// strides, the same chain), batch dimensions broadcast as MatMul broadcasts them. The product is
/// written contiguous or, with `out_perm`, in the order `Transpose(perm)` of it would have
/// (contiguous in that order): the bits of MatMul then Transpose, without either copy.
pub fn matmul_strided(a: &StridedF32, b: &StridedF32, out_perm: Option<&[usize]>) -> Result<Tensor> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if ra < 2 || rb < 2 || a.strides.len() != ra || b.strides.len() != rb {
        return Err(IrError::Internal(format!("strided MatMul of shapes {:?} and {:?}", a.shape, b.shape)));
    }
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (k2, n) = (b.shape[rb - 2], b.shape[rb - 1]);
    if k != k2 {
        return Err(IrError::Invalid(format!("MatMul inner dimensions differ: {:?} @ {:?}", a.shape, b.shape)));
    }
    let (ab, bb) = (&a.shape[..ra - 2], &b.shape[..rb - 2]);
    let batch = broadcast_shapes(&[ab, bb]).ok_or_else(|| {
        IrError::Invalid(format!("MatMul batch dims do not broadcast: {:?} @ {:?}", a.shape, b.shape))
    })?;
    let mut oshape = batch.clone();
    oshape.extend([m, n]);
    let r = oshape.len();
    let (shape, so) = match out_perm {
        Some(p) => {
            let mut seen = vec![false; r];
            if p.len() != r || p.iter().any(|&d| d >= r || std::mem::replace(&mut seen[d], true)) {
                return Err(IrError::Internal(format!("MatMul written as Transpose {p:?} of rank {r}")));
            }
            // The result is contiguous in the permuted order; the product's axis p[i] has the
            // result's stride i.
            let shape: Vec<usize> = p.iter().map(|&d| oshape[d]).collect();
            let sy = strides_of(&shape);
            let mut so = vec![0; r];
            for (i, &d) in p.iter().enumerate() {
                so[d] = sy[i];
            }
            (shape, so)
        }
        None => (oshape.clone(), strides_of(&oshape)),
    };
    let total: usize = shape.iter().product();
    let mut out = vec![0f32; total];
    if total == 0 || k == 0 {
        return Tensor::from_f32(shape, out);
    }
    // Each matrix's offset per batch index: an operand's batch axes align with the batch's last
    // ones, and an axis of 1 (or one it lacks) broadcasts (stride 0).
    let lead = |dims: &[usize], strides: &[usize]| -> Vec<isize> {
        let off = batch.len() - dims.len();
        (0..batch.len()).map(|d| if d < off || dims[d - off] == 1 { 0 } else { strides[d - off] as isize }).collect()
    };
    let (ia, ib) = (lead(ab, &a.strides[..ra - 2]), lead(bb, &b.strides[..rb - 2]));
    let ic: Vec<isize> = so[..r - 2].iter().map(|&s| s as isize).collect();
    let offsets = strided_indices(&batch, &ia, 0).into_iter().zip(strided_indices(&batch, &ib, 0));
    for ((oa, ob), oc) in offsets.zip(strided_indices(&batch, &ic, 0)) {
        sgemm_chain(
            m,
            k,
            n,
            &a.data[oa..],
            (a.strides[ra - 2], a.strides[ra - 1]),
            &b.data[ob..],
            (b.strides[rb - 2], b.strides[rb - 1]),
            &mut out[oc..],
            (so[r - 2], so[r - 1]),
        );
    }
    Tensor::from_f32(shape, out)
}

pub(crate) fn gemm(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
    ta: bool,
    tb: bool,
) -> Result<Tensor> {
    float_input(a, "Gemm")?;
    if a.rank() != 2 || b.rank() != 2 {
        return Err(IrError::Invalid(format!("Gemm needs 2-D inputs, got {:?} and {:?}", a.shape, b.shape)));
    }
    let (m, k) = if ta { (a.shape[1], a.shape[0]) } else { (a.shape[0], a.shape[1]) };
    let (k2, n) = if tb { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
    if k != k2 {
        return Err(IrError::Invalid(format!("Gemm inner dimensions differ: A {:?}, B {:?}", a.shape, b.shape)));
    }
    let sa = if ta { (1, m) } else { (k, 1) };
    let sb = if tb { (1, k) } else { (n, 1) };
    if let (Data::F64(x), Data::F64(y)) = (&a.data, &b.data) {
        let mut out = c_term(c, beta, (m, n))?;
        dgemm(m, k, n, alpha as f64, x, sa, y, sb, 1.0, &mut out, (n, 1));
        return Tensor::new(vec![m, n], Data::F64(out));
    }
    // f32: `y = alpha * chain + beta * c`, each product rounded once, the chain the policy GEMM's
    // (`sgemm_chain`); `alpha * chain` only when alpha is not 1, `+ beta * c` only with a C.
    let mut out = vec![0f32; m * n];
    sgemm_chain(m, k, n, &a.data.f32_cow(), sa, &b.data.f32_cow(), sb, &mut out, (n, 1));
    gemm_epilogue(a.dtype(), out, (m, n), c, alpha, beta)
}

/// `beta * c` broadcast to `[m, n]` in f64 (zeros without a C or with beta 0).
fn c_term(c: Option<&Tensor>, beta: f32, (m, n): (usize, usize)) -> Result<Vec<f64>> {
    let Some(c) = c.filter(|_| beta != 0.0) else { return Ok(vec![0.0; m * n]) };
    if broadcast_shapes(&[&c.shape, &[m, n]]).as_deref() != Some(&[m, n][..]) {
        return Err(IrError::Invalid(format!("Gemm C {:?} does not broadcast to [{m}, {n}]", c.shape)));
    }
    let cv = c.data.to_f64_vec();
    Ok(broadcast_indices(&c.shape, &[m, n]).into_iter().map(|i| beta as f64 * cv[i]).collect())
}

/// The f32 Gemm from its chains `out` (`[m, n]`): `alpha *` them when alpha is not 1, then `+ beta
/// * c`.
fn gemm_epilogue(
    dtype: DType,
    mut out: Vec<f32>,
    (m, n): (usize, usize),
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
) -> Result<Tensor> {
    if alpha != 1.0 {
        out.iter_mut().for_each(|v| *v *= alpha);
    }
    match c.filter(|_| beta != 0.0).map(|c| (c, &c.data)) {
        // A bias row ([n] or [1, n]): beta * c is exact in f64 and rounded once, as below.
        Some((c, Data::F32(cv))) if cv.len() == n && c.shape.last() == Some(&n) => {
            let row: Vec<f32> = cv.iter().map(|&v| (beta as f64 * v as f64) as f32).collect();
            sqil_kernels_cpu::generic::add_row_in_place(&mut out, &row);
        }
        Some(_) => {
            let cterm = c_term(c, beta, (m, n))?;
            out.iter_mut().zip(cterm).for_each(|(y, t)| *y += t as f32);
        }
        None => {}
    }
    via_f32(dtype, vec![m, n], out)
}

/// [`gemm`] of f32 rows `a` (`[m, k]`, no transpose) against a weight held as levels and scales
/// (`w`, the dequantized `[k, n]` B: a plan checked that it reproduces the constant bit for bit),
/// its chains by `dequant_gemm` from the levels: the same values as `gemm` on the constant.
pub fn gemm_dequant(
    a: &Tensor,
    w: &sqil_kernels_cpu::dequant::DequantRows,
    c: Option<&Tensor>,
    alpha: f32,
    beta: f32,
) -> Result<Tensor> {
    if a.dtype() != DType::F32 || a.rank() != 2 || a.shape[1] != w.k {
        return Err(IrError::Invalid(format!("Gemm: input {:?} against a [{} x {}] weight", a.shape, w.k, w.n)));
    }
    let (m, n) = (a.shape[0], w.n);
    let mut out = vec![0f32; m * n];
    sqil_kernels_cpu::dequant::dequant_gemm(w, &a.data.f32_cow(), m, &mut out);
    gemm_epilogue(DType::F32, out, (m, n), c, alpha, beta)
}

struct ConvPlan {
    n: usize,
    c: usize,
    m: usize,
    group: usize,
    geo: ConvGeometry,
}

impl ConvAttrs {
    /// The im2col geometry of this convolution (not transposed) over one image of an input of
    /// shape `x` (`[N, C, spatial...]`) with weights of shape `w`.
    pub fn input_geometry(&self, x: &[usize], w: &[usize]) -> Result<ConvGeometry> {
        Ok(conv_plan(x, w, self, false)?.geo)
    }

    /// The geometry of this transposed convolution over an input of shape `x` with weights of
    /// shape `w`, as the interpreter runs it: `input` is the output image, `output` the input
    /// image (the convolution whose adjoint it is), so `gather_table` maps (tap, input position)
    /// to the output position it adds into.
    pub fn transpose_geometry(&self, x: &[usize], w: &[usize]) -> Result<ConvGeometry> {
        Ok(conv_plan(x, w, self, true)?.geo)
    }

    /// The geometry of this convolution over an input of shape `x` with weights of shape `w` if
    /// it is depthwise as [`conv_with_table`] runs it (one input and one output channel per
    /// group, 1-D or 2-D: the direct kernel), else `None`.
    pub fn depthwise_geometry(&self, x: &[usize], w: &[usize]) -> Result<Option<ConvGeometry>> {
        let p = conv_plan(x, w, self, false)?;
        Ok((p.c == p.group && p.m == p.group && p.geo.input.len() <= 2).then_some(p.geo))
    }
}

fn conv_plan(x: &[usize], w: &[usize], c: &ConvAttrs, transpose: bool) -> Result<ConvPlan> {
    if x.len() < 3 || w.len() != x.len() {
        return Err(IrError::Invalid(format!(
            "Conv needs X of rank >= 3 and W of the same rank, got {:?} and {:?}",
            x, w
        )));
    }
    let kernel: Vec<usize> = w[2..].to_vec();
    if !c.kernel_shape.is_empty() && c.kernel_shape.iter().map(|&k| k as usize).ne(kernel.iter().copied()) {
        return Err(IrError::Invalid(format!("kernel_shape {:?} disagrees with W {:?}", c.kernel_shape, w)));
    }
    let group = c.group as usize;
    let spatial: Vec<Option<usize>> = x[2..].iter().map(|&d| Some(d)).collect();
    let (pb, _, out) = c.geometry(&spatial, &kernel, transpose)?;
    let out: Vec<usize> = out.into_iter().map(|o| o.expect("known input")).collect();
    let (n, ch) = (x[0], x[1]);
    let m = if transpose { w[1] * group } else { w[0] };
    let (cg_w, per) = if transpose { (w[0], ch) } else { (w[1] * group, ch) };
    if ch % group != 0 || m % group != 0 || cg_w != per {
        return Err(IrError::Invalid(format!("channels do not match: X {:?}, W {:?}, group {group}", x, w)));
    }
    let dil = ConvAttrs::list(&c.dilations, kernel.len(), 1, "dilations")?;
    let st = ConvAttrs::list(&c.strides, kernel.len(), 1, "strides")?;
    let (input, output) = if transpose { (out, x[2..].to_vec()) } else { (x[2..].to_vec(), out) };
    let geo = ConvGeometry {
        input,
        kernel,
        strides: st.iter().map(|&s| s as usize).collect(),
        dilations: dil.iter().map(|&d| d as usize).collect(),
        pads_begin: pb.iter().map(|&p| p as isize).collect(),
        output,
    };
    Ok(ConvPlan { n, c: ch, m, group, geo })
}

fn bias_of(b: Option<&Tensor>, m: usize) -> Result<Option<Vec<f32>>> {
    match b {
        None => Ok(None),
        Some(b) if b.len() == m => Ok(Some(b.data.to_f32_vec())),
        Some(b) => Err(IrError::Invalid(format!("bias has shape {:?}, expected [{m}]", b.shape))),
    }
}

pub(crate) fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, c: &ConvAttrs) -> Result<Tensor> {
    conv_with_table(x, w, b, c, None, (&[], &[]))
}

/// Conv with the im2col gather table of its geometry given (`ConvGeometry::gather_table` for
/// one image of `x` and `w`; a plan keeps it from run to run): the same arithmetic as the op,
/// on `x` after the element-wise `pre` ops that precede it in the plan (the input's quantizer:
/// applied to one image at a time into a buffer that stays in cache, instead of a pass over the
/// whole batch), then the `post` ops that follow it (f32 `x` only), applied to each image's
/// outputs while they are in cache (a depthwise layer's in registers, with its bias).
pub fn conv_with_table(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    c: &ConvAttrs,
    table: Option<&[Option<usize>]>,
    (pre, post): (&[sqil_kernels_cpu::Post], &[sqil_kernels_cpu::Post]),
) -> Result<Tensor> {
    float_input(x, "Conv")?;
    if !(post.is_empty() && pre.is_empty()) && x.dtype() != DType::F32 {
        return Err(IrError::Internal(format!("Conv: element-wise ops fused into a {:?} convolution", x.dtype())));
    }
    let p = conv_plan(&x.shape, &w.shape, c, false)?;
    let bias = bias_of(b, p.m)?;
    let (xv, wv) = (x.data.f32_cow(), w.data.f32_cow());
    let (cg, mg) = (p.c / p.group, p.m / p.group);
    let (kl, ol) = (p.geo.kernel_len(), p.geo.output_len());
    // Depthwise (one input and one output channel per group, 1-D or 2-D): the same chains
    // computed directly, vectorized along output rows (`depthwise_conv`), no gather.
    let depthwise = cg == 1 && mg == 1 && p.geo.input.len() <= 2;
    let owned;
    let table = match table {
        Some(t) if t.len() == kl * ol || depthwise => t,
        Some(t) => {
            return Err(IrError::Internal(format!("Conv: a gather table of {} entries for {} x {kl}", t.len(), ol)))
        }
        None => {
            owned = if depthwise { vec![] } else { p.geo.gather_table() };
            &owned
        }
    };
    let mut out = crate::pool::f32_buffer(p.n * p.m * ol);
    // The im2col matrix, every element of which `im2col` writes: kept from call to call on this
    // thread (a fresh one was zeroed and its pages faulted in on every call).
    COLS.with_borrow_mut(|cols| {
        if cols.len() < cg * kl * ol {
            cols.resize(cg * kl * ol, 0.0);
        }
        PRE_IMAGE.with_borrow_mut(|img| {
            let bufs = (&mut cols[..cg * kl * ol], img);
            conv_images(&p, (&xv, &wv), bias.as_deref(), (table, depthwise), (pre, post), bufs, &mut out)
        })
    });
    let mut shape = vec![p.n, p.m];
    shape.extend(&p.geo.output);
    via_f32(x.dtype(), shape, out)
}

thread_local! {
    /// [`conv_with_table`]'s image after its `pre` ops.
    static PRE_IMAGE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// [`conv_with_table`]'s im2col matrix.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`conv_with_table`]'s images: each through its `pre` ops (into `img`, when there are any),
/// then the depthwise kernel, or im2col into `cols` and one chain per output per group; the bias;
/// the post ops.
fn conv_images(
    p: &ConvPlan,
    (xv, wv): (&[f32], &[f32]),
    bias: Option<&[f32]>,
    (table, depthwise): (&[Option<usize>], bool),
    (pre, post): (&[sqil_kernels_cpu::Post], &[sqil_kernels_cpu::Post]),
    (cols, img): (&mut [f32], &mut Vec<f32>),
    out: &mut [f32],
) {
    let (cg, mg) = (p.c / p.group, p.m / p.group);
    let (kl, ol, il) = (p.geo.kernel_len(), p.geo.output_len(), p.geo.input_len());
    // A lone quantizer on the input of a one-group convolution (a float first layer's): the
    // direct kernel applies it as it copies the image into its planes; the image is quantized
    // on its own only where that kernel declines the layer.
    let lone = match pre {
        &[sqil_kernels_cpu::Post::FakeQuant { scale, zero, lo, hi }] if p.group == 1 && !depthwise => {
            Some((scale, zero, lo, hi))
        }
        _ => None,
    };
    for n in 0..p.n {
        let mut image = &xv[n * p.c * il..(n + 1) * p.c * il];
        if lone.is_some() {
            let o = &mut out[n * p.m * ol..(n + 1) * p.m * ol];
            if sqil_kernels_cpu::generic::conv_direct_f32((image, lone), cg, wv, mg, &p.geo, bias, o) {
                sqil_kernels_cpu::post_in_place(o, post);
                continue;
            }
        }
        match pre {
            [] => {}
            // One quantizer (a float first layer's input): from the image into the buffer in
            // one pass, the values the in-place op would leave there.
            &[sqil_kernels_cpu::Post::FakeQuant { scale, zero, lo, hi }] => {
                img.resize(image.len(), 0.0);
                sqil_kernels_cpu::generic::fake_quant_into(image, scale, zero, lo, hi, img);
                image = img;
            }
            _ => {
                img.clear();
                img.extend_from_slice(image);
                sqil_kernels_cpu::post_in_place(img, pre);
                image = img;
            }
        }
        if depthwise {
            let o = &mut out[n * p.m * ol..(n + 1) * p.m * ol];
            depthwise_conv(image, wv, &p.geo, bias, post, o);
            continue;
        }
        for g in 0..p.group {
            let xs = &image[g * cg * il..(g + 1) * cg * il];
            let wg = &wv[g * mg * cg * kl..(g + 1) * mg * cg * kl];
            let o = &mut out[(n * p.m + g * mg) * ol..(n * p.m + (g + 1) * mg) * ol];
            let bg = bias.map(|b| &b[g * mg..(g + 1) * mg]);
            // Few input channels (an encoder's first layer): the same chains without the
            // gathered matrix, the bias added as each is stored.
            if sqil_kernels_cpu::generic::conv_direct_f32((xs, None), cg, wg, mg, &p.geo, bg, o) {
                continue;
            }
            im2col(xs, cg, table, &p.geo, cols);
            sgemm_chain(mg, cg * kl, ol, wg, (cg * kl, 1), cols, (ol, 1), o, (ol, 1));
            if let Some(bg) = bg {
                for (row, bv) in o.chunks_exact_mut(ol).zip(bg) {
                    row.iter_mut().for_each(|v| *v += bv);
                }
            }
        }
        sqil_kernels_cpu::post_in_place(&mut out[n * p.m * ol..(n + 1) * p.m * ol], post);
    }
}

pub(crate) fn conv_transpose(x: &Tensor, w: &Tensor, b: Option<&Tensor>, c: &ConvAttrs) -> Result<Tensor> {
    float_input(x, "ConvTranspose")?;
    let p = conv_plan(&x.shape, &w.shape, c, true)?;
    let bias = bias_of(b, p.m)?;
    let (xv, wv) = (x.data.f32_cow(), w.data.f32_cow());
    let (cg, mg) = (p.c / p.group, p.m / p.group);
    // Here geo.input is the output image and geo.output the input image (roles swapped).
    let (kl, il, ol) = (p.geo.kernel_len(), p.geo.output_len(), p.geo.input_len());
    let table = p.geo.gather_table();
    let mut cols = vec![0f32; mg * kl * il];
    let mut out = vec![0f32; p.n * p.m * ol];
    for n in 0..p.n {
        for g in 0..p.group {
            let xs = &xv[(n * p.c + g * cg) * il..(n * p.c + (g + 1) * cg) * il];
            let wg = &wv[g * cg * mg * kl..(g + 1) * cg * mg * kl];
            // cols [mg*kl, il] = Wg^T [mg*kl, cg] @ X [cg, il]
            sgemm(mg * kl, cg, il, 1.0, wg, (1, mg * kl), xs, (il, 1), 0.0, &mut cols, (il, 1));
            for mi in 0..mg {
                let o = &mut out[(n * p.m + g * mg + mi) * ol..(n * p.m + g * mg + mi + 1) * ol];
                for (r, taps) in table.chunks_exact(il).enumerate() {
                    let row = &cols[(mi * kl + r) * il..(mi * kl + r + 1) * il];
                    for (v, t) in row.iter().zip(taps) {
                        if let Some(t) = t {
                            o[*t] += v;
                        }
                    }
                }
            }
        }
        if let Some(bias) = &bias {
            for (mi, bv) in bias.iter().enumerate() {
                out[(n * p.m + mi) * ol..(n * p.m + mi + 1) * ol].iter_mut().for_each(|v| *v += bv);
            }
        }
    }
    let mut shape = vec![p.n, p.m];
    shape.extend(&p.geo.input);
    via_f32(x.dtype(), shape, out)
}

/// Gradient of Conv with respect to input `wrt` (0: X, 1: W, 2: B), in f64 accumulations:
/// `dW_g += dY_g cols^T`, `dX = col2im(W_g^T dY_g)`, `dB = sum dY`.
pub(crate) fn conv_vjp(x: &Tensor, w: &Tensor, dy: &Tensor, c: &ConvAttrs, wrt: usize) -> Result<Tensor> {
    let p = conv_plan(&x.shape, &w.shape, c, false)?;
    let (cg, mg) = (p.c / p.group, p.m / p.group);
    let (kl, ol, il) = (p.geo.kernel_len(), p.geo.output_len(), p.geo.input_len());
    let table = p.geo.gather_table();
    let (xv, wv, gv) = (x.data.f32_cow(), w.data.f32_cow(), dy.data.f32_cow());
    match wrt {
        2 => {
            let mut db = vec![0f64; p.m];
            for n in 0..p.n {
                for (mi, acc) in db.iter_mut().enumerate() {
                    *acc += gv[(n * p.m + mi) * ol..(n * p.m + mi + 1) * ol].iter().map(|&v| v as f64).sum::<f64>();
                }
            }
            Tensor::from_f32(vec![p.m], db.into_iter().map(|v| v as f32).collect())
        }
        1 => {
            let mut dw = vec![0f32; w.len()];
            let mut cols = vec![0f32; cg * kl * ol];
            for n in 0..p.n {
                for g in 0..p.group {
                    let xs = &xv[(n * p.c + g * cg) * il..(n * p.c + (g + 1) * cg) * il];
                    im2col(xs, cg, &table, &p.geo, &mut cols);
                    let gy = &gv[(n * p.m + g * mg) * ol..(n * p.m + (g + 1) * mg) * ol];
                    let dwg = &mut dw[g * mg * cg * kl..(g + 1) * mg * cg * kl];
                    // dWg [mg, cg*kl] += dY [mg, ol] @ cols^T [ol, cg*kl]
                    sgemm(mg, ol, cg * kl, 1.0, gy, (ol, 1), &cols, (1, ol), 1.0, dwg, (cg * kl, 1));
                }
            }
            Tensor::from_f32(w.shape.clone(), dw)
        }
        _ => {
            let mut dx = vec![0f32; x.len()];
            let mut dcols = vec![0f32; cg * kl * ol];
            for n in 0..p.n {
                for g in 0..p.group {
                    let wg = &wv[g * mg * cg * kl..(g + 1) * mg * cg * kl];
                    let gy = &gv[(n * p.m + g * mg) * ol..(n * p.m + (g + 1) * mg) * ol];
                    // dcols [cg*kl, ol] = Wg^T [cg*kl, mg] @ dY [mg, ol]
                    sgemm(cg * kl, mg, ol, 1.0, wg, (1, cg * kl), gy, (ol, 1), 0.0, &mut dcols, (ol, 1));
                    let base = (n * p.c + g * cg) * il;
                    for ch in 0..cg {
                        for (r, taps) in table.chunks_exact(ol).enumerate() {
                            let row = &dcols[(ch * kl + r) * ol..(ch * kl + r + 1) * ol];
                            for (v, t) in row.iter().zip(taps) {
                                if let Some(i) = t {
                                    dx[base + ch * il + i] += v;
                                }
                            }
                        }
                    }
                }
            }
            Tensor::from_f32(x.shape.clone(), dx)
        }
    }
}
