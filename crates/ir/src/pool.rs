//! Output buffers of f32 values reused from run to run on a thread: a plan's values have the same
//! sizes every time it runs, so the buffers of the values that died in one run serve the next
//! run's (and later steps') outputs of the same length, with no allocation, no zeroing and no
//! fresh pages. Taken by kernels that write every value of their output ([`f32_buffer`]); given
//! back by the executor when a value dies ([`recycle`]).

use crate::tensor::{Data, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

/// Buffers shorter than this are not kept (allocating them is cheap).
const MIN_LEN: usize = 64;
/// Buffers shorter than this are kept in a short list searched by length (no hashing: a small
/// policy's step takes microseconds); longer ones by length in a map.
const SHORT_LEN: usize = 1024;
/// At most this many short buffers are kept.
const SHORT_KEPT: usize = 32;
/// At most this many buffers of one length are kept.
const PER_LEN: usize = 8;
/// At most this many bytes are kept per thread.
const MAX_BYTES: usize = 256 << 20;

#[derive(Default)]
struct Pool {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
    short: Vec<Vec<f32>>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    static POISON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A buffer of `n` f32 values with unspecified contents (a dead value's, or zeros): the caller
/// writes every one of them before anything reads it. With [`poison`] on, every value is NaN
/// (so a kernel that leaves one unwritten shows in its output).
pub fn f32_buffer(n: usize) -> Vec<f32> {
    let poison = POISON.get();
    // Short buffers are never kept: no lookup (small policies' steps take microseconds).
    let kept = if n < MIN_LEN { None } else { POOL.with_borrow_mut(|p| p.take(n)) };
    match kept {
        Some(mut v) => {
            if poison {
                v.fill(f32::NAN);
            }
            v
        }
        None => vec![if poison { f32::NAN } else { 0.0 }; n],
    }
}

impl Pool {
    fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        if n < SHORT_LEN {
            let at = self.short.iter().rposition(|v| v.len() == n)?;
            return Some(self.short.swap_remove(at));
        }
        let v = self.by_len.get_mut(&n).and_then(Vec::pop)?;
        self.bytes -= n * 4;
        Some(v)
    }
}

/// Gives a dead value's buffer back for [`f32_buffer`] to hand out again (f32 values of at least
/// `MIN_LEN`: below `SHORT_LEN` while the thread keeps fewer than `SHORT_KEPT` short buffers,
/// above while it keeps fewer than `PER_LEN` of that length and `MAX_BYTES` in all; anything else
/// is dropped).
pub fn recycle(t: Tensor) {
    let Data::F32(v) = t.data else { return };
    let n = v.len();
    if n < MIN_LEN {
        return;
    }
    POOL.with_borrow_mut(|p| {
        if n < SHORT_LEN {
            if p.short.len() < SHORT_KEPT {
                p.short.push(v);
            }
            return;
        }
        if p.bytes + n * 4 > MAX_BYTES {
            return;
        }
        let kept = p.by_len.entry(n).or_default();
        if kept.len() < PER_LEN {
            kept.push(v);
            p.bytes += n * 4;
        }
    });
}

/// Fills every buffer [`f32_buffer`] hands out on this thread with NaN (tests: a kernel that
/// leaves an output value unwritten then gives a NaN, not an earlier run's value).
pub fn poison(on: bool) {
    POISON.set(on);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_of_a_length_are_reused_and_poisoned_on_request() {
        let t = Tensor::from_f32(vec![2048], vec![1.5; 2048]).unwrap();
        let ptr = match &t.data {
            Data::F32(v) => v.as_ptr(),
            _ => unreachable!(),
        };
        recycle(t);
        let v = f32_buffer(2048);
        assert_eq!(v.as_ptr(), ptr, "the dead value's buffer is handed out again");
        assert!(f32_buffer(2048).iter().all(|&x| x == 0.0), "a fresh buffer when none is kept");
        recycle(Tensor::from_f32(vec![2048], v).unwrap());
        poison(true);
        assert!(f32_buffer(2048).iter().all(|x| x.is_nan()));
        assert!(f32_buffer(3000).iter().all(|x| x.is_nan()));
        poison(false);
        // Short buffers are kept in the short list; the shortest are not kept.
        let t = Tensor::from_f32(vec![100], vec![2.0; 100]).unwrap();
        let ptr = match &t.data {
            Data::F32(v) => v.as_ptr(),
            _ => unreachable!(),
        };
        recycle(t);
        assert!(f32_buffer(99).iter().all(|&x| x == 0.0), "another length: a fresh buffer");
        let again = f32_buffer(100);
        assert_eq!(again.as_ptr(), ptr, "a short buffer is handed out again");
        recycle(Tensor::from_f32(vec![8], vec![2.0; 8]).unwrap());
        assert_eq!(f32_buffer(8), vec![0.0; 8]);
    }
}
