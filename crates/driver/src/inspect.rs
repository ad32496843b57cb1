//! `sqil inspect`: per-layer summary of a graph.
//!
//! Parameters are the floating-point constants a node reads as weights, biases, normalisation
//! scales or slopes (whatever their size: a one-unit layer's bias has one element), other
//! floating-point constants with more than one element, and the integer weights a
//! DequantizeLinear decodes; not BatchNormalization's running mean and
//! variance (buffers, not parameters, as PyTorch counts them), nor quantization scales and zero
//! points. Each constant counts once, at its first reader. FLOPs are per sample (every
//! symbolic dimension taken as 1); a multiply-add counts 2. int4 size: 4 bits per parameter plus
//! one f16 scale per group of 64.

use sqil_ir::{Dim, Graph, Op, ValueType};
use std::collections::HashSet;

pub struct Row {
    pub name: String,
    pub op: String,
    pub inputs: String,
    pub output: String,
    pub params: usize,
    pub flops: u64,
}

pub struct Summary {
    pub rows: Vec<Row>,
    pub params: usize,
    pub flops: u64,
}

/// int4 bytes of `n` parameters: packed nibbles plus an f16 scale per 64.
pub fn int4_bytes(n: usize) -> usize {
    n.div_ceil(2) + 2 * n.div_ceil(64)
}

fn dims(t: &ValueType) -> Vec<u64> {
    t.shape.iter().map(|d| if let Dim::Known(k) = d { *k as u64 } else { 1 }).collect()
}

fn numel(t: &ValueType) -> u64 {
    dims(t).iter().product()
}

fn flops(g: &Graph, n: sqil_ir::NodeId) -> u64 {
    let node = g.node(n);
    let ins: Vec<Option<&ValueType>> = g.inputs_of(n).into_iter().map(|v| v.map(|v| &g.value(v).ty)).collect();
    let out = &node.outputs[0].ty;
    let inp = |i: usize| ins.get(i).copied().flatten();
    match &node.op {
        Op::MatMul | Op::Gemm { .. } => {
            // out elements x reduction length x 2
            let a = inp(0).map(dims).unwrap_or_default();
            let k = match &node.op {
                Op::Gemm { trans_a: true, .. } => a.first().copied().unwrap_or(1),
                _ => a.last().copied().unwrap_or(1),
            };
            2 * numel(out) * k
        }
        Op::Conv(c) => {
            let w = inp(1).map(dims).unwrap_or_default();
            let per_out: u64 = w.iter().skip(1).product();
            let _ = c;
            2 * numel(out) * per_out
        }
        Op::ConvTranspose(_) => {
            let (x, w) = (inp(0).map(numel).unwrap_or(0), inp(1).map(dims).unwrap_or_default());
            2 * x * w.iter().skip(1).product::<u64>()
        }
        Op::Input
        | Op::Const(_)
        | Op::Reshape { .. }
        | Op::Flatten { .. }
        | Op::Squeeze
        | Op::Unsqueeze
        | Op::Shape { .. }
        | Op::Identity => 0,
        _ => numel(out),
    }
}

pub fn summarise(g: &Graph) -> crate::Result<Summary> {
    let order = g.topo_order()?;
    let mut seen = HashSet::new();
    let mut rows = vec![];
    for n in order {
        let node = g.node(n);
        if matches!(node.op, Op::Input | Op::Const(_)) {
            continue;
        }
        let ins = g.inputs_of(n);
        let mut params = 0;
        for (slot, v) in ins.iter().enumerate() {
            let Some(v) = v else { continue };
            let Some(t) = g.const_value(*v) else { continue };
            // Not parameters: batch-norm running statistics, quantization scales and zero points.
            let meta = match node.op {
                Op::BatchNorm { .. } => slot >= 3,
                Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. } | Op::FakeQuant { .. } => slot >= 1,
                _ => false,
            };
            // Quantized weights count as the parameters they encode.
            let dequantized = matches!(node.op, Op::DequantizeLinear { .. }) && slot == 0;
            // Operands that are parameters whatever their size (a one-unit layer's bias has one
            // element); elsewhere a one-element constant is a literal (eps, 1/sqrt(d), 0.5).
            let param_slot = match &node.op {
                Op::Gemm { .. } | Op::Conv(_) | Op::ConvTranspose(_) | Op::LayerNorm { .. } | Op::PRelu => slot >= 1,
                Op::BatchNorm { .. } => slot == 1 || slot == 2,
                Op::MatMul => true,
                // A bias added to a MatMul (PyTorch's Linear exported as MatMul + Add).
                Op::Binary(sqil_ir::ops::BinaryOp::Add) => ins.iter().enumerate().any(|(i, u)| {
                    i != slot && u.is_some_and(|u| matches!(g.node(u.node).op, Op::MatMul | Op::Gemm { .. }))
                }),
                _ => false,
            };
            if (t.dtype().is_float() || dequantized) && (t.len() > 1 || param_slot) && !meta && seen.insert(*v) {
                params += t.len();
            }
        }
        let input_types: Vec<String> =
            ins.iter().flatten().filter(|v| g.const_value(**v).is_none()).map(|&v| g.value(v).ty.to_string()).collect();
        rows.push(Row {
            name: if node.name.is_empty() { node.outputs[0].name.clone() } else { node.name.clone() },
            op: node.op.name().to_string(),
            inputs: input_types.join(" "),
            output: node.outputs.iter().map(|v| v.ty.to_string()).collect::<Vec<_>>().join(" "),
            params,
            flops: flops(g, n),
        });
    }
    let params = rows.iter().map(|r| r.params).sum();
    let flops = rows.iter().map(|r| r.flops).sum();
    Ok(Summary { rows, params, flops })
}

pub fn render(s: &Summary, title: &str) -> String {
    let head = ["layer", "op", "inputs", "output", "params", "FLOPs", "f32 bytes", "int4 bytes"];
    let mut table: Vec<[String; 8]> = s
        .rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.op.clone(),
                r.inputs.clone(),
                r.output.clone(),
                r.params.to_string(),
                r.flops.to_string(),
                (r.params * 4).to_string(),
                int4_bytes(r.params).to_string(),
            ]
        })
        .collect();
    table.push([
        "total".into(),
        format!("{} ops", s.rows.len()),
        String::new(),
        String::new(),
        s.params.to_string(),
        s.flops.to_string(),
        (s.params * 4).to_string(),
        s.rows.iter().map(|r| int4_bytes(r.params)).sum::<usize>().to_string(),
    ]);
    let mut w = head.map(|h| h.len());
    for r in &table {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count()).min(48);
        }
    }
    let mut out = format!("{title}\n");
    let line = |cells: &[String]| -> String {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let c: String = if c.chars().count() > 48 {
                format!("{}…", c.chars().take(47).collect::<String>())
            } else {
                c.clone()
            };
            if i >= 4 {
                l.push_str(&format!("{c:>width$}  ", width = w[i]));
            } else {
                l.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(&head.map(String::from)));
    out.push_str(&line(&w.map(|n| "-".repeat(n))));
    for (i, r) in table.iter().enumerate() {
        if i == table.len() - 1 {
            out.push_str(&line(&w.map(|n| "-".repeat(n))));
        }
        out.push_str(&line(r));
    }
    out.push_str("FLOPs per sample (symbolic dimensions as 1); int4 bytes: 4-bit weights plus an f16 scale per 64.\n");
    out
}
