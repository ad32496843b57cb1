//! Numpy-style broadcasting of concrete shapes, as flat index maps.

use crate::error::{IrError, Result};
use crate::shape::broadcast_shapes;
use crate::tensor::strides_of;

/// The broadcast of several input shapes, able to list for each output element the flat index
/// of the corresponding element in each input.
pub struct Broadcast {
    pub out_shape: Vec<usize>,
    shapes: Vec<Vec<usize>>,
}

impl Broadcast {
    pub fn new(shapes: &[&[usize]]) -> Result<Broadcast> {
        let out_shape =
            broadcast_shapes(shapes).ok_or_else(|| IrError::Invalid(format!("shapes {shapes:?} do not broadcast")))?;
        Ok(Broadcast { out_shape, shapes: shapes.iter().map(|s| s.to_vec()).collect() })
    }

    pub fn out_len(&self) -> usize {
        self.out_shape.iter().product()
    }

    /// True if input `k` already has the output's shape (its index map is the identity).
    pub fn is_identity(&self, k: usize) -> bool {
        self.shapes[k].iter().product::<usize>() == self.out_len()
            && self.shapes[k].len() <= self.out_shape.len()
            && self.shapes[k].iter().rev().zip(self.out_shape.iter().rev()).all(|(a, b)| a == b)
    }

    /// True if input `k`, leading 1s dropped, equals the output's trailing dimensions: its
    /// elements repeat as whole rows (a bias against a batch).
    pub fn is_tiled(&self, k: usize) -> bool {
        tiled(&self.out_shape, &self.shapes[k])
    }

    /// For each output element (row-major), the flat index into input `k`.
    pub fn indices(&self, k: usize) -> Vec<usize> {
        broadcast_indices(&self.shapes[k], &self.out_shape)
    }
}

/// Flat indices into a tensor of `shape` for every element of its broadcast to `out`.
/// `shape` must broadcast unidirectionally to `out`.
pub fn broadcast_indices(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let rank = out.len();
    let off = rank - shape.len();
    let st = strides_of(shape);
    // Stride of each output axis in the input; 0 where the input is broadcast.
    let s: Vec<usize> = (0..rank).map(|d| if d < off || shape[d - off] == 1 { 0 } else { st[d - off] }).collect();
    let mut idx = Vec::with_capacity(n);
    if n == 0 {
        return idx;
    }
    if rank == 0 {
        idx.push(0);
        return idx;
    }
    let inner = out[rank - 1];
    let si = s[rank - 1];
    let mut pos = vec![0usize; rank];
    let mut base = 0usize;
    loop {
        for j in 0..inner {
            idx.push(base + j * si);
        }
        // advance the outer axes
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return idx;
            }
            d -= 1;
            pos[d] += 1;
            base += s[d];
            if pos[d] < out[d] {
                break;
            }
            base -= s[d] * pos[d];
            pos[d] = 0;
        }
    }
}

/// Applies `f` elementwise over two broadcast slices.
pub fn zip2<A: Copy, B: Copy, R>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    f: impl Fn(A, B) -> R,
) -> Result<(Vec<usize>, Vec<R>)> {
    let bc = Broadcast::new(&[ash, bsh])?;
    let out = if ash == bsh {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    } else if b.len() == 1 && bc.is_identity(0) {
        let y = b[0];
        a.iter().map(|&x| f(x, y)).collect()
    } else if a.len() == 1 && bc.is_identity(1) {
        let x = a[0];
        b.iter().map(|&y| f(x, y)).collect()
    } else if bc.is_identity(0) && bc.is_tiled(1) && !b.is_empty() {
        a.chunks(b.len()).flat_map(|r| r.iter().zip(b).map(|(&x, &y)| f(x, y))).collect()
    } else if bc.is_identity(1) && bc.is_tiled(0) && !a.is_empty() {
        b.chunks(a.len()).flat_map(|r| a.iter().zip(r).map(|(&x, &y)| f(x, y))).collect()
    } else if let Some(inner) = bc.is_identity(0).then(|| block_len(&bc.out_shape, bsh, b.len())).flatten() {
        // One b value per contiguous block of a (a squeeze-and-excitation gate [N, C, 1, 1]
        // over [N, C, H, W]).
        let mut out = Vec::with_capacity(a.len());
        for (blk, &y) in a.chunks(inner).zip(b) {
            out.extend(blk.iter().map(|&x| f(x, y)));
        }
        out
    } else if let Some(inner) = bc.is_identity(1).then(|| block_len(&bc.out_shape, ash, a.len())).flatten() {
        let mut out = Vec::with_capacity(b.len());
        for (blk, &x) in b.chunks(inner).zip(a) {
            out.extend(blk.iter().map(|&y| f(x, y)));
        }
        out
    } else if let Some((run, ia, ib)) = common_runs(&bc.out_shape, ash, bsh) {
        // Both broadcast over leading axes and agree on a run of trailing ones (ACT's learned
        // queries [1, 50, 256] added to [N, 1, 256]): run by run, one index per run.
        let mut out = Vec::with_capacity(ia.len() * run);
        for (&i, &j) in ia.iter().zip(&ib) {
            out.extend(a[i * run..(i + 1) * run].iter().zip(&b[j * run..(j + 1) * run]).map(|(&x, &y)| f(x, y)));
        }
        out
    } else {
        let (ia, ib) = (bc.indices(0), bc.indices(1));
        ia.iter().zip(&ib).map(|(&i, &j)| f(a[i], b[j])).collect()
    };
    Ok((bc.out_shape, out))
}

/// Where two operands broadcast to `out` both span its last axes in full, `run` values (at least
/// [`RUN_MIN`]): `run` and, per run of the output in order, the index of each operand's run (the
/// leading axes' [`broadcast_indices`], in units of `run`).
fn common_runs(out: &[usize], ash: &[usize], bsh: &[usize]) -> Option<(usize, Vec<usize>, Vec<usize>)> {
    let r = out.len();
    if ash.len() > r || bsh.len() > r {
        return None;
    }
    let pad = |sh: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, r - sh.len()).chain(sh.iter().copied()).collect() };
    let (pa, pb) = (pad(ash), pad(bsh));
    let full = (0..r).rev().take_while(|&d| pa[d] == out[d] && pb[d] == out[d]).count();
    let run: usize = out[r - full..].iter().product();
    if full == 0 || run < RUN_MIN {
        return None;
    }
    let lead = &out[..r - full];
    Some((run, broadcast_indices(&pa[..r - full], lead), broadcast_indices(&pb[..r - full], lead)))
}

/// Runs shorter than this go through the element-wise index gather.
const RUN_MIN: usize = 8;

/// How an operand `b` (shape `bsh`) broadcasts over `a` (shape `ash`) when the result has `a`'s
/// shape, in the forms with a contiguous inner loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// The same elements in the same order.
    Same,
    /// One value for every element.
    Scalar,
    /// Whole rows: `b` repeats every `b.len()` elements (a bias against a batch).
    Tiled,
    /// One `b` value per contiguous block of this many elements of `a` (a gate `[N, C, 1, 1]`).
    Block(usize),
}

impl Over {
    /// `b` over `a` in one of the forms, where the broadcast's result has `a`'s shape (else
    /// `None`: the general gather). From the shapes alone, no allocation (small policies check
    /// this on every element-wise step).
    pub fn of(ash: &[usize], bsh: &[usize]) -> Option<Over> {
        let blen: usize = bsh.iter().product();
        if blen == 0 || bsh.len() > ash.len() {
            return None;
        }
        let off = ash.len() - bsh.len();
        // The result has a's shape: each of b's dimensions is 1 or a's.
        if bsh.iter().zip(&ash[off..]).any(|(&d, &a)| d != 1 && d != a) {
            return None;
        }
        let alen: usize = ash.iter().product();
        if blen == alen {
            return Some(Over::Same);
        }
        if blen == 1 {
            return Some(Over::Scalar);
        }
        if tiled(ash, bsh) {
            return Some(Over::Tiled);
        }
        // a's leading dimensions then ones: one value per block of the rest.
        block_len(ash, bsh, blen).map(Over::Block)
    }
}

/// Whether an operand of shape `sh`, leading 1s dropped, is `out`'s trailing dimensions: its
/// elements repeat as whole rows of the output.
fn tiled(out: &[usize], sh: &[usize]) -> bool {
    out.ends_with(&sh[sh.iter().take_while(|&&d| d == 1).count()..])
}

/// If an operand of shape `sh` (`len` elements) broadcast to `out` holds one value per
/// contiguous block of the output (its shape is the output's leading dimensions, then ones), the
/// block's length.
fn block_len(out: &[usize], sh: &[usize], len: usize) -> Option<usize> {
    if sh.len() > out.len() || len == 0 {
        return None;
    }
    // `sh` aligned to `out`'s trailing dimensions (ones before it), read in place.
    let off = out.len() - sh.len();
    let aligned = |i: usize| if i < off { 1 } else { sh[i - off] };
    let lead = off + sh.iter().rposition(|&d| d != 1)? + 1;
    let inner: usize = out[lead..].iter().product();
    ((0..lead).all(|i| aligned(i) == out[i]) && inner > 1 && len * inner == out.iter().product::<usize>())
        .then_some(inner)
}

/// Flat indices of a strided view: for each element of `out_shape` (row-major), the offset
/// `base + sum(pos[d] * strides[d])`. Strides may be negative (reversed slices) or zero
/// (broadcast); every produced offset must be non-negative.
pub fn strided_indices(out_shape: &[usize], strides: &[isize], base: isize) -> Vec<usize> {
    let n: usize = out_shape.iter().product();
    let mut idx = Vec::with_capacity(n);
    if n == 0 {
        return idx;
    }
    let rank = out_shape.len();
    if rank == 0 {
        idx.push(base as usize);
        return idx;
    }
    let mut pos = vec![0usize; rank];
    let mut off = base;
    let (inner, si) = (out_shape[rank - 1], strides[rank - 1]);
    loop {
        for j in 0..inner as isize {
            idx.push((off + j * si) as usize);
        }
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return idx;
            }
            d -= 1;
            pos[d] += 1;
            off += strides[d];
            if pos[d] < out_shape[d] {
                break;
            }
            off -= strides[d] * pos[d] as isize;
            pos[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_broadcast_rows_and_columns() {
        assert_eq!(broadcast_indices(&[3], &[2, 3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_indices(&[2, 1], &[2, 3]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast_indices(&[], &[2, 2]), vec![0, 0, 0, 0]);
        assert_eq!(broadcast_indices(&[2, 1, 2], &[2, 2, 2]), vec![0, 1, 0, 1, 2, 3, 2, 3]);
    }

    /// The fast paths of `zip2` (one value per contiguous block among them) against the general
    /// gather by broadcast indices, both operand orders, a non-commutative op.
    #[test]
    fn zip2_fast_paths_equal_the_index_gather() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3, 4, 5], &[2, 3, 1, 1]),
            (&[2, 3, 4, 5], &[3, 1, 1]),
            (&[2, 3, 4, 5], &[2, 1, 1, 1]),
            (&[1, 6, 2, 2], &[1, 6, 1, 1]),
            (&[4, 5], &[4, 1]),
            (&[2, 3, 4], &[3, 4]),
            (&[2, 3, 4], &[1, 3, 1]),
            (&[2, 3, 4], &[1]),
            // Both broadcast, agreeing on their last axes (run by run).
            (&[3, 1, 16], &[1, 5, 16]),
            (&[2, 1, 3, 8], &[4, 1, 8]),
            (&[2, 3, 1, 4, 4], &[3, 5, 4, 4]),
        ];
        for &(big, small) in cases {
            let a: Vec<f32> = (0..big.iter().product::<usize>()).map(|i| i as f32 * 0.5 + 1.0).collect();
            let b: Vec<f32> = (0..small.iter().product::<usize>()).map(|i| i as f32 * 3.0 - 2.0).collect();
            let f = |x: f32, y: f32| x - 2.0 * y;
            for swap in [false, true] {
                let ((x, xs), (y, ys)) = if swap { ((&b, small), (&a, big)) } else { ((&a, big), (&b, small)) };
                let (shape, got) = zip2(x, xs, y, ys, f).unwrap();
                let bc = Broadcast::new(&[xs, ys]).unwrap();
                let want: Vec<f32> = bc.indices(0).iter().zip(bc.indices(1)).map(|(&i, j)| f(x[i], y[j])).collect();
                assert_eq!(shape, bc.out_shape, "{big:?} {small:?}");
                assert_eq!(got, want, "{big:?} {small:?} swapped {swap}");
            }
        }
    }
}
