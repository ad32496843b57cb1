//! Places FakeQuant nodes: on each quantized layer's weight (a FakeQuant of the constant, with
//! min-max RTN scales until a recipe sets better ones) and on its input activation (one
//! FakeQuant per distinct input value, shared by the layers that read it).

use super::config::QuantConfig;
use super::layers::{find_layers, Layer, WeightView};
use super::weights::{round_to_nearest, Quantizer, WeightQuant};
use sqil_ir::{Graph, NodeId, Op, Result, Tensor, ValueRef};
use std::collections::HashMap;

/// A quantized weight: the FakeQuant node and the constants that feed it.
#[derive(Clone, Debug)]
pub struct WeightSite {
    pub layer: Layer,
    pub bits: u8,
    pub quantizer: Quantizer,
    pub view: WeightView,
    pub fq: NodeId,
    pub w: NodeId,
    pub scale: NodeId,
    pub zero: Option<NodeId>,
    pub scale_shape: Vec<usize>,
}

/// A quantized activation: FakeQuant of `input`, feeding the layers in `layers`.
#[derive(Clone, Debug)]
pub struct ActSite {
    pub input: ValueRef,
    pub bits: u8,
    pub symmetric: bool,
    pub fq: NodeId,
    pub scale: NodeId,
    pub zero: Option<NodeId>,
    pub layers: Vec<String>,
}

fn set_const(g: &mut Graph, n: NodeId, t: Tensor) {
    g.node_mut(n).outputs[0].ty = sqil_ir::ValueType::fixed(t.dtype(), &t.shape);
    g.node_mut(n).op = Op::Const(t);
}

impl WeightSite {
    /// Stores a recipe's result (weights in view order, per-group scale and zero point).
    pub fn set(&self, g: &mut Graph, wq: &WeightQuant) -> Result<()> {
        set_const(g, self.w, self.view.to_tensor(&self.layer, &wq.w)?);
        set_const(g, self.scale, Tensor::from_f32(self.scale_shape.clone(), wq.scale.clone())?);
        if let Some(z) = self.zero {
            set_const(g, z, Tensor::from_f32(self.scale_shape.clone(), wq.zero.clone())?);
        }
        Ok(())
    }
}

impl ActSite {
    /// Sets the activation quantizer's scale and zero point.
    pub fn set(&self, g: &mut Graph, scale: f32, zero: f32) {
        set_const(g, self.scale, Tensor::scalar_f32(scale));
        if let Some(z) = self.zero {
            set_const(g, z, Tensor::scalar_f32(zero));
        }
    }
}

/// Quantizes the weights of every layer `cfg` selects (RTN min-max scales). Returns the sites.
pub fn insert_weight_quant(g: &mut Graph, cfg: &QuantConfig) -> Result<Vec<WeightSite>> {
    let layers = find_layers(g)?;
    let count = layers.len();
    let mut sites = vec![];
    for (i, layer) in layers.into_iter().enumerate() {
        let Some(bits) = cfg.weight_bits(&layer.name, i == 0, i + 1 == count) else { continue };
        let wt = g.const_value(layer.w).expect("layer weight is a Const").clone();
        let view = WeightView::new(&layer, &wt, cfg)?;
        let quantizer = Quantizer { bits, symmetric: cfg.weight_symmetric };
        let wq = round_to_nearest(&view, quantizer, false);
        let (axis, block, scale_shape) = layer.scale_layout(cfg);
        // The weight gets its own Const node so that a recipe can change it in place.
        let base = format!("{}.w", layer.name);
        let w = g.add_const(format!("{base}.value"), wt);
        let scale = g.add_const(format!("{base}.scale"), Tensor::from_f32(scale_shape.clone(), wq.scale.clone())?);
        let zero = if cfg.weight_symmetric {
            None
        } else {
            Some(g.add_const(format!("{base}.zero"), Tensor::from_f32(scale_shape.clone(), wq.zero.clone())?))
        };
        let op = Op::FakeQuant { bits, signed: true, axis, block_size: block };
        let fq = g.add_inferred(format!("{base}.fq"), op, &[Some(w), Some(scale), zero], format!("{base}.q"))?;
        g.set_input(layer.node, 1, fq);
        sites.push(WeightSite {
            layer,
            bits,
            quantizer,
            view,
            fq: fq.node,
            w: w.node,
            scale: scale.node,
            zero: zero.map(|z| z.node),
            scale_shape,
        });
    }
    Ok(sites)
}

/// Quantizes the input of every layer `cfg` gives activation bits; `params` gives each input
/// value's (scale, zero point), else placeholders (1, 0) that calibration replaces.
pub fn insert_act_quant(
    g: &mut Graph,
    cfg: &QuantConfig,
    params: &HashMap<ValueRef, (f32, f32)>,
) -> Result<Vec<ActSite>> {
    let layers = find_layers_with_quantized_weights(g)?;
    let mut by_input: HashMap<(ValueRef, u8), usize> = HashMap::new();
    let mut sites: Vec<ActSite> = vec![];
    for (node, name, x) in layers {
        let Some(bits) = cfg.act_bits_at(&name, is_raw_vector_input(g, x)) else { continue };
        if let Some(&i) = by_input.get(&(x, bits)) {
            sites[i].layers.push(name);
            g.set_input(node, 0, ValueRef { node: sites[i].fq, slot: 0 });
            continue;
        }
        let (s, z) = params.get(&x).copied().unwrap_or((1.0, 0.0));
        let base = format!("{name}.x");
        let scale = g.add_const(format!("{base}.scale"), Tensor::scalar_f32(s));
        let zero = (!cfg.act_symmetric).then(|| g.add_const(format!("{base}.zero"), Tensor::scalar_f32(z)));
        let op = Op::FakeQuant { bits, signed: true, axis: 0, block_size: 0 };
        let fq = g.add_inferred(format!("{base}.fq"), op, &[Some(x), Some(scale), zero], format!("{base}.q"))?;
        g.set_input(node, 0, fq);
        by_input.insert((x, bits), sites.len());
        sites.push(ActSite {
            input: x,
            bits,
            symmetric: cfg.act_symmetric,
            fq: fq.node,
            scale: scale.node,
            zero: zero.map(|z| z.node),
            layers: vec![name],
        });
    }
    Ok(sites)
}

/// Whether `x` is a policy's raw vector input: computed from graph inputs of rank <= 3 (and
/// constants) with no layer (MatMul, Gemm, Conv) on the way.
pub fn is_raw_vector_input(g: &Graph, x: ValueRef) -> bool {
    let mut stack = vec![x.node];
    let mut seen = std::collections::HashSet::new();
    let mut reaches_input = false;
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        match &g.node(n).op {
            Op::Input => {
                if g.node(n).outputs[0].ty.rank() > 3 {
                    return false;
                }
                reaches_input = true;
            }
            Op::Const(_) => {}
            Op::MatMul | Op::Gemm { .. } | Op::Conv(_) => return false,
            _ => stack.extend(g.inputs_of(n).into_iter().flatten().map(|v| v.node)),
        }
    }
    reaches_input
}

/// Layers whose weight is a FakeQuant of a constant or a float constant, whose input is not yet
/// quantized: `(node, name, input value)`.
fn find_layers_with_quantized_weights(g: &Graph) -> Result<Vec<(NodeId, String, ValueRef)>> {
    let mut out = vec![];
    for n in g.topo_order()? {
        if !matches!(g.node(n).op, Op::MatMul | Op::Gemm { .. } | Op::Conv(_)) {
            continue;
        }
        let ins = g.inputs_of(n);
        let (Some(x), Some(w)) = (ins.first().copied().flatten(), ins.get(1).copied().flatten()) else { continue };
        let weight_fq = matches!(g.node(w.node).op, Op::FakeQuant { .. })
            && g.inputs_of(w.node)[0].is_some_and(|c| g.const_value(c).is_some());
        if !weight_fq || matches!(g.node(x.node).op, Op::FakeQuant { .. }) {
            continue;
        }
        out.push((n, super::layers::layer_name(g, n), x));
    }
    Ok(out)
}
