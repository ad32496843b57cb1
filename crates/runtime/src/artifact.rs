//! The compiled CPU artifact (`policy.bin` from `sqil compile`, `sqil build --target cpu`): one
//! file holding the policy's simulation graph (IR text, which the plan is built from and which
//! keeps the float constants of the steps that are not int4 kernels) and the pre-packed int4
//! weights of every Q4 layer, behind a versioned header and a checksum.
//!
//! Since version 3 the graph is the fused simulation graph `sqil_lower::lower` planned (its
//! `Fused` nodes are the plan's fused kernels; loading plans it as stored, without fusing again)
//! and a layer's packed weights are named by its weight value (the FakeQuant of the float
//! weight, `sqil_lower::layer_key`); versions 1 and 2 stored the unfused graph and named a layer
//! by its output value, and load as before (every node its own step).
//!
//! Since version 4 the other float constants (the layers that stay in float, biases, norms) are
//! stored as raw f32 in a section of their own rather than as decimal text: the IR holds a zero
//! placeholder and loading puts the stored values back (a float layer's bytes were about 2.5x its
//! size as text; the artifact of an MLP with a float first layer was larger than its ONNX).
//!
//! Since version 2 the float weights of the int4 layers are not stored twice: in the IR text
//! they are zero placeholders (`{splat 0.0}`), and loading puts back their dequantized values
//! `q * scale` from the packed weights, which the graph's FakeQuant maps to the same values as
//! the original weights, so the loaded graph is still the exact simulation. (A weight constant
//! that anything else also reads is kept in full.) Version 1 files, with full weights, load too.
//!
//! Layout, little-endian:
//! ```text
//! magic  "SQILCPU\0"          8 bytes
//! version u32 (= VERSION)     flags u32 (0)
//! payload_len u64             checksum u64 (FNV-1a 64 of the 24 header bytes before it and the
//!                             payload; versions 1 and 2: of the payload only)
//! payload:
//!   ir_len u64, IR text (UTF-8)
//!   layers u32, then per layer:
//!     name_len u32, name, n u64, k u64, k_pad u64, group u64,
//!     blocks (n * k_pad / 2 bytes, the BlockQ4 layout), scales f32[n * groups], sums i32[n * groups]
//!   (version 4) constants u32, then per constant:
//!     name_len u32, value name, count u64, f32[count]
//! ```

use sqil_ir::{Graph, IrError, Op, Result, Tensor};
use sqil_kernels_cpu::{BlockQ4, PackedQ4};
use sqil_lower::{dequantized_weight, layer_weight, Plan, Step};
use std::collections::HashMap;
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"SQILCPU\0";
pub const VERSION: u32 = 4;

/// Float constants of at least this many elements (and not all equal, which the IR prints as a
/// splat) go to the binary section.
const BINARY_CONST_MIN: usize = 8;

/// FNV-1a, 64 bit.
pub fn checksum(bytes: &[u8]) -> u64 {
    sqil_ir::fnv1a(sqil_ir::FNV1A_START, bytes)
}

/// Since version 3 the checksum covers the header before it (magic, version, flags, length) and
/// the payload: a changed version or flag is caught too.
fn whole_checksum(header: &[u8], payload: &[u8]) -> u64 {
    sqil_ir::fnv1a(sqil_ir::fnv1a(sqil_ir::FNV1A_START, header), payload)
}

/// Lowers a simulation graph (`sqil_lower::lower`: fusion, then the plan) and encodes the
/// artifact: the fused graph and the plan's packed weights. Returns the plan and the bytes.
pub fn encode(sim: &Graph) -> Result<(Plan, Vec<u8>)> {
    let l = sqil_lower::lower(sim)?;
    let bytes = encode_lowered(&l.graph, &l.plan)?;
    Ok((l.plan, bytes))
}

/// The artifact bytes of a graph and the plan made from it (`Plan::with_packed` of that graph,
/// or `sqil_lower::lower`'s graph and plan).
pub fn encode_lowered(g: &Graph, plan: &Plan) -> Result<Vec<u8>> {
    let mut g = g.clone();
    for s in &plan.steps {
        if let Step::Q4Linear { layer, .. } = s {
            if let Some((c, _)) = layer_weight(&g, layer) {
                if let Op::Const(t) = &mut g.node_mut(c).op {
                    *t = Tensor::zeros(t.dtype(), t.shape.clone());
                }
            }
        }
    }
    // The remaining float constants as raw f32, zero placeholders in the text.
    let mut consts: Vec<(String, Vec<f32>)> = vec![];
    for c in g.topo_order()? {
        let name = g.node(c).outputs.first().map(|v| v.name.clone()).unwrap_or_default();
        if let Op::Const(t) = &mut g.node_mut(c).op {
            if t.dtype() == sqil_ir::DType::F32 && t.len() >= BINARY_CONST_MIN {
                let v = t.data.to_f32_vec();
                if v.iter().any(|x| x.to_bits() != v[0].to_bits()) {
                    *t = Tensor::zeros(t.dtype(), t.shape.clone());
                    consts.push((name, v));
                }
            }
        }
    }
    let ir_text = sqil_ir::print_graph(&g, &sqil_ir::PrintOptions { elide_over: None, splat: true })?;
    let mut p = vec![];
    p.extend((ir_text.len() as u64).to_le_bytes());
    p.extend(ir_text.as_bytes());
    let layers: Vec<(&String, &PackedQ4)> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Q4Linear { layer, w, .. } => Some((layer, &**w)),
            _ => None,
        })
        .collect();
    p.extend((layers.len() as u32).to_le_bytes());
    for (name, w) in layers {
        p.extend((name.len() as u32).to_le_bytes());
        p.extend(name.as_bytes());
        for v in [w.n, w.k, w.k_pad, w.group] {
            p.extend((v as u64).to_le_bytes());
        }
        for b in &w.blocks {
            p.extend(b.qs);
        }
        for s in &w.scales {
            p.extend(s.to_le_bytes());
        }
        for s in &w.sums {
            p.extend(s.to_le_bytes());
        }
    }
    p.extend((consts.len() as u32).to_le_bytes());
    for (name, v) in &consts {
        p.extend((name.len() as u32).to_le_bytes());
        p.extend(name.as_bytes());
        p.extend((v.len() as u64).to_le_bytes());
        for x in v {
            p.extend(x.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(p.len() + 32);
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend((p.len() as u64).to_le_bytes());
    let sum = whole_checksum(&out, &p);
    out.extend(sum.to_le_bytes());
    out.extend(p);
    Ok(out)
}

/// Puts the stored float constants (version 4) back into their placeholders: each name must be a
/// constant of the graph, an all-zero f32 placeholder of the same size.
pub fn restore_consts(g: &mut Graph, consts: &HashMap<String, Vec<f32>>, what: &str) -> Result<()> {
    let mut left: std::collections::HashSet<&String> = consts.keys().collect();
    for c in g.topo_order()? {
        let name = g.node(c).outputs.first().map(|v| v.name.clone()).unwrap_or_default();
        let Some(v) = consts.get(&name) else { continue };
        left.remove(&name);
        if let Op::Const(t) = &mut g.node_mut(c).op {
            if t.dtype() != sqil_ir::DType::F32 || t.len() != v.len() || t.data.to_f32_vec().iter().any(|&x| x != 0.0) {
                return Err(IrError::Invalid(format!(
                    "{what}: stored constant `{name}` ({} values) does not fit its placeholder ({} {:?} values)",
                    v.len(),
                    t.len(),
                    t.dtype()
                )));
            }
            *t = Tensor::from_f32(t.shape.clone(), v.clone())?;
        } else {
            return Err(IrError::Invalid(format!(
                "{what}: stored constant `{name}` names a value that is not a constant"
            )));
        }
    }
    if let Some(n) = left.into_iter().min() {
        return Err(IrError::Invalid(format!("{what}: stored constant `{n}` is not in the graph")));
    }
    Ok(())
}

/// Puts the dequantized int4 weights back into the placeholders `encode` left (see the module
/// docs); constants that are not all-zero placeholders are left alone.
pub fn restore_weights(g: &mut Graph, packed: &HashMap<String, PackedQ4>) -> Result<()> {
    for (layer, w) in packed {
        let Some((c, layout)) = layer_weight(g, layer) else { continue };
        if let Op::Const(t) = &mut g.node_mut(c).op {
            if t.data.to_f32_vec().iter().all(|&v| v == 0.0) {
                let v = dequantized_weight(w, layout);
                if v.len() == t.len() {
                    *t = Tensor::from_f32(t.shape.clone(), v)?;
                }
            }
        }
    }
    Ok(())
}

/// Checks that an artifact's plan and its packed layers fit together: every stored layer is an
/// int4 step of the plan (none renamed or left over), and every int4 step whose float weights are
/// an all-zero placeholder runs on stored weights (a removed layer would otherwise run on zeros).
pub fn check_layers(g: &Graph, plan: &Plan, packed: &HashMap<String, PackedQ4>, what: &str) -> Result<()> {
    let steps: Vec<&String> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Q4Linear { layer, .. } => Some(layer),
            _ => None,
        })
        .collect();
    for key in packed.keys() {
        // Version 1 and 2 artifacts name a layer by its output value: the step's weight's reader.
        let by_output = |l: &&String| {
            g.find_value(l).and_then(|w| g.uses_of(w).first().map(|u| &g.node(u.0).outputs[0].name)) == Some(key)
        };
        if !steps.iter().any(|l| *l == key || by_output(l)) {
            return Err(IrError::Invalid(format!("{what}: stored layer `{key}` is not an int4 layer of the graph")));
        }
    }
    for l in steps {
        let Some((c, _)) = layer_weight(g, l) else { continue };
        let stored = packed.contains_key(l)
            || g.find_value(l)
                .and_then(|w| g.uses_of(w).first().map(|u| g.node(u.0).outputs[0].name.clone()))
                .is_some_and(|o| packed.contains_key(&o));
        if let Op::Const(t) = &g.node(c).op {
            if !stored && t.data.to_f32_vec().iter().all(|&v| v == 0.0) {
                return Err(IrError::Invalid(format!(
                    "{what}: int4 layer `{l}` has no stored weights (its float weights are a placeholder)"
                )));
            }
        }
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| IrError::Invalid(format!("{}: truncated at byte {}", self.what, self.at)))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn len(&mut self, limit: usize) -> Result<usize> {
        let v = self.u64()?;
        if v as usize > limit {
            return Err(IrError::Invalid(format!(
                "{}: size field {v} at byte {} is out of range",
                self.what,
                self.at - 8
            )));
        }
        Ok(v as usize)
    }
}

/// A decoded artifact: the IR text, the packed weights by layer name, and (version 4) the float
/// constants by value name.
#[derive(Debug)]
pub struct Decoded {
    pub ir: String,
    pub packed: HashMap<String, PackedQ4>,
    pub consts: HashMap<String, Vec<f32>>,
}

/// Decodes an artifact. `what` names the source in errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<Decoded> {
    let mut r = Reader { b: bytes, at: 0, what };
    if r.take(8)? != MAGIC {
        return Err(IrError::Invalid(format!("{what}: not a sqil artifact (no SQILCPU magic)")));
    }
    let version = r.u32()?;
    if !(1..=VERSION).contains(&version) {
        return Err(IrError::Unsupported(format!(
            "{what}: artifact version {version}, this runtime reads versions 1 to {VERSION}"
        )));
    }
    let flags = r.u32()?;
    let len = r.u64()?;
    if len > (bytes.len() as u64).saturating_sub(32) {
        return Err(IrError::Invalid(format!(
            "{what}: truncated: the header promises {len} bytes of payload, the file holds {}",
            bytes.len().saturating_sub(32)
        )));
    }
    let len = len as usize;
    let sum = r.u64()?;
    let payload = r.take(len)?;
    let expect = if version >= 3 { whole_checksum(&bytes[..24], payload) } else { checksum(payload) };
    if expect != sum {
        return Err(IrError::Invalid(format!("{what}: checksum mismatch (the file is corrupt)")));
    }
    if flags != 0 {
        return Err(IrError::Unsupported(format!("{what}: artifact flags {flags:#x}, this runtime knows none")));
    }
    if r.at != bytes.len() {
        return Err(IrError::Invalid(format!("{what}: {} bytes after the payload", bytes.len() - r.at)));
    }
    let mut r = Reader { b: payload, at: 0, what };
    let ir_len = r.len(payload.len())?;
    let ir =
        std::str::from_utf8(r.take(ir_len)?).map_err(|_| IrError::Invalid(format!("{what}: IR text is not UTF-8")))?;
    let mut packed = HashMap::new();
    for _ in 0..r.u32()? {
        let nl = r.u32()? as usize;
        let name =
            String::from_utf8(r.take(nl)?.to_vec()).map_err(|_| IrError::Invalid(format!("{what}: bad layer name")))?;
        let cap = payload.len();
        let (n, k, k_pad, group) = (r.len(cap)?, r.len(cap)?, r.len(cap)?, r.len(cap)?);
        if k_pad % 32 != 0 || k_pad < k || group == 0 || k_pad % group != 0 {
            return Err(IrError::Invalid(format!("{what}: layer `{name}` has an invalid layout")));
        }
        let groups = k_pad / group;
        let size = |a: usize, b: usize, c: usize| {
            a.checked_mul(b).and_then(|x| x.checked_mul(c)).filter(|&x| x <= cap).ok_or_else(|| {
                IrError::Invalid(format!("{what}: layer `{name}`: [{n} x {k}] does not fit the file ({cap} bytes)"))
            })
        };
        let (nb, ns) = (size(n, k_pad / 32, 16)?, size(n, groups, 4)?);
        let blocks = r.take(nb)?.chunks_exact(16).map(|c| BlockQ4 { qs: c.try_into().expect("16") }).collect();
        let scales = r.take(ns)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
        let sums = r.take(ns)?.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4"))).collect();
        if packed.insert(name.clone(), PackedQ4::from_parts(n, k, k_pad, group, blocks, scales, sums)).is_some() {
            return Err(IrError::Invalid(format!("{what}: layer `{name}` is stored twice")));
        }
    }
    let mut consts = HashMap::new();
    if version >= 4 {
        for _ in 0..r.u32()? {
            let nl = r.u32()? as usize;
            let name = String::from_utf8(r.take(nl)?.to_vec())
                .map_err(|_| IrError::Invalid(format!("{what}: bad constant name")))?;
            let n = r.len(payload.len() / 4)?;
            let v: Vec<f32> =
                r.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
            if consts.insert(name.clone(), v).is_some() {
                return Err(IrError::Invalid(format!("{what}: constant `{name}` is stored twice")));
            }
        }
    }
    if r.at != payload.len() {
        return Err(IrError::Invalid(format!("{what}: {} trailing bytes", payload.len() - r.at)));
    }
    Ok(Decoded { ir: ir.to_string(), packed, consts })
}

/// Writes an artifact atomically (temporary file, then rename).
pub fn save(path: &Path, bytes: &[u8]) -> Result<()> {
    sqil_ir::write_atomic(path, bytes)
}

/// True if `path` starts with the artifact magic (a compiled policy, not a model).
pub fn is_artifact(path: &Path) -> bool {
    std::fs::File::open(path)
        .and_then(|mut f| {
            let mut m = [0u8; 8];
            std::io::Read::read_exact(&mut f, &mut m).map(|_| &m == MAGIC)
        })
        .unwrap_or(false)
}
