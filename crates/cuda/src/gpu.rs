//! The device half of the CUDA back end (feature `driver`): NVRTC compilation with a PTX cache,
//! the GPU context with the kernels loaded, weights on the device, launches (cudarc).

use crate::error::Result;
use crate::*;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::f16;
use std::path::PathBuf;
use std::sync::Arc;

/// One kernel parameter for [`launch_ex`]: a pointer to the value.
pub(crate) fn param<T>(v: &T) -> *mut std::ffi::c_void {
    v as *const T as *mut std::ffi::c_void
}

/// Launches `f` on `stream` through `cuLaunchKernelEx` with launch attributes (a cluster shape,
/// programmatic stream serialization, or none): `(grid, block, shared memory bytes)` in one
/// dimension, `params` one pointer per kernel parameter in order.
///
/// # Safety
/// `params` must point at values of the types `f` declares, in its order, alive through the call;
/// every access the kernel makes with them must be in bounds.
pub(crate) unsafe fn launch_ex(
    stream: &CudaStream,
    f: cudarc::driver::sys::CUfunction,
    (grid, block, smem): (u32, u32, u32),
    attrs: &mut [cudarc::driver::sys::CUlaunchAttribute],
    params: &mut [*mut std::ffi::c_void],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    let cfg = cudarc::driver::sys::CUlaunchConfig {
        gridDimX: grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream.cu_stream(),
        attrs: attrs.as_mut_ptr(),
        numAttrs: attrs.len() as u32,
    };
    cudarc::driver::sys::cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut()).result()
}

/// Whether the NVRTC library can be loaded (kernels can be compiled on this machine).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// FNV-1a of a source, for the PTX cache key.
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Whether kernel source `name` computes the CPU runtime's arithmetic (the policy kernels:
/// `policy_ops.cu` and the generated element-wise chains), so a multiply and a following add must
/// not be contracted into an fma (`--fmad=false`); the GEMV benchmark kernels may.
fn exact_arithmetic(name: &str) -> bool {
    !matches!(name, "q4_gemv.cu" | "bench.cu")
}

/// Compiles one kernel source to PTX for `arch` (e.g. `compute_90`), or reads it from the cache
/// (`$SQIL_CACHE` or `~/.cache/sqil/ptx`, file `NAME-ARCH-HASH.ptx`, written atomically).
pub fn compile(name: &str, src: &str, arch: &'static str) -> Result<String> {
    let dir = std::env::var_os("SQIL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sqil")))
        .map(|d| d.join("ptx"));
    let file = dir.as_ref().map(|d| d.join(format!("{name}-{arch}-{:016x}.ptx", hash(src))));
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        return Ok(text);
    }
    if !nvrtc_present() {
        return Err(format!("{name}: NVRTC is not installed (libnvrtc not found), kernels cannot be compiled").into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: if exact_arithmetic(name) {
            vec!["-std=c++17".into(), "-lineinfo".into(), "--fmad=false".into()]
        } else {
            vec!["-std=c++17".into(), "-lineinfo".into()]
        },
        ..Default::default()
    };
    let ptx =
        cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| crate::Error::Device(format!("{name}: {e:?}")))?;
    let text = ptx.to_src();
    if let (Some(d), Some(f)) = (dir, file) {
        // A cache that cannot be written only costs a recompile next time.
        if std::fs::create_dir_all(&d).is_ok() {
            // One temporary file per call (threads of a process compiling the same kernel at
            // once shared `tmp{pid}`: one truncated it while another renamed it into place).
            static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = f.with_extension(format!("tmp{}-{call}", std::process::id()));
            if std::fs::write(&tmp, &text).is_ok() {
                let _ = std::fs::rename(&tmp, &f);
            }
        }
    }
    Ok(text)
}

/// Scratch for [`Gpu::q4_gemm_w4a8`]: the batch's int8 activations, scales and sums (16 tokens of
/// up to `k` values).
pub struct W4a8Scratch {
    pub k: usize,
    pub xq: CudaSlice<i8>,
    pub xs: CudaSlice<f32>,
    pub xsum: CudaSlice<i32>,
}

/// int4 weights for the exact W4A8 GEMM ([`Gpu::w4a8_gemm`]): the int8 tensor-core layout
/// ([`w4a8_words`], rows padded to tiles of 8 and k to whole groups of at least 128 terms) and f32
/// scales per `group` weights (`[n, groups]`, the CPU runtime's scales, so the products round as
/// they do there).
pub struct DeviceW4a8 {
    pub n: usize,
    /// The layer's own row length (the last group may be partial).
    pub k: usize,
    pub group: usize,
    pub groups: usize,
    /// Blocks of 128 terms per row in `words` (k padded to whole groups).
    pub kqg: usize,
    pub words: CudaSlice<u32>,
    pub scales: CudaSlice<f32>,
    /// Per row and group the sum of the int4 weights (`[n, groups]`): the zero point's part.
    pub wsum: CudaSlice<i32>,
}

/// The static int8 quantizer of a W4A8 layer's input, as the CPU runtime applies it: level =
/// clamp(rint(x / scale) + zero, lo, hi) - zero (`hi - lo` at most 255).
#[derive(Clone, Copy, Debug)]
pub struct ActQuant {
    pub scale: f32,
    pub zero: f32,
    pub lo: f32,
    pub hi: f32,
}

/// Scratch for [`Gpu::w4a8_gemm`]: the batch's levels as A fragments (16 rows of up to `k`
/// terms), the per-row NaN flags and the call counter they are compared with.
pub struct W4a8Levels {
    pub k: usize,
    pub frag: CudaSlice<u32>,
    pub nanflag: CudaSlice<i32>,
    epoch: i32,
    /// The quantizer's zero less its lowest level (the levels are stored as `q - lo`).
    zp: i32,
    /// The levels in the half layout (rows g of the fragments only, batches up to 8) for the
    /// `sqil_w4a8_half_*` instances.
    half: bool,
}

/// The exact W4A8 GEMM's kernel instances: (entry point, rows per block, threads, 128-term
/// blocks per warp per chunk, blocks of weights in flight per warp, half levels). Chunk size 0: a
/// `sqil_w4a8_lean_*` instance (each warp walks its own range of k, every group's sums in shared
/// memory at once: layers whose sums fit); otherwise `sqil_w4a8_mma_*` (chunks of the row, a
/// barrier per chunk: any length). Half: a `sqil_w4a8_half_*` instance (the lean walk on the half
/// levels, the zero's part from the mma's rows 8-15 of ones: batches up to 8). [`Gpu::w4a8_gemm`]
/// takes the first that fits, a half instance at batches up to 8.
pub const W4A8_INSTANCES: &[(&str, u32, u32, usize, usize, bool)] = &[
    ("sqil_w4a8_lean_t2_s8_d4", 16, 256, 0, 4, false),
    ("sqil_w4a8_lean_t2_s8_d8", 16, 256, 0, 8, false),
    ("sqil_w4a8_lean_t4_s8_d4", 32, 256, 0, 4, false),
    ("sqil_w4a8_lean_t1_s8_d8", 8, 256, 0, 8, false),
    ("sqil_w4a8_mma_t2_s8_q1_d4", 16, 256, 1, 4, false),
    ("sqil_w4a8_mma_t4_s8_q1_d4", 32, 256, 1, 4, false),
    ("sqil_w4a8_half_t2_s8_d4", 16, 256, 0, 4, true),
    ("sqil_w4a8_half_t4_s8_d2", 32, 256, 0, 2, true),
];

type W4a8Instance = (&'static str, u32, u32, usize, usize, bool);

/// [`HostQd`] on the device.
pub struct DeviceQd {
    pub n: usize,
    pub k: usize,
    pub group: usize,
    pub bits: u32,
    pub lo: CudaSlice<u32>,
    /// One zero word for 2 bits (the kernel does not read it).
    pub hi: CudaSlice<u32>,
    pub scales: CudaSlice<f16>,
}

/// A GPU with sqil's kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub cc: (i32, i32),
    modules: Vec<Arc<CudaModule>>,
    /// Kernel name -> index of the module whose PTX has that `.entry`.
    entries: std::collections::HashMap<String, usize>,
    loaded: std::sync::Mutex<std::collections::HashMap<String, CudaFunction>>,
}

/// int4 weights on the device: the GEMV layout (batches 1-4), the fp16 tensor-core layout
/// (batches 5-16) and the int8 tensor-core layout (W4A8): the same weights rearranged three
/// times (see [`mma_words`], [`mma8_words`]), 1.5 bytes per weight in all.
pub struct DeviceQ4 {
    pub n: usize,
    pub k: usize,
    pub group: usize,
    pub words: CudaSlice<u32>,
    pub mma: CudaSlice<u32>,
    /// The int8 tensor-core layout (W4A8, [`mma8_words`]).
    pub mma8: CudaSlice<u32>,
    pub scales: CudaSlice<f16>,
}

impl Gpu {
    /// Device 0 with the kernels compiled (or read from the cache); an error, not a panic, when
    /// there is no driver or no device.
    pub fn new() -> Result<Gpu> {
        Gpu::on(0)
    }

    /// How many CUDA devices the driver reports (an error, not a panic, without a driver).
    pub fn count() -> Result<usize> {
        if !driver_present() {
            return Err("no CUDA driver (libcuda not found)".into());
        }
        let count = CudaContext::device_count().map_err(|e| crate::Error::Device(format!("CUDA driver: {e:?}")))?;
        Ok(count.max(0) as usize)
    }

    /// Device `ordinal` with the kernels compiled (or read from the cache), as [`Gpu::new`].
    pub fn on(ordinal: usize) -> Result<Gpu> {
        let count = Gpu::count()?;
        if count < 1 {
            return Err("the CUDA driver reports no devices".into());
        }
        if ordinal >= count {
            return Err(format!("GPU {ordinal}: the CUDA driver reports {count} device(s)").into());
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| crate::Error::Device(format!("CUDA context {ordinal}: {e:?}")))?;
        let name = ctx.name().map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        let cc = ctx.compute_capability().map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        let mut modules = vec![];
        let mut entries = std::collections::HashMap::new();
        for (file, src) in SOURCES {
            let ptx = compile(file, src, arch_for(cc))?;
            for line in ptx.lines() {
                if let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") {
                    let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    entries.insert(name, modules.len());
                }
            }
            modules.push(
                ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(|e| crate::Error::Device(format!("{file}: load: {e:?}")))?,
            );
        }
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream, name, cc, modules, entries, loaded: Default::default() })
    }

    /// (free, total) bytes of device memory, as the driver reports them.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        cudarc::driver::result::mem_get_info().map_err(|e| crate::Error::Device(format!("cuMemGetInfo: {e:?}")))
    }

    /// A kernel by name (looked up once, from the module whose PTX defines it).
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut loaded = self.loaded.lock().map_err(|_| "kernel cache poisoned".to_string())?;
        if let Some(f) = loaded.get(name) {
            return Ok(f.clone());
        }
        let m = self.entries.get(name).ok_or_else(|| format!("kernel {name}: no such entry point"))?;
        let f =
            self.modules[*m].load_function(name).map_err(|e| crate::Error::Device(format!("kernel {name}: {e:?}")))?;
        loaded.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Compiles generated kernel source `src` (fp16.cuh is prepended; PTX cached like the
    /// embedded sources) and makes its entry points available to [`Gpu::function`]. Sources
    /// already loaded under `name` are not compiled again.
    pub fn load_source(&self, name: &str, src: &str) -> Result<()> {
        self.load_full_source(name, &crate::full_source(src))
    }

    /// [`Gpu::load_source`] for a source that is complete as it is (nothing prepended).
    pub fn load_full_source(&self, name: &str, full: &str) -> Result<()> {
        if self.function(name).is_ok() {
            return Ok(());
        }
        let ptx = compile(&format!("{name}.cu"), full, arch_for(self.cc))?;
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))
            .map_err(|e| crate::Error::Device(format!("{name}: load: {e:?}")))?;
        let mut loaded = self.loaded.lock().map_err(|_| "kernel cache poisoned".to_string())?;
        for line in ptx.lines() {
            if let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") {
                let entry: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                let f = m.load_function(&entry).map_err(|e| crate::Error::Device(format!("kernel {entry}: {e:?}")))?;
                loaded.insert(entry, f);
            }
        }
        Ok(())
    }

    pub fn upload_dense(&self, w: &HostQd) -> Result<DeviceQd> {
        let e = |e| format!("{e:?}");
        let hi = if w.hi.is_empty() { vec![0u32; 2] } else { w.hi.clone() };
        Ok(DeviceQd {
            n: w.n,
            k: w.k,
            group: w.group,
            bits: w.bits,
            lo: self.stream.clone_htod(&w.lo).map_err(e)?,
            hi: self.stream.clone_htod(&hi).map_err(e)?,
            scales: self.stream.clone_htod(&w.scales).map_err(e)?,
        })
    }

    /// `y = x w^T (+ bias)`, ReLU if asked, for one row of fp16 activations (`x` is `[w.k]`) on
    /// dense 3- or 2-bit weights, on `stream` (asynchronous).
    #[allow(clippy::too_many_arguments)]
    pub fn qd_gemv_on(
        &self,
        stream: &Arc<CudaStream>,
        w: &DeviceQd,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        relu: bool,
    ) -> Result<()> {
        let name = if w.bits == 3 { "sqil_q3_gemv_s4_r4" } else { "sqil_q2_gemv_s4_r4" };
        self.qd_gemv_instance(stream, w, x, bias, y, relu, (name, 4))
    }

    /// [`Gpu::qd_gemv_on`] with a chosen instance: `sqil_q{3,2}_gemv_s4_r4` (four warps split
    /// k over four rows) or `sqil_q{3,2}_gemv_b1` (a warp per row), and its rows per 128-thread
    /// block.
    #[allow(clippy::too_many_arguments)]
    pub fn qd_gemv_instance(
        &self,
        stream: &Arc<CudaStream>,
        w: &DeviceQd,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        relu: bool,
        (name, rows_per_block): (&str, u32),
    ) -> Result<()> {
        if x.len() < w.k || y.len() < w.n {
            return Err(format!("q{}_gemv: buffers do not fit [{}, {}]", w.bits, w.n, w.k).into());
        }
        let f = self.function(name)?;
        let (n, k) = (w.n as i32, w.k as i32);
        let gshift = (w.group / 32).trailing_zeros() as i32;
        let relu = relu as i32;
        let null = 0u64;
        let mut l = stream.launch_builder(&f);
        l.arg(&w.lo).arg(&w.hi).arg(&w.scales).arg(x);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        l.arg(y).arg(&n).arg(&k).arg(&gshift).arg(&relu);
        let cfg = LaunchConfig {
            grid_dim: ((w.n as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: parameters as the kernel declares them; buffer sizes checked above, every
        // access bounded by n and k (a multiple of 128).
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(|e| crate::Error::Device(format!("q{}_gemv launch: {e:?}", w.bits)))
    }

    pub fn upload(&self, w: &HostQ4) -> Result<DeviceQ4> {
        Ok(DeviceQ4 {
            n: w.n,
            k: w.k,
            group: w.group,
            words: self.stream.clone_htod(&w.words).map_err(|e| crate::Error::Device(format!("{e:?}")))?,
            mma: self.stream.clone_htod(&mma_words(w)).map_err(|e| crate::Error::Device(format!("{e:?}")))?,
            mma8: self.stream.clone_htod(&mma8_words(w)).map_err(|e| crate::Error::Device(format!("{e:?}")))?,
            scales: self.stream.clone_htod(&w.scales).map_err(|e| crate::Error::Device(format!("{e:?}")))?,
        })
    }

    /// `y[b, n] = sum_k x[b, k] w[n, k] (+ bias[n])` for `batch` <= 16 rows of fp16 activations
    /// (`x` is `[batch, w.k]`), on the stream (asynchronous).
    pub fn q4_gemv(
        &self,
        w: &DeviceQ4,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        batch: usize,
    ) -> Result<()> {
        self.q4_gemv_on(&self.stream, w, x, bias, y, batch, false)
    }

    /// Scratch for [`Gpu::q4_gemm_w4a8`] on rows of up to `k` weights.
    pub fn w4a8_scratch(&self, k: usize) -> Result<W4a8Scratch> {
        let e = |e| format!("{e:?}");
        Ok(W4a8Scratch {
            k,
            xq: self.stream.alloc_zeros::<i8>(16 * k).map_err(e)?,
            xs: self.stream.alloc_zeros::<f32>(16).map_err(e)?,
            xsum: self.stream.alloc_zeros::<i32>(16 * k.div_ceil(32)).map_err(e)?,
        })
    }

    /// W4A8 on the int8 tensor cores: the batch's fp16 activations (`[batch, w.k]`, batch <= 16)
    /// quantized per token to int8 (`max |x| / 127`), then `y = (x_q * s_x) w^T (+ bias)` with
    /// exact int32 sums per 32 weights (two launches, on the stream).
    pub fn q4_gemm_w4a8(
        &self,
        w: &DeviceQ4,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        batch: usize,
        scratch: &mut W4a8Scratch,
    ) -> Result<()> {
        self.q4_gemm_w4a8_instance(w, x, bias, y, batch, scratch, ("sqil_q4_mma8_t2_s8", 16, 256))
    }

    /// [`Gpu::q4_gemm_w4a8`] with a chosen instance: (entry point, rows per block, threads).
    #[allow(clippy::too_many_arguments)]
    pub fn q4_gemm_w4a8_instance(
        &self,
        w: &DeviceQ4,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        batch: usize,
        scratch: &mut W4a8Scratch,
        (name, rows_per_block, threads): (&str, u32, u32),
    ) -> Result<()> {
        if self.cc.0 < 8 {
            return Err(format!(
                "q4_gemm_w4a8: int8 mma needs compute capability 8.0, {} has {}.{}",
                self.name, self.cc.0, self.cc.1
            )
            .into());
        }
        if batch == 0 || batch > 16 || scratch.k < w.k || x.len() < batch * w.k || y.len() < batch * w.n {
            return Err(format!("q4_gemm_w4a8: batch {batch} or buffers do not fit [{}, {}]", w.n, w.k).into());
        }
        let (n, k, bt) = (w.n as i32, w.k as i32, batch as i32);
        let quant = self.function("sqil_quant_tokens")?;
        let mut l = self.stream.launch_builder(&quant);
        l.arg(x).arg(&bt).arg(&k).arg(&mut scratch.xq).arg(&mut scratch.xs).arg(&mut scratch.xsum);
        let cfg = LaunchConfig { grid_dim: (16, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: x holds batch * k halves; the scratch holds 16 tokens of k values (checked).
        unsafe { l.launch(cfg) }.map_err(|e| crate::Error::Device(format!("quant launch: {e:?}")))?;
        let f = self.function(name)?;
        let gshift = (w.group / 32).trailing_zeros() as i32;
        let relu = 0i32;
        let null = 0u64;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&w.mma8).arg(&w.scales).arg(&scratch.xq).arg(&scratch.xs).arg(&scratch.xsum);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        l.arg(y).arg(&n).arg(&k).arg(&bt).arg(&gshift).arg(&relu);
        let cfg = LaunchConfig {
            grid_dim: ((w.n as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: parameters as the kernel declares them; accesses bounded by n, k, batch and
        // the 16-token scratch.
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| crate::Error::Device(format!("q4_mma8 launch: {e:?}")))
    }

    /// Uploads int4 weights `q` (`[n, k]`, in [-8, 7]) with f32 scales per `group` (`[n,
    /// ceil(k / group)]`) for [`Gpu::w4a8_gemm`]; group 32, 64, 128, 256 or 512.
    pub fn upload_w4a8(&self, q: &[i8], scales: &[f32], n: usize, k: usize, group: usize) -> Result<DeviceW4a8> {
        if !matches!(group, 32 | 64 | 128 | 256 | 512) {
            return Err(format!("w4a8: group {group} (the GEMM takes 32, 64, 128, 256 or 512)").into());
        }
        if n == 0 || k == 0 {
            return Err(format!("w4a8: an empty layer [{n}, {k}]").into());
        }
        let groups = k.div_ceil(group);
        if q.len() != n * k || scales.len() != n * groups {
            return Err(format!(
                "w4a8: {} weights and {} scales for [{n}, {k}] in groups of {group}",
                q.len(),
                scales.len()
            )
            .into());
        }
        if let Some(v) = q.iter().find(|v| !(-8..=7).contains(*v)) {
            return Err(format!("w4a8: weight {v} outside the int4 range").into());
        }
        let kp = k.div_ceil(GROUP) * GROUP;
        let host = pack_grouped(q, &vec![1.0; n * kp / GROUP], n, k, GROUP);
        let kqg = k.div_ceil(group.max(GROUP)) * group.max(GROUP) / GROUP;
        let wsum: Vec<i32> = (0..n * groups)
            .map(|i| {
                let (r, g) = (i / groups, i % groups);
                q[r * k + g * group..r * k + ((g + 1) * group).min(k)].iter().map(|&v| v as i32).sum()
            })
            .collect();
        let e = |e| crate::Error::Device(format!("{e:?}"));
        Ok(DeviceW4a8 {
            n,
            k,
            group,
            groups,
            kqg,
            words: self.stream.clone_htod(&w4a8_words(&host, kqg)).map_err(e)?,
            scales: self.stream.clone_htod(scales).map_err(e)?,
            wsum: self.stream.clone_htod(&wsum).map_err(e)?,
        })
    }

    /// Scratch for [`Gpu::w4a8_gemm`] on rows of up to `k` terms.
    pub fn w4a8_levels(&self, k: usize) -> Result<W4a8Levels> {
        let e = |e| crate::Error::Device(format!("{e:?}"));
        // Room for k padded to whole groups of up to 512 terms.
        let kp = k.div_ceil(512) * 512;
        Ok(W4a8Levels {
            k: kp,
            frag: self.stream.alloc_zeros::<u32>(kp / 32 * 128).map_err(e)?,
            nanflag: self.stream.alloc_zeros::<i32>(16).map_err(e)?,
            epoch: 0,
            zp: 0,
            half: false,
        })
    }

    /// Shared memory instance `inst` needs for `w`, and whether its warps hold whole groups.
    fn w4a8_needs(w: &DeviceW4a8, inst: &W4a8Instance) -> (usize, bool) {
        let &(_, rows, threads, q, d, _) = inst;
        let (rows, threads) = (rows as usize, threads as usize);
        let spans = w.group <= GROUP || (q * GROUP).is_multiple_of(w.group);
        if q == 0 {
            return (w.groups * rows / 8 * 32 * 16 + 2 * rows * (w.groups + 1) * 4, spans);
        }
        let cg = threads / 32 * q * GROUP / w.group;
        let words = (2 * cg * rows / 8 * 128 + (d + 1) * rows * (cg + 1)).next_multiple_of(4);
        (words * 4 + d * q * rows / 8 * threads * 16, spans)
    }

    /// The instance [`Gpu::w4a8_gemm`] runs for `w` at `batch` unless told: the first of
    /// [`W4A8_INSTANCES`] that fits (shared memory, whole groups per warp), a half one at batches
    /// up to 8 where one fits.
    pub fn w4a8_pick(&self, w: &DeviceW4a8, batch: usize) -> Result<usize> {
        let limit = self.smem_optin()?;
        let first = |half: bool| Self::w4a8_first(w, half, limit);
        (if batch <= 8 { first(true).or_else(|| first(false)) } else { first(false) })
            .ok_or_else(|| format!("w4a8: no instance fits group {}", w.group).into())
    }

    /// The first of [`W4A8_INSTANCES`] (the fastest measured) on the half levels or the full ones
    /// whose shared memory fits `limit` and whose warps hold whole groups of `w`.
    fn w4a8_first(w: &DeviceW4a8, half: bool, limit: usize) -> Option<usize> {
        W4A8_INSTANCES.iter().position(|i| {
            let (smem, spans) = Self::w4a8_needs(w, i);
            i.5 == half && smem <= limit && spans
        })
    }

    fn smem_optin(&self) -> Result<usize> {
        Ok(self
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| crate::Error::Device(format!("{e:?}")))? as usize)
    }

    /// The exact W4A8 layer for `batch` <= 16 rows of f32 inputs (`x` is `[batch, w.k]`, `y`
    /// `[batch, w.n]`) on the int8 tensor cores: the CPU runtime's arithmetic bit for bit (see
    /// `sqil_w4a8_lean_*` and `sqil_w4a8_mma_*` in `kernels/cuda/q4_gemv.cu`). Two launches on
    /// the stream: the levels, then the GEMM (the first of [`W4A8_INSTANCES`] that fits, unless
    /// `instance` names one; on Hopper a programmatic dependent of the first).
    #[allow(clippy::too_many_arguments)]
    pub fn w4a8_gemm(
        &self,
        w: &DeviceW4a8,
        x: &CudaSlice<f32>,
        quant: ActQuant,
        xscale: f32,
        bias: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
        batch: usize,
        scratch: &mut W4a8Levels,
        instance: Option<usize>,
    ) -> Result<()> {
        let i = match instance {
            Some(i) => i,
            None => self.w4a8_pick(w, batch)?,
        };
        let half = W4A8_INSTANCES.get(i).ok_or_else(|| format!("w4a8: no instance {i}"))?.5;
        self.w4a8_levels_into(w, x, quant, batch, scratch, half)?;
        self.w4a8_mma(w, xscale, bias, relu, y, batch, scratch, Some(i))
    }

    /// The first launch of [`Gpu::w4a8_gemm`]: the batch's levels and NaN flags into `scratch`,
    /// in the half layout (`half`, batches up to 8) or the full one.
    pub fn w4a8_levels_into(
        &self,
        w: &DeviceW4a8,
        x: &CudaSlice<f32>,
        quant: ActQuant,
        batch: usize,
        scratch: &mut W4a8Levels,
        half: bool,
    ) -> Result<()> {
        if half && batch > 8 {
            return Err(format!("w4a8: the half levels hold batches up to 8, not {batch}").into());
        }
        if self.cc.0 < 8 {
            return Err(format!(
                "w4a8: int8 mma needs compute capability 8.0, {} has {}.{}",
                self.name, self.cc.0, self.cc.1
            )
            .into());
        }
        if batch == 0 || batch > 16 || scratch.k < w.kqg * GROUP || x.len() < batch * w.k {
            return Err(format!("w4a8: batch {batch} or buffers do not fit [{}, {}]", w.n, w.k).into());
        }
        let integral = |v: f32| v.is_finite() && v.fract() == 0.0;
        if !(quant.scale > 0.0
            && quant.scale.is_finite()
            && integral(quant.lo)
            && integral(quant.hi)
            && integral(quant.zero))
            || quant.hi - quant.lo > 255.0
            || !(quant.lo <= quant.zero && quant.zero <= quant.hi)
        {
            return Err(format!("w4a8: activation quantizer {quant:?} is not an 8-bit range holding its zero").into());
        }
        scratch.zp = (quant.zero - quant.lo) as i32;
        scratch.half = half;
        scratch.epoch = if scratch.epoch == i32::MAX { 1 } else { scratch.epoch + 1 };
        if scratch.epoch == 1 {
            self.stream.memset_zeros(&mut scratch.nanflag).map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        }
        let kp = w.kqg * GROUP;
        let (bt, k, kpi) = (batch as i32, w.k as i32, kp as i32);
        let f = self.function("sqil_w4a8_levels")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(&bt).arg(&k).arg(&kpi).arg(&quant.scale).arg(&quant.zero).arg(&quant.lo).arg(&quant.hi);
        let hi = half as i32;
        l.arg(&scratch.epoch).arg(&mut scratch.frag).arg(&mut scratch.nanflag).arg(&hi);
        let total = (kp / 32 * if half { 64 } else { 128 }) as u32;
        let cfg = LaunchConfig { grid_dim: (total.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: x holds batch * k floats, frag kp / 32 * 128 words, nanflag 16 (checked above).
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| crate::Error::Device(format!("w4a8 levels launch: {e:?}")))
    }

    /// The second launch of [`Gpu::w4a8_gemm`], on the levels `scratch` holds (from
    /// [`Gpu::w4a8_levels_into`] with the same batch).
    #[allow(clippy::too_many_arguments)]
    pub fn w4a8_mma(
        &self,
        w: &DeviceW4a8,
        xscale: f32,
        bias: Option<&CudaSlice<f32>>,
        relu: bool,
        y: &mut CudaSlice<f32>,
        batch: usize,
        scratch: &W4a8Levels,
        instance: Option<usize>,
    ) -> Result<()> {
        let limit = self.smem_optin()?;
        let i = match instance {
            Some(i) => i,
            // The first that fits and reads the levels' layout.
            None => Self::w4a8_first(w, scratch.half, limit)
                .ok_or_else(|| format!("w4a8: no instance fits group {}", w.group))?,
        };
        let inst = W4A8_INSTANCES.get(i).ok_or_else(|| format!("w4a8: no instance {i}"))?;
        let (name, rows, threads, q, _, half) = *inst;
        let (smem, spans) = Self::w4a8_needs(w, inst);
        if smem > limit {
            return Err(format!(
                "w4a8: {name} needs {smem} bytes of shared memory for group {}, the device has {limit}",
                w.group
            )
            .into());
        }
        if half != scratch.half || (half && batch > 8) {
            return Err(format!(
                "w4a8: {name} reads the {} levels; the scratch holds the {} ones for batch {batch}",
                if half { "half" } else { "full" },
                if scratch.half { "half" } else { "full" }
            )
            .into());
        }
        if batch == 0
            || batch > 16
            || scratch.k < w.kqg * GROUP
            || y.len() < batch * w.n
            || bias.is_some_and(|b| b.len() < w.n)
        {
            return Err(format!("w4a8: batch {batch} or buffers do not fit [{}, {}]", w.n, w.k).into());
        }
        if !spans {
            return Err(
                format!("w4a8: group {} spans more than one warp's {} terms in {name}", w.group, q * GROUP).into()
            );
        }
        let f = self.function(name)?;
        if smem > 48 << 10 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| crate::Error::Device(format!("w4a8: {smem} bytes of shared memory: {e:?}")))?;
        }
        let kq = w.kqg as i32;
        let (n, gshift, groups, bt) =
            (w.n as i32, (w.group / 32).trailing_zeros() as i32, w.groups as i32, batch as i32);
        let relu = relu as i32;
        let dev = |s: &CudaSlice<u32>| s.device_ptr(&self.stream).0;
        let (wm, sc, ws) = (dev(&w.words), w.scales.device_ptr(&self.stream).0, w.wsum.device_ptr(&self.stream).0);
        let (fr, nf) = (dev(&scratch.frag), scratch.nanflag.device_ptr(&self.stream).0);
        let bp = bias.map(|b| b.device_ptr(&self.stream).0).unwrap_or(0);
        let yp = y.device_ptr_mut(&self.stream).0;
        // The parameters in the kernels' order (`wsum` only in the lean kernels').
        let mut params = vec![param(&wm), param(&sc)];
        if q == 0 {
            params.push(param(&ws));
        }
        params.extend([param(&fr), param(&nf), param(&bp), param(&yp)]);
        params.extend([param(&n), param(&kq), param(&gshift), param(&groups), param(&bt), param(&scratch.zp)]);
        params.extend([param(&xscale), param(&relu), param(&scratch.epoch)]);
        // On Hopper the lean kernels start as programmatic dependents of the levels kernel: they
        // load their weights and scales, then wait (griddepcontrol.wait) before reading the levels.
        let mut attrs = vec![];
        if q == 0 && self.cc.0 >= 9 {
            // SAFETY: all-zero is a valid launch attribute; its id and value are set next.
            let mut attr: cudarc::driver::sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = cudarc::driver::sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            attrs.push(attr);
        }
        let grid = (w.n as u32).div_ceil(rows);
        // SAFETY: the parameters point at values of the types the kernel declares, in its order,
        // alive through the call; buffers checked above, every access bounded by n, kqg and
        // groups, the shared memory sized for the instance.
        unsafe { launch_ex(&self.stream, f.cu_function(), (grid, threads, smem as u32), &mut attrs, &mut params) }
            .map_err(|e| crate::Error::Device(format!("w4a8 launch ({name}): {e:?}")))
    }

    /// [`Gpu::q4_gemv`] on `stream`, with an optional fused ReLU.
    #[allow(clippy::too_many_arguments)]
    pub fn q4_gemv_on(
        &self,
        stream: &Arc<CudaStream>,
        w: &DeviceQ4,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        batch: usize,
        relu: bool,
    ) -> Result<()> {
        let b = *BATCHES
            .iter()
            .find(|&&b| b >= batch)
            .ok_or_else(|| format!("q4_gemv: batch {batch} > {}", BATCHES[BATCHES.len() - 1]))?;
        // Measured on an H200 (docs/cuda.md, `sqil-cuda-bench explore`): batches 5-16 on the
        // tensor cores (compute capability 8.0 and up); rows of at least 4096 weights run
        // split-K over the four warps of a block, four rows per block (two when k > 4096),
        // batches up to 4; shorter rows, batches 2 to 4: four rows per warp with x in
        // registers; otherwise one row per warp.
        let instance = if b > 4 && self.cc.0 >= 8 {
            // Tensor cores: 16 rows per block of eight warps, next weights prefetched.
            ("sqil_q4_mma_t2_s8_p".to_string(), 16, 256)
        } else if w.k >= 4096 && b <= 4 {
            let r = if w.k <= 4096 || b > 1 { 4 } else { 2 };
            (format!("sqil_q4_gemv_s4_r{r}_b{b}"), r as u32, 128)
        } else if (2..=4).contains(&b) {
            (format!("sqil_q4_gemv_r4_b{b}"), 16, 128)
        } else {
            (format!("sqil_q4_gemv_b{b}"), 4, 128)
        };
        self.q4_gemv_instance(stream, w, x, bias, y, batch, relu, (&instance.0, instance.1, instance.2))
    }

    /// Launches GEMV instance `name` (any `sqil_q4_gemv_*` or `sqil_q4_mma_*` entry point:
    /// those take the tensor-core layout) with `rows_per_block` rows per block of `threads`
    /// threads; `batch` must not exceed the instance's.
    #[allow(clippy::too_many_arguments)]
    pub fn q4_gemv_instance(
        &self,
        stream: &Arc<CudaStream>,
        w: &DeviceQ4,
        x: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        batch: usize,
        relu: bool,
        (name, rows_per_block, threads): (&str, u32, u32),
    ) -> Result<()> {
        if batch == 0 || batch > 16 || x.len() < batch * w.k || y.len() < batch * w.n {
            return Err(format!("q4_gemv: batch {batch} or buffers do not fit [{}, {}]", w.n, w.k).into());
        }
        let f = self.function(name)?;
        let (n, k, bt) = (w.n as i32, w.k as i32, batch as i32);
        let gshift = (w.group / 32).trailing_zeros() as i32;
        let relu = relu as i32;
        let cfg = LaunchConfig {
            grid_dim: ((w.n as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;
        let mut l = stream.launch_builder(&f);
        l.arg(if name.starts_with("sqil_q4_mma_") { &w.mma } else { &w.words }).arg(&w.scales).arg(x);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        l.arg(y).arg(&n).arg(&k).arg(&bt).arg(&gshift).arg(&relu);
        // SAFETY: the kernel's parameters match (pointers, then five ints); buffer sizes are
        // checked above and every access is bounded by n, k and batch.
        unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| crate::Error::Device(format!("q4_gemv launch: {e:?}")))
    }
}
