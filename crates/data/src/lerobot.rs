//! LeRobot datasets (the `parquet` feature): a folder with `meta/info.json` and parquet frames
//! under `data/` (v2.x: a file per episode, v3.0: files holding several episodes), one row per
//! frame with `observation.state` and `action` as float lists and `episode_index`,
//! `frame_index`. Frames are taken in file order, then by (episode, frame); `obs_keys` picks and
//! orders the observation columns (default `observation.state`).
//!
//! Camera frames: a feature of dtype `image` in `meta/info.json` (a struct column of PNG `bytes`,
//! as LeRobot writes it) becomes the demonstrations' `images` `[T, C, H, W]`: the image key named
//! in `obs_keys` (one camera), else the first by name. A camera stored as `video` is decoded by the
//! `ffmpeg` program to RGB frames: v2.x keeps one mp4 per episode, v3.0 several episodes per file
//! at the offsets `meta/episodes/` gives ([`VideoSource`]); each row takes frame `frame_index` of
//! its episode (LeRobot's timestamps are `frame_index / fps`). Without ffmpeg, a message says so.

use crate::{Demos, DemosError};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::path::{Path, PathBuf};

/// Every parquet file under `dir`, sorted by path.
fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            parquet_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out.sort();
    Ok(())
}

/// Column `name` of `b` as rows of floats (a list or fixed-size list of float32/float64, or a
/// plain numeric column: one value per row).
fn float_rows(b: &RecordBatch, name: &str, file: &Path) -> Result<(Vec<f32>, usize), String> {
    let col = b.column_by_name(name).ok_or_else(|| {
        let have: Vec<String> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
        format!("{}: no column `{name}` (has: {})", file.display(), have.join(", "))
    })?;
    let rows = col.len();
    let values = |a: &dyn Array| -> Result<Vec<f32>, String> {
        if let Some(v) = a.as_primitive_opt::<Float32Type>() {
            Ok(v.values().to_vec())
        } else if let Some(v) = a.as_primitive_opt::<Float64Type>() {
            Ok(v.values().iter().map(|&x| x as f32).collect())
        } else {
            Err(format!("{}: column `{name}` holds {:?}, not floats", file.display(), a.data_type()))
        }
    };
    if col.null_count() > 0 {
        return Err(format!("{}: column `{name}` has {} missing values", file.display(), col.null_count()));
    }
    let (v, width) = if let Some(l) = col.as_list_opt::<i32>() {
        let offs = l.value_offsets();
        let width = if rows == 0 { 0 } else { (offs[1] - offs[0]) as usize };
        if offs.windows(2).any(|w| (w[1] - w[0]) as usize != width) {
            return Err(format!("{}: column `{name}`: rows of different lengths", file.display()));
        }
        let all = values(l.values().as_ref())?;
        let start = offs[0] as usize;
        (all[start..start + rows * width].to_vec(), width)
    } else if let Some(l) = col.as_fixed_size_list_opt() {
        (values(l.values().as_ref())?, l.value_length() as usize)
    } else {
        (values(col.as_ref())?, 1)
    };
    if v.len() != rows * width {
        return Err(format!("{}: column `{name}`: {} values for {rows} rows of {width}", file.display(), v.len()));
    }
    Ok((v, width))
}

fn int_rows(b: &RecordBatch, name: &str, file: &Path) -> Result<Vec<i64>, String> {
    let col = b.column_by_name(name).ok_or_else(|| format!("{}: no column `{name}`", file.display()))?;
    col.as_primitive_opt::<Int64Type>()
        .map(|v| v.values().to_vec())
        .ok_or_else(|| format!("{}: column `{name}` is {:?}, not int64", file.display(), col.data_type()))
}

/// One camera frame: `[C, H, W]` bytes and that shape.
type Frame = (Vec<u8>, [usize; 3]);

/// Decodes one PNG frame to `[C, H, W]` bytes (8-bit gray, gray + alpha, RGB or RGBA).
fn png_chw(bytes: &[u8], what: &str) -> Result<Frame, String> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut r = dec.read_info().map_err(|e| format!("{what}: not a PNG frame ({e})"))?;
    let size = r.output_buffer_size().ok_or_else(|| format!("{what}: PNG frame too large"))?;
    if size as u64 > crate::max_array_bytes() {
        return Err(format!("{what}: PNG frame of {size} bytes, more than allowed (SQIL_MAX_ARRAY_BYTES)"));
    }
    let mut buf = vec![0u8; size];
    let info = r.next_frame(&mut buf).map_err(|e| format!("{what}: PNG frame: {e}"))?;
    let (h, w, c) = (info.height as usize, info.width as usize, info.color_type.samples());
    Ok((crate::hwc_to_chw(&buf, 1, (h, w, c), info.line_size), [c, h, w]))
}

/// Column `name` of `b` as PNG frames, each `[C, H, W]` bytes.
fn image_rows(b: &RecordBatch, name: &str, file: &Path) -> Result<Vec<Frame>, String> {
    let col = b.column_by_name(name).ok_or_else(|| format!("{}: no column `{name}`", file.display()))?;
    let st = col
        .as_struct_opt()
        .ok_or_else(|| format!("{}: column `{name}` holds {:?}, not image structs", file.display(), col.data_type()))?;
    let bytes = st
        .column_by_name("bytes")
        .and_then(|c| c.as_binary_opt::<i32>())
        .ok_or_else(|| format!("{}: column `{name}` has no binary field `bytes`", file.display()))?;
    (0..b.num_rows())
        .map(|r| {
            if bytes.is_null(r) {
                return Err(format!("{}: column `{name}`, row {r}: no frame bytes", file.display()));
            }
            png_chw(bytes.value(r), &format!("{}: column `{name}`, row {r}", file.display()))
        })
        .collect()
}

/// A camera stored as video: where each episode's frames are, and the files decoded so far.
/// LeRobot v2.x keeps one mp4 per episode (`video_path` with `{episode_chunk}`, `{video_key}`,
/// `{episode_index}`); v3.0 concatenates episodes in files (`{chunk_index}`, `{file_index}`), each
/// episode's place given by `meta/episodes/` (`videos/<key>/chunk_index`, `file_index`,
/// `from_timestamp`).
struct VideoSource<'a> {
    dir: &'a Path,
    camera: &'a str,
    template: String,
    chunks_size: i64,
    fps: f64,
    h: usize,
    w: usize,
    /// v3.0: episode -> (chunk, file, first frame in the file).
    v3: Option<std::collections::HashMap<i64, (i64, i64, usize)>>,
    decoded: std::collections::HashMap<PathBuf, Vec<u8>>,
}

impl<'a> VideoSource<'a> {
    fn new(dir: &'a Path, info: &serde_json::Value, camera: &'a str) -> Result<VideoSource<'a>, String> {
        let template = info["video_path"]
            .as_str()
            .ok_or_else(|| format!("camera `{camera}` is a video, but meta/info.json has no `video_path`"))?
            .to_string();
        // Height and width: the feature's shape, by its names when it has them (else [H, W, C]).
        let feat = &info["features"][camera];
        let shape: Vec<usize> = feat["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect())
            .unwrap_or_default();
        let names: Vec<&str> =
            feat["names"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
        let dim = |n: &str, i: usize| {
            names.iter().position(|x| *x == n).map_or(shape.get(i).copied(), |p| shape.get(p).copied())
        };
        let (h, w) = match (dim("height", 0), dim("width", 1)) {
            (Some(h), Some(w)) if h > 0 && w > 0 => (h, w),
            _ => return Err(format!("camera `{camera}`: meta/info.json gives no [height, width, channel] shape")),
        };
        let fps = info["fps"].as_f64().filter(|f| *f > 0.0).unwrap_or(30.0);
        let v3 = if template.contains("{file_index") {
            let mut files = vec![];
            parquet_files(&dir.join("meta/episodes"), &mut files)
                .map_err(|e| format!("camera `{camera}`: meta/episodes/ (LeRobot v3.0): {e}"))?;
            let mut m = std::collections::HashMap::new();
            for file in &files {
                let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
                let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                    .and_then(|b| b.build())
                    .map_err(|e| format!("{}: not a parquet file: {e}", file.display()))?;
                for batch in reader {
                    let b = batch.map_err(|e| format!("{}: {e}", file.display()))?;
                    let eps = int_rows(&b, "episode_index", file)?;
                    let chunk = int_rows(&b, &format!("videos/{camera}/chunk_index"), file)?;
                    let fidx = int_rows(&b, &format!("videos/{camera}/file_index"), file)?;
                    let (from, _) = float_rows(&b, &format!("videos/{camera}/from_timestamp"), file)?;
                    for r in 0..b.num_rows() {
                        let first = (from[r] as f64 * fps).round().max(0.0) as usize;
                        m.insert(eps[r], (chunk[r], fidx[r], first));
                    }
                }
            }
            Some(m)
        } else {
            None
        };
        let chunks_size = info["chunks_size"].as_i64().unwrap_or(1000).max(1);
        Ok(VideoSource { dir, camera, template, chunks_size, fps, h, w, v3, decoded: Default::default() })
    }

    /// Frame `frame` of episode `episode`, `[3, H, W]` bytes.
    fn frame(&mut self, episode: i64, frame: i64) -> Result<Vec<u8>, String> {
        let camera = self.camera;
        let (rel, first) = match &self.v3 {
            None => {
                let chunk = episode / self.chunks_size;
                let rel = self
                    .template
                    .replace("{episode_chunk:03d}", &format!("{chunk:03}"))
                    .replace("{video_key}", camera)
                    .replace("{episode_index:06d}", &format!("{episode:06}"));
                (rel, 0)
            }
            Some(m) => {
                let &(chunk, file, first) = m
                    .get(&episode)
                    .ok_or_else(|| format!("camera `{camera}`: episode {episode} is not in meta/episodes/"))?;
                let rel = self
                    .template
                    .replace("{video_key}", camera)
                    .replace("{chunk_index:03d}", &format!("{chunk:03}"))
                    .replace("{file_index:03d}", &format!("{file:03}"));
                (rel, first)
            }
        };
        let path = self.dir.join(&rel);
        if !self.decoded.contains_key(&path) {
            if !path.is_file() {
                return Err(format!("camera `{camera}`: episode {episode}'s video {rel} is missing"));
            }
            let v = decode_video(&path, &rel, camera, self.h, self.w)?;
            self.decoded.insert(path.clone(), v);
        }
        let v = &self.decoded[&path];
        let per = 3 * self.h * self.w;
        let at = usize::try_from(frame).ok().map(|f| first + f).filter(|&i| (i + 1) * per <= v.len()).ok_or_else(|| {
            format!(
                "camera `{camera}`: {rel} has {} frames, episode {episode}'s frame_index {frame} (at {:.3} s) is past them",
                v.len() / per.max(1),
                frame as f64 / self.fps
            )
        })?;
        Ok(v[at * per..(at + 1) * per].to_vec())
    }
}

/// Every frame of an mp4, decoded by the ffmpeg program to RGB and stored `[3, H, W]` each.
fn decode_video(path: &Path, rel: &str, camera: &str, h: usize, w: usize) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .output()
        .map_err(|e| format!("camera `{camera}` is a video: decoding it needs the ffmpeg program on PATH ({e})"))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{rel}: ffmpeg could not decode it: {}", msg.lines().next().unwrap_or("")));
    }
    let per = h * w * 3;
    if out.stdout.len() % per != 0 {
        return Err(format!(
            "{rel}: decoded {} bytes, not whole {w}x{h} RGB frames (does the shape in meta/info.json match?)",
            out.stdout.len()
        ));
    }
    Ok(crate::hwc_to_chw(&out.stdout, out.stdout.len() / per, (h, w, 3), w * 3))
}

/// Loads a LeRobot dataset folder.
pub fn load(dir: &Path, obs_keys: &[String]) -> Result<Demos, DemosError> {
    let err = |msg: String| DemosError { path: dir.to_path_buf(), msg };
    let info_path = dir.join("meta/info.json");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&info_path).map_err(|e| err(format!("meta/info.json: {e}")))?)
            .map_err(|e| err(format!("meta/info.json: not JSON: {e}")))?;
    let dtype = |k: &str| info["features"][k]["dtype"].as_str().unwrap_or("").to_string();
    let mut cameras: Vec<String> = if obs_keys.is_empty() {
        let mut c: Vec<String> = info["features"]
            .as_object()
            .map(|f| f.keys().filter(|k| matches!(dtype(k).as_str(), "image" | "video")).cloned().collect())
            .unwrap_or_default();
        c.sort();
        c.truncate(1);
        c
    } else {
        obs_keys.iter().filter(|k| matches!(dtype(k).as_str(), "image" | "video")).cloned().collect()
    };
    if cameras.len() > 1 {
        return Err(err(format!("cameras {cameras:?}: a policy takes one image input, name one in --obs-keys")));
    }
    let camera = cameras.pop();
    let video = camera.as_ref().is_some_and(|c| dtype(c) == "video");
    let keys: Vec<String> = if obs_keys.is_empty() {
        vec!["observation.state".into()]
    } else {
        obs_keys.iter().filter(|k| Some(*k) != camera.as_ref()).cloned().collect()
    };
    let mut files = vec![];
    parquet_files(&dir.join("data"), &mut files).map_err(|e| err(format!("data/: {e}")))?;
    if files.is_empty() {
        return Err(err("no parquet files under data/".into()));
    }
    // (episode, frame, observation row, action row, camera frame)
    type Row = (i64, i64, Vec<f32>, Vec<f32>, Option<Frame>);
    let mut frames: Vec<Row> = vec![];
    let (mut width, mut act_w) = (None, None);
    for file in &files {
        let f = std::fs::File::open(file).map_err(|e| err(format!("{}: {e}", file.display())))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| err(format!("{}: not a parquet file: {e}", file.display())))?;
        for batch in reader {
            let b = batch.map_err(|e| err(format!("{}: {e}", file.display())))?;
            let cols: Vec<(Vec<f32>, usize)> =
                keys.iter().map(|k| float_rows(&b, k, file)).collect::<Result<_, _>>().map_err(err)?;
            let (acts, aw) = float_rows(&b, "action", file).map_err(err)?;
            let eps = int_rows(&b, "episode_index", file).map_err(err)?;
            let fr = int_rows(&b, "frame_index", file).map_err(err)?;
            let mut imgs: Vec<Option<Frame>> = match &camera {
                Some(c) if !video => image_rows(&b, c, file).map_err(err)?.into_iter().map(Some).collect(),
                Some(_) => vec![None; b.num_rows()],
                None => vec![None; b.num_rows()],
            };
            let w: usize = cols.iter().map(|c| c.1).sum();
            if *width.get_or_insert(w) != w || *act_w.get_or_insert(aw) != aw {
                return Err(err(format!(
                    "{}: {w} observation and {aw} action values per frame, other files differ",
                    file.display()
                )));
            }
            for r in 0..b.num_rows() {
                let mut o = Vec::with_capacity(w);
                for (v, c) in &cols {
                    o.extend_from_slice(&v[r * c..(r + 1) * c]);
                }
                frames.push((eps[r], fr[r], o, acts[r * aw..(r + 1) * aw].to_vec(), imgs[r].take()));
            }
        }
    }
    // Stable: frames of one episode in (episode, frame) order, episodes in index order.
    frames.sort_by_key(|f| (f.0, f.1));
    if let (Some(c), true) = (&camera, video) {
        let mut src = VideoSource::new(dir, &info, c).map_err(err)?;
        let shape = [3, src.h, src.w];
        for f in frames.iter_mut() {
            f.4 = Some((src.frame(f.0, f.1).map_err(err)?, shape));
        }
    }
    let starts: Vec<bool> = (0..frames.len()).map(|i| i == 0 || frames[i].0 != frames[i - 1].0).collect();
    let obs: Vec<f32> = frames.iter().flat_map(|f| f.2.iter().copied()).collect();
    let act: Vec<f32> = frames.iter().flat_map(|f| f.3.iter().copied()).collect();
    let images = match &camera {
        None => None,
        Some(c) => {
            let shape = frames.first().and_then(|f| f.4.as_ref()).map(|f| f.1).unwrap_or([0; 3]);
            let mut v = Vec::with_capacity(frames.len() * shape.iter().product::<usize>());
            for (i, f) in frames.iter_mut().enumerate() {
                let (px, s) = f.4.take().expect("every row has a frame");
                if s != shape {
                    return Err(err(format!("camera `{c}`: frame {i} is {s:?}, the first is {shape:?}")));
                }
                v.extend(px);
            }
            Some((v, [frames.len(), shape[0], shape[1], shape[2]]))
        }
    };
    let metadata = serde_json::json!({
        "format": "sqil-demos/1",
        "source": "lerobot",
        "codebase_version": info["codebase_version"],
        "fps": info["fps"],
        "obs_keys": keys,
        "camera": camera,
    });
    Demos::from_rows(dir, (obs, width.unwrap_or(0)), Some((act, act_w.unwrap_or(0))), starts, vec![], metadata)?
        .with_images(dir, images)
}
