//! HDF5 demonstration datasets read into [`Demos`] (the `hdf5` feature, libhdf5):
//!
//! - robomimic (`data/demo_<i>/obs/<key>`, `actions`, `rewards`; robomimic's documented layout):
//!   demos in the order of their number, the chosen observation keys (`obs_keys`, in that order;
//!   by default every 1-D or 2-D key, sorted by name) concatenated per step.
//! - Minari (a dataset folder with `data/main_data.hdf5`, or that file: `episode_<id>/observations`
//!   with one row more than `actions`, the final observation, which is dropped; a Dict observation
//!   space is a group whose keys `obs_keys` picks as for robomimic).
//!
//! Camera frames: a 4-D uint8 key `[T, H, W, C]` (robomimic's `agentview_image`, a Minari Dict
//! space's image) becomes the demonstrations' `images` `[T, C, H, W]`, which a policy's image input
//! sees divided by 255: the key named in `obs_keys` (one camera), else the first 4-D key by name.

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
        s => return Err(format!("`{what}`: shape {s:?}, expected [T] or [T, D] (or [T, H, W, C] camera frames)")),
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
        obs_keys.iter().filter(|k| og.dataset(k).map_or(true, |d| d.shape().len() != 4)).cloned().collect()
    };
    if keys.is_empty() && image_key(og, at, obs_keys)?.is_none() {
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
    if rows.is_none() {
        // Camera frames only: the steps are the frames.
        if let Some(k) = image_key(og, at, obs_keys)? {
            rows = og.dataset(&k).ok().and_then(|d| d.shape().first().copied());
        }
    }
    Ok((cols, rows.unwrap_or(0), keys))
}

/// The camera key of observation group `og`: the 4-D key among `obs_keys` (at most one), or with
/// no `obs_keys` the first 4-D key by name.
fn image_key(og: &hdf5::Group, at: &str, obs_keys: &[String]) -> Result<Option<String>, String> {
    let is4 = |k: &String| og.dataset(k).is_ok_and(|d| d.shape().len() == 4);
    let found: Vec<String> = if obs_keys.is_empty() {
        let mut k: Vec<String> = og.member_names().map_err(|e| e.to_string())?.into_iter().filter(is4).collect();
        k.sort();
        k.truncate(1);
        k
    } else {
        obs_keys.iter().filter(|k| is4(k)).cloned().collect()
    };
    if found.len() > 1 {
        return Err(format!("`{at}`: cameras {found:?}: a policy takes one image input, name one in --obs-keys"));
    }
    Ok(found.into_iter().next())
}

/// The first `t` camera frames of `og`'s image key (see [`image_key`]) as `[t, C, H, W]` bytes, and
/// the key; `None` without one.
#[allow(clippy::type_complexity)]
fn read_images(
    og: &hdf5::Group,
    at: &str,
    obs_keys: &[String],
    t: usize,
) -> Result<Option<(Vec<u8>, [usize; 4], String)>, String> {
    let Some(key) = image_key(og, at, obs_keys)? else { return Ok(None) };
    let what = format!("{at}/{key}");
    let ds = og.dataset(&key).map_err(|e| format!("`{what}`: {e}"))?;
    let sh = ds.shape();
    let (rows, h, w, c) = (sh[0], sh[1], sh[2], sh[3]);
    if rows < t || !matches!(c, 1 | 3 | 4) {
        return Err(format!("`{what}`: shape {sh:?}, expected [{t}, H, W, C] frames with 1, 3 or 4 channels"));
    }
    if ds.dtype().map(|d| d.size()).unwrap_or(0) != 1 {
        return Err(format!("`{what}`: camera frames must be uint8"));
    }
    let bytes = (rows as u64).saturating_mul((h * w * c) as u64);
    if bytes > max_array_bytes() {
        return Err(format!("`{what}`: {bytes} bytes of frames, more than allowed (SQIL_MAX_ARRAY_BYTES)"));
    }
    let v = ds.read_raw::<u8>().map_err(|e| format!("`{what}`: {e}"))?;
    Ok(Some((crate::hwc_to_chw(&v, t, (h, w, c), w * c), [t, c, h, w], key)))
}

/// Appends an episode's frames to `all`, checking their size against the first episode's.
fn push_images(
    all: &mut Option<(Vec<u8>, [usize; 4])>,
    got: Option<(Vec<u8>, [usize; 4], String)>,
    at: &str,
) -> Result<(), String> {
    match (all.as_mut(), got) {
        (None, Some((v, shape, _))) => *all = Some((v, shape)),
        (Some((a, s)), Some((v, shape, _))) => {
            if shape[1..] != s[1..] {
                return Err(format!("`{at}`: frames of {:?}, the first episode's are {:?}", &shape[1..], &s[1..]));
            }
            a.extend(v);
            s[0] += shape[0];
        }
        (Some(_), None) => return Err(format!("`{at}`: no camera frames, the first episode has them")),
        (None, None) => {}
    }
    Ok(())
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

/// The members named `<prefix><number>`, in the order of their number (`demo_10` after `demo_9`).
fn numbered(names: Vec<String>, prefix: &str) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> =
        names.into_iter().filter_map(|n| n.strip_prefix(prefix).and_then(|i| i.parse().ok()).map(|i| (i, n))).collect();
    v.sort();
    v
}

/// A Minari dataset file (see the module header).
fn minari(f: &hdf5::File, path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
    let eps = numbered(f.member_names().map_err(|e| err(e.to_string()))?, "episode_");
    let (mut obs, mut act, mut rew, mut starts) = (vec![], vec![], vec![], vec![]);
    let (mut width, mut act_w, mut keys_used) = (None, None, vec![]);
    let mut images = None;
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
        if let Ok(og) = g.group("observations") {
            let frames = read_images(&og, &format!("{name}/observations"), obs_keys, t).map_err(err)?;
            push_images(&mut images, frames, name).map_err(err)?;
        }
        push_steps(&cols, t, &mut obs, &mut starts);
        act.extend(av.iter().map(|&x| x as f32));
        if let Ok((v, r, _)) = read_2d(&g, "rewards", &format!("{name}/rewards")) {
            if r == t {
                rew.extend(v.iter().map(|&x| x as f32));
            }
        }
    }
    let metadata = serde_json::json!({"format": "sqil-demos/1", "source": "minari", "obs_keys": keys_used});
    Demos::from_rows(path, (obs, width.unwrap_or(0)), Some((act, act_w.unwrap_or(0))), starts, rew, metadata)?
        .with_images(path, images)
}

/// A robomimic dataset file (see the module header).
fn robomimic(f: &hdf5::File, path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
    let data = f
        .group("data")
        .map_err(|_| err("no group `data` (robomimic layout: data/demo_<i>/obs/<key>, actions)".into()))?;
    let demos = numbered(data.member_names().map_err(|e| err(e.to_string()))?, "demo_");
    if demos.is_empty() {
        return Err(err("group `data` holds no `demo_<i>` groups".into()));
    }
    let (mut obs, mut act, mut rew, mut starts) = (vec![], vec![], vec![], vec![]);
    let (mut width, mut act_w) = (None, None);
    let mut keys_used: Vec<String> = vec![];
    let mut has_actions = true;
    let (mut images, mut camera) = (None, None);
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
        let at = format!("data/{name}/obs");
        let frames = read_images(&og, &at, obs_keys, t).map_err(err)?;
        if let Some((_, _, k)) = &frames {
            camera.get_or_insert(k.clone());
        }
        push_images(&mut images, frames, &at).map_err(err)?;
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
        "camera": camera,
        "env_args": env_args,
    });
    let actions = if has_actions { act_w.map(|c| (act, c)) } else { None };
    Demos::from_rows(path, (obs, width.unwrap_or(0)), actions, starts, rew, metadata)?.with_images(path, images)
}
