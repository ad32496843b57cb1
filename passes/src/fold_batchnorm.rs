//! `fold-batchnorm`: an inference BatchNormalization whose input is a Conv or Gemm with constant
//! weights, read by nothing else, is folded into that layer: per output channel
//! `k = scale / sqrt(var + eps)`, `W' = W * k`, `b' = (b - mean) * k + bias` (in f64, rounded
//! once). Needs: constant BatchNorm parameters. Keeps: outputs within float rounding.

use crate::{Pass, PassCtx};
use sqil_ir::{Graph, Op, Result, Tensor, ValueRef};

#[derive(Debug, Default)]
pub struct FoldBatchNorm;

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-batchnorm"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut folded = 0;
        for n in g.topo_order()? {
            let Op::BatchNorm { epsilon, training: false, .. } = g.node(n).op else { continue };
            if g.node(n).outputs.len() != 1 {
                continue;
            }
            let ins = g.inputs_of(n);
            let Some(params) = ins[1..5]
                .iter()
                .map(|v| v.and_then(|v| g.const_value(v)).map(|t| t.data.to_f64_vec()))
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let x = ins[0].expect("BatchNorm input");
            if g.uses_of(x).len() != 1 || g.outputs.contains(&x) || x.slot != 0 {
                continue;
            }
            let layer = x.node;
            let lins = g.inputs_of(layer);
            // Output-channel axis of the weight, and the channel count.
            let (w_axis, c) = match &g.node(layer).op {
                Op::Conv(_) => (0, params[0].len()),
                Op::Gemm { trans_b, alpha, .. } if *alpha == 1.0 && g.value(x).ty.rank() == 2 => {
                    (if *trans_b { 0 } else { 1 }, params[0].len())
                }
                _ => continue,
            };
            let Some(wv) = lins.get(1).copied().flatten() else { continue };
            let Some(w) = g.const_value(wv).cloned() else { continue };
            if w.shape[w_axis] != c || !w.dtype().is_float() {
                continue;
            }
            let bias = match lins.get(2).copied().flatten() {
                Some(b) => match g.const_value(b) {
                    Some(t) if t.len() == c => t.data.to_f64_vec(),
                    _ => continue,
                },
                None => vec![0.0; c],
            };
            if let Op::Gemm { beta, .. } = g.node(layer).op {
                if beta != 1.0 {
                    continue;
                }
            }
            let (scale, shift, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
            let k: Vec<f64> = (0..c).map(|i| scale[i] / (var[i] + epsilon as f64).sqrt()).collect();
            let inner: usize = w.shape[w_axis + 1..].iter().product();
            let wd = w.data.to_f64_vec();
            let new_w: Vec<f32> = wd.iter().enumerate().map(|(i, &v)| (v * k[(i / inner) % c]) as f32).collect();
            let new_b: Vec<f32> = (0..c).map(|i| ((bias[i] - mean[i]) * k[i] + shift[i]) as f32).collect();
            let name = g.node(layer).name.clone();
            let w2 = g.add_const(format!("{name}.bn_weight"), Tensor::from_f32(w.shape.clone(), new_w)?);
            let b2 = g.add_const(format!("{name}.bn_bias"), Tensor::from_f32(vec![c], new_b)?);
            g.set_input(layer, 1, w2);
            g.set_input(layer, 2, b2);
            g.replace_uses(ValueRef { node: n, slot: 0 }, x);
            if g.uses_of(ValueRef { node: n, slot: 0 }).is_empty() {
                g.remove_node(n);
            }
            folded += 1;
        }
        if folded > 0 {
            cx.notes.push(format!("fold-batchnorm: folded {folded} BatchNorm(s)"));
            crate::dce::Dce.run(g, cx)?;
        }
        Ok(folded > 0)
    }
}
