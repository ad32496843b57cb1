//! sqil's CPU runtime: loads a compiled policy and runs it. It executes a lowered plan
//! (`sqil_lower::Plan`, run by [`Execute`]) with packed int4 layers on the best kernels the CPU has
//! and reference semantics for every other op, stored as a checksummed artifact (`artifact`),
//! usable from Rust ([`Policy`]) and C (`capi`, header `crates/runtime/include/sqil.h`).

pub mod artifact;
pub mod capi;
pub mod exec;

pub use exec::{Execute, AHEAD, FUSED, IN_PASS};
use sqil_ir::{IrError, Result, Tensor};
pub use sqil_lower::{Plan, Step, PLAN_TOL};
use std::path::Path;

/// Reads an artifact: its verified simulation graph and the plan over its stored packed weights.
pub fn load_artifact(path: &Path) -> Result<(sqil_ir::Graph, Plan)> {
    let bytes = std::fs::read(path).map_err(|e| IrError::Invalid(format!("{}: {e}", path.display())))?;
    load_artifact_bytes(&bytes, &path.display().to_string())
}

/// [`load_artifact`] from bytes in memory; `what` names the source in errors.
pub fn load_artifact_bytes(bytes: &[u8], what: &str) -> Result<(sqil_ir::Graph, Plan)> {
    let artifact::Decoded { ir, packed, consts } = artifact::decode(bytes, what)?;
    let mut g = sqil_ir::parse_graph(&ir).map_err(|e| e.context(what.to_string()))?;
    artifact::restore_consts(&mut g, &consts, what)?;
    artifact::restore_weights(&mut g, &packed)?;
    sqil_ir::verify_input(&g).map_err(|e| e.context(what.to_string()))?;
    let plan = Plan::with_packed(&g, &packed).map_err(|e| e.context(what.to_string()))?;
    artifact::check_layers(&g, &plan, &packed, what)?;
    Ok((g, plan))
}

/// Asks the C allocator to keep freed memory mapped, so that a policy run again and again reuses
/// the pages of its large activations instead of having the kernel map and zero fresh ones each
/// call (on this project's VM, page faults were a third of a batch-64 CNN run). glibc only: large
/// blocks (up to 32 MiB, glibc's maximum) come from the heap rather than their own mappings, and
/// the heap is not trimmed below 1 GiB of free memory. Process-wide, so the library never calls it
/// itself: `sqil run`, `sqil bench` and the standalone policy executable do; embedders may.
/// Returns whether the allocator took both settings.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Restores the default action of SIGPIPE (Rust's runtime ignores it, so writing to a closed pipe
/// fails and `println!` panics): `sqil ... | head -1` then ends quietly, as other command-line
/// tools do, instead of panicking with exit status 101. Process-wide: the `sqil` and
/// `sqil-policy` binaries call it first; the library never does.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default has no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A loaded policy: its plan and the threads its large layers may use.
pub struct Policy {
    pub plan: Plan,
    pub threads: usize,
    input_shapes: Vec<Vec<sqil_ir::Dim>>,
    input_dtypes: Vec<sqil_ir::DType>,
}

impl Policy {
    /// Plans a simulation graph directly (no artifact).
    pub fn from_graph(g: &sqil_ir::Graph) -> Result<Policy> {
        Ok(Policy::with_plan(g, Plan::new(g)?))
    }

    /// Loads an artifact written by `sqil compile` (`policy.bin`).
    pub fn load(path: &Path) -> Result<Policy> {
        let (g, plan) = load_artifact(path)?;
        Ok(Policy::with_plan(&g, plan))
    }

    /// An artifact's bytes (e.g. embedded in an executable); `what` names them in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Policy> {
        let (g, plan) = load_artifact_bytes(bytes, what)?;
        Ok(Policy::with_plan(&g, plan))
    }

    fn with_plan(g: &sqil_ir::Graph, plan: Plan) -> Policy {
        let input_shapes = g.inputs.iter().map(|&i| g.node(i).outputs[0].ty.shape.clone()).collect();
        let input_dtypes = g.inputs.iter().map(|&i| g.node(i).outputs[0].ty.dtype).collect();
        Policy { plan, threads: 1, input_shapes, input_dtypes }
    }

    /// The inputs' element types as the graph declares them.
    pub fn input_dtypes(&self) -> &[sqil_ir::DType] {
        &self.input_dtypes
    }

    /// The inputs' shapes as the graph declares them (the first dimension is the batch).
    pub fn input_shapes(&self) -> &[Vec<sqil_ir::Dim>] {
        &self.input_shapes
    }

    /// Per-sample sizes of the inputs (all dimensions but the batch).
    pub fn input_sizes(&self) -> Vec<usize> {
        self.input_shapes.iter().map(|s| s.iter().skip(1).map(|d| d.known().unwrap_or(1)).product()).collect()
    }

    /// Runs on tensors in the policy's input order; returns the outputs.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        // Each input of the graph's element type; a float16 or bfloat16 array for an f32 input is
        // widened first (exactly), as the model it was compiled from would take it.
        let mut widened: Vec<Tensor> = vec![];
        for (k, t) in inputs.iter().enumerate() {
            let Some(&want) = self.input_dtypes.get(k) else { break };
            if t.dtype() == want {
                continue;
            }
            if want == sqil_ir::DType::F32 && t.dtype().is_half() {
                if widened.is_empty() {
                    widened = inputs.to_vec();
                }
                widened[k] = t.cast(want);
                continue;
            }
            let name = self.plan.inputs.get(k).map_or("?", |(n, _)| n.as_str());
            return Err(IrError::Invalid(format!("input `{name}`: expects {want} values, got {}", t.dtype())));
        }
        self.plan.run(if widened.is_empty() { inputs } else { &widened }, self.threads)
    }

    /// Actions for `batch` states of a single-input vector policy: `obs` is `[batch, d]`
    /// row-major; returns the first output's values.
    pub fn act(&self, obs: &[f32], batch: usize) -> Result<Vec<f32>> {
        let sizes = self.input_sizes();
        if sizes.len() != 1 {
            return Err(IrError::Invalid(format!("act: the policy takes {} inputs; use run", sizes.len())));
        }
        if obs.len() != batch * sizes[0] {
            return Err(IrError::Invalid(format!("act: {} values for {batch} states of {} each", obs.len(), sizes[0])));
        }
        let mut shape = vec![batch];
        shape.extend(self.input_shapes[0].iter().skip(1).map(|d| d.known().unwrap_or(1)));
        let out = self.run(&[Tensor::from_f32(shape, obs.to_vec())?])?;
        Ok(out.into_iter().next().map(|t| t.data.to_f32_vec()).unwrap_or_default())
    }
}
