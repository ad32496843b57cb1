//! Demonstration datasets in the `sqil-demos/1` layout (docs/demos-format.md): loading with
//! every rule checked, so later stages (calibration, saliency, fine-tuning) can trust them.

use ndarray::{Array2, Array4, Ix1, Ix2, Ix4};
use ndarray_npy::{NpzReader, ReadableElement};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A bad demonstration file; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct DemosError {
    pub path: PathBuf,
    pub msg: String,
}

/// Expert demonstrations: steps of several episodes back to back.
#[derive(Clone, Debug)]
pub struct Demos {
    /// [T, obs_dim]
    pub observations: Array2<f32>,
    /// [T, act_dim]; absent in a file of states only (the float policy's actions are then the
    /// targets).
    pub actions: Option<Array2<f32>>,
    /// [T], true at each episode's first step (one episode when the file does not say).
    pub episode_starts: Vec<bool>,
    /// [T], or empty when the file has none.
    pub rewards: Vec<f32>,
    /// [E], or empty when the file has none.
    pub success: Vec<bool>,
    /// [E], or empty when the file has none.
    pub episode_returns: Vec<f64>,
    /// The JSON metadata (task, env, expert, seeds, versions); `{}` when the file has none.
    pub metadata: serde_json::Value,
    /// Pixel tasks: camera frames, uint8 `[T, 3, H, W]` (the policy sees them divided by 255).
    pub images: Option<Array4<u8>>,
}

/// Camera frames stored channels last (`[frames][H][W][C]`, rows `row` bytes apart, `row >= W * C`)
/// as the demonstrations keep them, channels first (`[frames][C][H][W]`): the layout of robomimic,
/// Minari and LeRobot images, PNG rows and decoded video.
#[allow(dead_code)]
pub(crate) fn hwc_to_chw(src: &[u8], frames: usize, (h, w, c): (usize, usize, usize), row: usize) -> Vec<u8> {
    let mut out = vec![0u8; frames * c * h * w];
    for (i, dst) in out.chunks_mut((c * h * w).max(1)).enumerate() {
        for y in 0..h {
            let line = &src[(i * h + y) * row..][..w * c];
            for x in 0..w {
                for ch in 0..c {
                    dst[(ch * h + y) * w + x] = line[x * c + ch];
                }
            }
        }
    }
    out
}

/// The `half` crate, whose `f16` the [`Half`] element wraps.
pub use half;

#[cfg(feature = "hdf5")]
pub mod hdf5_datasets;
#[cfg(feature = "parquet")]
pub mod lerobot;

impl Demos {
    /// Loads demonstrations by their file type: a LeRobot dataset folder (`meta/info.json`; the
    /// `parquet` feature), `.hdf5` / `.h5` as a robomimic or Minari dataset or a Minari dataset
    /// folder (the `hdf5` feature), anything else as `.npz`; `obs_keys` picks and orders the
    /// observation keys (columns).
    pub fn load_with(path: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
        if path.join("meta/info.json").is_file() {
            #[cfg(feature = "parquet")]
            return lerobot::load(path, obs_keys);
            #[cfg(not(feature = "parquet"))]
            return Err(DemosError {
                path: path.to_path_buf(),
                msg: "a LeRobot dataset: this sqil was built without parquet support (cargo build --features parquet)"
                    .into(),
            });
        }
        let h5 =
            path.extension().is_some_and(|e| e == "hdf5" || e == "h5") || path.join("data/main_data.hdf5").is_file();
        if h5 {
            #[cfg(feature = "hdf5")]
            return hdf5_datasets::load(path, obs_keys);
            #[cfg(not(feature = "hdf5"))]
            return Err(DemosError {
                path: path.to_path_buf(),
                msg: "an HDF5 dataset: this sqil was built without HDF5 support (cargo build --features hdf5, with libhdf5)".into(),
            });
        }
        if !obs_keys.is_empty() {
            return Err(DemosError {
                path: path.to_path_buf(),
                msg: "--obs-keys applies to HDF5 datasets; an .npz has one `observations` array".into(),
            });
        }
        Demos::load(path)
    }

    /// Loads and validates a `.npz` demonstration file. Only `observations` is required (float32,
    /// float64 or float16, `[T, obs_dim]`); `actions` (without them the float policy's own actions are the
    /// targets), `episode_starts` (without it the file is one episode), `rewards`, `success`,
    /// `episode_returns` (float32 or float64), `metadata` (JSON bytes) and `images` are optional,
    /// and each one present is checked.
    pub fn load(path: &Path) -> Result<Demos, DemosError> {
        let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
        check_npz_file(path).map_err(err)?;
        let f = File::open(path).map_err(|e| err(e.to_string()))?;
        let mut z = NpzReader::new(f).map_err(|e| err(format!("not an .npz archive: {e}")))?;
        let names = z.names().map_err(|e| err(e.to_string()))?;
        let has = |k: &str| names.iter().any(|n| n == k || *n == format!("{k}.npy"));
        let metadata = if has("metadata") {
            let meta_bytes = read::<u8, Ix1>(&mut z, &names, "metadata").map_err(err)?;
            let m: serde_json::Value = serde_json::from_slice(meta_bytes.as_slice().unwrap_or_default())
                .map_err(|e| err(format!("field `metadata`: not UTF-8 JSON: {e}")))?;
            if !m.is_object() {
                return Err(err("field `metadata`: not a JSON object".into()));
            }
            if !m["format"].is_null() && m["format"] != "sqil-demos/1" {
                return Err(err(format!("field `metadata`: format is {}, expected \"sqil-demos/1\"", m["format"])));
            }
            m
        } else {
            serde_json::json!({})
        };
        let observations = read_f32_2d(&mut z, &names, "observations").map_err(err)?;
        let t = observations.nrows();
        if t == 0 {
            return Err(err("field `observations`: no steps".into()));
        }
        let actions = if has("actions") { Some(read_f32_2d(&mut z, &names, "actions").map_err(err)?) } else { None };
        let episode_starts = if has("episode_starts") {
            read::<bool, Ix1>(&mut z, &names, "episode_starts").map_err(err)?.to_vec()
        } else {
            (0..t).map(|i| i == 0).collect()
        };
        let rewards = if has("rewards") {
            let r = read_f32_1d(&mut z, &names, "rewards").map_err(err)?;
            if r.len() != t {
                return Err(err(format!("field `rewards` has {} steps, `observations` has {t}", r.len())));
            }
            r
        } else {
            vec![]
        };
        if let Some(a) = &actions {
            if a.nrows() != t {
                return Err(err(format!("field `actions` has {} steps, `observations` has {t}", a.nrows())));
            }
        }
        if episode_starts.len() != t {
            return Err(err(format!(
                "field `episode_starts` has {} steps, `observations` has {t}",
                episode_starts.len()
            )));
        }
        if !episode_starts[0] {
            return Err(err("field `episode_starts`: the first step does not start an episode".into()));
        }
        let e = episode_starts.iter().filter(|&&s| s).count();
        let success =
            if has("success") { read::<bool, Ix1>(&mut z, &names, "success").map_err(err)?.to_vec() } else { vec![] };
        let episode_returns =
            if has("episode_returns") { read_f64_1d(&mut z, &names, "episode_returns").map_err(err)? } else { vec![] };
        for (field, len, present) in [
            ("success", success.len(), has("success")),
            ("episode_returns", episode_returns.len(), has("episode_returns")),
        ] {
            if present && len != e {
                return Err(err(format!("field `{field}` has {len} entries for {e} episodes")));
            }
        }
        let images = if has("images") {
            let im = read::<u8, Ix4>(&mut z, &names, "images").map_err(err)?;
            if im.shape()[0] != t {
                return Err(err(format!("field `images` has {} steps, `observations` has {t}", im.shape()[0])));
            }
            Some(im)
        } else {
            None
        };
        finite("observations", observations.iter().copied(), observations.ncols()).map_err(err)?;
        if let Some(a) = &actions {
            finite("actions", a.iter().copied(), a.ncols()).map_err(err)?;
        }
        finite("rewards", rewards.iter().copied(), 1).map_err(err)?;
        Ok(Demos { observations, actions, episode_starts, rewards, success, episode_returns, metadata, images })
    }

    /// Demonstrations from a reader of another format (HDF5, parquet): steps as flat rows of
    /// `width` observations and (when present) rows of actions with their width, episode starts, rewards
    /// (kept only when there is one per step); checked as `load` checks an .npz (at least one
    /// step, every value finite), errors against `path`.
    #[cfg(any(feature = "hdf5", feature = "parquet"))]
    pub(crate) fn from_rows(
        path: &Path,
        (obs, width): (Vec<f32>, usize),
        actions: Option<(Vec<f32>, usize)>,
        episode_starts: Vec<bool>,
        rewards: Vec<f32>,
        metadata: serde_json::Value,
    ) -> Result<Demos, DemosError> {
        let err = |msg: String| DemosError { path: path.to_path_buf(), msg };
        let t = episode_starts.len();
        if t == 0 {
            return Err(err("the dataset holds no steps".into()));
        }
        let observations = Array2::from_shape_vec((t, width), obs).map_err(|e| err(e.to_string()))?;
        finite("observations", observations.iter().copied(), width).map_err(err)?;
        let actions = match actions {
            Some((a, aw)) => {
                let a = Array2::from_shape_vec((t, aw), a).map_err(|e| err(e.to_string()))?;
                finite("actions", a.iter().copied(), aw).map_err(err)?;
                Some(a)
            }
            None => None,
        };
        Ok(Demos {
            observations,
            actions,
            episode_starts,
            rewards: if rewards.len() == t { rewards } else { vec![] },
            success: vec![],
            episode_returns: vec![],
            metadata,
            images: None,
        })
    }

    /// Adds camera frames `[T, C, H, W]` (bytes and shape) read beside the rows, checking that
    /// there is one per step.
    #[allow(dead_code)]
    pub(crate) fn with_images(
        mut self,
        path: &Path,
        images: Option<(Vec<u8>, [usize; 4])>,
    ) -> Result<Demos, DemosError> {
        if let Some((v, [t, c, h, w])) = images {
            if t != self.len() {
                return Err(DemosError {
                    path: path.to_path_buf(),
                    msg: format!("{t} camera frames for {} steps", self.len()),
                });
            }
            self.images = Some(
                Array4::from_shape_vec((t, c, h, w), v)
                    .map_err(|e| DemosError { path: path.to_path_buf(), msg: e.to_string() })?,
            );
        }
        Ok(self)
    }

    pub fn len(&self) -> usize {
        self.observations.nrows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For each step, the steps of a history window of length `h` ending at it (oldest first;
    /// the episode's first step repeated before the episode starts).
    pub fn history_indices(&self, h: usize) -> Vec<Vec<usize>> {
        let mut first = 0;
        (0..self.len())
            .map(|i| {
                if self.episode_starts[i] {
                    first = i;
                }
                (0..h).map(|j| (i + j + 1).saturating_sub(h).max(first)).collect()
            })
            .collect()
    }

    /// The action space's bounds from the metadata (`action_low`, `action_high`: one number, or
    /// one per action dimension), if it gives them; an error names the field if they are malformed.
    /// `dims`: the action dimension when the file has no actions (the policy's output width).
    pub fn action_box(&self, dims: usize) -> Result<Option<ActionBox>, String> {
        let (lo, hi) = (&self.metadata["action_low"], &self.metadata["action_high"]);
        if lo.is_null() && hi.is_null() {
            return Ok(None);
        }
        let nums = |v: &serde_json::Value, key: &str| -> Result<Vec<f32>, String> {
            let list = match v {
                serde_json::Value::Array(a) => a.clone(),
                serde_json::Value::Number(_) => vec![v.clone()],
                _ => return Err(format!("field `metadata`: `{key}` must be a number or a list of numbers")),
            };
            list.iter()
                .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(|| format!("field `metadata`: `{key}` holds {x}")))
                .collect()
        };
        let dims = self.actions.as_ref().map_or(dims, |a| a.ncols());
        ActionBox::new(nums(lo, "action_low")?, nums(hi, "action_high")?, dims)
            .map(Some)
            .map_err(|e| format!("field `metadata`: {e}"))
    }

    /// Step ranges of the episodes.
    pub fn episodes(&self) -> Vec<Range<usize>> {
        let starts: Vec<usize> = self.episode_starts.iter().enumerate().filter(|(_, &s)| s).map(|(i, _)| i).collect();
        starts.iter().enumerate().map(|(k, &s)| s..starts.get(k + 1).copied().unwrap_or(self.len())).collect()
    }
}

/// An action space's box: the environment clips every executed action to it, so two actions
/// that clip to the same point are the same action.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ActionBox {
    /// Per action dimension, `low[i] < high[i]`, both finite.
    pub low: Vec<f32>,
    pub high: Vec<f32>,
}

impl ActionBox {
    /// A box over `dims` action dimensions from one bound per dimension, or one for all.
    pub fn new(low: Vec<f32>, high: Vec<f32>, dims: usize) -> Result<ActionBox, String> {
        let widen = |v: Vec<f32>, what: &str| match v.len() {
            1 => Ok(vec![v[0]; dims]),
            n if n == dims => Ok(v),
            n => Err(format!("`{what}` has {n} entries for {dims} action dimensions")),
        };
        let (low, high) = (widen(low, "action_low")?, widen(high, "action_high")?);
        for (i, (l, h)) in low.iter().zip(&high).enumerate() {
            if !(l.is_finite() && h.is_finite() && l < h) {
                return Err(format!("action dimension {i}: bounds [{l}, {h}] are not finite with low < high"));
            }
        }
        Ok(ActionBox { low, high })
    }

    /// Parses `LOW,HIGH` (the same bounds on every dimension) for `dims` dimensions.
    pub fn parse(s: &str, dims: usize) -> Result<ActionBox, String> {
        let v: Vec<f32> = s
            .split(',')
            .map(|x| x.trim().parse::<f32>().map_err(|_| format!("action box `{s}`: `{x}` is not a number")))
            .collect::<Result<_, _>>()?;
        match v.as_slice() {
            [l, h] => ActionBox::new(vec![*l], vec![*h], dims),
            _ => Err(format!("action box `{s}`: expected LOW,HIGH")),
        }
    }

    /// Clips `v` (rows of `low.len()` actions, or chunks of them) to the box in place.
    pub fn clip(&self, v: &mut [f32]) {
        let a = self.low.len();
        for (i, x) in v.iter_mut().enumerate() {
            *x = x.clamp(self.low[i % a], self.high[i % a]);
        }
    }
}

/// The largest array (bytes) an .npy file or .npz entry may declare before anything is allocated
/// for it: `SQIL_MAX_ARRAY_BYTES`, default 16 GiB.
pub fn max_array_bytes() -> u64 {
    std::env::var("SQIL_MAX_ARRAY_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(16 << 30)
}

/// What an .npy header declares: the shape, the element size and the header's own length.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyHeader {
    pub shape: Vec<u64>,
    pub item_bytes: u64,
    pub header_bytes: u64,
}

impl NpyHeader {
    /// The data bytes the shape needs, or `None` when that overflows.
    pub fn data_bytes(&self) -> Option<u64> {
        self.shape.iter().try_fold(self.item_bytes, |a, &d| a.checked_mul(d))
    }

    /// Checks the declared size against the bytes that follow the header (`data_len`) and the cap
    /// ([`max_array_bytes`]), before a reader allocates it.
    pub fn check(&self, data_len: u64) -> Result<(), String> {
        let need = self.data_bytes().ok_or_else(|| format!("the header's shape {:?} overflows", self.shape))?;
        if need > max_array_bytes() {
            return Err(format!(
                "the header declares shape {:?} ({need} bytes), more than the {} bytes allowed (SQIL_MAX_ARRAY_BYTES)",
                self.shape,
                max_array_bytes()
            ));
        }
        if need > data_len {
            return Err(format!(
                "the header declares shape {:?} ({need} bytes of data), but only {data_len} bytes follow it",
                self.shape
            ));
        }
        Ok(())
    }
}

/// Reads an .npy header (format versions 1 to 3) without reading the data.
pub fn npy_header(r: &mut impl std::io::Read) -> Result<NpyHeader, String> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|_| "not an .npy array (shorter than its magic)".to_string())?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err("not an .npy array (bad magic)".into());
    }
    let (len, prefix) = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).map_err(|_| "truncated .npy header".to_string())?;
            (u16::from_le_bytes(b) as u64, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).map_err(|_| "truncated .npy header".to_string())?;
            (u32::from_le_bytes(b) as u64, 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    if len > 1 << 20 {
        return Err(format!(".npy header of {len} bytes (at most 1 MiB)"));
    }
    let mut text = vec![0u8; len as usize];
    r.read_exact(&mut text).map_err(|_| "truncated .npy header".to_string())?;
    let text = String::from_utf8_lossy(&text);
    let field = |key: &str| text.find(key).map(|i| &text[i + key.len()..]);
    let descr = field("'descr':").ok_or("the .npy header has no 'descr'")?;
    let descr = descr.trim_start().trim_start_matches(['\'', '"']);
    let descr: String = descr.chars().take_while(|c| *c != '\'' && *c != '"').collect();
    let item_bytes: u64 =
        descr.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().map_err(|_| format!("dtype `{descr}`"))?;
    let shape = field("'shape':").ok_or("the .npy header has no 'shape'")?;
    let shape = shape.trim_start().strip_prefix('(').ok_or("the .npy header's shape is not a tuple")?;
    let shape = &shape[..shape.find(')').ok_or("the .npy header's shape is not a tuple")?];
    let shape = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<u64>().map_err(|_| format!("shape entry `{d}`")))
        .collect::<Result<Vec<u64>, String>>()?;
    Ok(NpyHeader { shape, item_bytes, header_bytes: prefix + len })
}

/// Checks an .npy file's header against its size (see [`NpyHeader::check`]) before it is read.
pub fn check_npy_file(path: &Path) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let h = npy_header(&mut f)?;
    h.check(size.saturating_sub(h.header_bytes))
}

/// Checks every entry of an .npz archive (its declared size, its inflation ratio, its .npy header
/// against that size) before any is read.
pub fn check_npz_file(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| format!("not an .npz archive: {e}"))?;
    let mut total = 0u64;
    for i in 0..z.len() {
        let mut e = z.by_index(i).map_err(|e| format!("entry {i}: {e}"))?;
        let name = e.name().to_string();
        let (size, packed) = (e.size(), e.compressed_size());
        total = total.saturating_add(size);
        if size > max_array_bytes() || total > max_array_bytes() {
            return Err(format!("entry `{name}` inflates to {size} bytes, more than allowed (SQIL_MAX_ARRAY_BYTES)"));
        }
        if size > (1 << 20) && size / packed.max(1) > 1000 {
            return Err(format!("entry `{name}` inflates {size} / {packed} = over 1000x: refused as a zip bomb"));
        }
        let h = npy_header(&mut e).map_err(|m| format!("entry `{name}`: {m}"))?;
        h.check(size.saturating_sub(h.header_bytes)).map_err(|m| format!("entry `{name}`: {m}"))?;
    }
    Ok(())
}

fn read<A: ReadableElement, D: ndarray::Dimension>(
    z: &mut NpzReader<File>,
    names: &[String],
    key: &str,
) -> Result<ndarray::Array<A, D>, String> {
    let name = names
        .iter()
        .find(|n| n.as_str() == key || n.as_str() == format!("{key}.npy"))
        .ok_or_else(|| format!("missing field `{key}` (has: {})", names.join(", ")))?;
    z.by_name(name).map_err(|e| format!("field `{key}`: wrong type or shape ({e}); see docs/demos-format.md"))
}

/// An IEEE binary16 element of an .npy array (`<f2`, `>f2`): ndarray-npy reads and writes only
/// its built-in element types, and half-precision pipelines save float16 observations and inputs.
/// Every float16 value is exactly an f32 (`f32::from(h.0)`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Half(pub half::f16);

impl ReadableElement for Half {
    fn read_to_end_exact_vec<R: std::io::Read>(
        mut reader: R,
        type_desc: &py_literal::Value,
        len: usize,
    ) -> Result<Vec<Half>, ndarray_npy::ReadDataError> {
        let little = match type_desc {
            py_literal::Value::String(s) if s == "<f2" => true,
            py_literal::Value::String(s) if s == ">f2" => false,
            other => return Err(ndarray_npy::ReadDataError::WrongDescriptor(other.clone())),
        };
        let mut bytes = vec![0u8; len.checked_mul(2).ok_or(ndarray_npy::ReadDataError::MissingData)?];
        reader.read_exact(&mut bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ndarray_npy::ReadDataError::MissingData,
            _ => ndarray_npy::ReadDataError::Io(e),
        })?;
        let extra = reader.read_to_end(&mut Vec::new())?;
        if extra > 0 {
            return Err(ndarray_npy::ReadDataError::ExtraBytes(extra));
        }
        Ok(bytes
            .chunks_exact(2)
            .map(|b| {
                let b = [b[0], b[1]];
                Half(half::f16::from_bits(if little { u16::from_le_bytes(b) } else { u16::from_be_bytes(b) }))
            })
            .collect())
    }
}

impl ndarray_npy::WritableElement for Half {
    fn type_descriptor() -> py_literal::Value {
        py_literal::Value::String("<f2".into())
    }

    fn write<W: std::io::Write>(&self, mut writer: W) -> Result<(), ndarray_npy::WriteDataError> {
        Ok(writer.write_all(&self.0.to_bits().to_le_bytes())?)
    }

    fn write_slice<W: std::io::Write>(slice: &[Half], mut writer: W) -> Result<(), ndarray_npy::WriteDataError> {
        let bytes: Vec<u8> = slice.iter().flat_map(|h| h.0.to_bits().to_le_bytes()).collect();
        Ok(writer.write_all(&bytes)?)
    }
}

/// A 2-D float field as f32: stored as float32, float64 (numpy's default; rounded) or float16
/// (exact).
fn read_f32_2d(z: &mut NpzReader<File>, names: &[String], key: &str) -> Result<Array2<f32>, String> {
    read::<f32, Ix2>(z, names, key).or_else(|e32| {
        (read::<f64, Ix2>(z, names, key).map(|a| a.mapv(|v| v as f32)))
            .or_else(|_| read::<Half, Ix2>(z, names, key).map(|a| a.mapv(|v| f32::from(v.0))))
            .map_err(|_| e32)
    })
}

fn read_f32_1d(z: &mut NpzReader<File>, names: &[String], key: &str) -> Result<Vec<f32>, String> {
    read::<f32, Ix1>(z, names, key).map(|a| a.to_vec()).or_else(|e32| {
        (read::<f64, Ix1>(z, names, key).map(|a| a.iter().map(|&v| v as f32).collect()))
            .or_else(|_| read::<Half, Ix1>(z, names, key).map(|a| a.iter().map(|v| f32::from(v.0)).collect()))
            .map_err(|_| e32)
    })
}

fn read_f64_1d(z: &mut NpzReader<File>, names: &[String], key: &str) -> Result<Vec<f64>, String> {
    match read::<f64, Ix1>(z, names, key) {
        Ok(a) => Ok(a.to_vec()),
        Err(e64) => read::<f32, Ix1>(z, names, key).map(|a| a.iter().map(|&v| v as f64).collect()).map_err(|_| e64),
    }
}

fn finite(field: &str, v: impl Iterator<Item = f32>, cols: usize) -> Result<(), String> {
    for (i, x) in v.enumerate() {
        if !x.is_finite() {
            return Err(format!("field `{field}`: {x} at step {}, column {}", i / cols.max(1), i % cols.max(1)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_boxes_parse_clip_and_name_their_errors() {
        let b = ActionBox::parse("-1,1", 3).unwrap();
        assert_eq!((b.low.clone(), b.high.clone()), (vec![-1.0; 3], vec![1.0; 3]));
        let mut v = vec![-2.0, 0.5, 3.0, 1.0, -1.0, f32::MIN];
        b.clip(&mut v);
        assert_eq!(v, vec![-1.0, 0.5, 1.0, 1.0, -1.0, -1.0]);
        let per = ActionBox::new(vec![0.0, -2.0], vec![1.0, 2.0], 2).unwrap();
        let mut w = vec![5.0, 5.0];
        per.clip(&mut w);
        assert_eq!(w, vec![1.0, 2.0]);
        for (s, want) in [("1,-1", "low < high"), ("x,1", "not a number"), ("1", "LOW,HIGH"), ("nan,1", "finite")] {
            let e = ActionBox::parse(s, 2).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        assert!(ActionBox::new(vec![0.0; 3], vec![1.0; 3], 2).unwrap_err().contains("3 entries for 2"));
    }

    #[test]
    fn the_box_comes_from_the_metadata() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/demos/hopper.npz");
        let mut d = Demos::load(&root).unwrap();
        assert_eq!(d.action_box(3).unwrap(), Some(ActionBox::parse("-1,1", 3).unwrap()));
        d.metadata["action_high"] = serde_json::json!("big");
        assert!(d.action_box(3).unwrap_err().contains("action_high"));
        d.metadata.as_object_mut().unwrap().remove("action_low");
        d.metadata.as_object_mut().unwrap().remove("action_high");
        assert_eq!(d.action_box(3).unwrap(), None);
    }
}
