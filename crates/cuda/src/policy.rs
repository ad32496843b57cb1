//! A lowered GPU policy ([`crate::lower::Lowered`]) on a device: every buffer allocated once,
//! the whole step list captured once in a CUDA graph and replayed per action, with one copy in
//! and one copy out. Needs the `driver` feature (cudarc).

use crate::error::Result;
use crate::lower::{lower, HostArr, KArg, LStep};
use crate::Gpu;
use cudarc::driver::{sys, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use sqil_runtime::Policy;
use std::sync::Arc;

pub use crate::lower::{Lowered, GPU_TOL};

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// [`HostArr`] on the device.
pub enum DevArr {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
    U32(CudaSlice<u32>),
}

type GStep = LStep<DevArr>;

pub struct GpuPolicy {
    stream: Arc<CudaStream>,
    steps: Vec<GStep>,
    bufs: Vec<CudaSlice<f32>>,
    /// The observations, fp32, concatenated.
    input: CudaSlice<f32>,
    in_len: usize,
    output: usize,
    out_len: usize,
    graph: Option<CudaGraph>,
    /// One line per step (for reports).
    pub describe: Vec<String>,
    /// Per lowered step, its kernel and plan step.
    pub labels: Vec<String>,
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(256).max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl GpuPolicy {
    /// Uploads `policy` (see [`lower`]).
    pub fn new(gpu: &Gpu, policy: &Policy) -> Result<GpuPolicy> {
        let l = lower(policy)?;
        for (name, src) in &l.sources {
            gpu.load_source(name, src)?;
        }
        let stream = gpu.ctx.new_stream().map_err(err)?;
        let bufs = l.bufs.iter().map(|&n| stream.alloc_zeros::<f32>(n)).collect::<Result<Vec<_>, _>>().map_err(err)?;
        let mut steps: Vec<GStep> = vec![];
        for st in l.steps {
            steps.push(match st {
                LStep::Kernel { name, args, threads } => {
                    let args = args
                        .into_iter()
                        .map(|a| {
                            Ok(match a {
                                KArg::Arr(HostArr::F32(v)) => {
                                    KArg::Arr(DevArr::F32(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Arr(HostArr::I32(v)) => {
                                    KArg::Arr(DevArr::I32(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Arr(HostArr::U32(v)) => {
                                    KArg::Arr(DevArr::U32(stream.clone_htod(&v).map_err(err)?))
                                }
                                KArg::Buf(b) => KArg::Buf(b),
                                KArg::In(o) => KArg::In(o),
                                KArg::Null => KArg::Null,
                                KArg::I32(v) => KArg::I32(v),
                                KArg::F32(v) => KArg::F32(v),
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    LStep::Kernel { name, args, threads }
                }
            });
        }
        let input = stream.alloc_zeros::<f32>(l.in_len.max(1)).map_err(err)?;
        Ok(GpuPolicy {
            stream,
            steps,
            bufs,
            input,
            in_len: l.in_len,
            output: l.output,
            out_len: l.out_len,
            graph: None,
            describe: l.describe,
            labels: l.labels,
        })
    }

    /// Launches every step on the policy's stream (no copies).
    fn launch(&mut self, gpu: &Gpu) -> Result<()> {
        self.launch_steps(gpu, 0..self.steps.len())
    }

    /// Per lowered step, its label and its median time in microseconds over `iters` eager runs
    /// on `obs` (CUDA events around each step's launch).
    pub fn profile(&mut self, gpu: &Gpu, obs: &[f32], iters: usize) -> Result<Vec<(String, f64)>> {
        self.act(gpu, obs)?;
        let ev = || gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(err);
        let (a, b) = (ev()?, ev()?);
        let mut t = vec![vec![]; self.steps.len()];
        for _ in 0..iters.max(1) {
            for (i, ts) in t.iter_mut().enumerate() {
                a.record(&self.stream).map_err(err)?;
                self.launch_steps(gpu, i..i + 1)?;
                b.record(&self.stream).map_err(err)?;
                b.synchronize().map_err(err)?;
                ts.push(a.elapsed_ms(&b).map_err(err)? as f64 * 1e3);
            }
        }
        Ok(t.into_iter()
            .zip(&self.labels)
            .map(|(mut v, l)| {
                v.sort_by(f64::total_cmp);
                (l.clone(), v[v.len() / 2])
            })
            .collect())
    }

    /// Launches steps `range` on the policy's stream (no copies).
    fn launch_steps(&mut self, gpu: &Gpu, range: std::ops::Range<usize>) -> Result<()> {
        let input_ptr = self.input.device_ptr(&self.stream).0;
        for st in &self.steps[range] {
            match st {
                LStep::Kernel { name, args, threads } => {
                    let f = gpu.function(name)?;
                    // Every argument as the value the kernel receives: device pointers (0 for
                    // null), ints and floats.
                    enum V {
                        P(u64),
                        I(i32),
                        F(f32),
                    }
                    let vals: Vec<V> = args
                        .iter()
                        .map(|a| match a {
                            KArg::Buf(b) => V::P(self.bufs[*b].device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::F32(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::I32(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Arr(DevArr::U32(d)) => V::P(d.device_ptr(&self.stream).0),
                            KArg::Null => V::P(0),
                            KArg::In(o) => V::P(input_ptr + 4 * *o as u64),
                            KArg::I32(v) => V::I(*v),
                            KArg::F32(v) => V::F(*v),
                        })
                        .collect();
                    let mut l = self.stream.launch_builder(&f);
                    for v in &vals {
                        match v {
                            V::P(p) => l.arg(p),
                            V::I(i) => l.arg(i),
                            V::F(x) => l.arg(x),
                        };
                    }
                    // SAFETY: the lowering builds each kernel's argument list in the order and of
                    // the types `policy_ops.cu` declares; the buffers and arrays hold what the
                    // sizes passed beside them say (one thread per output, bounds-checked).
                    unsafe { l.launch(cfg(*threads)) }.map_err(|e| crate::Error::Device(format!("{name}: {e:?}")))?;
                }
            }
        }
        Ok(())
    }

    /// Captures the step list in a CUDA graph (once); later [`GpuPolicy::act`] calls replay it.
    pub fn capture(&mut self, gpu: &Gpu) -> Result<()> {
        // Kernels load (and warm up) outside the capture.
        self.launch(gpu)?;
        self.stream.synchronize().map_err(err)?;
        // SAFETY: this context's buffers are all used from this one stream.
        unsafe { gpu.ctx.disable_event_tracking() };
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(err)?;
        let r = self.launch(gpu);
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(err)?;
        r?;
        self.graph = Some(g.ok_or("empty CUDA graph")?);
        Ok(())
    }

    /// One state in (its inputs concatenated), its actions out: a copy in, the graph (or the
    /// steps), a copy out.
    pub fn act(&mut self, gpu: &Gpu, obs: &[f32]) -> Result<Vec<f32>> {
        if obs.len() != self.in_len {
            return Err(format!("{} values, the policy takes {}", obs.len(), self.in_len).into());
        }
        self.stream.memcpy_htod(obs, &mut self.input).map_err(err)?;
        match &self.graph {
            Some(g) => g.launch().map_err(err)?,
            None => self.launch(gpu)?,
        }
        let mut out = vec![0f32; self.bufs[self.output].len()];
        self.stream.memcpy_dtoh(&self.bufs[self.output], &mut out).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        out.truncate(self.out_len);
        Ok(out)
    }
}
