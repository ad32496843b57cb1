//! A lowered GPU policy ([`crate::lower::Lowered`]) on a device: every buffer allocated once,
//! the observation and the action in page-locked host memory, and per action one of three
//! paths, each computing the same bits:
//! - [`Mode::Persistent`]: the whole step list as one persistent kernel ([`crate::fused`]),
//!   launched once, that takes each observation from host memory when the host raises a sequence
//!   number and answers with the action: nothing launched per action;
//! - [`Mode::Graph`]: the copies and the steps captured once in a CUDA graph, replayed;
//! - [`Mode::Steps`]: a copy in, one launch per step, a copy out.
//!
//! [`GpuPolicy::capture`] captures the graph, times the graph and the persistent program on the
//! policy and keeps the faster. Needs the `driver` feature (cudarc).
//!
//! Several policies on one GPU: a running persistent program holds its blocks' share of the
//! device until it is stopped, and a launch that needs more than the rest would wait behind it
//! for as long as it runs. The policies of one process share the device through an arbiter:
//! running programs may together hold at most [`program_share_limit`] of the device's resident
//! blocks (half by default); a program that would go over it stops the others (oldest first),
//! and another policy's launches (its graph, its steps, its upload) stop every program of the
//! device while they hold more than the limit; dropping a policy stops every program of its device
//! (freeing page-locked memory synchronizes the device). A policy whose program was stopped so
//! takes its graph (or its steps) from its next action on; [`GpuPolicy::set_mode`] to
//! [`Mode::Persistent`] takes the program back.

use crate::error::Result;
use crate::lower::{lower, HostArr, KArg, LStep};
use crate::Gpu;
use cudarc::driver::{
    sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use sqil_runtime::Policy;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

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

impl DevArr {
    fn ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            DevArr::F32(d) => d.device_ptr(stream).0,
            DevArr::I32(d) => d.device_ptr(stream).0,
            DevArr::U32(d) => d.device_ptr(stream).0,
        }
    }
}

type GStep = LStep<DevArr>;

/// How [`GpuPolicy::act`] runs the policy (every path computes the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A copy in, one launch per step, a copy out.
    Steps,
    /// The captured CUDA graph (copies included).
    Graph,
    /// The persistent program: running, answering each observation put in host memory.
    Persistent,
}

/// What stops a running persistent program: its control word and stream, shared by its policy
/// and the device arbiter (which stops it for another policy's launch).
struct Stopper {
    /// The program's control word (in its policy's `Persist::ctl`, which outlives every use:
    /// the policy takes its entry out of the arbiter before it is dropped).
    ctl: *mut u32,
    stream: Arc<CudaStream>,
    running: AtomicBool,
    /// Set when the arbiter stopped the program for another policy.
    preempted: AtomicBool,
    /// Set when the program would not stop: the stream is unusable.
    failed: Mutex<Option<String>>,
}

// SAFETY: `ctl` is a word of page-locked host memory written only with atomic stores; the stream
// is Send and Sync.
unsafe impl Send for Stopper {}
// SAFETY: as above.
unsafe impl Sync for Stopper {}

impl Stopper {
    /// Why the program would not stop, if it would not.
    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends STOP and waits (at most `ANSWER_LIMIT`) for the program to exit.
    fn stop(&self) -> std::result::Result<(), String> {
        if !self.running.swap(false, AcqRel) {
            return Ok(());
        }
        // SAFETY: the program's control word (see `ctl`), polled by the program.
        unsafe { AtomicU32::from_ptr(self.ctl) }.store(crate::fused::STOP, Release);
        // Wait for the program to exit, but not forever: a program that cannot exit (its blocks
        // never all resident, a fault) leaves the stream busy, and the policy says so from then on.
        let t0 = std::time::Instant::now();
        loop {
            // SAFETY: a query of the program's stream.
            let q = unsafe { sys::cuStreamQuery(self.stream.cu_stream()) };
            match q {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY if t0.elapsed() < ANSWER_LIMIT => std::thread::yield_now(),
                q => {
                    let why = format!("the persistent program did not stop ({q:?}); the policy's stream is unusable");
                    *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                    return Err(why);
                }
            }
        }
    }
}

/// A running persistent program as the arbiter sees it.
struct Held {
    dev: usize,
    policy: u64,
    /// Its blocks over the blocks of it the device holds at once.
    share: f64,
    stop: Arc<Stopper>,
}

/// The running persistent programs of this process, oldest first.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());
/// How many there are (read without the lock by launches when none runs).
static HELD_COUNT: AtomicUsize = AtomicUsize::new(0);
/// [`program_share_limit`], as f64 bits (0.5).
static SHARE_LIMIT: AtomicU64 = AtomicU64::new(0x3fe0_0000_0000_0000);
/// The next policy's id.
static NEXT_POLICY: AtomicU64 = AtomicU64::new(1);

/// The share of a device's resident blocks the running persistent programs of this process may
/// hold together (each program's share: its blocks over how many of them the device holds at
/// once); the rest is left to other launches.
pub fn program_share_limit() -> f64 {
    f64::from_bits(SHARE_LIMIT.load(Relaxed))
}

/// Sets [`program_share_limit`] (clamped to `[0, 1]`; 0: a program runs only while no other
/// policy of the process launches on its device). Programs already running keep running until
/// the next launch or program start on their device applies the new limit.
pub fn set_program_share_limit(share: f64) {
    let s = if share.is_nan() { 0.0 } else { share.clamp(0.0, 1.0) };
    SHARE_LIMIT.store(s.to_bits(), Relaxed);
}

/// Makes room on device `dev` for policy `me`: stops other policies' programs there, oldest
/// first, until those left plus `need` (the share of the program `me` is about to start; 0 for
/// a plain launch) fit [`program_share_limit`].
fn make_room(dev: usize, me: u64, need: f64) -> Result<()> {
    if need == 0.0 && HELD_COUNT.load(Acquire) == 0 {
        return Ok(());
    }
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let limit = program_share_limit();
    loop {
        let others: f64 = held.iter().filter(|h| h.dev == dev && h.policy != me).map(|h| h.share).sum();
        if others + need <= limit {
            return Ok(());
        }
        let Some(i) = held.iter().position(|h| h.dev == dev && h.policy != me) else { return Ok(()) };
        let h = held.remove(i);
        HELD_COUNT.fetch_sub(1, AcqRel);
        h.stop.preempted.store(true, Release);
        h.stop.stop().map_err(|why| format!("stopping another policy's persistent program for this one: {why}"))?;
    }
}

/// Stops every persistent program of this process on `gpu`'s device (their policies take their
/// graphs from their next action): for other work on the device that could wait behind them
/// (training, a benchmark, freeing page-locked memory, which synchronizes the device).
pub fn stop_programs(gpu: &Gpu) -> Result<()> {
    make_room(gpu.ctx.ordinal(), 0, f64::INFINITY)
}

/// Takes policy `me`'s entry (if any) out of the arbiter.
fn release(me: u64) {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let before = held.len();
    held.retain(|h| h.policy != me);
    HELD_COUNT.fetch_sub(before - held.len(), AcqRel);
}

/// The persistent program on the device: its kernel, pointers, barrier words, grid, and
/// whether it is running (with the last sequence number given).
struct Persist {
    f: CudaFunction,
    /// The observation and the action in host memory, one 64-bit word per value: the sequence
    /// number above the value's bits.
    obs: Mapped<u64>,
    act: Mapped<u64>,
    /// The host's control word in host memory: the last sequence number given (read by the
    /// program for big observations) or STOP.
    ctl: Mapped<u32>,
    /// The program's pointers (`fused::Fused::slots`), its first parameter by value.
    ptrs: Vec<u64>,
    bar: CudaSlice<u64>,
    /// Blocks when the barrier is the grid barrier (at most as many as the multiprocessors hold
    /// at once).
    grid: u32,
    /// Blocks when the grid is one thread-block cluster (compute capability 9.0 and up: at most
    /// 16), with the hardware's cluster barrier.
    cluster_grid: Option<u32>,
    /// Whether the program runs as one cluster.
    cluster: bool,
    /// At most this many blocks (fewer blocks: cheaper barriers, more of each step's blocks per
    /// program block; see [`GpuPolicy::set_persistent_blocks`]).
    cap: Option<u32>,
    /// Blocks of the program the device holds at once (a grid's share of the device is its
    /// blocks over this).
    resident: u32,
    stop: Arc<Stopper>,
    seq: u32,
}

impl Persist {
    fn running(&self) -> bool {
        self.stop.running.load(Acquire)
    }

    /// The blocks the program is launched with.
    fn blocks(&self) -> u32 {
        let most = if self.cluster { self.cluster_grid.unwrap_or(self.grid) } else { self.grid };
        self.cap.map_or(most, |c| c.clamp(1, most))
    }
}

/// The largest thread-block cluster a program runs as (Hopper's non-portable maximum).
const MAX_CLUSTER: usize = 16;

/// How long [`GpuPolicy::act`] waits for the persistent program's answer before it checks the
/// program is still running, and how long before it gives up.
const ANSWER_CHECK: std::time::Duration = std::time::Duration::from_millis(100);
const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Page-locked host memory the device reads and writes directly, with its host and device
/// addresses (taken once: `PinnedHostSlice`'s accessors synchronise an event, which a stream
/// capture forbids).
struct Mapped<T> {
    _host: PinnedHostSlice<T>,
    ptr: *mut T,
    len: usize,
    dev: u64,
}

// SAFETY: `ptr` points into `_host`'s allocation (which is Send); moving the pair moves no memory.
unsafe impl<T> Send for Mapped<T> {}

impl<T> Mapped<T> {
    fn slice(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` floats, initialised in `new`, owned by `_host`; the device
        // writes them only inside `act`, which synchronises the stream before reading.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn slice_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `slice`; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy> Mapped<T> {
    /// `len` zeroed values of page-locked, device-mapped host memory (cached: the host reads
    /// and writes it; the device reads it uncached and fences its writes).
    fn new(gpu: &Gpu, len: usize) -> Result<Mapped<T>> {
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: zeroed below before any read.
        let mut host = unsafe { gpu.ctx.alloc_pinned_with_flags::<T>(len.max(1), flags) }.map_err(err)?;
        // SAFETY: all-zero bits are a valid T (ValidAsZeroBits).
        host.as_mut_slice().map_err(err)?.fill(unsafe { std::mem::zeroed() });
        let ptr = host.as_mut_ptr().map_err(err)?;
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `host` was allocated by cuMemHostAlloc with DEVICEMAP in this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr as *mut _, 0).result().map_err(err)? };
        Ok(Mapped { _host: host, ptr, len: len.max(1), dev })
    }
}

pub struct GpuPolicy {
    /// This policy's id and device (for the arbiter).
    id: u64,
    dev: usize,
    stream: Arc<CudaStream>,
    steps: Vec<GStep>,
    bufs: Vec<CudaSlice<f32>>,
    /// The observations, fp32, concatenated, on the device.
    input: CudaSlice<f32>,
    in_len: usize,
    output: usize,
    out_len: usize,
    /// The observation and the action in host memory (the copies' ends).
    obs: Mapped<f32>,
    act: Mapped<f32>,
    graph: Option<CudaGraph>,
    persist: Option<Persist>,
    /// Why the policy has no persistent program (when it has none).
    pub persist_why_not: Option<String>,
    /// Set when a persistent program would not answer or stop: every later call fails with it.
    broken: Option<String>,
    mode: Mode,
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
        Self::from_lowered(gpu, lower(policy)?)
    }

    /// Uploads a lowered policy.
    pub fn from_lowered(gpu: &Gpu, l: Lowered) -> Result<GpuPolicy> {
        let fusion = crate::fused::fuse(&l);
        let (id, dev) = (NEXT_POLICY.fetch_add(1, Relaxed), gpu.ctx.ordinal());
        // The uploads below (their memsets among them) would wait behind a program holding the device.
        make_room(dev, id, 0.0)?;
        // Layers with a generated epilogue (`lower::base_kernel`) instantiate policy_ops.cu's
        // templates: compiled together after it, as one module; the chains each on their own.
        let (epis, chains): (Vec<_>, Vec<_>) =
            l.sources.iter().partition(|(name, _)| crate::lower::base_kernel(name) != name.as_str());
        for (name, src) in chains {
            gpu.load_source(name, src)?;
        }
        if let Some((first, _)) = epis.iter().find(|(name, _)| gpu.function(name).is_err()) {
            let all: String = epis.iter().map(|(_, src)| src.as_str()).collect();
            gpu.load_full_source(first, &crate::generated_source(first, &all))?;
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
        let (persist, persist_why_not) = match fusion {
            Ok(f) => {
                gpu.load_full_source(&f.name, &f.src)?;
                let ptrs: Vec<u64> = f
                    .slots
                    .iter()
                    .map(|s| match s {
                        crate::fused::Slot::Buf(b) => bufs[*b].device_ptr(&stream).0,
                        crate::fused::Slot::In => input.device_ptr(&stream).0,
                        crate::fused::Slot::Arr { step, arg } => match &steps[*step] {
                            LStep::Kernel { args, .. } => match &args[*arg] {
                                KArg::Arr(a) => a.ptr(&stream),
                                _ => unreachable!("fuse() makes array slots of array arguments only"),
                            },
                        },
                    })
                    .collect();
                let sms = gpu
                    .ctx
                    .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .map_err(err)?;
                let coop =
                    gpu.ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH).map_err(err)?;
                let func = gpu.function(&f.name)?;
                // Blocks of the program one multiprocessor holds at once (a cooperative launch
                // takes at most that many per multiprocessor).
                let mut per_sm: std::ffi::c_int = 0;
                // SAFETY: an occupancy query of a loaded function.
                unsafe {
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        &mut per_sm,
                        func.cu_function(),
                        crate::fused::STEP_BLOCK as std::ffi::c_int,
                        0,
                    )
                    .result()
                    .map_err(err)?
                };
                if coop == 0 || per_sm < 1 {
                    (
                        None,
                        Some(format!("no cooperative launch (supported: {coop}, blocks per multiprocessor: {per_sm})")),
                    )
                } else {
                    let ctl = Mapped::new(gpu, 1)?;
                    let stop = Arc::new(Stopper {
                        ctl: ctl.ptr,
                        stream: stream.clone(),
                        running: AtomicBool::new(false),
                        preempted: AtomicBool::new(false),
                        failed: Mutex::new(None),
                    });
                    let p = Persist {
                        f: func,
                        obs: Mapped::new(gpu, l.in_len)?,
                        act: Mapped::new(gpu, l.out_len)?,
                        ctl,
                        ptrs,
                        bar: stream.alloc_zeros::<u64>(2).map_err(err)?,
                        grid: f.max_blocks.min((sms.max(1) * per_sm) as usize) as u32,
                        cluster_grid: (gpu.cc.0 >= 9).then(|| f.max_blocks.min(MAX_CLUSTER) as u32),
                        cluster: gpu.cc.0 >= 9 && f.max_blocks <= MAX_CLUSTER,
                        cap: None,
                        resident: (sms.max(1) * per_sm) as u32,
                        stop,
                        seq: 0,
                    };
                    (Some(p), None)
                }
            }
            Err(why) => (None, Some(why)),
        };
        Ok(GpuPolicy {
            id,
            dev,
            obs: Mapped::new(gpu, l.in_len)?,
            act: Mapped::new(gpu, l.out_len)?,
            stream,
            steps,
            bufs,
            input,
            in_len: l.in_len,
            output: l.output,
            out_len: l.out_len,
            graph: None,
            persist,
            persist_why_not,
            broken: None,
            mode: Mode::Steps,
            describe: l.describe,
            labels: l.labels,
        })
    }

    /// The path [`GpuPolicy::act`] takes.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the policy has a persistent program.
    pub fn has_persistent(&self) -> bool {
        self.persist.is_some()
    }

    /// Chooses the path [`GpuPolicy::act`] takes (an error when the policy has no persistent
    /// program, or no graph before [`GpuPolicy::capture`]). Leaving [`Mode::Persistent`] stops
    /// the program; entering it starts the program.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(why.clone().into());
        }
        match mode {
            Mode::Persistent if self.persist.is_none() => {
                return Err(format!("no persistent program: {}", self.persist_why_not.as_deref().unwrap_or("")).into())
            }
            Mode::Graph if self.graph.is_none() => return Err("no captured graph (call capture first)".into()),
            _ => {}
        }
        if mode == Mode::Persistent {
            self.start_persistent()?;
        } else {
            self.stop_persistent()?;
        }
        self.mode = mode;
        Ok(())
    }

    /// Whether the persistent program runs as one thread-block cluster with the hardware's
    /// barrier (else over the grid barrier); a running program is restarted in the new form.
    pub fn set_persistent_cluster(&mut self, cluster: bool) -> Result<()> {
        let Some(p) = self.persist.as_mut() else { return Err("no persistent program".into()) };
        if cluster && p.cluster_grid.is_none() {
            return Err("thread-block clusters need compute capability 9.0".into());
        }
        if p.cluster == cluster {
            return Ok(());
        }
        self.reform(|p| p.cluster = cluster)
    }

    /// Caps the persistent program's blocks, over the grid barrier or as one cluster (`None`: as
    /// many as its largest step launches, or the device holds, or a cluster holds); a running
    /// program is restarted. Any number of blocks computes the same bits (block `b` of a step runs
    /// on program block `b % grid`); fewer make each barrier cheaper (one block needs only its
    /// own) and run more of a step's blocks one after another, which measured slower on every
    /// policy tried (`docs/cuda.md`), so [`GpuPolicy::capture`] does not try caps.
    pub fn set_persistent_blocks(&mut self, cap: Option<u32>) -> Result<()> {
        let Some(p) = self.persist.as_mut() else { return Err("no persistent program".into()) };
        if p.cap == cap {
            return Ok(());
        }
        self.reform(|p| p.cap = cap)
    }

    /// Changes the persistent program's form with `change`: stopped first and started again
    /// after where it was running.
    fn reform(&mut self, change: impl FnOnce(&mut Persist)) -> Result<()> {
        let running = self.persist.as_ref().is_some_and(Persist::running);
        self.stop_persistent()?;
        change(self.persist.as_mut().ok_or("no persistent program")?);
        if running {
            self.start_persistent()?;
        }
        Ok(())
    }

    /// The persistent program's blocks and whether they form one cluster.
    pub fn persistent_grid(&self) -> Option<(u32, bool)> {
        self.persist.as_ref().map(|p| (p.blocks(), p.cluster))
    }

    /// Launches the persistent program (cooperatively: every block resident) with its control
    /// words and barrier zeroed, after making room for it on the device (see the module's notes).
    fn start_persistent(&mut self) -> Result<()> {
        let p = self.persist.as_mut().ok_or("no persistent program")?;
        if p.running() {
            return Ok(());
        }
        if let Some(why) = p.stop.failure() {
            self.broken = Some(why.clone());
            return Err(why.into());
        }
        let blocks = p.blocks();
        let share = blocks as f64 / p.resident.max(1) as f64;
        make_room(self.dev, self.id, share)?;
        p.stop.preempted.store(false, Relaxed);
        self.stream.memset_zeros(&mut p.bar).map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        // The program is not running: nothing else touches these words.
        p.ctl.slice_mut().fill(0);
        p.obs.slice_mut().fill(0);
        p.act.slice_mut().fill(0);
        p.seq = 0;
        let (ctl, obs, act, bar) = (p.ctl.dev, p.obs.dev, p.act.dev, p.bar.device_ptr(&self.stream).0);
        let cluster = p.cluster as u32;
        let f = p.f.cu_function();
        // SAFETY: all-zero is a valid launch attribute; its id and value are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        if p.cluster {
            p.cluster_grid.ok_or("no cluster form on this device")?;
            // SAFETY: a plain attribute of this function (clusters over 8 blocks are allowed on
            // Hopper as non-portable sizes).
            unsafe {
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    (blocks > 8) as i32,
                )
                .result()
                .map_err(err)?
            };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x: blocks, y: 1, z: 1 };
        } else {
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attr.value.cooperative = 1;
        }
        use crate::gpu::param;
        // The pointers' struct: its bytes are the vector's (the launch copies them).
        let mut params = [
            p.ptrs.as_ptr() as *mut std::ffi::c_void,
            param(&ctl),
            param(&obs),
            param(&act),
            param(&bar),
            param(&cluster),
        ];
        let form = if p.cluster { "one cluster of" } else { "a cooperative grid of" };
        // SAFETY: the program's six parameters, in order, of the types it declares (the first a
        // struct of `ptrs.len()` words, every one a live allocation of the size the program was
        // generated for); one cluster is scheduled whole and a cooperative launch makes every
        // block resident, which the program's barrier needs.
        unsafe {
            crate::gpu::launch_ex(
                &self.stream,
                f,
                (blocks, crate::fused::STEP_BLOCK as u32, 0),
                &mut [attr],
                &mut params,
            )
        }
        .map_err(|e| crate::Error::Device(format!("persistent program ({form} {blocks} blocks): {e:?}")))?;
        p.stop.running.store(true, Release);
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.push(Held { dev: self.dev, policy: self.id, share, stop: p.stop.clone() });
        HELD_COUNT.fetch_add(1, AcqRel);
        Ok(())
    }

    /// Stops the persistent program (if running) and waits for it to exit.
    fn stop_persistent(&mut self) -> Result<()> {
        let Some(p) = self.persist.as_mut() else { return Ok(()) };
        release(self.id);
        if let Err(why) = p.stop.stop() {
            self.broken = Some(why.clone());
            return Err(why.into());
        }
        Ok(())
    }

    /// Whether the arbiter stopped this policy's program for another policy's launch.
    fn preempted(&self) -> bool {
        self.persist.as_ref().is_some_and(|p| p.stop.preempted.load(Acquire))
    }

    /// After a preemption: the graph (or the steps) from now on.
    fn leave_preempted(&mut self) -> Result<()> {
        if let Some(why) = self.persist.as_ref().and_then(|p| p.stop.failure()) {
            self.broken = Some(why.clone());
            return Err(why.into());
        }
        self.mode = if self.graph.is_some() { Mode::Graph } else { Mode::Steps };
        Ok(())
    }

    /// One action through the running persistent program: the observation (in `self.obs`) is
    /// written tagged with the next sequence number, and the action is back when every word of
    /// it carries that number (left in `self.act`).
    fn run_persistent(&mut self) -> Result<()> {
        if self.persist.as_ref().is_some_and(|p| p.seq >= crate::fused::STOP - 1) {
            // The sequence would reach STOP: start afresh.
            self.stop_persistent()?;
            self.start_persistent()?;
        }
        let p = self.persist.as_mut().ok_or("no persistent program")?;
        if !p.running() {
            return Err("the persistent program is not running".into());
        }
        p.seq += 1;
        let seq = p.seq;
        let tag = (seq as u64) << 32;
        for (i, w) in p.obs.slice_mut().iter_mut().enumerate() {
            let v = self.obs.slice().get(i).copied().unwrap_or(0.0);
            // SAFETY: an aligned word of mapped host memory the device reads whole (an atomic
            // store, so it never sees half of it).
            unsafe { std::sync::atomic::AtomicU64::from_ptr(w) }.store(tag | v.to_bits() as u64, Relaxed);
        }
        // SAFETY: the host's control word (read by the program for big observations and STOP).
        unsafe { AtomicU32::from_ptr(p.ctl.ptr) }.store(seq, Release);
        let answer = p.act.ptr;
        let n = p.act.len;
        let done = || {
            // SAFETY: aligned words of mapped host memory the device writes whole.
            (0..n).all(|i| {
                unsafe { std::sync::atomic::AtomicU64::from_ptr(answer.add(i)) }.load(Relaxed) >> 32 == seq as u64
            })
        };
        let t0 = std::time::Instant::now();
        let mut spins = 0u32;
        while !done() {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && p.stop.preempted.load(Acquire) {
                // Another thread's launch stopped the program (it may have left before answering).
                return Err("the persistent program was stopped for another policy".into());
            }
            if spins.is_multiple_of(4096) && t0.elapsed() > ANSWER_CHECK {
                // A program that faulted or exited never answers: say so instead of spinning.
                // SAFETY: a query of this policy's stream.
                let q = unsafe { sys::cuStreamQuery(self.stream.cu_stream()) };
                if q != sys::CUresult::CUDA_ERROR_NOT_READY {
                    p.stop.running.store(false, Release);
                    release(self.id);
                    return Err(format!("the persistent program stopped without answering ({q:?})").into());
                }
                if t0.elapsed() > ANSWER_LIMIT {
                    let why = format!("the persistent program did not answer in {ANSWER_LIMIT:?}");
                    self.broken = Some(why.clone());
                    return Err(why.into());
                }
            }
        }
        std::sync::atomic::fence(Acquire);
        let out_len = self.out_len;
        for (o, w) in self.act.slice_mut().iter_mut().zip(p.act.slice()).take(out_len) {
            *o = f32::from_bits(*w as u32);
        }
        Ok(())
    }

    /// Copies the observation (in host memory) to the device input, on the stream.
    fn copy_in(&self) -> Result<()> {
        if self.in_len == 0 {
            return Ok(());
        }
        // SAFETY: both ends hold at least in_len floats and live as long as the policy; the host
        // end is page-locked, so the copy is asynchronous (and can be captured).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                self.input.device_ptr(&self.stream).0,
                self.obs.ptr as *const _,
                4 * self.in_len,
                self.stream.cu_stream(),
            )
            .result()
            .map_err(err)?
        };
        Ok(())
    }

    /// Copies the output buffer's first out_len values to the action in host memory.
    fn copy_out(&self) -> Result<()> {
        if self.out_len == 0 {
            return Ok(());
        }
        // SAFETY: as in copy_in; the output buffer holds at least out_len floats.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                self.act.ptr as *mut _,
                self.bufs[self.output].device_ptr(&self.stream).0,
                4 * self.out_len,
                self.stream.cu_stream(),
            )
            .result()
            .map_err(err)?
        };
        Ok(())
    }

    /// Launches every step on the policy's stream (no copies).
    fn launch(&mut self, gpu: &Gpu) -> Result<()> {
        self.launch_steps(gpu, 0..self.steps.len())
    }

    /// Per lowered step, its label and its median time in microseconds over `iters` eager runs
    /// on `obs` (CUDA events around each step's launch).
    pub fn profile(&mut self, gpu: &Gpu, obs: &[f32], iters: usize) -> Result<Vec<(String, f64)>> {
        // Steps launched on the stream would wait behind a running persistent program.
        let mode = self.mode;
        self.set_mode(Mode::Steps)?;
        let r = self.profile_steps(gpu, obs, iters);
        self.set_mode(mode)?;
        r
    }

    fn profile_steps(&mut self, gpu: &Gpu, obs: &[f32], iters: usize) -> Result<Vec<(String, f64)>> {
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
        make_room(self.dev, self.id, 0.0)?;
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
                            KArg::Arr(a) => V::P(a.ptr(&self.stream)),
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

    /// Captures the copies and the step list in a CUDA graph (once), then times the graph and
    /// the persistent program (when there is one) on the observation now in place and keeps the
    /// faster for [`GpuPolicy::act`] (both compute the same bits).
    pub fn capture(&mut self, gpu: &Gpu) -> Result<()> {
        self.set_mode(Mode::Steps)?;
        // Kernels load (and warm up) outside the capture.
        self.launch(gpu)?;
        self.stream.synchronize().map_err(err)?;
        // SAFETY: this context's buffers are all used from this one stream.
        unsafe { gpu.ctx.disable_event_tracking() };
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(err)?;
        let r = self.copy_in().and_then(|_| self.launch(gpu)).and_then(|_| self.copy_out());
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .map_err(err)?;
        r?;
        self.graph = Some(g.ok_or("empty CUDA graph")?);
        self.set_mode(Mode::Graph)?;
        if let Some(p) = self.persist.as_ref() {
            // The program's forms: over the grid barrier with every block, and as one cluster
            // where the device has clusters. (Capped at 1 to 8 blocks, over either barrier, every
            // testdata MLP, bc_hopper, the transformer and the CNN were slower than uncapped on an
            // H200, 2026-12-06: the cheaper barrier never paid for running a step's blocks in
            // turn; `set_persistent_blocks` and `sqil-cuda-bench policy` keep them measurable.)
            let clusters = p.cluster_grid.is_some();
            self.set_persistent_blocks(None)?;
            // (time, mode, cluster): the graph first.
            let mut best = (self.time_runs(gpu, 30)?, Mode::Graph, false);
            for cluster in [false, true].into_iter().filter(|&c| !c || clusters) {
                self.set_mode(Mode::Graph)?;
                self.set_persistent_cluster(cluster)?;
                // A device that refuses the launch leaves the other forms.
                if self.set_mode(Mode::Persistent).is_err() {
                    continue;
                }
                // A form far slower than the best on a few runs is not timed further.
                let t = self.time_runs(gpu, 3)?;
                let t = if t < 1.5 * best.0 { self.time_runs(gpu, 30)? } else { t };
                if t < best.0 {
                    best = (t, Mode::Persistent, cluster);
                }
            }
            self.set_mode(Mode::Graph)?;
            self.set_persistent_cluster(best.2)?;
            self.set_mode(best.1)?;
        }
        Ok(())
    }

    /// The median seconds of `n` runs of the current path on the observation in place (after
    /// five unmeasured).
    pub fn time_runs(&mut self, gpu: &Gpu, n: usize) -> Result<f64> {
        let mut t = vec![];
        for i in 0..n + 5 {
            let t0 = std::time::Instant::now();
            self.run_current(gpu)?;
            if i >= 5 {
                t.push(t0.elapsed().as_secs_f64());
            }
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    /// Runs the current path on the observation in host memory, leaving the action there.
    fn run_current(&mut self, gpu: &Gpu) -> Result<()> {
        if self.mode == Mode::Persistent && self.preempted() {
            self.leave_preempted()?;
        }
        match self.mode {
            Mode::Persistent => {
                let r = self.run_persistent();
                if r.is_err() && self.preempted() {
                    // Stopped by another thread's launch while this action was in flight: again
                    // by the graph.
                    self.leave_preempted()?;
                    return self.run_current(gpu);
                }
                return r;
            }
            Mode::Graph => {
                make_room(self.dev, self.id, 0.0)?;
                self.graph.as_ref().ok_or("no captured graph")?.launch().map_err(err)?
            }
            Mode::Steps => {
                self.copy_in()?;
                self.launch(gpu)?;
                self.copy_out()?;
            }
        }
        self.stream.synchronize().map_err(err)?;
        Ok(())
    }

    /// One state in (its inputs concatenated), its actions out, by the path [`GpuPolicy::mode`]
    /// names (the graph, or the steps, when another policy's launch stopped the program: see the
    /// module's notes).
    pub fn act(&mut self, gpu: &Gpu, obs: &[f32]) -> Result<Vec<f32>> {
        if let Some(why) = &self.broken {
            return Err(why.clone().into());
        }
        if obs.len() != self.in_len {
            return Err(format!("{} values, the policy takes {}", obs.len(), self.in_len).into());
        }
        self.obs.slice_mut()[..self.in_len].copy_from_slice(obs);
        self.run_current(gpu)?;
        Ok(self.act.slice()[..self.out_len].to_vec())
    }
}

impl Drop for GpuPolicy {
    fn drop(&mut self) {
        // A running persistent program would spin until the context goes; the arbiter must not
        // keep its control word.
        let _ = self.stop_persistent();
        // Freeing page-locked memory (the fields, next) synchronizes the whole device: it would
        // wait forever behind another policy's program, so every program there stops first (each
        // takes its graph from its next action).
        let _ = make_room(self.dev, self.id, f64::INFINITY);
    }
}
