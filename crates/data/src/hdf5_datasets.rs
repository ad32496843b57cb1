//! HDF5 demonstration datasets read into [`Demos`] (the `hdf5` feature, libhdf5):
//!
//! - robomimic (`data/demo_<i>/obs/<key>`, `actions`, `rewards`; robomimic's documented layout):
//!   demos in the order of their number, the chosen observation keys (`obs_keys`, in that order;
//!   by default every 1-D or 2-D key, sorted by name) concatenated per step.
//! - Minari (a dataset folder with `data/main_data.hdf5`, or that file: `episode_<id>/observations`
//!   with one row more than `actions`, the final observation, which is dropped; a Dict observation
//!   space is a group whose keys `obs_keys` picks as for robomimic).

use crate::{max_array_bytes, Demos, DemosError};
use hdf5_metno as hdf5;
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

/// Loads an HDF5 dataset, robomimic or Minari by its layout (a folder: Minari's).
pub fn load(path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let file = if path.is_dir() { path.join("data/main_data.hdf5") } else { path.to_path_buf() };
    let f = hdf5::File::open(&file).map_err(|e| DemosError {
        path: file.clone(),
        msg: format!("not an HDF5 file (or not a Minari dataset folder): {e}"),
    })?;
    let names = f.member_names().unwrap_or_default();
    if names.iter().any(|n| n.starts_with("episode_")) && !names.iter().any(|n| n == "data") {
        return minari(&f, &file, obs_keys);
    }
    robomimic(&f, path, obs_keys)
}

/// Observation columns: the datasets `obs_keys` (in that order; by default every 1-D or 2-D
/// dataset, sorted by name) of group `og` at `at`, all with the same number of rows.
#[allow(clippy::type_complexity)]
fn key_columns(
    og: &hdf5::Group,
    at: &str,
    obs_keys: &[String],
) -> Result<(Vec<(Vec<f64>, usize)>, usize, Vec<String>), String> {
    let keys: Vec<String> = if obs_keys.is_empty() {
        let mut k: Vec<String> = og
            .member_names()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|k| og.dataset(k).is_ok_and(|d| d.shape().len() <= 2))
            .collect();
        k.sort();
        k
    } else {
        obs_keys.to_vec()
    };
    if keys.is_empty() {
        return Err(format!("`{at}`: no 1-D or 2-D observation keys"));
    }
    let mut cols = vec![];
    let mut rows = None;
    for k in &keys {
        let (v, r, c) = read_2d(og, k, &format!("{at}/{k}"))?;
        if *rows.get_or_insert(r) != r {
            return Err(format!("`{at}/{k}` has {r} rows, the other keys {}", rows.unwrap_or(0)));
        }
        cols.push((v, c));
    }
    Ok((cols, rows.unwrap_or(0), keys))
}

/// The observation columns of one Minari episode group: the dataset `observations` or, for a
/// Dict space, the keys of the group `observations`.
#[allow(clippy::type_complexity)]
fn episode_obs(
    g: &hdf5::Group,
    at: &str,
    obs_keys: &[String],
) -> Result<(Vec<(Vec<f64>, usize)>, usize, Vec<String>), String> {
    if let Ok(og) = g.group("observations") {
        return key_columns(&og, &format!("{at}/observations"), obs_keys);
    }
    if !obs_keys.is_empty() {
        return Err(format!("`{at}/observations` is one array: --obs-keys applies to Dict observation spaces"));
    }
    let (v, r, c) = read_2d(g, "observations", &format!("{at}/observations"))?;
    Ok((vec![(v, c)], r, vec!["observations".into()]))
}

/// Appends the first `t` steps of `cols` (each step's columns side by side) to `obs`, and their
/// episode starts (a new episode at the first) to `starts`.
fn push_steps(cols: &[(Vec<f64>, usize)], t: usize, obs: &mut Vec<f32>, starts: &mut Vec<bool>) {
    for i in 0..t {
        for (v, c) in cols {
            obs.extend(v[i * c..(i + 1) * c].iter().map(|&x| x as f32));
        }
        starts.push(i == 0);
    }
}

/// A Minari dataset file (see the module header).
fn minari(f: &hdf5::File, path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
    let mut eps: Vec<(u64, String)> = f
        .member_names()
        .map_err(|e| err(e.to_string()))?
        .into_iter()
        .filter_map(|n| n.strip_prefix("episode_").and_then(|i| i.parse().ok()).map(|i| (i, n.clone())))
        .collect();
    eps.sort();
    let (mut obs, mut act, mut rew, mut starts) = (vec![], vec![], vec![], vec![]);
    let (mut width, mut act_w, mut keys_used) = (None, None, vec![]);
    for (_, name) in &eps {
        let g = f.group(name).map_err(|e| err(format!("`{name}`: {e}")))?;
        let (cols, rows, keys) = episode_obs(&g, name, obs_keys).map_err(err)?;
        let (av, t, ac) = read_2d(&g, "actions", &format!("{name}/actions")).map_err(err)?;
        if rows != t + 1 && rows != t {
            return Err(err(format!("`{name}/observations` has {rows} rows for {t} actions (Minari stores T + 1)")));
        }
        let w: usize = cols.iter().map(|c| c.1).sum();
        if *width.get_or_insert(w) != w || *act_w.get_or_insert(ac) != ac {
            return Err(err(format!(
                "`{name}`: {w} observation and {ac} action values per step, the first episode differs"
            )));
        }
        keys_used = keys;
        push_steps(&cols, t, &mut obs, &mut starts);
        act.extend(av.iter().map(|&x| x as f32));
        if let Ok((v, r, _)) = read_2d(&g, "rewards", &format!("{name}/rewards")) {
            if r == t {
                rew.extend(v.iter().map(|&x| x as f32));
            }
        }
    }
    let metadata = serde_json::json!({"format": "sqil-demos/1", "source": "minari", "obs_keys": keys_used});
    Demos::from_rows(path, (obs, width.unwrap_or(0)), Some((act, act_w.unwrap_or(0))), starts, rew, metadata)
}

/// A robomimic dataset file (see the module header).
fn robomimic(f: &hdf5::File, path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
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
        let (cols, t, keys) = key_columns(&og, &format!("data/{name}/obs"), obs_keys).map_err(err)?;
        if keys_used.is_empty() {
            keys_used = keys;
        } else if keys_used != keys {
            return Err(err(format!("`data/{name}/obs`: keys {keys:?}, the first demo has {keys_used:?}")));
        }
        let w: usize = cols.iter().map(|c| c.1).sum();
        if *width.get_or_insert(w) != w {
            return Err(err(format!(
                "`data/{name}/obs`: {w} values per step, the first demo has {}",
                width.unwrap_or(0)
            )));
        }
        push_steps(&cols, t, &mut obs, &mut starts);
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
    let actions = if has_actions { act_w.map(|c| (act, c)) } else { None };
    Demos::from_rows(path, (obs, width.unwrap_or(0)), actions, starts, rew, metadata)
}
