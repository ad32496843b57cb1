//! A policy's whole step list as one persistent kernel (a *persistent program*): launched once,
//! it waits until the observation in page-locked host memory carries the next sequence number
//! (one 64-bit word per value, the number above the value's bits), runs every lowered step with
//! a grid-wide barrier between steps, and writes the action back to host memory tagged the same
//! way. Nothing is launched per action.
//!
//! Why: measured on an H200 (`sqil-cuda-bench floor`), a kernel launch and a stream
//! synchronisation cost 8 us, a replayed graph 5.9 us plus 0.65 us per kernel, the two copies
//! more; a persistent kernel's round trip through host memory costs 1.7 us. A small policy's
//! time is that fixed cost, not its arithmetic.
//!
//! Each step's kernel (`policy_ops.cu`, the generated element-wise chains) is compiled a second
//! time as a device function (`SQIL_MEGA`, see `fp16.cuh`) and called once per block of its
//! launch, with that block's index, by the program's blocks in turn (block `b` of a step runs on
//! program block `b % grid`). Blocks are 256 threads, as every step's launch: every thread runs
//! the code it runs in the step's own kernel with the same indices, so the outputs are the
//! graph's bits; kernels that synchronise their block do so with all of its threads, as there.
//!
//! The grid is at most as many blocks as the multiprocessors hold at once and is launched
//! cooperatively, or is one thread-block cluster, so every block is resident (the barrier needs
//! it); while the program runs it holds those multiprocessors (`GpuPolicy` stops it when dropped
//! or when another path is chosen).

use crate::lower::{cu_float, HostArr, KArg, LStep, Lowered};
use std::fmt::Write;

/// Threads of one block: every step's launch uses 256 (`policy.rs`).
pub const STEP_BLOCK: usize = 256;

/// Most steps a persistent program takes (its source grows with them).
pub const MAX_STEPS: usize = 512;

/// Most pointers a program takes: they are its first kernel parameter, by value (a launch's
/// parameters hold 32764 bytes on compute capability 7.0 and up, CUDA 12.1 and later), so every
/// step reads them from the constant bank rather than from memory: an L2 round trip fewer before
/// each step's loads (the barrier between steps invalidates the L1 cache).
pub const MAX_SLOTS: usize = 4000;

/// The sequence number that stops the program.
pub const STOP: u32 = u32::MAX;

/// Where one of the program's pointers points (the program takes them as its first parameter,
/// so its source, and the PTX cache entry, do not depend on where the buffers are).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Activation buffer `b`.
    Buf(usize),
    /// Step `step`'s constant array argument `arg`.
    Arr { step: usize, arg: usize },
    /// The device copy of the observation.
    In,
}

/// A persistent program for one lowered policy.
#[derive(Clone, Debug)]
pub struct Fused {
    /// The kernel's name (`sqil_persist_<hash of its steps>`).
    pub name: String,
    /// Complete CUDA source (compile as it is: it defines `SQIL_MEGA` and includes the kernels).
    pub src: String,
    /// The program's pointers, in order: `S.p[j]` is `slots[j]` (its first parameter, a struct of
    /// `slots.len()` 64-bit words passed by value).
    pub slots: Vec<Slot>,
    /// The most blocks any step launches (the program needs no more).
    pub max_blocks: usize,
}

/// Whether a persistent program can call `kernel`: a generated element-wise chain, or a kernel
/// `policy_ops.cu` declares with `SQIL_VARGS` (every one of them: the list is read from the source).
pub fn fusible(kernel: &str) -> bool {
    let base = crate::lower::base_kernel(kernel);
    kernel.starts_with("sqil_ew_") || crate::POLICY_OPS_CU.contains(&format!(" {base}(SQIL_VARGS"))
}

/// Blocks of a step's launch (of [`STEP_BLOCK`] threads).
pub fn step_blocks(step: &LStep<HostArr>) -> usize {
    let LStep::Kernel { threads, .. } = step;
    threads.div_ceil(STEP_BLOCK).max(1)
}

/// The device side of the program: the grid barrier (the hardware's cluster barrier when the grid
/// is launched as one thread-block cluster, compute capability 9.0 and up; else) over a 64-bit
/// arrival count in device memory
/// (`bar[0]`, zeroed at launch, never reset: the k-th barrier of a grid of g blocks is passed when
/// the count reaches k * g), release / acquire at GPU scope (the CUDA memory model's cumulative
/// release: writes a block made before its `__syncthreads` are visible to every block after the
/// barrier); one block needs only `__syncthreads`.
const RUNTIME: &str = r#"
__device__ __forceinline__ void sqil_grid_sync(unsigned long long *count, unsigned long long &passed, unsigned cluster)
{
#if __CUDA_ARCH__ >= 900
    // The whole grid is one thread-block cluster: the hardware's cluster barrier.
    if (cluster) {
        asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
        return;
    }
#endif
    __syncthreads();
    if (gridDim.x == 1) {
        return;
    }
    passed += gridDim.x;
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
        unsigned long long v;
        do {
            asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(count) : "memory");
        } while (v < passed);
    }
    __syncthreads();
}

__device__ __forceinline__ unsigned sqil_ld_acquire_sys(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned sqil_ld_relaxed_sys(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned long long sqil_ld_relaxed_sys64(const unsigned long long *p)
{
    unsigned long long v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void sqil_st_relaxed_sys64(unsigned long long *p, unsigned long long v)
{
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
"#;

/// Observations of more values than this are announced by the sequence number in `ctl[0]` before
/// block 0 reads them; smaller ones are polled directly (one round trip through host memory).
pub const POLL_DIRECT: usize = 1024;

/// Where a step runs in the program and what follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// The step is one block of element-wise work that every block computes in full (the same
    /// bits into the same buffer), so the step after it reads only what its own block wrote and
    /// no grid barrier separates them.
    pub everywhere: bool,
    /// The step is followed by `__syncthreads` only (not a grid barrier).
    pub local_sync: bool,
}

/// Kernels that read their input buffers whole and never write one of them (so a block may
/// start one while another block still computes, from other buffers, what it reads).
const READS_ONLY_INPUTS: &[&str] = &[
    "sqil_linear_f32w",
    "sqil_linear_f32w_tile",
    "sqil_q4_int",
    "sqil_q4_int_groups",
    "sqil_q4_int_tile",
    "sqil_q4_w16",
    "sqil_conv2d_f32",
];

/// The buffers a step of one block may write when every block runs it in full (the same bits
/// into the same buffers): generated element-wise chains (operands..., y, n), or (operands...,
/// y, lv, n) where they write levels too (named `..._lv`); LayerNormalization rows (x, y, ...).
/// None for any other kernel.
fn everywhere_writes(name: &str, args: &[KArg<HostArr>]) -> Option<Vec<usize>> {
    let at: Vec<usize> = if name.starts_with("sqil_ew_") {
        let outs = if name.ends_with("_lv") { 2 } else { 1 };
        (args.len().checked_sub(outs + 1)?..args.len() - 1).collect()
    } else if name == "sqil_layernorm_rows" {
        vec![1]
    } else {
        return None;
    };
    at.iter().map(|&k| if let Some(KArg::Buf(b)) = args.get(k) { Some(*b) } else { None }).collect()
}

/// Most blocks of a float layer at a thread per output (`sqil_linear_f32w`, `opw` 0) that every
/// block computes in full (see [`placement`]), and most terms per output over those blocks (each
/// thread runs one chain per block in turn): a short first layer, cheaper run twice per block than
/// waited for across a grid barrier. Measured on an H100 (three interleaved rounds, median of 400
/// actions; `docs/data/gpu-short-first-layer-2026-12-06-s15-h100.txt`): a TD3-sized 17 -> 400
/// (2 x 17 terms) 10.61-10.86 -> 10.32-10.34 us; 7 -> 300 with a SiLU or Sigmoid epilogue (2 x 7)
/// 9.12-9.42 -> 8.79-9.12 and 9.40-9.69 -> 9.62-9.94, a wash; 24 -> 512 (2 x 24) 11.88-12.16 ->
/// 11.92-12.27, slower, so it keeps its barrier.
pub const EVERYWHERE_MAX_BLOCKS: usize = 4;
/// See [`EVERYWHERE_MAX_BLOCKS`]: blocks times terms per output.
pub const EVERYWHERE_MAX_WORK: i32 = 40;

/// [`everywhere_writes`] for a step of `blocks` blocks: any of those one-block steps, or a float
/// layer at a thread per output (`opw` 0) of at most [`EVERYWHERE_MAX_BLOCKS`] blocks and
/// [`EVERYWHERE_MAX_WORK`] terms over them, which writes its outputs `y` and, if any, their levels `lvout`
/// (and reads only its input, weights and bias).
fn everywhere_step(name: &str, args: &[KArg<HostArr>], blocks: usize) -> Option<Vec<usize>> {
    if blocks == 1 {
        if let Some(w) = everywhere_writes(name, args) {
            return Some(w);
        }
    }
    let short = blocks <= EVERYWHERE_MAX_BLOCKS
        && matches!(args.get(5), Some(KArg::I32(k)) if *k as i64 * blocks as i64 <= EVERYWHERE_MAX_WORK as i64);
    let thread_form = matches!(args.get(12), Some(KArg::I32(0)));
    if crate::lower::base_kernel(name) != "sqil_linear_f32w" || args.len() != 18 || !short || !thread_form {
        return None;
    }
    let mut w = vec![];
    for k in [3, 13] {
        match &args[k] {
            KArg::Buf(b) => w.push(*b),
            KArg::Null if k == 13 => {}
            _ => return None,
        }
    }
    Some(w)
}

/// Per step, where it runs and which barrier follows it:
/// - a step of one block runs on block 0; after it a `__syncthreads` suffices when the next
///   step is one block too (or it is the last: block 0 reads the output);
/// - a run of steps of one block each that [`everywhere_writes`] knows, or short float layers at a
///   thread per output ([`everywhere_step`]; none writing a buffer a step of the run reads),
///   before a multi-block step of [`READS_ONLY_INPUTS`] that touches none of the run's input
///   buffers runs on every block (each block running every block's share of a step in turn):
///   the grid barrier before the run stays (every block reads all of its input), the ones inside
///   it and after it go (a block reads only what it wrote itself, and what it writes next nobody
///   still reads);
/// - every other step is followed by the grid barrier.
pub fn placement(l: &Lowered) -> Vec<Placed> {
    let blocks: Vec<usize> = l.steps.iter().map(step_blocks).collect();
    let bufs = |args: &[KArg<HostArr>]| -> Vec<usize> {
        args.iter().filter_map(|a| if let KArg::Buf(b) = a { Some(*b) } else { None }).collect()
    };
    let mut out = vec![Placed::default(); l.steps.len()];
    let mut i = 0;
    while i < l.steps.len() {
        // The longest run from step i, its input buffers (those of the run's steps' buffers that
        // they do not write).
        let (mut j, mut inputs) = (i, vec![]);
        while j < l.steps.len() {
            let LStep::Kernel { name, args, .. } = &l.steps[j];
            let Some(w) = everywhere_step(name, args, blocks[j]) else { break };
            let r: Vec<usize> = bufs(args).into_iter().filter(|b| !w.contains(b)).collect();
            if w.iter().any(|b| inputs.contains(b)) || bufs(args).len() != r.len() + w.len() {
                break;
            }
            inputs.extend(r);
            j += 1;
        }
        let next_ok = j > i
            && l.steps.get(j).is_some_and(|LStep::Kernel { name, args, .. }| {
                blocks[j] > 1
                    && READS_ONLY_INPUTS.contains(&crate::lower::base_kernel(name))
                    && !bufs(args).iter().any(|b| inputs.contains(b))
            });
        if next_ok {
            out[i..j].iter_mut().for_each(|p| p.everywhere = true);
            i = j + 1;
        } else {
            i += 1;
        }
    }
    for i in 0..l.steps.len() {
        let next_everywhere = out.get(i + 1).is_some_and(|p| p.everywhere);
        out[i].local_sync =
            out[i].everywhere || (!next_everywhere && blocks[i] == 1 && blocks.get(i + 1).is_none_or(|&n| n == 1));
    }
    out
}

/// The persistent program of `l`, or why there is none.
pub fn fuse(l: &Lowered) -> Result<Fused, String> {
    if l.steps.len() > MAX_STEPS {
        return Err(format!("{} steps (at most {MAX_STEPS} are fused)", l.steps.len()));
    }
    let mut slots: Vec<Slot> = vec![];
    let mut slot = |s: Slot| -> usize {
        if let Some(j) = slots.iter().position(|x| *x == s) {
            return j;
        }
        slots.push(s);
        slots.len() - 1
    };
    let input = slot(Slot::In);
    let output = slot(Slot::Buf(l.output));
    let mut body = String::new();
    let mut max_blocks = 1;
    let placed = placement(l);
    for (si, st) in l.steps.iter().enumerate() {
        let LStep::Kernel { name, args, .. } = st;
        if !fusible(name) {
            return Err(format!("step {si}: no device form of kernel {name}"));
        }
        let mut a: Vec<String> = vec![];
        for (ai, arg) in args.iter().enumerate() {
            let arr = Slot::Arr { step: si, arg: ai };
            a.push(match arg {
                KArg::Buf(b) => format!("(float *)S.p[{}]", slot(Slot::Buf(*b))),
                KArg::Arr(HostArr::F32(_)) => format!("(const float *)S.p[{}]", slot(arr)),
                KArg::Arr(HostArr::I32(_)) => format!("(const int *)S.p[{}]", slot(arr)),
                KArg::Arr(HostArr::U32(_)) => format!("(const unsigned *)S.p[{}]", slot(arr)),
                KArg::In(o) => format!("(float *)S.p[{input}] + {o}"),
                KArg::Null => "nullptr".to_string(),
                KArg::I32(v) => format!("{v}"),
                KArg::F32(v) => cu_float(*v),
            });
        }
        let blocks = step_blocks(st);
        max_blocks = max_blocks.max(blocks);
        let label = l.labels.get(si).map(|s| s.replace(['\n', '\r', '\\'], " ")).unwrap_or_default();
        let sync = if placed[si].local_sync { "__syncthreads();" } else { "sqil_grid_sync(bar, passed, cluster);" };
        if placed[si].everywhere && blocks == 1 {
            let _ = writeln!(
                body,
                "        // {label} (on every block)\n        {name}(0u, threadIdx.x, {});\n        {sync}",
                a.join(", ")
            );
        } else if placed[si].everywhere {
            let _ = writeln!(
                body,
                "        // {label} (every block runs all {blocks})\n        for (unsigned b = 0; b < {blocks}u; b++) {{\n            \
                 {name}(b, threadIdx.x, {});\n        }}\n        {sync}",
                a.join(", ")
            );
        } else {
            let _ = writeln!(
                body,
                "        // {label}\n        for (unsigned b = blockIdx.x; b < {blocks}u; b += gridDim.x) {{\n            \
                 {name}(b, threadIdx.x, {});\n        }}\n        {sync}",
                a.join(", ")
            );
        }
    }
    let tail = format!("{} {} {input} {output}", l.in_len, l.out_len);
    let hash = sqil_ir::fnv1a(sqil_ir::fnv1a(sqil_ir::FNV1A_START, body.as_bytes()), tail.as_bytes());
    let name = format!("sqil_persist_{hash:016x}");
    let mut src = String::from("#define SQIL_MEGA\n");
    src.push_str(crate::FP16_CUH);
    src.push_str(crate::POLICY_OPS_CU);
    let mut seen = std::collections::HashSet::new();
    for (k, s) in &l.sources {
        if seen.insert(k.as_str()) {
            src.push_str(s);
        }
    }
    src.push_str(RUNTIME);
    if slots.len() > MAX_SLOTS {
        return Err(format!("{} pointers (at most {MAX_SLOTS} are a program's parameters)", slots.len()));
    }
    let _ = writeln!(src, "\nstruct sqil_slots {{\n    unsigned long long p[{}];\n}};", slots.len());
    let (in2, out2) = (l.in_len.max(1), l.out_len.max(1));
    // Big observations: wait for the host's sequence number before reading them.
    let announce = if l.in_len > POLL_DIRECT {
        format!(
            "                if (threadIdx.x == 0) {{\n                    unsigned c;\n                    \
             while ((c = sqil_ld_acquire_sys(ctl)) != want && c != {STOP}u) {{\n                    }}\n                    \
             stop = c == {STOP}u;\n                }}\n                __syncthreads();\n                \
             if (stop) {{\n                    break;\n                }}\n"
        )
    } else {
        String::new()
    };
    // Each thread's observation words: from two per thread up to POLL_DIRECT values, all its loads
    // issued before any is looked at (one round trip per poll: in the loop each word's store waited
    // on its load and the next load behind it, one round trip per STEP_BLOCK values; a 376-value
    // observation's handshake 5.8 -> 3.5 us on the H100); one word per thread keeps the loop (the
    // unrolled form measured 0.3 us slower on a 17-value one).
    // One word `v` of position `i` taken: a stale tag holds the poll, else the value is stored.
    let take = |v: &str| {
        format!(
            "if ((unsigned)({v} >> 32) != want) {{\n                        \
             ok = 0;\n                    \
             }} else if (i < {in_len}u) {{\n                        \
             ((float *)S.p[{input}])[i] = __uint_as_float((unsigned){v});\n                    \
             }}\n",
            in_len = l.in_len,
        )
    };
    let per = in2.div_ceil(STEP_BLOCK);
    let read = if per >= 2 && in2 <= POLL_DIRECT {
        format!(
            "                unsigned long long v[{per}];\n                \
             #pragma unroll\n                \
             for (unsigned k = 0; k < {per}u; k++) {{\n                    \
             const unsigned i = threadIdx.x + k * {STEP_BLOCK}u;\n                    \
             v[k] = i < {in2}u ? sqil_ld_relaxed_sys64(obs + i) : 0ull;\n                \
             }}\n                \
             #pragma unroll\n                \
             for (unsigned k = 0; k < {per}u; k++) {{\n                    \
             const unsigned i = threadIdx.x + k * {STEP_BLOCK}u;\n                    \
             if (i >= {in2}u) {{\n                    \
             }} else {}                \
             }}\n",
            take("v[k]"),
        )
    } else {
        format!(
            "                for (unsigned i = threadIdx.x; i < {in2}u; i += blockDim.x) {{\n                    \
             const unsigned long long v = sqil_ld_relaxed_sys64(obs + i);\n                    \
             {}                \
             }}\n",
            take("v"),
        )
    };
    let _ = write!(
        src,
        "\n// Generated by sqil: the policy's {steps} steps as one persistent program (crates/cuda/src/fused.rs).\n\
         // obs / act: host memory, one 64-bit word per value (the action's sequence number above its\n\
         // bits: each word is written and read whole, so a value is new exactly when its tag is);\n\
         // ctl[0]: the host's sequence number (or STOP); bar: device memory [arrivals; the sequence\n\
         // numbers block 0 took, by parity of the action: a block reads action n's after the barrier\n\
         // that starts it, and block 0 writes the same word again only after the barrier that starts\n\
         // action n + 1, which every block reaches after its read].\n\
         extern \"C\" __global__ void __launch_bounds__({STEP_BLOCK}) {name}(const sqil_slots S,\n    \
         const unsigned *ctl, const unsigned long long *obs, unsigned long long *act, unsigned long long *bar,\n    \
         unsigned cluster)\n{{\n    \
         __shared__ int stop;\n    \
         unsigned long long passed = 0;\n    \
         unsigned last = 0, parity = 0;\n    \
         for (;;) {{\n        \
         // Block 0 waits until every observation word carries the next sequence number (or the\n        \
         // host says stop), copying the values in as they come.\n        \
         if (blockIdx.x == 0) {{\n            \
         const unsigned want = last + 1u;\n            \
         if (threadIdx.x == 0) {{\n                \
         stop = 0;\n            \
         }}\n            \
         __syncthreads();\n            \
         for (;;) {{\n{announce}                \
         // The control word's load is issued before the observation's and both are in flight\n                \
         // together: one round trip through host memory per poll, not two.\n                \
         const unsigned c = threadIdx.x == 0 ? sqil_ld_relaxed_sys(ctl) : 0u;\n                \
         int ok = 1;\n{read}                \
         if (c == {STOP}u) {{\n                    \
         stop = 1;\n                \
         }}\n                \
         if (__syncthreads_and(ok) || stop) {{\n                    \
         break;\n                \
         }}\n            \
         }}\n            \
         if (threadIdx.x == 0) {{\n                \
         ((volatile unsigned *)bar)[2 + parity] = stop ? {STOP}u : want;\n            \
         }}\n        \
         }}\n        \
         sqil_grid_sync(bar, passed, cluster);\n        \
         // Block 0 knows the number; the others load it here and look at it only after the\n        \
         // steps, so its round trip through L2 overlaps them (on STOP every block runs the steps\n        \
         // once more on what the input holds, writes no action, and leaves).\n        \
         const unsigned s = blockIdx.x == 0 ? (stop ? {STOP}u : last + 1u) : ((volatile unsigned *)bar)[2 + parity];\n        \
         parity ^= 1u;\n\
         {body}        \
         if (s == {STOP}u) {{\n            \
         return;\n        \
         }}\n        \
         last = s;\n        \
         if (blockIdx.x == 0) {{\n            \
         for (unsigned i = threadIdx.x; i < {out2}u; i += blockDim.x) {{\n                \
         const float v = i < {out_len}u ? ((const float *)S.p[{output}])[i] : 0.0f;\n                \
         sqil_st_relaxed_sys64(act + i, ((unsigned long long)s << 32) | __float_as_uint(v));\n            \
         }}\n        \
         }}\n    \
         }}\n}}\n",
        steps = l.steps.len(),
        out_len = l.out_len,
    );
    Ok(Fused { name, src, slots, max_blocks })
}

#[cfg(test)]
mod tests {
    use super::fusible;

    #[test]
    fn the_fusible_kernels_are_read_from_the_source() {
        for k in ["sqil_copy_pairs", "sqil_q4_int", "sqil_q4_conv_int", "sqil_softmax_rows_block", "sqil_ew_0123"] {
            assert!(fusible(k), "{k}");
        }
        // Not policy kernels, or a prefix of one.
        for k in ["sqil_q4_gemv_b1", "sqil_q4", "sqil_softmax_rows_bloc", "copy_pairs"] {
            assert!(!fusible(k), "{k}");
        }
    }
}
