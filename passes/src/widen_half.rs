//! `widen-half`: a half-precision model (float16 or bfloat16 weights, values, inputs or outputs,
//! as `model.half()` exports or fp16 conversion tools write them) becomes the same model in f32.
//! Every f16 and bf16 value type, constant, `ConstantOfShape` fill and `Cast` target becomes f32
//! (a cast to or from half that then converts f32 to f32 is removed: its readers read its input).
//! Each half value is exactly an f32, so the weights keep their values; what changes is only the
//! half-precision rounding of intermediate results, which the widened graph no longer does (far
//! below a 4- or 8-bit quantizer's step, and the reason the quantizing commands compute in f32:
//! calibration, SIS and fine-tuning see the model's own weights at f32 precision).
//!
//! Needs: nothing. Keeps: the graph's structure, names and every non-half type; the graph's
//! inputs and outputs become f32 where they were half (the drivers put the original types back
//! on the exported ONNX).

use crate::manager::{Pass, PassCtx};
use sqil_ir::{DType, Graph, Op, Result, Tensor};

pub struct WidenHalf;

fn widen(t: &mut Tensor) -> bool {
    let half = t.dtype().is_half();
    if half {
        *t = t.cast(DType::F32);
    }
    half
}

impl Pass for WidenHalf {
    fn name(&self) -> &'static str {
        "widen-half"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let (mut consts, mut values) = (0usize, 0usize);
        // Casts to or from a half type: once widened, those between f32 and f32 are no-ops.
        let mut casts = vec![];
        let ids: Vec<_> = g.g.node_indices().collect();
        for &n in &ids {
            if let Op::Cast { to, .. } = g.node(n).op {
                let from_half =
                    g.inputs_of(n).first().copied().flatten().is_some_and(|v| g.value(v).ty.dtype.is_half());
                if from_half || to.is_half() {
                    casts.push(n);
                }
            }
        }
        for n in ids {
            let node = g.node_mut(n);
            match &mut node.op {
                Op::Const(t) | Op::ConstantOfShape { value: t } => consts += widen(t) as usize,
                Op::Cast { to, .. } if to.is_half() => *to = DType::F32,
                _ => {}
            }
            for v in &mut node.outputs {
                if v.ty.dtype.is_half() {
                    v.ty.dtype = DType::F32;
                    values += 1;
                }
            }
        }
        let mut bypassed = 0;
        for n in casts {
            let Some(x) = g.inputs_of(n).first().copied().flatten() else { continue };
            if matches!(g.node(n).op, Op::Cast { to: DType::F32, .. }) && g.value(x).ty.dtype == DType::F32 {
                g.replace_uses(sqil_ir::ValueRef { node: n, slot: 0 }, x);
                g.remove_node(n);
                bypassed += 1;
            }
        }
        if values + consts + bypassed > 0 {
            cx.notes.push(format!(
                "widen-half: {values} half-precision value(s) and {consts} constant(s) now f32, {bypassed} cast(s) no longer needed removed"
            ));
        }
        Ok(values + consts + bypassed > 0)
    }
}

/// Puts a widened graph's half-precision signature back: each input that was f16 or bf16 in
/// `original` (same position) takes that type again and is widened by a `Cast` to f32 before its
/// readers, and each such output is the `Cast` of the f32 result back to its half type (the
/// result keeps its name; the f32 value is renamed `NAME.f32`). So a quantized ONNX exported from
/// a half-precision model is a drop-in replacement for it. Returns how many were restored.
pub fn restore_io_types(g: &mut Graph, original: &Graph) -> usize {
    let half_at = |gr: &Graph, v: sqil_ir::ValueRef| Some(gr.value(v).ty.dtype).filter(|d| d.is_half());
    let mut restored = 0;
    for (k, &n) in g.inputs.clone().iter().enumerate() {
        let Some(&on) = original.inputs.get(k) else { break };
        let (v, ov) = (sqil_ir::ValueRef { node: n, slot: 0 }, sqil_ir::ValueRef { node: on, slot: 0 });
        let (Some(half), DType::F32) = (half_at(original, ov), g.value(v).ty.dtype) else { continue };
        let readers = g.uses_of(v);
        let name = g.value(v).name.clone();
        let ty = g.value(v).ty.clone();
        let cast = g.add_node(
            format!("{name}.widen"),
            Op::Cast { to: DType::F32, saturate: true },
            &[Some(v)],
            vec![sqil_ir::Value { name: format!("{name}.f32"), ty: ty.clone() }],
        );
        for (reader, slot) in readers {
            g.set_input(reader, slot, sqil_ir::ValueRef { node: cast, slot: 0 });
        }
        g.value_mut(v).ty.dtype = half;
        restored += 1;
    }
    // An f32 result the signature lists twice gets one Cast.
    let mut narrowed: std::collections::HashMap<sqil_ir::ValueRef, sqil_ir::ValueRef> = Default::default();
    for k in 0..g.outputs.len().min(original.outputs.len()) {
        let (o, oo) = (g.outputs[k], original.outputs[k]);
        if let Some(&c) = narrowed.get(&o) {
            g.outputs[k] = c;
            continue;
        }
        let (Some(half), DType::F32) = (half_at(original, oo), g.value(o).ty.dtype) else { continue };
        let name = g.value(o).name.clone();
        let mut ty = g.value(o).ty.clone();
        ty.dtype = half;
        g.value_mut(o).name = format!("{name}.f32");
        let cast = g.add_node(
            format!("{name}.narrow"),
            Op::Cast { to: half, saturate: true },
            &[Some(o)],
            vec![sqil_ir::Value { name, ty }],
        );
        g.outputs[k] = sqil_ir::ValueRef { node: cast, slot: 0 };
        narrowed.insert(o, g.outputs[k]);
        restored += 1;
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqil_ir::interp::Interpreter;
    use sqil_ir::{Data, Dim, Value, ValueRef, ValueType};
    use std::collections::HashMap;

    /// `y = Cast<f32>(x16 * w16 + ConstantOfShape<bf16 0.5>(shape))`: a half graph with a cast at
    /// its output, an f16 input, f16 and bf16 constants.
    fn half_graph() -> Graph {
        let mut g = Graph::new("half");
        let x = g.add_input("x", ValueType::new(DType::F16, vec![Dim::Known(2), Dim::Known(3)]));
        let w = g.add_const("w", Tensor::from_f32(vec![3], vec![0.1, -2.5, 3.0]).unwrap().cast(DType::F16));
        let shape = g.add_const("shape", Tensor::new(vec![2], Data::I64(vec![2, 3])).unwrap());
        let m = g.add_inferred("mul", Op::Binary(sqil_ir::ops::BinaryOp::Mul), &[Some(x), Some(w)], "m").unwrap();
        let half = Tensor::from_f32(vec![1], vec![0.5]).unwrap().cast(DType::BF16);
        let c = g.add_inferred("fill", Op::ConstantOfShape { value: half }, &[Some(shape)], "c").unwrap();
        let c16 = g.add_inferred("c16", Op::Cast { to: DType::F16, saturate: true }, &[Some(c)], "c16").unwrap();
        let s = g.add_inferred("add", Op::Binary(sqil_ir::ops::BinaryOp::Add), &[Some(m), Some(c16)], "s").unwrap();
        let y = g.add_node(
            "out",
            Op::Cast { to: DType::F32, saturate: true },
            &[Some(s)],
            vec![Value { name: "y".into(), ty: ValueType::new(DType::F32, vec![Dim::Known(2), Dim::Known(3)]) }],
        );
        g.outputs.push(ValueRef { node: y, slot: 0 });
        g
    }

    #[test]
    fn widens_every_half_value_and_drops_the_casts_it_makes_no_ops() {
        let original = half_graph();
        let mut g = original.clone();
        assert!(WidenHalf.run(&mut g, &mut PassCtx::default()).unwrap());
        sqil_ir::verify(&g).unwrap();
        for n in g.topo_order().unwrap() {
            for v in &g.node(n).outputs {
                assert!(!v.ty.dtype.is_half(), "{} is still {}", v.name, v.ty.dtype);
            }
            if let Op::Const(t) | Op::ConstantOfShape { value: t } = &g.node(n).op {
                assert!(!t.dtype().is_half());
            }
            // The output's f32 -> f32 cast is gone; the bf16 -> f16 one is now f32 -> f32, gone too.
            assert!(!matches!(g.node(n).op, Op::Cast { .. }), "{}", g.describe(n));
        }
        assert_eq!(g.value(g.outputs[0]).name, "y");
        // Half inputs as f32: the widened graph computes x * w + 0.5 in f32, exactly here.
        let x = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, -1.0, 0.25, 4.0, 8.0]).unwrap();
        let feeds = HashMap::from([("x".to_string(), x.clone())]);
        let y = Interpreter::new(&g).unwrap().run(&feeds).unwrap().remove(0);
        let w = [1638.0f32 / 16384.0, -2.5, 3.0]; // 0.1 in f16
        let want: Vec<f32> = (0..6).map(|i| x.data.to_f32_vec()[i] * w[i % 3] + 0.5).collect();
        assert_eq!(y.data.to_f32_vec(), want);
        // The half signature put back: an f16 input widened by a Cast, the f32 output unchanged
        // (it was f32 in the original).
        let mut r = g.clone();
        assert_eq!(restore_io_types(&mut r, &original), 1);
        sqil_ir::verify(&r).unwrap();
        assert_eq!(r.value(ValueRef { node: r.inputs[0], slot: 0 }).ty.dtype, DType::F16);
        let feeds = HashMap::from([("x".to_string(), x.cast(DType::F16))]);
        assert_eq!(Interpreter::new(&r).unwrap().run(&feeds).unwrap()[0].data, y.data);
    }

    #[test]
    fn restores_half_outputs_under_their_names() {
        let mut original = Graph::new("o");
        let x = original.add_input("x", ValueType::new(DType::BF16, vec![Dim::Known(2)]));
        let n = original.add_inferred("neg", Op::Unary(sqil_ir::ops::UnaryOp::Neg), &[Some(x)], "y").unwrap();
        // The same result listed twice: one Cast serves both.
        original.outputs.extend([n, n]);
        let mut g = original.clone();
        WidenHalf.run(&mut g, &mut PassCtx::default()).unwrap();
        assert_eq!(g.value(g.outputs[0]).ty.dtype, DType::F32);
        assert_eq!(restore_io_types(&mut g, &original), 2);
        sqil_ir::verify(&g).unwrap();
        assert_eq!(g.value(g.outputs[0]).ty.dtype, DType::BF16);
        assert_eq!(g.value(g.outputs[0]).name, "y");
        assert_eq!(g.outputs[0], g.outputs[1]);
        let x = Tensor::from_f32(vec![2], vec![1.5, -3.0]).unwrap().cast(DType::BF16);
        let feeds = HashMap::from([("x".to_string(), x)]);
        let y = Interpreter::new(&g).unwrap().run(&feeds).unwrap().remove(0);
        assert_eq!((y.dtype(), y.data.to_f32_vec()), (DType::BF16, vec![-1.5, 3.0]));
    }
}
