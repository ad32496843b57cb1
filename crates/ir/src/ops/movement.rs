//! What a data-movement op (Transpose, Split, Slice, Gather, Expand, Concat) copies, found by
//! running the op itself on probe inputs: every computed input filled with NaN shows which output
//! elements come from constants, then each computed input in turn filled with its element indices
//! (exact in f32 below 2^24) shows which of its elements every other output element copies. Code
//! generators (C loops, GPU copy tables) take the map from here, so the index arithmetic of each
//! op exists once, in the reference op.

use super::Op;
use crate::error::{IrError, Result};
use crate::tensor::Tensor;

/// Where an output element of a movement op comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CopySrc {
    /// A constant input's element (the traced output's value).
    Const,
    /// (input position, element of that input)
    Input(usize, usize),
}

/// The ops whose outputs only copy input elements.
pub fn is_movement(op: &Op) -> bool {
    matches!(
        op,
        Op::Concat { .. } | Op::Transpose { .. } | Op::Split { .. } | Op::Slice | Op::Gather { .. } | Op::Expand
    )
}

/// Per output, per element, what it copies. `args`: the traced inputs; `computed[j]`: whether
/// input j is computed at run time (probed) or a constant (kept as it is). An error names `what`
/// when an element is not a copy of exactly one input element or constant.
pub fn copy_sources(
    op: &Op,
    args: &[Option<&Tensor>],
    computed: &[bool],
    outputs: usize,
    what: &str,
) -> Result<Vec<Vec<CopySrc>>> {
    let fill = |only: Option<usize>| -> Result<Vec<Option<Tensor>>> {
        args.iter()
            .enumerate()
            .map(|(j, a)| match a {
                Some(t) if computed[j] => {
                    let v = (0..t.len()).map(|i| if only == Some(j) { i as f32 } else { f32::NAN }).collect();
                    Tensor::from_f32(t.shape.clone(), v).map(Some)
                }
                Some(t) => Ok(Some((*t).clone())),
                None => Ok(None),
            })
            .collect()
    };
    let run = |probe: &[Option<Tensor>]| -> Result<Vec<Vec<f32>>> {
        let refs: Vec<Option<&Tensor>> = probe.iter().map(|t| t.as_ref()).collect();
        Ok(op.eval(&refs, outputs)?.iter().map(|t| t.data.to_f32_vec()).collect())
    };
    let mut src: Vec<Vec<Option<CopySrc>>> = run(&fill(None)?)?
        .into_iter()
        .map(|o| o.into_iter().map(|v| (!v.is_nan()).then_some(CopySrc::Const)).collect())
        .collect();
    for (j, a) in args.iter().enumerate() {
        let Some(t) = a.filter(|_| computed[j]) else { continue };
        if t.len() >= 1 << 24 {
            return Err(IrError::Unsupported(format!(
                "{what}: input {j} has {} elements (probes stop at 2^24)",
                t.len()
            )));
        }
        for (o, vals) in run(&fill(Some(j))?)?.into_iter().enumerate() {
            for (i, v) in vals.into_iter().enumerate() {
                if v.is_nan() || src[o][i] == Some(CopySrc::Const) {
                    continue;
                }
                if src[o][i].is_some() || v.fract() != 0.0 || v < 0.0 || v as usize >= t.len() {
                    return Err(IrError::Unsupported(format!(
                        "{what}: output {o} element {i} is not a copy of one input element"
                    )));
                }
                src[o][i] = Some(CopySrc::Input(j, v as usize));
            }
        }
    }
    src.into_iter()
        .enumerate()
        .map(|(o, s)| {
            s.into_iter()
                .enumerate()
                .map(|(i, x)| {
                    x.ok_or_else(|| {
                        IrError::Unsupported(format!("{what}: output {o} element {i} is computed, not copied"))
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_with_a_constant_and_transposes_map_every_element() {
        let x = Tensor::from_f32(vec![1, 2], vec![0.0; 2]).unwrap();
        let c = Tensor::from_f32(vec![1, 1], vec![5.0]).unwrap();
        let src = copy_sources(&Op::Concat { axis: 1 }, &[Some(&c), Some(&x)], &[false, true], 1, "cat").unwrap();
        assert_eq!(src[0], vec![CopySrc::Const, CopySrc::Input(1, 0), CopySrc::Input(1, 1)]);
        let x = Tensor::from_f32(vec![2, 3], vec![0.0; 6]).unwrap();
        let src = copy_sources(&Op::Transpose { perm: None }, &[Some(&x)], &[true], 1, "t").unwrap();
        let from: Vec<usize> =
            src[0].iter().map(|s| if let CopySrc::Input(0, k) = s { *k } else { panic!() }).collect();
        assert_eq!(from, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn ops_that_compute_are_refused() {
        let x = Tensor::from_f32(vec![4], vec![0.0; 4]).unwrap();
        let err = copy_sources(&Op::Unary(super::super::UnaryOp::Neg), &[Some(&x)], &[true], 1, "neg").unwrap_err();
        assert!(err.to_string().contains("neg: output 0 element 1 is not a copy"), "{err}");
        let err = copy_sources(&Op::Unary(super::super::UnaryOp::Exp), &[Some(&x)], &[true], 1, "exp").unwrap_err();
        assert!(err.to_string().contains("exp"), "{err}");
    }
}
