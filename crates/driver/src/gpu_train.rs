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

    /// [`GpuEngine::new`] on a GPU already opened (shared with the forward passes). A policy of
    /// this process running its persistent program on the device is stopped first (it takes its
    /// graph from its next action): the training's uploads, and later its frees, which
    /// synchronize the device, would otherwise wait behind the program.
    pub fn on(gpu: Arc<Gpu>, tg: &TrainGraph, batch: usize) -> Result<GpuEngine> {
        sqil_cuda::policy::stop_programs(&gpu).map_err(dev_err)?;
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

impl GpuEngine {
    /// Makes the program of `idx.len()` rows hold the live parameters (from `tg` when nothing
    /// is resident at that size), gathers rows `idx` of `data` into its inputs and launches one
    /// step (forward and backward; the loss and gradients stay on the device).
    fn launch_rows(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize], opt: &mut AdamW) -> Result<()> {
        // The parameters live on the device from the first step; the host's copies (in `tg`)
        // are read only here, when nothing is resident yet.
        let b = idx.len();
        if self.resident.as_ref().is_none_or(|(rb, _)| *rb != b) {
            let mut host = tg.params.clone();
            self.make_resident(tg, &mut host, opt, b)?;
        }
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
        gg.run().map_err(dev_err)
    }

    /// The resident program and its device optimizer.
    fn resident_mut(&mut self) -> Result<(&mut GpuGraph, &mut DeviceAdamW)> {
        let (b, dopt) = self.resident.as_mut().ok_or_else(|| IrError::Internal("no resident program".into()))?;
        let gg = self.programs.get_mut(b).ok_or_else(|| IrError::Internal("resident program missing".into()))?;
        Ok((gg, dopt))
    }

    /// The last launched step's mean loss over its rows (waits for it).
    fn loss(&mut self) -> Result<f64> {
        let (gg, _) = self.resident_mut()?;
        Ok(gg.output(0).map_err(dev_err)?[0] as f64)
    }

    /// The device AdamW update from the resident program's gradients, with the scalars of
    /// [`adamw_scalars`].
    fn update(&mut self, sc: [f64; 9]) -> Result<()> {
        let (gg, dopt) = self.resident_mut()?;
        gg.adamw_step(dopt, sc).map_err(dev_err)?;
        self.dirty = true;
        Ok(())
    }
}

/// Advances `opt`'s step and returns the device AdamW's scalars for it: the host AdamW's
/// schedule and bias corrections (its update's arithmetic is the device kernel's).
fn adamw_scalars(opt: &mut AdamW) -> [f64; 9] {
    let lr = opt.lr_at(opt.step);
    opt.step += 1;
    let t = opt.step as i32;
    [
        lr,
        lr * opt.step_lr_scale,
        1.0 - opt.beta1.powi(t),
        1.0 - opt.beta2.powi(t),
        opt.weight_decay,
        opt.clip,
        opt.beta1,
        opt.beta2,
        opt.eps,
    ]
}

impl GradEngine for GpuEngine {
    fn step(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize], opt: &mut AdamW) -> Result<Option<f64>> {
        self.launch_rows(tg, data, idx, opt)?;
        let loss = self.loss()?;
        if !loss.is_finite() {
            return Ok(Some(loss));
        }
        self.update(adamw_scalars(opt))?;
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

/// Rows `idx` split over `ranks` data-parallel ranks: contiguous shards, the first
/// `idx.len() % ranks` one row longer than the others (none empty when `idx.len() >= ranks`).
pub fn shards(idx: &[usize], ranks: usize) -> Vec<&[usize]> {
    let ranks = ranks.max(1);
    let (base, extra) = (idx.len() / ranks, idx.len() % ranks);
    let mut out = Vec::with_capacity(ranks);
    let mut at = 0;
    for r in 0..ranks {
        let len = base + usize::from(r < extra);
        out.push(&idx[at..at + len]);
        at += len;
    }
    out
}

/// Data-parallel QRD fine-tuning over several GPUs of one host (`sqil compile --device cuda
/// --gpus N`): one [`GpuEngine`] per GPU, each resident with the same parameters and AdamW
/// moments. Per step every rank runs forward and backward on its shard of the batch
/// ([`shards`]), scales its mean-loss gradients by its share of the batch's rows, and the ranks'
/// gradients are summed in place by NCCL ([`sqil_cuda::collective::Collective`]) into the
/// batch's mean gradient on every GPU; every rank then applies the same AdamW update (the same
/// global-norm clipping, from the same sums), so the parameters stay equal across the GPUs. The
/// trainer's checkpoints, validation and schedule are unchanged: parameters and moments are read
/// back from rank 0, and a checkpoint resumes on any number of GPUs (the shards' sums reorder
/// the batch's reduction, so runs on different GPU counts agree within float rounding, not bit
/// for bit).
pub struct DataParallel {
    ranks: Vec<GpuEngine>,
    group: sqil_cuda::collective::Collective,
}

impl DataParallel {
    /// Opens GPUs 0..gpus (GPU 0 is `first` where the caller has it open already) and lowers the
    /// training graph at each rank's shard of `batch`.
    pub fn new(first: Option<Arc<Gpu>>, gpus: usize, tg: &TrainGraph, batch: usize) -> Result<DataParallel> {
        let count = Gpu::count().map_err(|e| IrError::Invalid(format!("--gpus {gpus}: {e}")))?;
        if gpus == 0 || gpus > count {
            return Err(IrError::Invalid(format!("--gpus {gpus}: this machine has {count} GPU(s)")));
        }
        let open =
            |i: usize| Gpu::on(i).map(Arc::new).map_err(|e| IrError::Invalid(format!("--gpus {gpus}: GPU {i}: {e}")));
        let mut devs = vec![match first {
            Some(g) => g,
            None => open(0)?,
        }];
        for i in 1..gpus {
            devs.push(open(i)?);
        }
        DataParallel::on(devs, tg, batch)
    }

    /// [`DataParallel::new`] on GPUs already opened (rank i on `gpus[i]`).
    pub fn on(gpus: Vec<Arc<Gpu>>, tg: &TrainGraph, batch: usize) -> Result<DataParallel> {
        let n = gpus.len();
        if n == 0 || batch < n {
            return Err(IrError::Invalid(format!(
                "--gpus {n} with a batch of {batch} rows: every GPU needs at least one row (raise --batch)"
            )));
        }
        let idx: Vec<usize> = (0..batch).collect();
        let sizes: Vec<usize> = shards(&idx, n).iter().map(|s| s.len()).collect();
        let group =
            sqil_cuda::collective::Collective::new(&gpus).map_err(|e| IrError::Invalid(format!("--gpus {n}: {e}")))?;
        let ranks = gpus.into_iter().zip(sizes).map(|(g, b)| GpuEngine::on(g, tg, b)).collect::<Result<Vec<_>>>()?;
        Ok(DataParallel { ranks, group })
    }

    /// GPUs in the group.
    pub fn gpus(&self) -> usize {
        self.ranks.len()
    }

    /// Device memory of every rank's buffers and cuBLAS workspaces, in bytes.
    pub fn bytes(&self) -> usize {
        self.ranks.iter().map(GpuEngine::bytes).sum()
    }

    /// How the steps run (rank 0's: every rank has the same program).
    pub fn mode(&self) -> String {
        format!("{} per GPU, gradients summed by NCCL", self.ranks[0].mode())
    }
}

impl GradEngine for DataParallel {
    fn step(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize], opt: &mut AdamW) -> Result<Option<f64>> {
        let parts = shards(idx, self.ranks.len());
        if parts.iter().any(|p| p.is_empty()) {
            return Err(IrError::Invalid(format!(
                "a batch of {} rows over {} GPUs: every GPU needs at least one row",
                idx.len(),
                self.ranks.len()
            )));
        }
        // Every rank's step launched before any loss is read, so the GPUs run together.
        for (e, p) in self.ranks.iter_mut().zip(&parts) {
            e.launch_rows(tg, data, p, opt)?;
        }
        let share: Vec<f64> = parts.iter().map(|p| p.len() as f64 / idx.len() as f64).collect();
        // Each rank's mean gradient times its share, summed over the ranks (the batch's mean),
        // queued behind each rank's backward pass before the host waits for any loss: the
        // reduction starts as each GPU's backward ends, not after the host has read every loss
        // and issued it. A step whose loss is not finite then skips the update as before (its
        // gradients are rewritten by the next step's backward pass).
        let mut streams = vec![];
        let mut bufs = vec![];
        for (e, w) in self.ranks.iter_mut().zip(&share) {
            let (gg, dopt) = e.resident_mut()?;
            gg.scale_grads(dopt, *w as f32).map_err(dev_err)?;
            streams.push(gg.stream().clone());
            bufs.push(gg.grads_mut(dopt).map_err(dev_err)?);
        }
        let after: Vec<_> = streams.iter().collect();
        self.group.all_reduce_sum(&mut bufs, &after).map_err(dev_err)?;
        drop(bufs);
        let mut loss = 0.0;
        for (e, w) in self.ranks.iter_mut().zip(&share) {
            loss += e.loss()? * w;
        }
        if !loss.is_finite() {
            return Ok(Some(loss));
        }
        let sc = adamw_scalars(opt);
        for e in &mut self.ranks {
            e.update(sc)?;
        }
        Ok(Some(loss))
    }

    fn read_back(&mut self, params: &mut [Param], opt: &mut AdamW) -> Result<()> {
        // Every rank holds the same parameters and moments: rank 0's are read.
        self.ranks[0].read_back(params, opt)?;
        for e in &mut self.ranks[1..] {
            e.dirty = false;
        }
        Ok(())
    }

    fn grads(&mut self, tg: &TrainGraph, data: &Dataset, idx: &[usize]) -> Result<(f64, Vec<Vec<f32>>)> {
        // Only for callers that update on the host: the whole batch on rank 0.
        self.ranks[0].grads(tg, data, idx)
    }

    fn device(&self) -> String {
        let names: Vec<String> = self.ranks.iter().map(|e| e.gpu.name.clone()).collect();
        format!("cuda x{}: {}", self.ranks.len(), names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::shards;

    #[test]
    fn shards_cover_the_batch_in_order_and_differ_by_at_most_one_row() {
        for len in 0..40usize {
            let idx: Vec<usize> = (100..100 + len).collect();
            for ranks in 1..9 {
                let s = shards(&idx, ranks);
                assert_eq!(s.len(), ranks);
                assert_eq!(s.concat(), idx, "{len} rows over {ranks}");
                let (lo, hi) = (s.iter().map(|p| p.len()).min().unwrap(), s.iter().map(|p| p.len()).max().unwrap());
                assert!(hi - lo <= 1, "{len} rows over {ranks}: {lo}..{hi}");
                assert!(s.windows(2).all(|w| w[0].len() >= w[1].len()), "longer shards first");
                assert_eq!(len >= ranks, s.iter().all(|p| !p.is_empty()));
            }
        }
    }
}
