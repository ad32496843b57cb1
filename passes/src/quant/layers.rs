//! Quantizable layers (Gemm, MatMul with a constant 2-D weight, Conv) and the views the recipes
//! work on: a weight as an `[N out, K reduction]` matrix with each entry's place in the original
//! tensor and its scale group; a layer input as `[rows, K]` (im2col patches for Conv).

use super::config::{Granularity, QuantConfig};
use sqil_ir::ops::quant::param_index;
use sqil_ir::{Graph, IrError, NodeId, Op, Result, Tensor, ValueRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `Y = X @ W`, W `[K, N]`.
    MatMul,
    /// W `[N, K]` if `trans_b` else `[K, N]`; X transposed if `trans_a`.
    Gemm { trans_a: bool, trans_b: bool },
    /// W `[M, C/group, k...]`.
    Conv { group: usize },
}

/// One quantizable layer of a graph.
#[derive(Clone, Debug)]
pub struct Layer {
    pub node: NodeId,
    pub name: String,
    pub kind: LayerKind,
    /// The layer's input activation (input slot 0).
    pub x: ValueRef,
    /// The weight, a `Const` (input slot 1).
    pub w: ValueRef,
    pub w_shape: Vec<usize>,
}

/// A layer's display name: its node name, else its output's name.
pub fn layer_name(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    if node.name.is_empty() {
        node.outputs[0].name.clone()
    } else {
        node.name.clone()
    }
}

/// The quantizable layers in topological order.
pub fn find_layers(g: &Graph) -> Result<Vec<Layer>> {
    let mut out = vec![];
    for n in g.topo_order()? {
        let ins = g.inputs_of(n);
        let (Some(x), Some(w)) = (ins.first().copied().flatten(), ins.get(1).copied().flatten()) else { continue };
        let Some(wt) = g.const_value(w) else { continue };
        if !wt.dtype().is_float() {
            continue;
        }
        let kind = match &g.node(n).op {
            Op::MatMul if wt.rank() == 2 => LayerKind::MatMul,
            Op::Gemm { trans_a, trans_b, .. } => LayerKind::Gemm { trans_a: *trans_a, trans_b: *trans_b },
            Op::Conv(c) => LayerKind::Conv { group: c.group as usize },
            _ => continue,
        };
        out.push(Layer { node: n, name: layer_name(g, n), kind, x, w, w_shape: wt.shape.clone() });
    }
    Ok(out)
}

impl Layer {
    /// (N output channels, K reduction length).
    pub fn nk(&self) -> (usize, usize) {
        let s = &self.w_shape;
        match self.kind {
            LayerKind::MatMul | LayerKind::Gemm { trans_b: false, .. } => (s[1], s[0]),
            LayerKind::Gemm { trans_b: true, .. } => (s[0], s[1]),
            LayerKind::Conv { .. } => (s[0], s[1..].iter().product()),
        }
    }

    /// Axis of the weight that indexes output channels.
    pub fn channel_axis(&self) -> i64 {
        match self.kind {
            LayerKind::MatMul | LayerKind::Gemm { trans_b: false, .. } => 1,
            _ => 0,
        }
    }

    /// Axis of the weight along which groups run (the reduction axis; input channels for Conv).
    pub fn reduction_axis(&self) -> i64 {
        match self.kind {
            LayerKind::MatMul | LayerKind::Gemm { trans_b: false, .. } => 0,
            _ => 1,
        }
    }

    /// Flat index into the weight tensor of view entry `(n, k)`.
    pub fn orig_index(&self, n: usize, k: usize) -> usize {
        let (nn, kk) = self.nk();
        match self.kind {
            LayerKind::MatMul | LayerKind::Gemm { trans_b: false, .. } => k * nn + n,
            _ => n * kk + k,
        }
    }

    /// For the view entry `(n, k)` (row-major, `N*K`), the weight's flat index.
    pub fn orig_indices(&self) -> Vec<usize> {
        let (n, k) = self.nk();
        (0..n * k).map(|i| self.orig_index(i / k, i % k)).collect()
    }

    /// `(axis, block_size, scale shape)` of the weight quantizer for a granularity.
    pub fn scale_layout(&self, cfg: &QuantConfig) -> (i64, i64, Vec<usize>) {
        match cfg.granularity {
            Granularity::Tensor => (0, 0, vec![]),
            Granularity::Channel => {
                let ax = self.channel_axis();
                (ax, 0, vec![self.w_shape[ax as usize]])
            }
            Granularity::Group => {
                let ax = self.reduction_axis();
                let mut s = self.w_shape.clone();
                s[ax as usize] = s[ax as usize].div_ceil(cfg.group);
                (ax, cfg.group as i64, s)
            }
        }
    }

    /// Input channel of each reduction index k (k itself for Gemm/MatMul; `k / kernel_len` for Conv).
    pub fn channel_of_k(&self) -> Vec<usize> {
        let (_, k) = self.nk();
        let kl: usize = match self.kind {
            LayerKind::Conv { .. } => self.w_shape[2..].iter().product(),
            _ => 1,
        };
        (0..k).map(|i| i / kl).collect()
    }
}

/// A layer's weight viewed as `[N, K]` with its quantization groups.
#[derive(Clone, Debug)]
pub struct WeightView {
    pub n: usize,
    pub k: usize,
    /// Row-major `[N, K]`.
    pub w: Vec<f32>,
    /// Scale-group id of each entry, in `0..groups`.
    pub group: Vec<usize>,
    pub groups: usize,
}

impl WeightView {
    pub fn new(layer: &Layer, wt: &Tensor, cfg: &QuantConfig) -> Result<WeightView> {
        let (n, k) = layer.nk();
        let (axis, block, pshape) = layer.scale_layout(cfg);
        let pidx = param_index(&wt.shape, &pshape, axis, block)?;
        let data = wt.data.to_f32_vec();
        let orig = layer.orig_indices();
        Ok(WeightView {
            n,
            k,
            w: orig.iter().map(|&i| data[i]).collect(),
            group: orig.iter().map(|&i| pidx[i]).collect(),
            groups: pshape.iter().product::<usize>().max(1),
        })
    }

    /// Writes view values back into a tensor of the layer's weight layout.
    pub fn to_tensor(&self, layer: &Layer, w: &[f32]) -> Result<Tensor> {
        let mut out = vec![0f32; w.len()];
        for (i, o) in layer.orig_indices().into_iter().enumerate() {
            out[o] = w[i];
        }
        Tensor::from_f32(layer.w_shape.clone(), out)
    }
}

/// The layer's input as a `[rows, K]` row-major matrix matching the weight view's K order
/// (im2col patches for Conv, one row per output position). At most `max_rows` rows, taken evenly.
pub fn input_matrix(g: &Graph, layer: &Layer, x: &Tensor, max_rows: usize) -> Result<(usize, Vec<f32>)> {
    let (_, k) = layer.nk();
    // Rows `src` of the full input matrix, `max_rows` of them spread evenly when there are more.
    let picks = |total: usize| -> Vec<usize> {
        if total <= max_rows {
            (0..total).collect()
        } else {
            (0..max_rows).map(|r| r * total / max_rows).collect()
        }
    };
    let rows: Vec<f32> = match layer.kind {
        LayerKind::MatMul | LayerKind::Gemm { trans_a: false, .. } => {
            let xv = x.data.f32_cow();
            let total = xv.len() / k.max(1);
            if total <= max_rows {
                return Ok((total, xv.into_owned()));
            }
            picks(total).iter().flat_map(|&src| xv[src * k..(src + 1) * k].iter().copied()).collect()
        }
        LayerKind::Gemm { trans_a: true, .. } => {
            let xv = x.data.f32_cow();
            let m = x.shape[1];
            picks(m).iter().flat_map(|&src| (0..k).map(move |kk| (kk, src))).map(|(kk, src)| xv[kk * m + src]).collect()
        }
        LayerKind::Conv { group } => {
            if group != 1 {
                return Err(IrError::Unsupported(format!("input patches of grouped convolution `{}`", layer.name)));
            }
            let Op::Conv(c) = &g.node(layer.node).op else { unreachable!("conv layer") };
            let geo = c.input_geometry(&x.shape, &layer.w_shape)?;
            // im2col's `[channels * kernel_len, output_len]` table, read only at the picked
            // positions (the whole matrix of a calibration batch can be gigabytes).
            let table = geo.gather_table();
            let (ch, il, ol, kl) = (x.shape[1], geo.input_len(), geo.output_len(), geo.kernel_len());
            let xv = x.data.f32_cow();
            let mut out = Vec::with_capacity(max_rows.min(x.shape[0] * ol) * k);
            for src in picks(x.shape[0] * ol) {
                let (img, o) = (src / ol, src % ol);
                let image = &xv[img * ch * il..(img + 1) * ch * il];
                for c in 0..ch {
                    let plane = &image[c * il..(c + 1) * il];
                    out.extend((0..kl).map(|r| table[r * ol + o].map_or(0.0, |i| plane[i])));
                }
            }
            out
        }
    };
    Ok((rows.len() / k.max(1), rows))
}
