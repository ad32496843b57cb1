//! robomimic HDF5 datasets (`data/demo_<i>/obs/<key>`, `actions`, `rewards`; robomimic's documented
//! layout) read into [`Demos`]: demos in the order of their number, the chosen observation keys
//! (`obs_keys`, in that order; by default every 1-D or 2-D key, sorted by name) concatenated per
//! step. Needs the `hdf5` feature (libhdf5).

use crate::{finite, max_array_bytes, Demos, DemosError};
use hdf5_metno as hdf5;
use ndarray::Array2;
use std::path::Path;

/// A dataset's values as f64 (HDF5 converts the stored type) with rows and columns: 1-D is one
/// column; anything else is refused naming it.
fn read_2d(g: &hdf5::Group, name: &str, what: &str) -> Result<(Vec<f64>, usize, usize), String> {
    let ds = g
        .dataset(name)
        .map_err(|_| format!("`{what}`: missing (has: {})", g.member_names().unwrap_or_default().join(", ")))?;
    let shape = ds.shape();
    let (rows, cols) = match shape.as_slice() {
        [r] => (*r, 1),
        [r, c] => (*r, *c),
        s => return Err(format!("`{what}`: shape {s:?}, expected [T] or [T, D] (images are not read from HDF5 yet)")),
    };
    let bytes = (rows as u64).saturating_mul(cols as u64).saturating_mul(8);
    if bytes > max_array_bytes() {
        return Err(format!(
            "`{what}`: shape {shape:?} is more than the {} bytes allowed (SQIL_MAX_ARRAY_BYTES)",
            max_array_bytes()
        ));
    }
    let v = ds.read_raw::<f64>().map_err(|e| format!("`{what}`: not numeric ({e})"))?;
    Ok((v, rows, cols))
}

/// Loads a robomimic dataset; `obs_keys` picks and orders the observation keys.
pub fn load(path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
    let f = hdf5::File::open(path).map_err(|e| err(format!("not an HDF5 file: {e}")))?;
    let data = f
        .group("data")
        .map_err(|_| err("no group `data` (robomimic layout: data/demo_<i>/obs/<key>, actions)".into()))?;
    let mut demos: Vec<(u64, String)> = data
        .member_names()
        .map_err(|e| err(e.to_string()))?
        .into_iter()
        .filter_map(|n| n.strip_prefix("demo_").and_then(|i| i.parse().ok()).map(|i| (i, n.clone())))
        .collect();
    demos.sort();
    if demos.is_empty() {
        return Err(err("group `data` holds no `demo_<i>` groups".into()));
    }
    let (mut obs, mut act, mut rew, mut starts) = (vec![], vec![], vec![], vec![]);
    let (mut width, mut act_w) = (None, None);
    let mut keys_used: Vec<String> = vec![];
    let mut has_actions = true;
    for (_, name) in &demos {
        let g = data.group(name).map_err(|e| err(format!("`data/{name}`: {e}")))?;
        let og = g.group("obs").map_err(|_| err(format!("`data/{name}/obs`: missing")))?;
        let keys: Vec<String> = if obs_keys.is_empty() {
            let mut k: Vec<String> = og
                .member_names()
                .map_err(|e| err(e.to_string()))?
                .into_iter()
                .filter(|k| og.dataset(k).is_ok_and(|d| d.shape().len() <= 2))
                .collect();
            k.sort();
            k
        } else {
            obs_keys.to_vec()
        };
        if keys.is_empty() {
            return Err(err(format!("`data/{name}/obs`: no 1-D or 2-D observation keys")));
        }
        if keys_used.is_empty() {
            keys_used = keys.clone();
        } else if keys_used != keys {
            return Err(err(format!("`data/{name}/obs`: keys {keys:?}, the first demo has {keys_used:?}")));
        }
        let mut cols: Vec<(Vec<f64>, usize)> = vec![];
        let mut t = None;
        for k in &keys {
            let (v, r, c) = read_2d(&og, k, &format!("data/{name}/obs/{k}")).map_err(err)?;
            if *t.get_or_insert(r) != r {
                return Err(err(format!("`data/{name}/obs/{k}` has {r} steps, the other keys {}", t.unwrap_or(0))));
            }
            cols.push((v, c));
        }
        let t = t.unwrap_or(0);
        let w: usize = cols.iter().map(|c| c.1).sum();
        if *width.get_or_insert(w) != w {
            return Err(err(format!(
                "`data/{name}/obs`: {w} values per step, the first demo has {}",
                width.unwrap_or(0)
            )));
        }
        for i in 0..t {
            for (v, c) in &cols {
                obs.extend(v[i * c..(i + 1) * c].iter().map(|&x| x as f32));
            }
            starts.push(i == 0);
        }
        if g.dataset("actions").is_ok() && has_actions {
            let (v, r, c) = read_2d(&g, "actions", &format!("data/{name}/actions")).map_err(err)?;
            if r != t {
                return Err(err(format!("`data/{name}/actions` has {r} steps, `obs` has {t}")));
            }
            if *act_w.get_or_insert(c) != c {
                return Err(err(format!(
                    "`data/{name}/actions`: {c} columns, the first demo has {}",
                    act_w.unwrap_or(0)
                )));
            }
            act.extend(v.iter().map(|&x| x as f32));
        } else {
            has_actions = false;
        }
        if let Ok((v, r, _)) = read_2d(&g, "rewards", &format!("data/{name}/rewards")) {
            if r == t {
                rew.extend(v.iter().map(|&x| x as f32));
            }
        }
    }
    let t = starts.len();
    if t == 0 {
        return Err(err("the demos hold no steps".into()));
    }
    let w = width.unwrap_or(0);
    let observations = Array2::from_shape_vec((t, w), obs).map_err(|e| err(e.to_string()))?;
    let actions = match (has_actions, act_w) {
        (true, Some(c)) => Some(Array2::from_shape_vec((t, c), act).map_err(|e| err(e.to_string()))?),
        _ => None,
    };
    finite("observations", observations.iter().copied(), w).map_err(err)?;
    if let Some(a) = &actions {
        finite("actions", a.iter().copied(), a.ncols()).map_err(err)?;
    }
    let env_args = data
        .attr("env_args")
        .ok()
        .and_then(|a| a.read_scalar::<hdf5::types::VarLenUnicode>().ok())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s.as_str()).ok())
        .unwrap_or(serde_json::Value::Null);
    let metadata = serde_json::json!({
        "format": "sqil-demos/1",
        "source": "robomimic",
        "obs_keys": keys_used,
        "env_args": env_args,
    });
    Ok(Demos {
        observations,
        actions,
        episode_starts: starts,
        rewards: if rew.len() == t { rew } else { vec![] },
        success: vec![],
        episode_returns: vec![],
        metadata,
        images: None,
    })
}
