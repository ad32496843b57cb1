//! The fusion rules, as data: each a named `rewrite!`-style rule with a `;; lhs => rhs` comment.
//! `seed-*` rules offer a GEMM/conv as a one-stage fused kernel, with the DequantizeLinear of
//! its activation and/or weight operand pulled in (an integer kernel); `absorb-*` rules grow a
//! fused kernel by its single consumer: bias or residual Add, activation, requantizing
//! QuantizeLinear. A kernel only absorbs a consumer of a value nothing else reads, so no value
//! is ever computed twice.

use super::lang::{as_stage, attr_op, fused_symbol, stage_args, symbol_fused, EGraph, FuseLang, Info};
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use sqil_ir::ops::fused::{Arg, Fused, Stage};
use sqil_ir::ops::{BinaryOp, UnaryOp};
use sqil_ir::Op;

fn var(s: &str) -> Var {
    s.parse().expect("valid variable")
}

fn pat(s: &str) -> Pattern<FuseLang> {
    s.parse().expect("valid pattern")
}

fn kernel_tag(op: &Op) -> &'static str {
    match op {
        Op::Gemm { .. } => "gemm",
        Op::MatMul => "matmul",
        Op::Conv(_) => "conv",
        Op::Binary(BinaryOp::Add) => "add",
        Op::Unary(UnaryOp::Relu) => "relu",
        Op::Unary(UnaryOp::Tanh) => "tanh",
        Op::Unary(UnaryOp::Sigmoid) => "sigmoid",
        Op::Gelu { .. } => "gelu",
        Op::LeakyRelu { .. } => "leakyrelu",
        Op::Clip => "clip",
        Op::QuantizeLinear { .. } => "q",
        _ => "op",
    }
}

fn add_fused(eg: &mut EGraph, root: Id, f: &Fused, inputs: Vec<Id>) -> Vec<Id> {
    let Ok(sym) = fused_symbol(f) else { return vec![] };
    let id = eg.add(FuseLang::Fused(sym, inputs));
    if eg.union(root, id) {
        vec![id]
    } else {
        vec![]
    }
}

/// `seed-*`: the base op as a fused kernel, also with each DequantizeLinear operand pulled in.
struct Seed {
    vars: Vec<Var>,
}

impl Applier<FuseLang, Info> for Seed {
    fn apply_one(
        &self,
        eg: &mut EGraph,
        root: Id,
        subst: &Subst,
        _: Option<&PatternAst<FuseLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let Some(op) = attr_op(eg, subst[self.vars[0]]) else { return vec![] };
        let operands: Vec<Id> = self.vars[1..].iter().map(|v| subst[*v]).collect();
        let none = eg.lookup(FuseLang::None).expect("none exists");
        // Operands 0 (activation) and 1 (weight) may arrive through a DequantizeLinear.
        let dq_of = |eg: &EGraph, c: Id| {
            eg[c].nodes.iter().find_map(|n| match n {
                FuseLang::Dq(_) => as_stage(eg, n),
                _ => None,
            })
        };
        let dqs: Vec<Option<(Op, Vec<Id>)>> = (0..2).map(|i| dq_of(eg, operands[i])).collect();
        let mut out = vec![];
        for mask in 0..4u8 {
            if (0..2).any(|i| mask & (1 << i) != 0 && dqs[i].is_none()) {
                continue;
            }
            let mut inputs = vec![];
            let mut stages = vec![];
            let mut base_args = vec![];
            let mut tag = String::new();
            for (i, &c) in operands.iter().enumerate() {
                match (i < 2 && mask & (1 << i) != 0, &dqs.get(i)) {
                    (true, Some(Some((dq, ins)))) => {
                        let args = stage_args(eg, none, ins, &mut inputs);
                        stages.push(Stage { op: dq.clone(), args });
                        base_args.push(Some(Arg::Stage(stages.len() - 1)));
                        tag += if i == 0 { "qx-" } else { "qw-" };
                    }
                    _ => base_args.extend(stage_args(eg, none, &[c], &mut inputs)),
                }
            }
            tag += kernel_tag(&op);
            stages.push(Stage { op: op.clone(), args: base_args });
            out.extend(add_fused(eg, root, &Fused { kernel: tag, stages }, inputs));
        }
        out
    }
}

/// How an absorbed consumer gets its op: fixed, or from an attribute variable.
enum OpFrom {
    Fixed(Op),
    Attr(Var),
}

/// `absorb-*`: the consumer becomes the fused kernel's last stage. `pos` is the fused operand's
/// slot in the consumer; `extra` are the consumer's other operands, in slot order.
struct Absorb {
    op: OpFrom,
    fused: Var,
    pos: usize,
    extra: Vec<Var>,
    /// Only where the consumer's result has as many elements as the kernel's (no broadcast
    /// that would grow it): residual / bias Add.
    same_size: bool,
}

impl Applier<FuseLang, Info> for Absorb {
    fn apply_one(
        &self,
        eg: &mut EGraph,
        root: Id,
        subst: &Subst,
        _: Option<&PatternAst<FuseLang>>,
        _: Symbol,
    ) -> Vec<Id> {
        let f = subst[self.fused];
        if eg[f].data.uses != 1 {
            return vec![]; // another reader needs the intermediate value: fusing would recompute it
        }
        if self.same_size && eg[root].data.elems != eg[f].data.elems {
            return vec![];
        }
        let op = match &self.op {
            OpFrom::Fixed(op) => op.clone(),
            OpFrom::Attr(a) => match attr_op(eg, subst[*a]) {
                Some(op) => op,
                None => return vec![],
            },
        };
        let none = eg.lookup(FuseLang::None).expect("none exists");
        let kernels: Vec<(Fused, Vec<Id>)> = eg[f]
            .nodes
            .iter()
            .filter_map(|n| match n {
                FuseLang::Fused(s, ch) => symbol_fused(*s).map(|k| (k, ch.clone())),
                _ => None,
            })
            .collect();
        let mut out = vec![];
        for (mut k, mut inputs) in kernels {
            if k.stages.iter().any(|s| matches!(s.op, Op::QuantizeLinear { .. })) {
                continue; // nothing follows the requantizing epilogue
            }
            let extra: Vec<Id> = self.extra.iter().map(|v| subst[*v]).collect();
            let mut args = stage_args(eg, none, &extra, &mut inputs);
            args.insert(self.pos, Some(Arg::Stage(k.stages.len() - 1)));
            let tag = match (&op, self.same_size) {
                (Op::Binary(BinaryOp::Add), _) => {
                    let bias = extra.first().is_some_and(|&r| eg[r].data.elems < eg[root].data.elems);
                    if bias {
                        "bias"
                    } else {
                        "residual"
                    }
                }
                _ => kernel_tag(&op),
            };
            k.kernel = format!("{}+{tag}", k.kernel);
            k.stages.push(Stage { op: op.clone(), args });
            out.extend(add_fused(eg, root, &k, inputs));
        }
        out
    }
}

fn rule(
    name: &str,
    lhs: &str,
    applier: impl Applier<FuseLang, Info> + Send + Sync + 'static,
) -> Rewrite<FuseLang, Info> {
    Rewrite::new(name, pat(lhs), applier).expect("valid rule")
}

fn absorb(op: OpFrom, fused: &str, pos: usize, extra: &[&str], same_size: bool) -> Absorb {
    Absorb { op, fused: var(fused), pos, extra: extra.iter().map(|v| var(v)).collect(), same_size }
}

/// Every fusion rule.
pub fn rules() -> Vec<Rewrite<FuseLang, Info>> {
    let seed = |vs: &[&str]| Seed { vars: vs.iter().map(|v| var(v)).collect() };
    let fixed = |op: Op| OpFrom::Fixed(op);
    vec![
        // (gemm ?a ?x ?w ?c) => fused[gemm](?x ?w ?c), also with dq(?x) / dq(?w) pulled in
        rule("seed-gemm", "(gemm ?a ?x ?w ?c)", seed(&["?a", "?x", "?w", "?c"])),
        // (matmul ?a ?x ?w) => fused[matmul](?x ?w), likewise
        rule("seed-matmul", "(matmul ?a ?x ?w)", seed(&["?a", "?x", "?w"])),
        // (conv ?a ?x ?w ?b) => fused[conv](?x ?w ?b), likewise
        rule("seed-conv", "(conv ?a ?x ?w ?b)", seed(&["?a", "?x", "?w", "?b"])),
        // (add ?f ?r) => fused[..., add](..., ?r): bias or residual epilogue
        rule("absorb-add", "(add ?f ?r)", absorb(fixed(Op::Binary(BinaryOp::Add)), "?f", 0, &["?r"], true)),
        // (add ?r ?f) => fused[..., add](..., ?r)
        rule("absorb-add-rhs", "(add ?r ?f)", absorb(fixed(Op::Binary(BinaryOp::Add)), "?f", 1, &["?r"], true)),
        // (relu ?f) => fused[..., relu]
        rule("absorb-relu", "(relu ?f)", absorb(fixed(Op::Unary(UnaryOp::Relu)), "?f", 0, &[], false)),
        // (tanh ?f) => fused[..., tanh]
        rule("absorb-tanh", "(tanh ?f)", absorb(fixed(Op::Unary(UnaryOp::Tanh)), "?f", 0, &[], false)),
        // (sigmoid ?f) => fused[..., sigmoid]
        rule("absorb-sigmoid", "(sigmoid ?f)", absorb(fixed(Op::Unary(UnaryOp::Sigmoid)), "?f", 0, &[], false)),
        // (gelu ?a ?f) => fused[..., gelu]
        rule("absorb-gelu", "(gelu ?a ?f)", absorb(OpFrom::Attr(var("?a")), "?f", 0, &[], false)),
        // (leaky ?a ?f) => fused[..., leakyrelu]
        rule("absorb-leakyrelu", "(leaky ?a ?f)", absorb(OpFrom::Attr(var("?a")), "?f", 0, &[], false)),
        // (clip ?f ?lo ?hi) => fused[..., clip](..., ?lo, ?hi)
        rule("absorb-clip", "(clip ?f ?lo ?hi)", absorb(fixed(Op::Clip), "?f", 0, &["?lo", "?hi"], false)),
        // (q ?a ?f ?s ?z) => fused[..., q](..., ?s, ?z): the requantizing epilogue
        rule("absorb-q", "(q ?a ?f ?s ?z)", absorb(OpFrom::Attr(var("?a")), "?f", 0, &["?s", "?z"], false)),
    ]
}
