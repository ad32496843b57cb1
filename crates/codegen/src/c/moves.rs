//! Loop nests for the C back end: ops that only move values (Transpose, Split, Slice, Gather,
//! Expand, Concat) and operands broadcast to an element-wise op's output.
//!
//! What each output element of a movement op copies comes from probing the IR's own op
//! (`sqil_ir::ops::movement`): the index arithmetic of each op is written once, in the reference
//! op, and the generated code repeats whatever it does. Each (output, source) map is then
//! recognised as an affine box (nested loops with strides, `memcpy` for contiguous runs) or,
//! where it is not affine (a Gather with scattered indices), written as an index table.

use super::Emitter;
use sqil_ir::ops::movement::{copy_sources, CopySrc};
use sqil_ir::ops::Op;
use sqil_ir::{DType, IrError, Result, Tensor};
use std::fmt::Write;

/// Row-major strides of `shape`.
pub(super) fn strides(shape: &[usize]) -> Vec<isize> {
    let mut s = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1] as isize;
    }
    s
}

/// Strides that read a tensor of `shape` broadcast to `out` (numpy rules: 0 along broadcast axes).
pub(super) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<isize> {
    let own = strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len()).map(|d| if d < lead || shape[d - lead] == 1 { 0 } else { own[d - lead] }).collect()
}

/// A loop nest: extents, and per operand a base offset and a stride per loop.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Nest {
    pub extents: Vec<usize>,
    pub operands: Vec<(isize, Vec<isize>)>,
}

impl Nest {
    /// Over `shape`, each operand read with its `strides` from offset 0.
    pub fn over(shape: &[usize], strides: Vec<Vec<isize>>) -> Nest {
        Nest { extents: shape.to_vec(), operands: strides.into_iter().map(|s| (0, s)).collect() }.merged()
    }

    /// Unit loops dropped, and each loop folded into the one outside it where every operand
    /// steps through the two as through one.
    pub fn merged(self) -> Nest {
        let mut extents: Vec<usize> = vec![];
        let mut st: Vec<Vec<isize>> = vec![vec![]; self.operands.len()];
        for (d, &e) in self.extents.iter().enumerate() {
            if e == 1 {
                continue;
            }
            let inner = |o: usize| self.operands[o].1[d];
            let fold = !extents.is_empty()
                && (0..st.len()).all(|o| *st[o].last().expect("same length") == e as isize * inner(o));
            if fold {
                *extents.last_mut().expect("checked") *= e;
                for (o, s) in st.iter_mut().enumerate() {
                    *s.last_mut().expect("checked") = inner(o);
                }
            } else {
                extents.push(e);
                for (o, s) in st.iter_mut().enumerate() {
                    s.push(inner(o));
                }
            }
        }
        Nest { extents, operands: self.operands.iter().zip(st).map(|(o, s)| (o.0, s)).collect() }
    }

    /// Operand `o`'s index inside the first `loops` loops (`i0`, `i1`, ...).
    fn index(&self, o: usize, loops: usize) -> String {
        let (base, st) = &self.operands[o];
        let mut e = String::new();
        for (d, &s) in st.iter().enumerate().take(loops) {
            let term = match s.abs() {
                0 => continue,
                1 => format!("i{d}"),
                a => format!("i{d} * {a}"),
            };
            if e.is_empty() {
                e = if s < 0 { format!("-{term}") } else { term };
            } else {
                let _ = write!(e, " {} {term}", if s < 0 { '-' } else { '+' });
            }
        }
        match (*base, e.is_empty()) {
            (b, true) => b.to_string(),
            (0, false) => e,
            (b, false) => format!("{b} + {e}"),
        }
    }

    /// Writes the first `loops` loops around `stmt(index of each operand)`.
    fn emit_loops(&self, body: &mut String, loops: usize, stmt: &dyn Fn(&[String]) -> String) {
        let idx: Vec<String> = (0..self.operands.len()).map(|o| self.index(o, loops)).collect();
        body.push_str("    {\n");
        if loops > 0 {
            let vars: Vec<String> = (0..loops).map(|d| format!("i{d}")).collect();
            let _ = writeln!(body, "        int32_t {};", vars.join(", "));
        }
        let mut ind = "        ".to_string();
        for d in 0..loops {
            let _ = writeln!(body, "{ind}for (i{d} = 0; i{d} < {}; i{d}++) {{", self.extents[d]);
            ind.push_str("    ");
        }
        let _ = writeln!(body, "{ind}{}", stmt(&idx));
        for _ in 0..loops {
            ind.truncate(ind.len() - 4);
            let _ = writeln!(body, "{ind}}}");
        }
        body.push_str("    }\n");
    }

    /// Every loop around `stmt`.
    pub fn emit(&self, body: &mut String, stmt: &dyn Fn(&[String]) -> String) {
        self.emit_loops(body, self.extents.len(), stmt)
    }

    /// A copy from operand 1 to operand 0: the innermost loop as one `memcpy` where both step
    /// by one element through it.
    pub fn emit_copy(&self, body: &mut String, dst: &str, src: &str) {
        let loops = self.extents.len();
        let contiguous = loops > 0 && self.operands.iter().all(|(_, s)| s[loops - 1] == 1);
        if contiguous {
            let run = self.extents[loops - 1];
            self.emit_loops(body, loops - 1, &|i| {
                format!("memcpy({dst} + {}, {src} + {}, sizeof(float) * {run});", i[0], i[1])
            });
        } else {
            self.emit_loops(body, loops, &|i| format!("{dst}[{}] = {src}[{}];", i[0], i[1]));
        }
    }
}

/// The affine box a copy map (output element, source element), in output order, forms within
/// an output of `shape`: the nest [destination, source], or `None` when it is no box or not
/// affine.
fn affine(shape: &[usize], pairs: &[(usize, usize)]) -> Option<Nest> {
    let os = strides(shape);
    let coords =
        |flat: usize| -> Vec<usize> { shape.iter().zip(&os).map(|(&e, &s)| (flat / s as usize) % e).collect() };
    let (mut lo, mut hi) = (coords(pairs.first()?.0), coords(pairs[0].0));
    for &(d, _) in pairs {
        for (k, c) in coords(d).into_iter().enumerate() {
            lo[k] = lo[k].min(c);
            hi[k] = hi[k].max(c);
        }
    }
    let ext: Vec<usize> = lo.iter().zip(&hi).map(|(l, h)| h - l + 1).collect();
    if ext.iter().product::<usize>() != pairs.len() {
        return None;
    }
    let cs = strides(&ext);
    let dst0: isize = lo.iter().zip(&os).map(|(&l, &s)| l as isize * s).sum();
    let src0 = pairs[0].1 as isize;
    let st: Vec<isize> =
        (0..ext.len()).map(|d| if ext[d] > 1 { pairs[cs[d] as usize].1 as isize - src0 } else { 0 }).collect();
    for (i, &(dst, src)) in pairs.iter().enumerate() {
        let c: Vec<isize> = ext.iter().zip(&cs).map(|(&e, &s)| ((i / s as usize) % e) as isize).collect();
        let want_dst: isize = dst0 + c.iter().zip(&os).map(|(a, b)| a * b).sum::<isize>();
        let want_src: isize = src0 + c.iter().zip(&st).map(|(a, b)| a * b).sum::<isize>();
        if want_dst != dst as isize || want_src != src as isize {
            return None;
        }
    }
    Some(Nest { extents: ext, operands: vec![(dst0, os), (src0, st)] }.merged())
}

/// Emits a movement op: `args` its traced inputs, `exprs[j]` the C expression of computed input
/// j (`None` for constants), `outs` each output's expression and traced value.
pub(super) fn emit_movement(
    em: &mut Emitter,
    what: &str,
    op: &Op,
    args: &[Option<&Tensor>],
    exprs: &[Option<String>],
    outs: &[(String, &Tensor)],
) -> Result<()> {
    for (j, a) in args.iter().enumerate() {
        if exprs[j].is_some() && a.is_some_and(|t| t.dtype() != DType::F32) {
            return Err(IrError::Unsupported(format!("{what}: computed input {j} is not f32")));
        }
    }
    let computed: Vec<bool> = exprs.iter().map(Option::is_some).collect();
    let src = copy_sources(op, args, &computed, outs.len(), what)?;
    for (o, (ye, yt)) in outs.iter().enumerate() {
        let consts: Vec<f32> = yt.data.to_f32_vec();
        // Constant elements first (in output order, into one array), then each input's.
        let cpairs: Vec<usize> = (0..consts.len()).filter(|&i| src[o][i] == CopySrc::Const).collect();
        if !cpairs.is_empty() {
            let vals: Vec<f32> = cpairs.iter().map(|&i| consts[i]).collect();
            let name = em.const_array(&vals, what)?;
            let pairs: Vec<(usize, usize)> = cpairs.iter().enumerate().map(|(k, &i)| (i, k)).collect();
            copy(em, yt, &pairs, ye, &name);
        }
        for (j, e) in exprs.iter().enumerate() {
            let Some(e) = e else { continue };
            let pairs: Vec<(usize, usize)> = src[o]
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match *s {
                    CopySrc::Input(jj, k) if jj == j => Some((i, k)),
                    _ => None,
                })
                .collect();
            if !pairs.is_empty() {
                copy(em, yt, &pairs, ye, e);
            }
        }
    }
    Ok(())
}

/// One source's part of an output: loops where the map is affine, else an index table.
fn copy(em: &mut Emitter, yt: &Tensor, pairs: &[(usize, usize)], dst: &str, src: &str) {
    if let Some(nest) = affine(&yt.shape, pairs) {
        nest.emit_copy(&mut em.body, dst, src);
        return;
    }
    let items: Vec<String> = pairs.iter().flat_map(|&(d, s)| [d.to_string(), s.to_string()]).collect();
    let name = em.int_array(&items, 12);
    let _ = writeln!(
        em.body,
        "    {{\n        int32_t i;\n        for (i = 0; i < {}; i++) {{\n            {dst}[{name}[2 * i]] = {src}[{name}[2 * i + 1]];\n        }}\n    }}",
        pairs.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_become_strided_loops_and_rows_memcpy() {
        // [2, 3, 4] -> perm [1, 0, 2]: rows of 4 stay contiguous.
        let x = Tensor::from_f32(vec![2, 3, 4], vec![0.0; 24]).unwrap();
        let op = Op::Transpose { perm: Some(vec![1, 0, 2]) };
        let y = op.eval(&[Some(&x)], 1).unwrap().remove(0);
        let src = copy_sources(&op, &[Some(&x)], &[true], 1, "t").unwrap();
        let pairs: Vec<(usize, usize)> = src[0]
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                CopySrc::Input(0, k) => (i, *k),
                _ => panic!("{s:?}"),
            })
            .collect();
        let nest = affine(&y.shape, &pairs).unwrap();
        assert_eq!(nest.extents, vec![3, 2, 4]);
        assert_eq!(nest.operands[1].1, vec![4, 12, 1]);
        let mut body = String::new();
        nest.emit_copy(&mut body, "y", "x");
        assert!(body.contains("memcpy(y + i0 * 8 + i1 * 4, x + i0 * 4 + i1 * 12, sizeof(float) * 4);"), "{body}");
        // perm [2, 1, 0]: nothing contiguous, element loops.
        let op = Op::Transpose { perm: Some(vec![2, 1, 0]) };
        let y = op.eval(&[Some(&x)], 1).unwrap().remove(0);
        let src = copy_sources(&op, &[Some(&x)], &[true], 1, "t").unwrap();
        let pairs: Vec<(usize, usize)> = src[0]
            .iter()
            .enumerate()
            .map(|(i, s)| if let CopySrc::Input(_, k) = s { (i, *k) } else { panic!() })
            .collect();
        let nest = affine(&y.shape, &pairs).unwrap();
        assert_eq!(nest.operands[1].1, vec![1, 4, 12]);
    }

    #[test]
    fn scattered_maps_are_not_affine() {
        assert!(affine(&[4], &[(0, 3), (1, 0), (2, 2), (3, 1)]).is_none());
        assert!(affine(&[4], &[(0, 0), (1, 1), (3, 3)]).is_none(), "not a box");
    }

    #[test]
    fn broadcasting_merges_loops() {
        // [2, 3, 4] + [3, 1]: the second operand steps 1 per row of 4, 0 within it.
        let n = Nest::over(&[2, 3, 4], vec![strides(&[2, 3, 4]), broadcast_strides(&[3, 1], &[2, 3, 4])]);
        assert_eq!(n.extents, vec![2, 3, 4]);
        assert_eq!(n.operands[1].1, vec![0, 1, 0]);
        let n = Nest::over(&[2, 3, 4], vec![strides(&[2, 3, 4]), strides(&[2, 3, 4])]);
        assert_eq!(n.extents, vec![24]);
    }
}
