//! Gradients summed over the GPUs of one host with NCCL, for data-parallel fine-tuning: one
//! communicator per GPU of this process (`ncclCommInitAll`), each on a stream of its own. A sum
//! is ordered after the work that wrote the buffers (each rank's collective stream waits for the
//! rank's compute stream) and before the work that reads them (the compute stream waits for the
//! collective stream); the ranks' calls go out in one NCCL group, as one thread driving several
//! devices must issue them. NCCL is loaded at run time: without it, [`Collective::new`] says so.
//!
//! Where NVLink multicast is not available (the lent multi-GPU machines among them), set
//! `NCCL_NVLS_ENABLE=0` (`sqil compile --gpus N` does when it is unset).

use crate::{Gpu, Result};
use cudarc::driver::{CudaStream, CudaViewMut};
use cudarc::nccl::{result as nccl, Comm, ReduceOp};
use std::sync::Arc;

/// What to do when NCCL cannot be loaded. cudarc opens `libnccl.so` (or `libnccl.so.13`, ...), not
/// NCCL's soname `libnccl.so.2`, which is all the `nvidia-nccl-cu13` wheel and the `libnccl2`
/// package install.
pub const NCCL_MISSING: &str = "NCCL not found: put a `libnccl.so` link to libnccl.so.2 (the nvidia-nccl-cu13 wheel's nvidia/nccl/lib, or the libnccl2 package) in a folder on LD_LIBRARY_PATH, or train on one GPU";

/// Whether the NCCL library can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// One NCCL communicator per GPU of a data-parallel group, in rank order.
pub struct Collective {
    comms: Vec<Comm>,
}

impl Collective {
    /// A group over `gpus` (rank i on `gpus[i]`; one GPU makes a group of one).
    pub fn new(gpus: &[Arc<Gpu>]) -> Result<Collective> {
        if gpus.is_empty() {
            return Err("an NCCL group needs at least one GPU".into());
        }
        if !nccl_present() {
            return Err(NCCL_MISSING.into());
        }
        let streams: Vec<Arc<CudaStream>> = gpus
            .iter()
            .map(|g| g.ctx.new_stream().map_err(|e| crate::Error::Device(format!("{}: stream: {e:?}", g.name))))
            .collect::<Result<_>>()?;
        let comms = Comm::from_devices(streams).map_err(|e| crate::Error::Device(format!("NCCL init: {e:?}")))?;
        Ok(Collective { comms })
    }

    /// Ranks in the group.
    pub fn ranks(&self) -> usize {
        self.comms.len()
    }

    /// Sums `bufs[r][j]` over the ranks r in place, for every j (every rank ends with the same
    /// sums): after the work queued so far on `after[r]`, and before what is queued there next.
    pub fn all_reduce_sum(&self, bufs: &mut [Vec<CudaViewMut<'_, f32>>], after: &[&Arc<CudaStream>]) -> Result<()> {
        let n = self.comms.len();
        if bufs.len() != n || after.len() != n {
            return Err(format!(
                "all-reduce over {n} ranks given {} buffer lists and {} streams",
                bufs.len(),
                after.len()
            )
            .into());
        }
        let lens = |b: &Vec<CudaViewMut<'_, f32>>| b.iter().map(|v| v.len()).collect::<Vec<_>>();
        let first = lens(&bufs[0]);
        if let Some(r) = bufs.iter().position(|b| lens(b) != first) {
            return Err(format!("all-reduce: rank {r}'s buffers differ in number or length from rank 0's").into());
        }
        let dev = |e| crate::Error::Device(format!("NCCL: {e:?}"));
        for (c, s) in self.comms.iter().zip(after) {
            c.stream().join(s).map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        }
        nccl::group_start().map_err(dev)?;
        let issued = (|| -> Result<()> {
            for (c, b) in self.comms.iter().zip(bufs.iter_mut()) {
                for v in b.iter_mut() {
                    c.all_reduce_in_place(v, &ReduceOp::Sum).map_err(dev)?;
                }
            }
            Ok(())
        })();
        // The group is closed even when a call failed (NCCL requires it).
        let ended = nccl::group_end().map_err(dev);
        issued?;
        ended?;
        for (c, s) in self.comms.iter().zip(after) {
            s.join(&c.stream()).map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        }
        Ok(())
    }
}
