//! QRD fine-tuning on the GPU: the training graph (forward with LSQ FakeQuant, the backward
//! graph, the loss) lowered by `sqil_cuda::graph` at the batch size and replayed from one CUDA
//! graph per step; the trainer's optimizer, schedule, checkpoints and validation are unchanged
//! (`sqil_train::trainer::train_with`). Per step: the batch and the current parameters copied
//! in, one graph launch, the loss and gradients copied out.

use sqil_cuda::graph_exec::{DeviceAdamW, GpuGraph};
use sqil_cuda::Gpu;
use sqil_ir::{IrError, Result};
use sqil_train::model::{Param, ParamKind, TrainGraph};
use sqil_train::optim::AdamW;
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
    /// The device optimizer: the batch size whose program holds the live parameters, its AdamW,
    /// and whether the device is ahead of the host copies (`tg.params`, the moments).
    resident: Option<(usize, DeviceAdamW)>,
    dirty: bool,
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
        let mut e = GpuEngine { gpu, programs: HashMap::new(), resident: None, dirty: false };
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

impl GpuEngine {
    /// Makes program `b` hold the live parameters and moments (uploading `host`'s, after
    /// bringing back into them another program's if it was ahead).
    fn make_resident(&mut self, tg: &TrainGraph, host: &mut [Param], opt: &mut AdamW, b: usize) -> Result<()> {
        self.sync_host(host, opt)?;
        self.resident = None;
        self.program(tg, b)?;
        let gg = self.programs.get_mut(&b).expect("lowered above");
        let mut dopt = gg.adamw(&self.gpu, &adamw_params(tg)).map_err(dev_err)?;
        for p in host.iter() {
            gg.set_input(&p.name, &p.value.data.f32_cow()).map_err(dev_err)?;
        }
        gg.set_adamw_moments(&mut dopt, &opt.m, &opt.v).map_err(dev_err)?;
        self.resident = Some((b, dopt));
        Ok(())
    }

    /// Copies the resident program's parameters and moments into `tg` and `opt` if the device
    /// is ahead of them.
    fn sync_host(&mut self, params: &mut [Param], opt: &mut AdamW) -> Result<()> {
        let Some((b, dopt)) = &self.resident else { return Ok(()) };
        if !self.dirty {
            return Ok(());
        }
        let gg = &self.programs[b];
        for p in params.iter_mut() {
            let mut v = gg.read_input(&p.name).map_err(dev_err)?;
            v.truncate(p.value.len());
            p.value = sqil_ir::Tensor::from_f32(p.value.shape.clone(), v)?;
        }
        let (m, v) = gg.adamw_moments(dopt).map_err(dev_err)?;
        opt.m = m;
        opt.v = v;
        self.dirty = false;
        Ok(())
    }
}

/// The parameters of `tg` as `GpuGraph::adamw` takes them: (input name, gradient output index,
/// kind: 0 weight, 1 bias, 2 LSQ step).
pub fn adamw_params(tg: &TrainGraph) -> Vec<(String, usize, u8)> {
    let code = |k: ParamKind| match k {
        ParamKind::Weight => 0,
        ParamKind::Bias => 1,
        ParamKind::Step => 2,
    };
    tg.params.iter().enumerate().map(|(k, p)| (p.name.clone(), k + 1, code(p.kind))).collect()
}

/// Rows `idx` of `t` (batch axis first) into `dst`, as f32.
fn gather_rows(t: &sqil_ir::Tensor, idx: &[usize], dst: &mut [f32]) {
    let per: usize = t.shape[1..].iter().product();
    match &t.data {
        sqil_ir::Data::F32(v) => {
            for (k, &i) in idx.iter().enumerate() {
                dst[k * per..(k + 1) * per].copy_from_slice(&v[i * per..(i + 1) * per]);
            }
        }
        _ => dst.copy_from_slice(&sqil_train::trainer::take_rows(t, idx).data.f32_cow()),
    }
}

impl GradEngine for GpuEngine {
    fn step(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize], opt: &mut AdamW) -> Result<Option<f64>> {
        // The parameters live on the device from the first step; the host's copies (in `tg`)
        // are read only here, when nothing is resident yet.
        let b = idx.len();
        if self.resident.as_ref().is_none_or(|(rb, _)| *rb != b) {
            let mut host = tg.params.clone();
            self.make_resident(tg, &mut host, opt, b)?;
        }
        let (_, dopt) = self.resident.as_mut().expect("made resident above");
        let gg = self.programs.get_mut(&b).expect("lowered when made resident");
        // The batch's rows gathered straight into the inputs' pinned staging buffers.
        let mut rows: Vec<(&str, &sqil_ir::Tensor)> = data.inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        rows.push(("train.target", &data.target));
        rows.push(("train.teacher", &data.teacher));
        if let Some(t) = &data.target_hi {
            rows.push(("train.target_hi", t));
        }
        if let Some(t) = &data.teacher_hi {
            rows.push(("train.teacher_hi", t));
        }
        for (n, t) in rows {
            if gg.program.inputs.iter().any(|(pn, _, _)| pn == n) {
                gg.stage_input(n, &mut |dst| gather_rows(t, idx, dst)).map_err(dev_err)?;
            }
        }
        gg.stage_input("train.alpha", &mut |dst| {
            for (d, &i) in dst.iter_mut().zip(idx) {
                *d = data.alpha[i];
            }
        })
        .map_err(dev_err)?;
        gg.run().map_err(dev_err)?;
        let loss = gg.output(0).map_err(dev_err)?[0] as f64;
        if !loss.is_finite() {
            return Ok(Some(loss));
        }
        // The host AdamW's schedule and bias corrections for this step (its update's arithmetic
        // is the device kernel's).
        let lr = opt.lr_at(opt.step);
        opt.step += 1;
        let t = opt.step as i32;
        let sc = [
            lr,
            lr * opt.step_lr_scale,
            1.0 - opt.beta1.powi(t),
            1.0 - opt.beta2.powi(t),
            opt.weight_decay,
            opt.clip,
            opt.beta1,
            opt.beta2,
            opt.eps,
        ];
        gg.adamw_step(dopt, sc).map_err(dev_err)?;
        self.dirty = true;
        Ok(Some(loss))
    }

    fn read_back(&mut self, params: &mut [Param], opt: &mut AdamW) -> Result<()> {
        self.sync_host(params, opt)
    }

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
