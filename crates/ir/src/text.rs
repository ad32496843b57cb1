//! The IR's text format: prints a graph and parses it back to an equal graph.
//!
//! ```text
//! graph "policy" (%obs: f32[N,15]) -> (%act) {
//!   %w = Const[value=f32[2,15]{0.5, ...}] : f32[2,15]
//!   %act = Gemm[alpha=1.0, beta=1.0, transA=0, transB=1](%obs, %w, _) @"fc" : f32[N,2]
//! }
//! ```
//! Nodes appear in topological order; `_` is an absent optional input; `@"..."` is the node
//! name (omitted when empty); every attribute is printed, defaults included. Floats print in
//! Rust's shortest round-trip form, so constants survive a round trip bit for bit.

use crate::attrs::{Attr, AttrMap};
use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::graph::{Graph, Value, ValueRef};
use crate::ops::Op;
use crate::shape::{is_ident, Dim, ValueType};
use crate::tensor::{Data, Tensor};
use std::collections::HashMap;
use std::fmt::Write;

/// How to print: `elide_over` replaces the elements of tensors larger than that with `...`
/// (for people; such text does not parse back); `splat` prints a tensor of two or more equal
/// elements as `{splat V}` (parses back; compact for placeholders and zero biases).
#[derive(Clone, Copy, Debug, Default)]
pub struct PrintOptions {
    pub elide_over: Option<usize>,
    pub splat: bool,
}

fn value_name(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        format!("%{s}")
    } else {
        format!("%{s:?}")
    }
}

fn fmt_tensor(t: &Tensor, o: &PrintOptions, out: &mut String) {
    write!(out, "{}", ValueType::fixed(t.dtype(), &t.shape)).expect("string write");
    if o.elide_over.is_some_and(|m| t.len() > m) {
        out.push_str("{...}");
        return;
    }
    let items: Vec<String> = match &t.data {
        Data::F32(v) => v.iter().map(|x| format!("{x:?}")).collect(),
        Data::F64(v) => v.iter().map(|x| format!("{x:?}")).collect(),
        Data::F16(v) => v.iter().map(|x| format!("{:?}", x.to_f32())).collect(),
        Data::BF16(v) => v.iter().map(|x| format!("{:?}", x.to_f32())).collect(),
        Data::Bool(v) => v.iter().map(|x| x.to_string()).collect(),
        d => d.to_i64_vec().iter().map(|x| x.to_string()).collect(),
    };
    if o.splat && items.len() > 1 && items.iter().all(|x| *x == items[0]) {
        write!(out, "{{splat {}}}", items[0]).expect("string write");
        return;
    }
    out.push('{');
    out.push_str(&items.join(", "));
    out.push('}');
}

fn fmt_attr(a: &Attr, o: &PrintOptions, out: &mut String) {
    match a {
        Attr::Int(v) => write!(out, "{v}").expect("string write"),
        Attr::Float(v) => write!(out, "{v:?}").expect("string write"),
        Attr::Ints(v) => {
            write!(out, "[{}]", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")).expect("string write")
        }
        Attr::Floats(v) if v.is_empty() => out.push_str("[]"),
        Attr::Floats(v) => write!(out, "[{}]", v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", "))
            .expect("string write"),
        Attr::Str(s) => write!(out, "{s:?}").expect("string write"),
        Attr::DType(d) => out.push_str(d.name()),
        Attr::Tensor(t) => fmt_tensor(t, o, out),
    }
}

/// Prints `g` in the text format.
pub fn print_graph(g: &Graph, o: &PrintOptions) -> Result<String> {
    let mut s = String::new();
    write!(s, "graph {:?} (", g.name).expect("string write");
    for (i, &n) in g.inputs.iter().enumerate() {
        let v = &g.node(n).outputs[0];
        if i > 0 {
            s.push_str(", ");
        }
        write!(s, "{}: {}", value_name(&v.name), v.ty).expect("string write");
    }
    s.push_str(") -> (");
    let outs: Vec<String> = g.outputs.iter().map(|&v| value_name(&g.value(v).name)).collect();
    s.push_str(&outs.join(", "));
    s.push_str(") {\n");
    for n in g.topo_order()? {
        let node = g.node(n);
        if matches!(node.op, Op::Input) {
            continue;
        }
        s.push_str("  ");
        s.push_str(&node.outputs.iter().map(|v| value_name(&v.name)).collect::<Vec<_>>().join(", "));
        write!(s, " = {}", node.op.name()).expect("string write");
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            s.push('[');
            for (i, (k, a)) in attrs.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                write!(s, "{k}=").expect("string write");
                fmt_attr(a, o, &mut s);
            }
            s.push(']');
        }
        let ins: Vec<String> =
            g.inputs_of(n).into_iter().map(|v| v.map_or("_".to_string(), |v| value_name(&g.value(v).name))).collect();
        if !ins.is_empty() || !matches!(node.op, Op::Const(_)) {
            write!(s, "({})", ins.join(", ")).expect("string write");
        }
        if !node.name.is_empty() {
            write!(s, " @{:?}", node.name).expect("string write");
        }
        let tys: Vec<String> = node.outputs.iter().map(|v| v.ty.to_string()).collect();
        writeln!(s, " : {}", tys.join(", ")).expect("string write");
    }
    s.push_str("}\n");
    Ok(s)
}

/// Parses the text format into a graph. Errors give the line and column.
pub fn parse_graph(src: &str) -> Result<Graph> {
    let mut p = Parser { s: src.as_bytes(), i: 0, src };
    p.graph().map_err(|e| {
        let (line, col) = p.position();
        e.context(format!("line {line}, column {col}"))
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn position(&self) -> (usize, usize) {
        let before = &self.src[..self.i.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
        (line, col)
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(IrError::Invalid(msg.into()))
    }

    fn ws(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b' ' | b'\t' | b'\r' | b'\n' => self.i += 1,
                b';' => {
                    while self.i < self.s.len() && self.s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(tok.as_bytes()) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> Result<()> {
        if self.eat(tok) {
            Ok(())
        } else {
            let found = self.src[self.i..].chars().take(12).collect::<String>();
            self.err(format!("expected `{tok}`, found `{found}`"))
        }
    }

    fn word(&mut self) -> Result<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || matches!(self.s[self.i], b'_' | b'.'))
        {
            self.i += 1;
        }
        if start == self.i {
            return self.err("expected a name");
        }
        Ok(self.src[start..self.i].to_string())
    }

    fn string(&mut self) -> Result<String> {
        self.expect("\"")?;
        let mut out = String::new();
        loop {
            let Some(c) = self.src[self.i..].chars().next() else { return self.err("unterminated string") };
            self.i += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let e = self.src[self.i..].chars().next().ok_or_else(|| IrError::Invalid("bad escape".into()))?;
                    self.i += e.len_utf8();
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        '0' => out.push('\0'),
                        '\\' | '"' | '\'' => out.push(e),
                        'u' => {
                            self.expect("{")?;
                            let end = self.src[self.i..]
                                .find('}')
                                .ok_or_else(|| IrError::Invalid("bad \\u escape".into()))?;
                            let code = u32::from_str_radix(&self.src[self.i..self.i + end], 16)
                                .map_err(|_| IrError::Invalid("bad \\u escape".into()))?;
                            out.push(char::from_u32(code).ok_or_else(|| IrError::Invalid("bad \\u escape".into()))?);
                            self.i += end + 1;
                        }
                        o => return self.err(format!("unknown escape `\\{o}`")),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn value_name(&mut self) -> Result<String> {
        self.expect("%")?;
        if self.s.get(self.i) == Some(&b'"') {
            self.string()
        } else {
            self.word()
        }
    }

    fn number(&mut self) -> Result<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || matches!(self.s[self.i], b'.' | b'-' | b'+'))
        {
            self.i += 1;
        }
        if start == self.i {
            return self.err("expected a number");
        }
        Ok(self.src[start..self.i].to_string())
    }

    fn int(&mut self) -> Result<i64> {
        let n = self.number()?;
        n.parse().map_err(|_| IrError::Invalid(format!("`{n}` is not an integer")))
    }

    fn ty(&mut self) -> Result<ValueType> {
        let d = self.word()?;
        let dtype: DType = d.parse().map_err(IrError::Invalid)?;
        self.expect("[")?;
        let mut shape = vec![];
        if !self.eat("]") {
            loop {
                let dim = match self.peek() {
                    Some(b'?') => {
                        self.i += 1;
                        Dim::Unknown
                    }
                    Some(b'"') => Dim::Sym(self.string()?),
                    Some(c) if c.is_ascii_digit() => Dim::Known(self.int()? as usize),
                    _ => {
                        let w = self.word()?;
                        if !is_ident(&w) {
                            return self.err(format!("bad dimension `{w}`"));
                        }
                        Dim::Sym(w)
                    }
                };
                shape.push(dim);
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(ValueType::new(dtype, shape))
    }

    fn tensor_body(&mut self, ty: ValueType) -> Result<Tensor> {
        let shape =
            ty.known_shape().ok_or_else(|| IrError::Invalid("a tensor literal needs a concrete shape".into()))?;
        self.expect("{")?;
        if self.eat("...") {
            return self.err("this constant was elided when printed; print without elision to parse it back");
        }
        let mut items = vec![];
        if self.eat("splat") {
            let v = self.number()?;
            self.expect("}")?;
            let n = crate::tensor::checked_len(&shape, ty.dtype.bits().div_ceil(8).max(1), "a splat literal")
                .or_else(|e| self.err(e.to_string()))?;
            items = vec![v; n];
        } else if !self.eat("}") {
            loop {
                items.push(self.number()?);
                if self.eat("}") {
                    break;
                }
                self.expect(",")?;
            }
        }
        let bad = |s: &str| IrError::Invalid(format!("`{s}` is not a valid {} element", ty.dtype));
        let data = match ty.dtype {
            DType::F32 => Data::F32(items.iter().map(|s| s.parse().map_err(|_| bad(s))).collect::<Result<_>>()?),
            DType::F64 => Data::F64(items.iter().map(|s| s.parse().map_err(|_| bad(s))).collect::<Result<_>>()?),
            DType::F16 | DType::BF16 => {
                let v: Vec<f32> = items.iter().map(|s| s.parse().map_err(|_| bad(s))).collect::<Result<_>>()?;
                if ty.dtype == DType::F16 {
                    Data::F16(v.into_iter().map(half::f16::from_f32).collect())
                } else {
                    Data::BF16(v.into_iter().map(half::bf16::from_f32).collect())
                }
            }
            DType::Bool => Data::Bool(
                items
                    .iter()
                    .map(|s| match s.as_str() {
                        "true" => Ok(true),
                        "false" => Ok(false),
                        _ => Err(bad(s)),
                    })
                    .collect::<Result<_>>()?,
            ),
            d => {
                let (lo, hi) = d.int_range().expect("integer type");
                let v: Vec<i64> = items
                    .iter()
                    .map(|s| {
                        s.parse::<i64>()
                            .ok()
                            .filter(|&x| (lo..=hi).contains(&x) || d == DType::U64)
                            .ok_or_else(|| bad(s))
                    })
                    .collect::<Result<_>>()?;
                if d == DType::U64 {
                    Data::U64(items.iter().map(|s| s.parse().map_err(|_| bad(s))).collect::<Result<_>>()?)
                } else {
                    Data::from_i64(d, v.into_iter())
                }
            }
        };
        Tensor::new(shape, data)
    }

    fn attr(&mut self) -> Result<Attr> {
        match self.peek() {
            Some(b'"') => Ok(Attr::Str(self.string()?)),
            Some(b'[') => {
                self.i += 1;
                let mut items = vec![];
                if !self.eat("]") {
                    loop {
                        items.push(self.number()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                if items.iter().all(|s| s.parse::<i64>().is_ok()) {
                    Ok(Attr::Ints(items.iter().map(|s| s.parse().expect("checked")).collect()))
                } else {
                    Ok(Attr::Floats(
                        items
                            .iter()
                            .map(|s| s.parse().map_err(|_| IrError::Invalid(format!("`{s}` is not a number"))))
                            .collect::<Result<_>>()?,
                    ))
                }
            }
            Some(c) if c.is_ascii_digit() || c == b'-' || c == b'+' => {
                let n = self.number()?;
                match n.parse::<i64>() {
                    Ok(v) => Ok(Attr::Int(v)),
                    Err(_) => {
                        Ok(Attr::Float(n.parse().map_err(|_| IrError::Invalid(format!("`{n}` is not a number")))?))
                    }
                }
            }
            _ => {
                let save = self.i;
                let w = self.word()?;
                match w.as_str() {
                    "inf" | "NaN" => return Ok(Attr::Float(w.parse().expect("float word"))),
                    _ => {}
                }
                let d: DType = w.parse().map_err(IrError::Invalid)?;
                if self.peek() == Some(b'[') {
                    self.i = save;
                    let ty = self.ty()?;
                    Ok(Attr::Tensor(self.tensor_body(ty)?))
                } else {
                    Ok(Attr::DType(d))
                }
            }
        }
    }

    fn graph(&mut self) -> Result<Graph> {
        self.expect("graph")?;
        let name = self.string()?;
        let mut g = Graph::new(name);
        let mut values: HashMap<String, ValueRef> = HashMap::new();
        self.expect("(")?;
        if !self.eat(")") {
            loop {
                let n = self.value_name()?;
                self.expect(":")?;
                let ty = self.ty()?;
                if values.contains_key(&n) {
                    return self.err(format!("value `{n}` defined twice"));
                }
                values.insert(n.clone(), g.add_input(n, ty));
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.expect("->")?;
        self.expect("(")?;
        let mut out_names = vec![];
        if !self.eat(")") {
            loop {
                out_names.push(self.value_name()?);
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.expect("{")?;
        while !self.eat("}") {
            let mut outs = vec![self.value_name()?];
            while self.eat(",") {
                outs.push(self.value_name()?);
            }
            self.expect("=")?;
            let op_name = self.word()?;
            let mut attrs = AttrMap::new();
            if self.eat("[") && !self.eat("]") {
                loop {
                    let k = self.word()?;
                    self.expect("=")?;
                    let v = self.attr()?;
                    if attrs.contains(&k) {
                        return self.err(format!("attribute `{k}` given twice"));
                    }
                    attrs.insert(k, v);
                    if self.eat("]") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
            let mut ins = vec![];
            if self.eat("(") && !self.eat(")") {
                loop {
                    if self.eat("_") {
                        ins.push(None);
                    } else {
                        let n = self.value_name()?;
                        ins.push(Some(
                            *values
                                .get(&n)
                                .ok_or_else(|| IrError::Invalid(format!("value `{n}` used before it is defined")))?,
                        ));
                    }
                    if self.eat(")") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
            let node_name = if self.eat("@") { self.string()? } else { String::new() };
            self.expect(":")?;
            let mut tys = vec![self.ty()?];
            while self.eat(",") {
                tys.push(self.ty()?);
            }
            if tys.len() != outs.len() {
                return self.err(format!("{} values but {} types", outs.len(), tys.len()));
            }
            let op = Op::from_attrs(&op_name, &attrs, outs.len())?;
            let known: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
            attrs.check_known(&op_name, &known)?;
            if matches!(op, Op::Input) {
                return self.err("Input nodes belong in the graph signature");
            }
            let outputs: Vec<Value> = outs.iter().cloned().zip(tys).map(|(name, ty)| Value { name, ty }).collect();
            let n = g.add_node(node_name, op, &ins, outputs);
            for (slot, name) in outs.into_iter().enumerate() {
                if values.insert(name.clone(), ValueRef { node: n, slot }).is_some() {
                    return self.err(format!("value `{name}` defined twice"));
                }
            }
        }
        for n in out_names {
            g.outputs
                .push(*values.get(&n).ok_or_else(|| IrError::Invalid(format!("graph output `{n}` is not defined")))?);
        }
        if self.peek().is_some() {
            return self.err("unexpected text after the graph");
        }
        Ok(g)
    }
}
