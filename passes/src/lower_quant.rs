//! `lower-quant`: turns FakeQuant into the standard ONNX form. A FakeQuant of a constant
//! becomes an integer constant (int4 for up to 4 bits, int8 up to 8; values in the narrower
//! range of 2 or 3 bits stay within it) and a DequantizeLinear; any other FakeQuant becomes
//! QuantizeLinear + DequantizeLinear. The results are bit-identical: both compute
//! `clamp(round_half_even(x / s) + z)` then `(q - z) * s` in f32.
//! Needs: FakeQuant zero points holding integers. Keeps: every value's type.

use crate::{Pass, PassCtx};
use sqil_ir::ops::quant::fake_quant_range;
use sqil_ir::{DType, Data, Graph, IrError, Op, Result, Tensor, Value, ValueRef};

#[derive(Debug, Default)]
pub struct LowerQuant;

fn int_dtype(bits: u8, signed: bool) -> Result<DType> {
    Ok(match (bits, signed) {
        (1..=4, true) => DType::I4,
        (1..=4, false) => DType::U4,
        (5..=8, true) => DType::I8,
        (5..=8, false) => DType::U8,
        (9..=16, true) => DType::I16,
        (9..=16, false) => DType::U16,
        _ => return Err(IrError::Unsupported(format!("FakeQuant with {bits} bits"))),
    })
}

impl Pass for LowerQuant {
    fn name(&self) -> &'static str {
        "lower-quant"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut changed = false;
        for n in g.topo_order()? {
            let Op::FakeQuant { bits, signed, axis, block_size } = g.node(n).op.clone() else { continue };
            let ins = g.inputs_of(n);
            let (x, scale, zero) = (ins[0].expect("x"), ins[1].expect("scale"), ins.get(2).copied().flatten());
            let dtype = int_dtype(bits, signed)?;
            let name = g.node(n).name.clone();
            let st = g
                .const_value(scale)
                .ok_or_else(|| IrError::Invalid(format!("{}: scale is not constant", g.describe(n))))?;
            let st = st.clone();
            let zt = match zero {
                Some(z) => {
                    let t = g
                        .const_value(z)
                        .ok_or_else(|| IrError::Invalid(format!("{}: zero point is not constant", g.describe(n))))?;
                    let v = t.data.to_f32_vec();
                    if v.iter().any(|z| z.fract() != 0.0) {
                        return Err(IrError::Invalid(format!("{}: zero point is not an integer", g.describe(n))));
                    }
                    Some(Tensor::new(t.shape.clone(), Data::from_i64(dtype, v.iter().map(|&z| z as i64)))?)
                }
                // Symmetric: an explicit zero point of 0 fixes the integer type in every opset.
                None => Some(Tensor::new(st.shape.clone(), Data::zeros(dtype, st.len()))?),
            };
            let scale_c = g.add_const(format!("{name}.scale"), st.clone());
            let zero_c = zt.clone().map(|z| g.add_const(format!("{name}.zero_point"), z));
            let out_name = g.value(ValueRef { node: n, slot: 0 }).name.clone();
            let q = if let Some(xt) = g.const_value(x) {
                // Weights: quantize now, store integers.
                // Weights: quantize now and store the integers, clamped to the FakeQuant's own
                // range (2 and 3 bits live in an int4 container).
                let q = sqil_ir::ops::quant::quantize_values(xt, &st, zt.as_ref(), axis, block_size, dtype)?;
                let (lo, hi) = fake_quant_range(bits, signed);
                let v = q.data.to_i64_vec().into_iter().map(|v| v.clamp(lo, hi));
                g.add_const(format!("{name}.int"), Tensor::new(q.shape.clone(), Data::from_i64(dtype, v))?)
            } else {
                let op = Op::QuantizeLinear { axis, block_size, output_dtype: Some(dtype), saturate: true };
                g.add_inferred(
                    format!("{name}.quantize"),
                    op,
                    &[Some(x), Some(scale_c), zero_c],
                    format!("{out_name}.int"),
                )?
            };
            let ty = g.value(ValueRef { node: n, slot: 0 }).ty.clone();
            let dq = g.add_node(
                format!("{name}.dequantize"),
                Op::DequantizeLinear { axis, block_size },
                &[Some(q), Some(scale_c), zero_c],
                vec![Value { name: format!("{out_name}.dq"), ty }],
            );
            let old = ValueRef { node: n, slot: 0 };
            g.replace_uses(old, ValueRef { node: dq, slot: 0 });
            g.remove_node(n);
            changed = true;
        }
        if changed {
            cx.notes.push("FakeQuant lowered to QuantizeLinear/DequantizeLinear".into());
        }
        Ok(changed)
    }
}
