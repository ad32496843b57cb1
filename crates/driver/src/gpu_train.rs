//! QRD fine-tuning on the GPU: the training graph (forward with LSQ FakeQuant, the backward
//! graph, the loss) lowered by `sqil_cuda::graph` at the batch size and replayed from one CUDA
//! graph per step; the trainer's optimizer, schedule, checkpoints and validation are unchanged
//! (`sqil_train::trainer::train_with`). Per step: the batch and the current parameters copied
//! in, one graph launch, the loss and gradients copied out.

use sqil_cuda::graph_exec::GpuGraph;
use sqil_cuda::Gpu;
use sqil_ir::{IrError, Result};
use sqil_train::model::TrainGraph;
use sqil_train::trainer::{batch_feeds, Dataset, GradEngine};
use std::collections::HashMap;
use std::sync::Arc;

/// Which device computes the fine-tuning steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The interpreter, each batch split over `--threads`.
    #[default]
    Cpu,
    /// The first CUDA GPU (fp32, no TF32).
    Cuda,
}

fn dev_err(e: sqil_cuda::Error) -> IrError {
    IrError::Invalid(format!("GPU training: {e}"))
}

/// The GPU [`GradEngine`]: one lowered program per batch size (the last batch of an epoch may be
/// shorter), each captured in a CUDA graph.
pub struct GpuEngine {
    gpu: Arc<Gpu>,
    programs: HashMap<usize, GpuGraph>,
}

impl GpuEngine {
    /// Opens the GPU and lowers the training graph at `batch` (so an op the GPU cannot run is
    /// named before training starts).
    pub fn new(tg: &TrainGraph, batch: usize) -> Result<GpuEngine> {
        let gpu = Gpu::new().map_err(|e| IrError::Invalid(format!("--device cuda: {e}")))?;
        GpuEngine::on(Arc::new(gpu), tg, batch)
    }

    /// [`GpuEngine::new`] on a GPU already opened (shared with the forward passes).
    pub fn on(gpu: Arc<Gpu>, tg: &TrainGraph, batch: usize) -> Result<GpuEngine> {
        let mut e = GpuEngine { gpu, programs: HashMap::new() };
        e.program(tg, batch)?;
        Ok(e)
    }

    fn program(&mut self, tg: &TrainGraph, b: usize) -> Result<&mut GpuGraph> {
        if !self.programs.contains_key(&b) {
            let p = sqil_cuda::graph::lower_graph(&tg.graph, b).map_err(dev_err)?;
            let mut gg = GpuGraph::new(&self.gpu, p).map_err(dev_err)?;
            gg.capture().map_err(dev_err)?;
            self.programs.insert(b, gg);
        }
        Ok(self.programs.get_mut(&b).expect("inserted"))
    }

    /// How the steps run: from a CUDA graph, or eagerly and why.
    pub fn mode(&self) -> String {
        match self.programs.values().find_map(|g| g.eager_because.clone()) {
            None => "one CUDA graph per step".into(),
            Some(why) => format!("eager launches ({why})"),
        }
    }

    /// Device memory of the programs' buffers and cuBLAS workspaces, in bytes.
    pub fn bytes(&self) -> usize {
        self.programs.values().map(|g| g.program.bytes() + sqil_cuda::graph_exec::WORKSPACE).sum()
    }
}

impl GradEngine for GpuEngine {
    fn grads(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize]) -> Result<(f64, Vec<Vec<f32>>)> {
        let feeds = batch_feeds(tg, data, idx)?;
        let gg = self.program(tg, idx.len())?;
        let outs = gg.run_feeds(&feeds).map_err(dev_err)?;
        let loss = outs[0].data.to_f32_vec()[0] as f64;
        Ok((loss, outs[1..].iter().map(|t| t.data.to_f32_vec()).collect()))
    }

    fn device(&self) -> String {
        format!("cuda:{}", self.gpu.name)
    }
}
