//! Policy inputs from demonstrations: the graph's inputs filled from a demo file, for
//! calibration, saliency and fine-tuning. Supported input layouts: one `[B, obs]` input; one
//! `[B, H, obs]` history input (windows within each episode, the first step repeated before
//! it); or `image` `[B, 3, h, w]` + `proprio` `[B, p]` (frames divided by 255).

use sqil_data::Demos;
use sqil_ir::{Dim, Graph, Tensor, ValueType};
use sqil_passes::quant::Feeds;

/// `n` step indices spread evenly over `0..total` (all of them when `n >= total`).
pub fn spread(total: usize, n: usize) -> Vec<usize> {
    if n >= total {
        return (0..total).collect();
    }
    (0..n).map(|i| i * total / n).collect()
}

fn known(ty: &ValueType, axis: usize) -> Option<usize> {
    match ty.shape.get(axis) {
        Some(Dim::Known(n)) => Some(*n),
        _ => None,
    }
}

/// The graph's inputs for demo steps `steps`, in batches of at most `batch`.
pub fn policy_feeds(g: &Graph, demos: &Demos, steps: &[usize], batch: usize) -> crate::Result<Vec<Feeds>> {
    let inputs: Vec<(String, ValueType)> =
        g.inputs.iter().map(|&i| (g.node(i).outputs[0].name.clone(), g.node(i).outputs[0].ty.clone())).collect();
    let obs_dim = demos.observations.ncols();
    let obs = demos.observations.as_slice().ok_or("demo observations are not contiguous")?;
    let row = |i: usize| &obs[i * obs_dim..(i + 1) * obs_dim];
    let check_dim = |name: &str, ty: &ValueType, axis: usize, want: usize| -> crate::Result<()> {
        match known(ty, axis) {
            Some(d) if d != want => {
                Err(format!("input `{name}` ({ty}) expects {d} features per step; the demos have {want}").into())
            }
            _ => Ok(()),
        }
    };
    let mut out = vec![];
    for chunk in steps.chunks(batch.max(1)) {
        let b = chunk.len();
        let mut f = Feeds::new();
        match inputs.as_slice() {
            [(name, ty)] if ty.rank() == 2 => {
                check_dim(name, ty, 1, obs_dim)?;
                let v: Vec<f32> = chunk.iter().flat_map(|&i| row(i).iter().copied()).collect();
                f.insert(name.clone(), Tensor::from_f32(vec![b, obs_dim], v)?);
            }
            [(name, ty)] if ty.rank() == 3 => {
                check_dim(name, ty, 2, obs_dim)?;
                let h = known(ty, 1).ok_or_else(|| format!("history input `{name}` ({ty}) needs a fixed length"))?;
                let hist = demos.history_indices(h);
                let v: Vec<f32> =
                    chunk.iter().flat_map(|&i| hist[i].iter().flat_map(|&j| row(j).iter().copied())).collect();
                f.insert(name.clone(), Tensor::from_f32(vec![b, h, obs_dim], v)?);
            }
            [(iname, ity), (pname, pty)] if iname == "image" && pname == "proprio" => {
                check_dim(pname, pty, 1, obs_dim)?;
                let im = demos.images.as_ref().ok_or("the policy takes images but the demos have no `images` field")?;
                let sh = im.shape();
                for (ax, want) in [(1, sh[1]), (2, sh[2]), (3, sh[3])] {
                    check_dim(iname, ity, ax, want)?;
                }
                let per = sh[1] * sh[2] * sh[3];
                let flat = im.as_slice().ok_or("demo images are not contiguous")?;
                let v: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&i| flat[i * per..(i + 1) * per].iter().map(|&p| p as f32 / 255.0))
                    .collect();
                f.insert(iname.clone(), Tensor::from_f32(vec![b, sh[1], sh[2], sh[3]], v)?);
                let p: Vec<f32> = chunk.iter().flat_map(|&i| row(i).iter().copied()).collect();
                f.insert(pname.clone(), Tensor::from_f32(vec![b, obs_dim], p)?);
            }
            _ => {
                let sig: Vec<String> = inputs.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                return Err(format!(
                    "cannot feed demonstrations to inputs ({}): expected [B, obs], [B, H, obs] or image + proprio",
                    sig.join(", ")
                )
                .into());
            }
        }
        out.push(f);
    }
    Ok(out)
}
