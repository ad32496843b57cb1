//! `Fused`: one kernel made of several ops, as the fusion pass (egg) extracts them: a GEMM or
//! convolution with its bias, activation, residual Add and (de)quantization around it. The
//! stages run in order, each reading node inputs or earlier stages' results; the last stage is
//! the output. Evaluation composes the stages' own reference semantics, so a fused node is
//! bit-identical to the chain it replaced; back ends lower it as one kernel named `kernel`.
//!
//! In the text format the stages are one string attribute: `Op{attr=value;...}(i0,s1,_)|...`
//! where `iK` is node input K, `sK` stage K's result and `_` an absent input; values are
//! `i:<int>`, `f:<f32 bits, hex>`, `is:<ints, colon separated>`, `fs:<f32 bits, colon separated>`,
//! `s:<string, no special characters>` and `d:<dtype>`.

use super::Op;
use crate::attrs::{Attr, AttrMap};
use crate::error::{IrError, Result};
use crate::shape::ValueType;
use crate::tensor::Tensor;

/// Where a stage's input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    Input(usize),
    Stage(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub op: Op,
    pub args: Vec<Option<Arg>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fused {
    /// The kernel this lowers to, e.g. `gemm+relu` or `dq-gemm+relu+q`.
    pub kernel: String,
    pub stages: Vec<Stage>,
}

fn bad(msg: String) -> IrError {
    IrError::Invalid(format!("Fused: {msg}"))
}

fn enc_attr(a: &Attr) -> Result<String> {
    let join = |v: Vec<String>| v.join(":");
    Ok(match a {
        Attr::Int(i) => format!("i:{i}"),
        Attr::Float(f) => format!("f:{:08x}", f.to_bits()),
        Attr::Ints(v) => format!("is:{}", join(v.iter().map(|x| x.to_string()).collect())),
        Attr::Floats(v) => format!("fs:{}", join(v.iter().map(|x| format!("{:08x}", x.to_bits())).collect())),
        Attr::Str(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => format!("s:{s}"),
        Attr::Str(s) => return Err(bad(format!("string attribute `{s}` cannot be encoded"))),
        Attr::DType(d) => format!("d:{d}"),
        Attr::Tensor(_) => return Err(bad("tensor attributes cannot be fused".into())),
    })
}

fn dec_attr(s: &str) -> Result<Attr> {
    let (k, v) = s.split_once(':').ok_or_else(|| bad(format!("attribute value `{s}`")))?;
    let int = |x: &str| x.parse::<i64>().map_err(|_| bad(format!("`{x}` is not an int")));
    let f32h =
        |x: &str| u32::from_str_radix(x, 16).map(f32::from_bits).map_err(|_| bad(format!("`{x}` is not f32 bits")));
    let list = |v: &str| -> Vec<String> {
        if v.is_empty() {
            vec![]
        } else {
            v.split(':').map(String::from).collect()
        }
    };
    Ok(match k {
        "i" => Attr::Int(int(v)?),
        "f" => Attr::Float(f32h(v)?),
        "is" => Attr::Ints(list(v).iter().map(|x| int(x)).collect::<Result<_>>()?),
        "fs" => Attr::Floats(list(v).iter().map(|x| f32h(x)).collect::<Result<_>>()?),
        "s" => Attr::Str(v.to_string()),
        "d" => Attr::DType(v.parse().map_err(|_| bad(format!("`{v}` is not a dtype")))?),
        _ => return Err(bad(format!("attribute kind `{k}`"))),
    })
}

impl Fused {
    /// The stages as one string (see the module docs).
    pub fn encode(&self) -> Result<String> {
        let mut parts = vec![];
        for st in &self.stages {
            let attrs: Vec<String> =
                st.op.attrs().iter().map(|(k, v)| Ok(format!("{k}={}", enc_attr(v)?))).collect::<Result<_>>()?;
            let args: Vec<String> = st
                .args
                .iter()
                .map(|a| match a {
                    None => "_".to_string(),
                    Some(Arg::Input(i)) => format!("i{i}"),
                    Some(Arg::Stage(i)) => format!("s{i}"),
                })
                .collect();
            parts.push(format!("{}{{{}}}({})", st.op.name(), attrs.join(";"), args.join(",")));
        }
        Ok(parts.join("|"))
    }

    pub fn decode(kernel: &str, s: &str) -> Result<Fused> {
        let mut stages = vec![];
        for part in s.split('|') {
            let (name, rest) = part.split_once('{').ok_or_else(|| bad(format!("stage `{part}`")))?;
            let (attrs, rest) = rest.split_once('}').ok_or_else(|| bad(format!("stage `{part}`")))?;
            let args = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| bad(format!("stage `{part}`")))?;
            let mut map = AttrMap::new();
            for kv in attrs.split(';').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("attribute `{kv}`")))?;
                map.insert(k, dec_attr(v)?);
            }
            let op = Op::from_attrs(name, &map, 1)?;
            if matches!(op, Op::Fused(_) | Op::Input | Op::Const(_))
                || op.attrs().iter().any(|(_, v)| enc_attr(v).is_err())
            {
                return Err(bad(format!("`{name}` cannot be a stage")));
            }
            let args = args
                .split(',')
                .filter(|a| !a.is_empty())
                .map(|a| {
                    let num = |x: &str| x.parse::<usize>().map_err(|_| bad(format!("argument `{a}`")));
                    match a {
                        "_" => Ok(None),
                        _ if a.starts_with('i') => Ok(Some(Arg::Input(num(&a[1..])?))),
                        _ if a.starts_with('s') => {
                            let k = num(&a[1..])?;
                            if k >= stages.len() {
                                return Err(bad(format!("stage {} reads stage {k}, not yet computed", stages.len())));
                            }
                            Ok(Some(Arg::Stage(k)))
                        }
                        _ => Err(bad(format!("argument `{a}`"))),
                    }
                })
                .collect::<Result<_>>()?;
            stages.push(Stage { op, args });
        }
        if stages.is_empty() {
            return Err(bad("no stages".into()));
        }
        Ok(Fused { kernel: kernel.to_string(), stages })
    }

    /// Number of node inputs the stages read.
    pub fn arity(&self) -> usize {
        self.stages
            .iter()
            .flat_map(|s| s.args.iter())
            .filter_map(|a| match a {
                Some(Arg::Input(i)) => Some(i + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn infer(&self, inputs: &[Option<&ValueType>], consts: &[Option<&Tensor>]) -> Result<Vec<ValueType>> {
        let mut tys: Vec<ValueType> = vec![];
        for (k, st) in self.stages.iter().enumerate() {
            let ins: Vec<Option<&ValueType>> = st
                .args
                .iter()
                .map(|a| match a {
                    None => None,
                    Some(Arg::Input(i)) => inputs.get(*i).copied().flatten(),
                    Some(Arg::Stage(s)) => tys.get(*s),
                })
                .collect();
            let cs: Vec<Option<&Tensor>> = st
                .args
                .iter()
                .map(|a| match a {
                    Some(Arg::Input(i)) => consts.get(*i).copied().flatten(),
                    _ => None,
                })
                .collect();
            let t = st.op.infer(&ins, &cs, 1).map_err(|e| e.context(format!("fused stage {k} ({})", st.op.name())))?;
            tys.push(t.into_iter().next().ok_or_else(|| bad("stage without output".into()))?);
        }
        Ok(vec![tys.pop().expect("non-empty")])
    }

    pub(crate) fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        self.eval_from(vec![], inputs)
    }

    /// Evaluates the stages after the first, given the first stage's result `head` (computed by
    /// a lowered step: an int4 GEMM or convolution, `crate::lowered`).
    pub fn eval_after(&self, head: Tensor, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
        Ok(self.eval_from(vec![head], inputs)?.pop().expect("one output"))
    }

    fn eval_from(&self, mut vals: Vec<Tensor>, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        for (k, st) in self.stages.iter().enumerate().skip(vals.len()) {
            let ins: Vec<Option<&Tensor>> = st
                .args
                .iter()
                .map(|a| match a {
                    None => None,
                    Some(Arg::Input(i)) => inputs.get(*i).copied().flatten(),
                    Some(Arg::Stage(s)) => vals.get(*s),
                })
                .collect();
            let t = st.op.eval(&ins, 1).map_err(|e| e.context(format!("fused stage {k} ({})", st.op.name())))?;
            vals.push(t.into_iter().next().ok_or_else(|| bad("stage without output".into()))?);
        }
        Ok(vec![vals.pop().expect("non-empty")])
    }
}
