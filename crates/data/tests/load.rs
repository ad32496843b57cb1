//! The committed demonstration subsets load; broken files are refused with the field named.

use ndarray::{Array1, Array2};
use ndarray_npy::NpzWriter;
use sqil_data::Demos;
use std::path::PathBuf;

fn demos(task: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/demos").join(format!("{task}.npz"))
}

#[test]
fn committed_demos_load() {
    for (task, obs, act) in [("hopper", 15, 3), ("lander", 8, 2), ("pickplace", 39, 4), ("pickplace-pixels", 7, 4)] {
        let d = Demos::load(&demos(task)).unwrap();
        assert_eq!((d.observations.ncols(), d.actions.as_ref().unwrap().ncols()), (obs, act), "{task}");
        assert_eq!(d.metadata["task"], task);
        let eps = d.episodes();
        assert_eq!(eps.len(), d.success.len());
        assert_eq!(eps.last().unwrap().end, d.len());
        // Returns recorded per episode equal the sum of that episode's rewards.
        for (r, e) in eps.iter().zip(&d.episode_returns) {
            let s: f64 = d.rewards[r.clone()].iter().map(|&x| x as f64).sum();
            assert!((s - e).abs() < 1e-2 * e.abs().max(1.0), "{task}: {s} vs {e}");
        }
    }
}

#[test]
fn pixel_demos_carry_frames_and_history_windows_stay_in_episodes() {
    let d = Demos::load(&demos("pickplace-pixels")).unwrap();
    let im = d.images.as_ref().expect("frames");
    assert_eq!(im.shape(), &[d.len(), 3, 84, 84]);
    assert!(Demos::load(&demos("hopper")).unwrap().images.is_none());
    let h = Demos::load(&demos("hopper")).unwrap();
    let w = h.history_indices(4);
    let starts: Vec<usize> = h.episodes().iter().map(|r| r.start).collect();
    assert_eq!(w[0], vec![0, 0, 0, 0]);
    assert_eq!(w[2], vec![0, 0, 1, 2]);
    let s1 = starts[1];
    assert_eq!(w[s1 + 1], vec![s1, s1, s1, s1 + 1], "a window never reaches into the previous episode");
}

fn write(path: &PathBuf, obs: Array2<f32>, starts: Vec<bool>, meta: &str, skip: Option<&str>) {
    let t = obs.nrows();
    let e = starts.iter().filter(|&&s| s).count();
    let mut w = NpzWriter::new(std::fs::File::create(path).unwrap());
    let keep = |k: &str| skip != Some(k);
    if keep("observations") {
        w.add_array("observations", &obs).unwrap();
    }
    if keep("actions") {
        w.add_array("actions", &Array2::<f32>::zeros((t, 2))).unwrap();
    }
    w.add_array("episode_starts", &Array1::from(starts)).unwrap();
    w.add_array("rewards", &Array1::<f32>::zeros(t)).unwrap();
    w.add_array("success", &Array1::from(vec![true; e])).unwrap();
    w.add_array("episode_returns", &Array1::<f64>::zeros(e)).unwrap();
    w.add_array("metadata", &Array1::from(meta.as_bytes().to_vec())).unwrap();
    w.finish().unwrap();
}

#[test]
fn broken_files_name_the_field() {
    let dir = std::env::temp_dir().join(format!("sqil-demos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("d.npz");
    let meta = r#"{"format": "sqil-demos/1", "task": "t"}"#;
    let ok = Array2::<f32>::zeros((4, 3));
    write(&p, ok.clone(), vec![true, false, true, false], meta, None);
    assert_eq!(Demos::load(&p).unwrap().episodes(), vec![0..2, 2..4]);

    let mut nan = ok.clone();
    nan[[2, 1]] = f32::NAN;
    write(&p, nan, vec![true, false, true, false], meta, None);
    let e = Demos::load(&p).unwrap_err().to_string();
    assert!(e.contains("d.npz") && e.contains("`observations`") && e.contains("step 2, column 1"), "{e}");

    // Actions are optional (states only: the float policy's actions become the targets);
    // observations are not.
    write(&p, ok.clone(), vec![true, false, true, false], meta, Some("actions"));
    assert!(Demos::load(&p).unwrap().actions.is_none());
    write(&p, ok.clone(), vec![true, false, true, false], meta, Some("observations"));
    let e = Demos::load(&p).unwrap_err().to_string();
    assert!(e.contains("missing field `observations`"), "{e}");

    write(&p, ok.clone(), vec![false, false, true, false], meta, None);
    assert!(Demos::load(&p).unwrap_err().to_string().contains("episode_starts"));

    write(&p, ok, vec![true, false, true, false], r#"{"format": "other"}"#, None);
    assert!(Demos::load(&p).unwrap_err().to_string().contains("sqil-demos/1"));

    std::fs::write(&p, b"not a zip").unwrap();
    assert!(Demos::load(&p).unwrap_err().to_string().contains("not an .npz"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A file of plain arrays as numpy writes them by default: only `observations` (float64), or
/// observations and actions; no metadata, rewards, success or returns. One episode unless
/// `episode_starts` says otherwise; float32 returns accepted.
#[test]
fn plain_arrays_load_with_only_observations_required() {
    let dir = std::env::temp_dir().join(format!("sqil-demos-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("plain.npz");
    let obs = Array2::<f64>::from_shape_fn((5, 3), |(i, j)| (i * 3 + j) as f64 * 0.25);
    let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
    w.add_array("observations", &obs).unwrap();
    w.finish().unwrap();
    let d = Demos::load(&p).unwrap();
    assert_eq!(d.observations[[4, 2]], 3.5);
    assert!(d.actions.is_none() && d.rewards.is_empty() && d.success.is_empty());
    assert_eq!(d.episodes(), vec![0..5]);
    assert_eq!(d.metadata, serde_json::json!({}));

    let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
    w.add_array("observations", &obs).unwrap();
    w.add_array("actions", &Array2::<f64>::ones((5, 2))).unwrap();
    w.add_array("episode_starts", &Array1::from(vec![true, false, false, true, false])).unwrap();
    w.add_array("episode_returns", &Array1::<f32>::from(vec![1.5, 2.5])).unwrap();
    w.finish().unwrap();
    let d = Demos::load(&p).unwrap();
    assert_eq!(d.actions.as_ref().unwrap().ncols(), 2);
    assert_eq!(d.episode_returns, vec![1.5, 2.5]);
    assert_eq!(d.episodes(), vec![0..3, 3..5]);

    // A field present is still checked, and named.
    let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
    w.add_array("observations", &obs).unwrap();
    w.add_array("actions", &Array2::<f32>::ones((4, 2))).unwrap();
    w.finish().unwrap();
    let e = Demos::load(&p).unwrap_err().to_string();
    assert!(e.contains("plain.npz") && e.contains("field `actions` has 4 steps"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The first 64 steps of the pixel demonstrations, cut into two episodes of 32 (as
/// tools/make_image_demos.py writes its fixtures).
#[cfg(any(feature = "hdf5", feature = "parquet"))]
fn pixel_reference() -> Demos {
    use ndarray::s;
    let d = Demos::load(&demos("pickplace-pixels")).unwrap();
    let mut episode_starts = vec![false; 64];
    episode_starts[0] = true;
    episode_starts[32] = true;
    Demos {
        observations: d.observations.slice(s![..64, ..]).to_owned(),
        actions: Some(d.actions.unwrap().slice(s![..64, ..]).to_owned()),
        episode_starts,
        rewards: vec![],
        success: vec![],
        episode_returns: vec![],
        metadata: serde_json::json!({}),
        images: Some(d.images.unwrap().slice(s![..64, .., .., ..]).to_owned()),
    }
}

#[cfg(any(feature = "hdf5", feature = "parquet"))]
fn same_steps(got: &Demos, want: &Demos, what: &str) {
    assert_eq!(got.observations, want.observations, "{what}: observations");
    assert_eq!(got.actions, want.actions, "{what}: actions");
    assert_eq!(got.episode_starts, want.episode_starts, "{what}: episode starts");
    assert_eq!(got.images, want.images, "{what}: camera frames (CHW, uint8)");
}

/// robomimic's camera key (`obs/agentview_image`, [T, H, W, C] uint8) becomes the frames
/// [T, C, H, W]; by default (the first 4-D key) and named in --obs-keys; two cameras named at once
/// are refused.
#[cfg(feature = "hdf5")]
#[test]
fn robomimic_camera_frames_load_as_images() {
    let p = demos("pixels.robomimic").with_extension("hdf5");
    let want = pixel_reference();
    same_steps(&Demos::load_with(&p, &[]).unwrap(), &want, "robomimic, default keys");
    let keys = ["robot0_proprio".to_string(), "agentview_image".to_string()];
    let d = Demos::load_with(&p, &keys).unwrap();
    same_steps(&d, &want, "robomimic, --obs-keys");
    assert_eq!(d.metadata["camera"], "agentview_image");
    let e = Demos::load_with(&p, &["agentview_image".into(), "agentview_image".into()]).unwrap_err().to_string();
    assert!(e.contains("one image input"), "{e}");
}

/// LeRobot's `image` feature (PNG bytes in a struct column) becomes the frames; a camera stored as
/// video is refused with a message.
#[cfg(feature = "parquet")]
#[test]
fn lerobot_image_features_load_as_images() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/demos/lerobot/pixels");
    let d = Demos::load_with(&p, &[]).unwrap();
    same_steps(&d, &pixel_reference(), "lerobot");
    assert_eq!(d.metadata["camera"], "observation.image");
    // The same dataset claiming its camera is a video.
    let tmp = std::env::temp_dir().join(format!("sqil-lerobot-video-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("meta")).unwrap();
    std::fs::create_dir_all(tmp.join("data")).unwrap();
    let info = std::fs::read_to_string(p.join("meta/info.json")).unwrap().replace("\"image\"", "\"video\"");
    std::fs::write(tmp.join("meta/info.json"), info).unwrap();
    for f in std::fs::read_dir(p.join("data/chunk-000")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.join("data").join(f.file_name().unwrap())).unwrap();
    }
    let e = Demos::load_with(&tmp, &["observation.state".into(), "observation.image".into()]).unwrap_err().to_string();
    assert!(e.contains("video_path"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// A camera stored as video (one mp4 per episode, LeRobot v2.1's `video_path`; encoded losslessly
/// by tools/make_image_demos.py) is decoded by ffmpeg to the same frames as the npz. Skips with a
/// reason without ffmpeg (`SQIL_REQUIRE_FFMPEG=1`, as CI sets, makes that a failure).
#[cfg(feature = "parquet")]
#[test]
fn lerobot_video_cameras_decode_to_the_same_frames() {
    if std::process::Command::new("ffmpeg").arg("-version").output().is_err() {
        assert!(std::env::var("SQIL_REQUIRE_FFMPEG").as_deref() != Ok("1"), "no ffmpeg and SQIL_REQUIRE_FFMPEG=1");
        eprintln!("skipping the LeRobot video test: no ffmpeg on PATH");
        return;
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/demos/lerobot/pixels-video");
    let keys = ["observation.state".to_string(), "observation.image".to_string()];
    let d = Demos::load_with(&p, &keys).unwrap();
    same_steps(&d, &pixel_reference(), "lerobot video");
    same_steps(&Demos::load_with(&p, &[]).unwrap(), &pixel_reference(), "lerobot video, default keys");
    // LeRobot v3.0: both episodes in one video file, found by meta/episodes/'s offsets.
    let v3 = p.with_file_name("pixels-video-v3");
    same_steps(&Demos::load_with(&v3, &[]).unwrap(), &pixel_reference(), "lerobot v3.0 video");
    // A missing episode file is named.
    let tmp = std::env::temp_dir().join(format!("sqil-lerobot-novideo-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("meta")).unwrap();
    std::fs::create_dir_all(tmp.join("data")).unwrap();
    std::fs::copy(p.join("meta/info.json"), tmp.join("meta/info.json")).unwrap();
    for f in std::fs::read_dir(p.join("data/chunk-000")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.join("data").join(f.file_name().unwrap())).unwrap();
    }
    let e = Demos::load_with(&tmp, &keys).unwrap_err().to_string();
    assert!(e.contains("episode_000000.mp4 is missing"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// A Minari dataset written by Minari's own DataCollector with a Dict observation holding a camera
/// (`camera`, [T + 1, 12, 16, 3] uint8) and a state (tools/make_minari_image_demos.py): the camera
/// becomes the frames, the state the observations, equal to the .npz of the same steps.
#[cfg(feature = "hdf5")]
#[test]
fn minari_camera_frames_load_as_images() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/demos/minari-pixels");
    let want = Demos::load(&dir.join("point-pixels-v0.npz")).unwrap();
    let got = Demos::load_with(&dir.join("point/pixels-v0"), &["state".into(), "camera".into()]).unwrap();
    same_steps(&got, &want, "minari, --obs-keys state,camera");
    same_steps(&Demos::load_with(&dir.join("point/pixels-v0"), &[]).unwrap(), &want, "minari, default keys");
}
