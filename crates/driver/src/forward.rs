//! Forward passes of whole graphs over many batches, where `sqil compile` spends its time
//! outside fine-tuning: the float policy's actions (the teacher), SIS (one forward pass per
//! perturbed position of every state), and scoring every candidate on the held-out states. On the
//! CPU that is the interpreter; with `--device cuda`, each graph is lowered by
//! `sqil_cuda::graph` once per batch size and replayed from a CUDA graph (fp32, no TF32).

use sqil_cuda::graph_exec::GpuGraph;
use sqil_cuda::Gpu;
use sqil_ir::interp::Interpreter;
use sqil_ir::{Graph, IrError, Tensor};
use sqil_passes::quant::{concat_batches, Feeds};
use std::collections::HashMap;
use std::sync::Arc;

fn dev_err(what: &str, e: sqil_cuda::Error) -> IrError {
    IrError::Invalid(format!("GPU forward pass ({what}): {e}"))
}

/// Where forward passes run.
#[derive(Clone, Default)]
pub struct Forward {
    gpu: Option<Arc<Gpu>>,
}

impl Forward {
    /// The interpreter.
    pub fn cpu() -> Forward {
        Forward { gpu: None }
    }

    /// The first CUDA GPU (an error naming why, when there is none).
    pub fn cuda() -> crate::Result<Forward> {
        let gpu = Gpu::new().map_err(|e| format!("--device cuda: {e}"))?;
        Ok(Forward { gpu: Some(Arc::new(gpu)) })
    }

    /// Where the forward passes run: `cpu`, or `cuda:` and the GPU's name.
    pub fn device(&self) -> String {
        match &self.gpu {
            None => "cpu".into(),
            Some(g) => format!("cuda:{}", g.name),
        }
    }

    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.gpu.as_ref()
    }

    /// A runner of `g`'s forward pass (its first output), `what` naming it in errors.
    pub fn runner<'g>(&self, g: &'g Graph, what: &str) -> sqil_ir::Result<Runner<'g>> {
        Ok(match &self.gpu {
            None => Runner::Cpu(Interpreter::new(g)?),
            Some(gpu) => Runner::Gpu { g, gpu: gpu.clone(), programs: HashMap::new(), what: what.to_string() },
        })
    }

    /// `g`'s first output on every batch, concatenated along the batch axis.
    pub fn run_all(&self, g: &Graph, batches: &[Feeds], what: &str) -> sqil_ir::Result<Tensor> {
        let mut r = self.runner(g, what)?;
        let outs = batches.iter().map(|b| r.run(b)).collect::<sqil_ir::Result<Vec<_>>>()?;
        concat_batches(outs)
    }
}

/// One graph's forward pass: the interpreter, or one lowered GPU program per batch size seen.
pub enum Runner<'g> {
    Cpu(Interpreter<'g>),
    Gpu { g: &'g Graph, gpu: Arc<Gpu>, programs: HashMap<usize, GpuGraph>, what: String },
}

impl Runner<'_> {
    /// The first output for `feeds` (every input fed, all with the same batch size).
    pub fn run(&mut self, feeds: &Feeds) -> sqil_ir::Result<Tensor> {
        match self {
            Runner::Cpu(it) => it.run(feeds).map(|mut o| o.remove(0)),
            Runner::Gpu { g, gpu, programs, what } => {
                let batch = feeds.values().next().map(|t| t.shape.first().copied().unwrap_or(1)).unwrap_or(1);
                let gg = match programs.entry(batch) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let p = sqil_cuda::graph::lower_graph(g, batch).map_err(|e| dev_err(what, e))?;
                        let mut gg = GpuGraph::new(gpu, p).map_err(|e| dev_err(what, e))?;
                        gg.capture().map_err(|e| dev_err(what, e))?;
                        e.insert(gg)
                    }
                };
                let mut outs = gg.run_feeds(feeds).map_err(|e| dev_err(what, e))?;
                Ok(outs.remove(0))
            }
        }
    }
}
