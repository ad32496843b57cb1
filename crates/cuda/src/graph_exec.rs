//! Runs a [`GraphProgram`] on the GPU: buffers allocated once, constants uploaded once, the
//! generated kernels compiled with NVRTC (PTX cached like the others), GEMMs through cuBLAS in
//! fp32, and the whole step list captured in one CUDA graph after a first eager run; a run is
//! then the inputs' copies in, one graph launch, the outputs' copies out.

use crate::graph::{GStep, GraphProgram};
use crate::lower::err;
use crate::{Gpu, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, CudaViewMut, DevicePtr, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use sqil_ir::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

pub struct GpuGraph {
    pub program: GraphProgram,
    stream: Arc<CudaStream>,
    bufs: Vec<CudaSlice<f32>>,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    graph: Option<CudaGraph>,
    inputs: HashMap<String, usize>,
    /// cuBLAS's workspace, owned here so that no GEMM allocates while the stream is captured.
    _workspace: CudaSlice<u8>,
    /// Why the steps run eagerly rather than from a CUDA graph, if they do.
    pub eager_because: Option<String>,
    /// Page-locked staging buffers of the inputs fed through [`GpuGraph::stage_input`], by
    /// buffer: allocated on first use and reused.
    staging: HashMap<usize, PinnedHostSlice<f32>>,
}

/// cuBLAS workspace bytes (its documented recommendation for Hopper is 32 MiB).
pub const WORKSPACE: usize = 32 << 20;

impl GpuGraph {
    /// Allocates and uploads `program` on `gpu` and compiles its kernels.
    pub fn new(gpu: &Gpu, program: GraphProgram) -> Result<GpuGraph> {
        // A stream of its own: the context's default (legacy) stream cannot be captured.
        let stream = gpu.ctx.new_stream().map_err(err)?;
        // SAFETY: every buffer of this graph is used from this one stream, in order.
        unsafe { gpu.ctx.disable_event_tracking() };
        let mut bufs: Vec<CudaSlice<f32>> =
            program.bufs.iter().map(|&n| stream.alloc_zeros::<f32>(n)).collect::<Result<_, _>>().map_err(err)?;
        for (b, data) in &program.consts {
            stream.memcpy_htod(data, &mut bufs[*b]).map_err(err)?;
        }
        let mut funcs = HashMap::new();
        if program.steps.iter().any(|s| matches!(s, GStep::Kernel { .. })) {
            let h = program
                .source
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            gpu.load_source(&format!("sqil_graph_{h:016x}"), &program.source)?;
            for s in &program.steps {
                if let GStep::Kernel { name, .. } = s {
                    funcs.insert(name.clone(), gpu.function(name)?);
                }
            }
        }
        let blas = CudaBlas::new(stream.clone()).map_err(err)?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE).map_err(err)?;
        let wptr = workspace.device_ptr(&stream).0;
        // SAFETY: the workspace outlives the handle's use (both owned by this GpuGraph).
        let st = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), wptr as *mut std::ffi::c_void, WORKSPACE)
        };
        if st != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(crate::Error::Device(format!("cublasSetWorkspace: {st:?}")));
        }
        let inputs = program.inputs.iter().map(|(n, b, _)| (n.clone(), *b)).collect();
        Ok(GpuGraph {
            program,
            stream,
            bufs,
            blas,
            funcs,
            graph: None,
            inputs,
            _workspace: workspace,
            eager_because: Some("not captured".into()),
            staging: HashMap::new(),
        })
    }

    fn ptr(&self, b: usize) -> u64 {
        self.bufs[b].device_ptr(&self.stream).0
    }

    fn launch(&self) -> Result<()> {
        (0..self.program.steps.len()).try_for_each(|i| self.launch_step(i))
    }

    /// Device milliseconds of every step, run eagerly `reps` times between timing events (the
    /// mean per step; the inputs as set). For finding where a step's time goes: the events
    /// themselves add a few microseconds per step, which the captured graph does not pay.
    pub fn profile(&self, reps: usize) -> Result<Vec<(String, f64)>> {
        let reps = reps.max(1);
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut ms = vec![0f64; self.program.steps.len()];
        for _ in 0..reps {
            let mut evs = vec![self.stream.record_event(timing).map_err(err)?];
            for i in 0..self.program.steps.len() {
                self.launch_step(i)?;
                evs.push(self.stream.record_event(timing).map_err(err)?);
            }
            self.stream.synchronize().map_err(err)?;
            for (i, w) in evs.windows(2).enumerate() {
                ms[i] += w[0].elapsed_ms(&w[1]).map_err(err)? as f64 / reps as f64;
            }
        }
        Ok(self
            .program
            .steps
            .iter()
            .zip(ms)
            .map(|(s, t)| {
                let what = match s {
                    GStep::Kernel { label, grid, .. } => format!("kernel {label} [{grid} blocks]"),
                    GStep::Gemm(g) => {
                        format!("gemm {} [{}x{}x{} x{} split {}]", g.label, g.m, g.n, g.k, g.batch, g.split)
                    }
                };
                (what, t)
            })
            .collect())
    }

    fn launch_step(&self, i: usize) -> Result<()> {
        match &self.program.steps[i] {
            GStep::Kernel { name, out, ins, grid, block, label, off } => {
                let f = &self.funcs[name];
                let ptrs: Vec<u64> = std::iter::once(*out)
                    .chain(ins.iter().copied())
                    .enumerate()
                    .map(|(i, b)| self.ptr(b) + 4 * off.get(i).copied().unwrap_or(0) as u64)
                    .collect();
                let mut l = self.stream.launch_builder(f);
                for p in &ptrs {
                    l.arg(p);
                }
                let cfg = LaunchConfig { grid_dim: (*grid, 1, 1), block_dim: (*block, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the generated kernel takes `out` then one const pointer per operand,
                // each buffer as large as the lowering's offsets reach (bounds from the shapes).
                unsafe { l.launch(cfg) }.map_err(|e| crate::Error::Device(format!("{label}: {e:?}")))?;
            }
            GStep::Gemm(g) => {
                // Row-major C = op(X) op(Y) is column-major C^T = op(Y)^T op(X)^T.
                let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
                let ldy = if g.ty { g.k } else { g.n };
                let ldx = if g.tx { g.m } else { g.k };
                // Split-K: matrix s of the batch is slice s of k (offsets along the stored
                // layout's k axis), each a full m x n partial product.
                let (k, batch, sx, sy) = if g.split > 1 {
                    let kk = g.k / g.split;
                    (kk, g.split, if g.tx { kk * g.m } else { kk }, if g.ty { kk } else { kk * g.n })
                } else {
                    (g.k, g.batch, g.sx, g.sy)
                };
                let (alpha, beta) = (g.alpha, g.beta);
                // SAFETY: x, y and c hold batch matrices of the sizes given (the lowering's
                // shapes); alpha and beta are host scalars read during the call.
                unsafe {
                    cudarc::cublas::result::sgemm_strided_batched(
                        *self.blas.handle(),
                        op(g.ty),
                        op(g.tx),
                        g.n as i32,
                        g.m as i32,
                        k as i32,
                        &alpha,
                        (self.ptr(g.y) + 4 * g.off[1] as u64) as *const f32,
                        ldy as i32,
                        sy as i64,
                        (self.ptr(g.x) + 4 * g.off[0] as u64) as *const f32,
                        ldx as i32,
                        sx as i64,
                        &beta,
                        (self.ptr(g.c) + 4 * g.off[2] as u64) as *mut f32,
                        g.n as i32,
                        (g.m * g.n) as i64,
                        batch as i32,
                    )
                }
                .map_err(|e| crate::Error::Device(format!("{}: cuBLAS: {e:?}", g.label)))?;
            }
        }
        Ok(())
    }

    /// Runs the steps once eagerly, then captures them in a CUDA graph that later runs replay.
    /// A capture the driver refuses leaves the steps eager (the reason in `eager_because`): a
    /// slower step, not a failed run.
    pub fn capture(&mut self) -> Result<()> {
        self.launch()?;
        self.stream.synchronize().map_err(err)?;
        if let Err(e) = self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            self.eager_because = Some(format!("{e:?}"));
            return Ok(());
        }
        let r = self.launch();
        let g = self.stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        match (r, g) {
            (Ok(()), Ok(Some(g))) => {
                self.graph = Some(g);
                self.eager_because = None;
            }
            (r, g) => {
                let why = match (r, g) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => format!("{e:?}"),
                    _ => "empty CUDA graph".into(),
                };
                self.eager_because = Some(why);
                // Whatever the failed capture left: a clean stream for the eager steps.
                self.stream.synchronize().ok();
            }
        }
        Ok(())
    }

    /// Copies `data` into input `name` (its full length).
    pub fn set_input(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let b = *self.inputs.get(name).ok_or_else(|| crate::Error::Unsupported(format!("no input `{name}`")))?;
        if data.len() != self.program.bufs[b] {
            return Err(crate::Error::Unsupported(format!(
                "input `{name}`: {} values, the program takes {}",
                data.len(),
                self.program.bufs[b]
            )));
        }
        self.stream.memcpy_htod(data, &mut self.bufs[b]).map_err(err)?;
        Ok(())
    }

    /// Fills input `name` through its page-locked staging buffer (`fill` writes every value; it
    /// runs once the buffer's previous copy has left it) and copies it to the device
    /// asynchronously: a batch gathered straight into DMA-able memory, without a per-step
    /// allocation or the driver's own staging of pageable memory.
    pub fn stage_input(&mut self, name: &str, fill: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        let b = *self.inputs.get(name).ok_or_else(|| crate::Error::Unsupported(format!("no input `{name}`")))?;
        if !self.staging.contains_key(&b) {
            // SAFETY: the buffer is written in full by `fill` before its first copy.
            let s = unsafe { self.stream.context().alloc_pinned::<f32>(self.program.bufs[b]) }.map_err(err)?;
            self.staging.insert(b, s);
        }
        let st = self.staging.get_mut(&b).expect("allocated above");
        fill(st.as_mut_slice().map_err(err)?);
        self.stream.memcpy_htod(st, &mut self.bufs[b]).map_err(err)?;
        Ok(())
    }

    /// Runs the program (the captured graph when there is one) on the inputs set.
    pub fn run(&mut self) -> Result<()> {
        match &self.graph {
            Some(g) => g.launch().map_err(err),
            None => self.launch(),
        }
    }

    /// Output `i`'s values.
    pub fn output(&self, i: usize) -> Result<Vec<f32>> {
        let (b, shape) = &self.program.outputs[i];
        let mut v = vec![0f32; self.program.bufs[*b]];
        self.stream.memcpy_dtoh(&self.bufs[*b], &mut v).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        v.truncate(shape.iter().product());
        Ok(v)
    }

    /// Every output, as tensors of their concrete shapes.
    pub fn outputs(&self) -> Result<Vec<Tensor>> {
        (0..self.program.outputs.len())
            .map(|i| Tensor::from_f32(self.program.outputs[i].1.clone(), self.output(i)?).map_err(crate::Error::Ir))
            .collect()
    }

    /// Sets every input from `feeds` (by name; each must be f32 of the program's shape), runs,
    /// returns the outputs.
    pub fn run_feeds(&mut self, feeds: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
        let names: Vec<String> = self.program.inputs.iter().map(|(n, _, _)| n.clone()).collect();
        for n in names {
            let t = feeds.get(&n).ok_or_else(|| crate::Error::Unsupported(format!("input `{n}` not fed")))?;
            self.set_input(&n, &t.data.f32_cow())?;
        }
        self.run()?;
        self.outputs()
    }
}

/// A profile from [`GpuGraph::profile`] summarised: steps grouped by their description with the
/// digits taken out (layer `l3.q.wq.17` and `l0.k.wq.5` are one group), the `top` groups by time
/// with their count, milliseconds and share, then GEMMs against generated kernels.
pub fn profile_table(rows: &[(String, f64)], top: usize) -> String {
    let total: f64 = rows.iter().map(|r| r.1).sum::<f64>().max(1e-12);
    let mut groups: Vec<(String, usize, f64)> = vec![];
    let mut at: HashMap<String, usize> = HashMap::new();
    for (what, ms) in rows {
        let key: String = what.chars().filter(|c| !c.is_ascii_digit()).collect();
        let i = *at.entry(key.clone()).or_insert_with(|| {
            groups.push((key, 0, 0.0));
            groups.len() - 1
        });
        groups[i].1 += 1;
        groups[i].2 += ms;
    }
    groups.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mut s = format!("{} steps, {total:.3} ms\n", rows.len());
    for (key, n, ms) in groups.iter().take(top) {
        s += &format!("{ms:9.3} ms {:5.1}% x{n:<4} {key}\n", 100.0 * ms / total);
    }
    let gemm: f64 = rows.iter().filter(|r| r.0.starts_with("gemm")).map(|r| r.1).sum();
    s += &format!("GEMMs {gemm:.3} ms ({:.1}%), generated kernels {:.3} ms\n", 100.0 * gemm / total, total - gemm);
    s
}

/// AdamW on the device for a [`GpuGraph`] whose inputs include the parameters and whose outputs
/// include their gradients: the same update as `sqil_train::optim::AdamW` (global-norm clipping,
/// decoupled weight decay on weights, LSQ steps kept positive, moments in f32, arithmetic in
/// double), applied in place to the parameter input buffers, so parameters stay resident and
/// cross the bus only when read back.
pub struct DeviceAdamW {
    /// Per parameter: input buffer, gradient output buffer, length, kind (0 weight, 1 bias, 2 step).
    params: Vec<(usize, usize, usize, u8)>,
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    /// Per parameter, `PARTS` partial sums of squares of its gradient (doubles).
    partials: CudaSlice<f64>,
    /// [norm]
    norm: CudaSlice<f64>,
    /// [lr, lr of steps, 1 - b1^t, 1 - b2^t, weight decay, clip, b1, b2, eps]
    scalars: CudaSlice<f64>,
    sumsq: CudaFunction,
    total: CudaFunction,
    update: CudaFunction,
    scale: CudaFunction,
}

const PARTS: usize = 256;

const ADAMW_SRC: &str = r#"
extern "C" __global__ void sqil_adamw_sumsq(const float* __restrict__ g, long long n, double* __restrict__ partial) {
  __shared__ double sh[256];
  double acc = 0.0;
  for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < n; i += (long long)gridDim.x * 256) {
    double v = (double)g[i];
    acc += v * v;
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}
extern "C" __global__ void sqil_adamw_norm(const double* __restrict__ partial, long long n, double* __restrict__ norm) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0.0;
  for (long long i = 0; i < n; i++) s += partial[i];
  norm[0] = sqrt(s);
}
extern "C" __global__ void sqil_grad_scale(float* __restrict__ g, long long n, float f) {
  long long i = (long long)blockIdx.x * 256 + threadIdx.x;
  if (i < n) g[i] *= f;
}
extern "C" __global__ void sqil_adamw_update(float* __restrict__ x, const float* __restrict__ g, float* __restrict__ m,
                                             float* __restrict__ v, long long n, int kind,
                                             const double* __restrict__ sc, const double* __restrict__ norm) {
  long long i = (long long)blockIdx.x * 256 + threadIdx.x;
  if (i >= n) return;
  double clip = sc[5];
  double scale = (clip > 0.0 && norm[0] > clip) ? clip / norm[0] : 1.0;
  double lr = kind == 2 ? sc[1] : sc[0];
  double b1 = sc[6], b2 = sc[7];
  double gi = (double)g[i] * scale;
  double mi = b1 * (double)m[i] + (1.0 - b1) * gi;
  double vi = b2 * (double)v[i] + (1.0 - b2) * gi * gi;
  m[i] = (float)mi;
  v[i] = (float)vi;
  double nx = (double)x[i];
  if (kind == 0) nx -= lr * sc[4] * nx;
  nx -= lr * (mi / sc[2]) / (sqrt(vi / sc[3]) + sc[8]);
  if (kind == 2) nx = fmax(nx, 1e-8);
  x[i] = (float)nx;
}
"#;

impl GpuGraph {
    /// A device AdamW over `params`: (input name, gradient output index, kind: 0 weight, 1 bias,
    /// 2 LSQ step).
    pub fn adamw(&self, gpu: &Gpu, params: &[(String, usize, u8)]) -> Result<DeviceAdamW> {
        gpu.load_source("sqil_adamw", ADAMW_SRC)?;
        let mut ps = vec![];
        let (mut m, mut v) = (vec![], vec![]);
        for (name, out, kind) in params {
            let b = *self.inputs.get(name).ok_or_else(|| crate::Error::Unsupported(format!("no input `{name}`")))?;
            let (gb, shape) = self.program.outputs.get(*out).ok_or("no such gradient output")?;
            let n: usize = shape.iter().product();
            ps.push((b, *gb, n, *kind));
            m.push(self.stream.alloc_zeros::<f32>(n.max(1)).map_err(err)?);
            v.push(self.stream.alloc_zeros::<f32>(n.max(1)).map_err(err)?);
        }
        Ok(DeviceAdamW {
            partials: self.stream.alloc_zeros::<f64>(PARTS * ps.len().max(1)).map_err(err)?,
            norm: self.stream.alloc_zeros::<f64>(1).map_err(err)?,
            scalars: self.stream.alloc_zeros::<f64>(9).map_err(err)?,
            params: ps,
            m,
            v,
            sumsq: gpu.function("sqil_adamw_sumsq")?,
            total: gpu.function("sqil_adamw_norm")?,
            update: gpu.function("sqil_adamw_update")?,
            scale: gpu.function("sqil_grad_scale")?,
        })
    }

    /// One AdamW update from the gradients of the last run. `sc`: [lr, lr of LSQ steps, 1 - b1^t,
    /// 1 - b2^t, weight decay, clip, b1, b2, eps].
    pub fn adamw_step(&mut self, opt: &mut DeviceAdamW, sc: [f64; 9]) -> Result<()> {
        self.stream.memcpy_htod(&sc, &mut opt.scalars).map_err(err)?;
        let cfg = |blocks: usize| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let part_ptr = opt.partials.device_ptr(&self.stream).0;
        let norm_ptr = opt.norm.device_ptr(&self.stream).0;
        let sc_ptr = opt.scalars.device_ptr(&self.stream).0;
        for (k, &(_, gb, n, _)) in opt.params.iter().enumerate() {
            let (g, nn, p) = (self.ptr(gb), n as i64, part_ptr + (k * PARTS * 8) as u64);
            let mut l = self.stream.launch_builder(&opt.sumsq);
            l.arg(&g).arg(&nn).arg(&p);
            // SAFETY: g holds n floats; p has PARTS doubles for this parameter.
            unsafe { l.launch(cfg(PARTS)) }.map_err(err)?;
        }
        let total = (PARTS * opt.params.len()) as i64;
        let mut l = self.stream.launch_builder(&opt.total);
        l.arg(&part_ptr).arg(&total).arg(&norm_ptr);
        // SAFETY: the partials hold `total` doubles; norm one.
        unsafe { l.launch(cfg(1)) }.map_err(err)?;
        for (k, &(xb, gb, n, kind)) in opt.params.iter().enumerate() {
            let (x, g) = (self.ptr(xb), self.ptr(gb));
            let (m, v) = (opt.m[k].device_ptr(&self.stream).0, opt.v[k].device_ptr(&self.stream).0);
            let (nn, kk) = (n as i64, kind as i32);
            let mut l = self.stream.launch_builder(&opt.update);
            l.arg(&x).arg(&g).arg(&m).arg(&v).arg(&nn).arg(&kk).arg(&sc_ptr).arg(&norm_ptr);
            // SAFETY: x, g, m, v hold n floats each; sc 9 doubles; norm one.
            unsafe { l.launch(cfg(n.div_ceil(256))) }.map_err(err)?;
        }
        Ok(())
    }

    /// Multiplies the gradients of the last run that `opt` updates from by `factor` (a
    /// data-parallel rank's share of the global batch, before the ranks' gradients are summed).
    pub fn scale_grads(&mut self, opt: &DeviceAdamW, factor: f32) -> Result<()> {
        for &(_, gb, n, _) in &opt.params {
            let (g, nn) = (self.ptr(gb), n as i64);
            let mut l = self.stream.launch_builder(&opt.scale);
            l.arg(&g).arg(&nn).arg(&factor);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: g holds n floats.
            unsafe { l.launch(cfg) }.map_err(err)?;
        }
        Ok(())
    }

    /// The gradient buffers `opt` updates from, in parameter order, each its parameter's length
    /// (for a collective that sums them in place, ordered after this graph's stream).
    pub fn grads_mut(&mut self, opt: &DeviceAdamW) -> Result<Vec<CudaViewMut<'_, f32>>> {
        let want: HashMap<usize, usize> = opt.params.iter().map(|&(_, gb, n, _)| (gb, n)).collect();
        if want.len() != opt.params.len() {
            return Err("two parameters share a gradient buffer".into());
        }
        let mut views: HashMap<usize, CudaViewMut<'_, f32>> = self
            .bufs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, b)| want.get(&i).map(|&n| (i, b.slice_mut(0..n))))
            .collect();
        opt.params.iter().map(|&(_, gb, _, _)| views.remove(&gb).ok_or_else(|| "no gradient buffer".into())).collect()
    }

    /// The stream this graph's steps run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device AdamW's first and second moments, per parameter (for checkpoints).
    #[allow(clippy::type_complexity)]
    pub fn adamw_moments(&self, opt: &DeviceAdamW) -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        let read = |s: &[CudaSlice<f32>]| -> Result<Vec<Vec<f32>>> {
            s.iter()
                .zip(&opt.params)
                .map(|(b, p)| {
                    let mut v = vec![0f32; b.len()];
                    self.stream.memcpy_dtoh(b, &mut v).map_err(err)?;
                    v.truncate(p.2);
                    Ok(v)
                })
                .collect()
        };
        let (m, v) = (read(&opt.m)?, read(&opt.v)?);
        self.stream.synchronize().map_err(err)?;
        Ok((m, v))
    }

    /// Sets the device AdamW's moments (resuming from a checkpoint), one vector per parameter of
    /// the parameter's length.
    pub fn set_adamw_moments(&mut self, opt: &mut DeviceAdamW, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        if m.len() != opt.params.len() || v.len() != opt.params.len() {
            return Err(crate::Error::Unsupported("AdamW moments: one per parameter".into()));
        }
        for (k, p) in opt.params.iter().enumerate() {
            if m[k].len() != p.2 || v[k].len() != p.2 {
                return Err(crate::Error::Unsupported(format!("AdamW moments of parameter {k}: {} values", p.2)));
            }
            if p.2 > 0 {
                self.stream.memcpy_htod(&m[k], &mut opt.m[k]).map_err(err)?;
                self.stream.memcpy_htod(&v[k], &mut opt.v[k]).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Reads input `name` back (e.g. a parameter the device optimizer updated).
    pub fn read_input(&self, name: &str) -> Result<Vec<f32>> {
        let b = *self.inputs.get(name).ok_or_else(|| crate::Error::Unsupported(format!("no input `{name}`")))?;
        let mut v = vec![0f32; self.program.bufs[b]];
        self.stream.memcpy_dtoh(&self.bufs[b], &mut v).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        Ok(v)
    }

    /// Synchronises the stream (for timing).
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(err)
    }
}
