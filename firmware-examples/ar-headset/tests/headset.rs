//! The headset pipeline against independent references: tokens and heat-map logits from
//! models/train_marker.py (transformers), marker positions on the held-out frames the training
//! script stored, geometry identities, filter behaviour, the drop policy. No timing assertions.

use ar_headset::geometry::{AlphaBeta, Camera};
use ar_headset::model::{fill_tokens, locate, position_table, TOKEN_WIDTH};
use ar_headset::scene::{Sequence, PIXELS};
use ar_headset::tracker::{self, Config, DropPolicy, MarkerModel, Report};
use nalgebra::Vector2;
use perceiver_edge_runtime::{npy, to_vec, Session};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_f32(rel: &str) -> (Vec<usize>, Vec<f32>) {
    let t = npy::read_npy(&root().join(rel)).unwrap();
    (t.shape().to_vec(), to_vec::<f32>(&t).unwrap())
}

/// models/marker exported with `--seq-len 256` (once per test binary).
fn marker_onnx() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ar-headset-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("marker.onnx");
        let opts = perceiver_edge_export::ExportOptions { seq_len: Some(256), ..Default::default() };
        perceiver_edge_export::export(&root().join("models/marker"), &opts).unwrap().write(&path).unwrap();
        path
    })
    .clone()
}

fn frame(data: &[f32], k: usize) -> [f32; PIXELS] {
    data[k * PIXELS..(k + 1) * PIXELS].try_into().unwrap()
}

#[test]
fn tokens_match_the_training_script() {
    let (_, frames) = read_f32("models/marker/samples/heldout_frames.npy");
    let table = position_table();
    let mut tokens = vec![0f32; PIXELS * TOKEN_WIDTH];
    for k in 0..3 {
        let (shape, want) = read_f32(&format!("models/marker/samples/tokens_{k}.npy"));
        assert_eq!(shape, [1, PIXELS, TOKEN_WIDTH]);
        fill_tokens(&frame(&frames, k), &table, &mut tokens);
        let worst = tokens.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6, "frame {k}: tokens differ by {worst}");
    }
}

#[test]
fn engine_heat_map_matches_transformers() {
    let (_, frames) = read_f32("models/marker/samples/heldout_frames.npy");
    let mut model = MarkerModel::new(Session::load(&marker_onnx()).unwrap()).unwrap();
    for k in 0..3 {
        let (_, want) = read_f32(&format!("models/marker/samples/logits_{k}.npy"));
        let got = model.heat_map(&frame(&frames, k)).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 + 1e-5 * b.abs(), "frame {k}: {a} vs {b}");
        }
        let (a, b) = (locate(&got).0, locate(&want).0);
        assert!((a[0] - b[0]).abs() < 1e-4 && (a[1] - b[1]).abs() < 1e-4, "{a:?} vs {b:?}");
    }
}

#[test]
fn locates_markers_in_the_stored_heldout_frames() {
    let (shape, frames) = read_f32("models/marker/samples/heldout_frames.npy");
    let (_, truth) = read_f32("models/marker/samples/heldout_positions.npy");
    let mut model = MarkerModel::new(Session::load(&marker_onnx()).unwrap()).unwrap();
    let errs: Vec<f64> = (0..shape[0])
        .map(|k| {
            let p = model.locate(&frame(&frames, k)).unwrap();
            (p[0] - truth[2 * k] as f64).hypot(p[1] - truth[2 * k + 1] as f64)
        })
        .collect();
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    // The model card reports the f32 error on these frames; any regression in tokens, engine
    // or locate() shows up as a much larger error.
    assert!(mean < 0.5, "mean localisation error {mean} px");
}

#[test]
fn locate_is_the_weighted_centroid_around_the_peak() {
    // Two equal logits side by side, everything else very negative: centroid half-way.
    let mut l = vec![-100f32; PIXELS];
    l[5 * 16 + 7] = 3.0;
    l[5 * 16 + 8] = 3.0;
    let (p, peak) = locate(&l);
    assert!((p[0] - 7.5).abs() < 1e-9 && (p[1] - 5.0).abs() < 1e-9, "{p:?}");
    assert!((peak - 0.5).abs() < 1e-9);
    // A peak in the corner: the window is clipped, the centroid stays inside the frame.
    let mut l = vec![0f32; PIXELS];
    l[0] = 50.0;
    let (p, _) = locate(&l);
    assert!(p[0] < 0.01 && p[1] < 0.01 && p[0] >= 0.0);
}

#[test]
fn camera_geometry() {
    let cam = Camera::new(16, 16, 60.0);
    // The principal point looks straight ahead; pixels round-trip through normalised coords.
    assert!(cam.normalise(Vector2::new(7.5, 7.5)).norm() < 1e-12);
    for (u, v) in [(0.0, 0.0), (15.0, 3.25), (4.5, 12.0)] {
        let back = cam.project(cam.normalise(Vector2::new(u, v)));
        assert!((back - Vector2::new(u, v)).norm() < 1e-12);
    }
    // The image edge (half the width from the centre) is half the field of view off-axis.
    let edge = cam.normalise(Vector2::new(7.5 + 8.0, 7.5));
    assert!((Camera::angle_deg(edge, Vector2::zeros()) - 30.0).abs() < 1e-9);
}

#[test]
fn filter_tracks_constant_velocity_and_smooths_noise() {
    let dt = 1.0 / 90.0;
    let mut f = AlphaBeta::new(0.5, 0.1);
    let truth = |k: usize| Vector2::new(0.1 + 0.3 * k as f64 * dt, -0.2 + 0.1 * k as f64 * dt);
    for k in 0..400 {
        f.update(truth(k), dt);
    }
    assert!((f.pos - truth(399)).norm() < 1e-6);
    assert!((f.vel - Vector2::new(0.3, 0.1)).norm() < 1e-4);
    assert!((f.predicted(dt) - truth(400)).norm() < 1e-6);

    // A static point seen with deterministic +-e jitter: the output varies less than the input.
    let mut f = AlphaBeta::new(0.5, 0.1);
    let mut out = Vec::new();
    for k in 0..400 {
        let e = if k % 2 == 0 { 0.01 } else { -0.01 };
        out.push(f.update(Vector2::new(e, -e), dt).x);
    }
    let spread = out[200..].iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(spread < 0.01 * 0.6, "{spread}");
}

#[test]
fn drop_policy_budgets_mean_plus_deviations() {
    let mut p = DropPolicy::new(1000.0);
    for _ in 0..200 {
        p.observe(500.0);
    }
    // Converged to a steady 500 us with no spread.
    assert!((p.budget_us() - 500.0).abs() < 1.0);
    assert!(!p.should_drop(600.0));
    assert!(p.should_drop(400.0));
    // Jittery inference widens the budget.
    for k in 0..200 {
        p.observe(if k % 2 == 0 { 300.0 } else { 700.0 });
    }
    assert!(p.budget_us() > 1000.0 && p.should_drop(900.0));
    // decide(): at most two drops in a row, each one shrinking the budget, then a forced run.
    let b0 = p.budget_us();
    assert!(p.decide(0.0) && p.budget_us() < b0);
    assert!(p.decide(0.0));
    assert!(!p.decide(0.0));
    assert!(p.decide(0.0));
}

#[test]
fn short_run_reports_consistent_statistics() {
    let mut model = MarkerModel::new(Session::load(&marker_onnx()).unwrap()).unwrap();
    let cfg = Config { frames: 45, ..Config::default() };
    let mut seen = 0;
    let results = tracker::run(&mut model, &cfg, |_| seen += 1).unwrap();
    assert_eq!(seen, 45);
    let r = Report::of(&results);
    assert_eq!(r.frames, 45);
    assert_eq!(r.processed + r.dropped, 45);
    assert!(r.processed >= 1 && results[0].processed, "the first frame always runs");
    assert!(r.latency_ms[0] <= r.latency_ms[1] && r.latency_ms[1] <= r.latency_ms[2]);
    // The synthetic sequence is the training distribution: the model-only error stays small.
    assert!(r.measured_err_px[0] < 0.5, "{:?}", r.measured_err_px);
    // The sequence itself is deterministic in its seed.
    let (mut a, mut b) = (Sequence::new(3, 90.0), Sequence::new(3, 90.0));
    let (mut fa, mut fb) = ([0f32; PIXELS], [0f32; PIXELS]);
    a.frame(10, &mut fa);
    b.frame(10, &mut fb);
    assert_eq!(fa, fb);
}

/// The split model decoding only a 7x7 window around a prediction locates the marker where the
/// full heat map does (transformers' locate on the stored held-out frames), and falls back to the
/// full map when the prediction is far off.
#[test]
fn windowed_decode_locates_like_the_full_map() {
    let dir = std::env::temp_dir().join(format!("ar-headset-split-{}", std::process::id()));
    let opts = perceiver_edge_export::ExportOptions { seq_len: Some(256), ..Default::default() };
    let ck = perceiver_edge_export::Checkpoint::open(&root().join("models/marker")).unwrap();
    perceiver_edge_export::split::build_split(&ck, &opts, None).unwrap().write(&dir).unwrap();
    let mut split = MarkerModel::load(&dir).unwrap();
    let mut single = MarkerModel::new(Session::load(&marker_onnx()).unwrap()).unwrap();
    let (shape, frames) = read_f32("models/marker/samples/heldout_frames.npy");
    let (_, truth) = read_f32("models/marker/samples/heldout_positions.npy");
    let n = shape[0].min(64);
    for k in 0..n {
        let f = frame(&frames, k);
        let full = single.locate(&f).unwrap();
        let hint = [truth[2 * k] as f64 + 1.0, truth[2 * k + 1] as f64 - 1.0];
        let win = split.locate_near(&f, Some(hint)).unwrap();
        let d = (full[0] - win[0]).hypot(full[1] - win[1]);
        assert!(d < 1e-4, "frame {k}: window {win:?} vs full map {full:?}");
    }
    assert!(split.windowed >= n as u64 * 9 / 10, "most frames use the window ({} of {n})", split.windowed);
    // A prediction in the wrong corner: the window's peak is on its border, so the full map decides.
    let f = frame(&frames, 0);
    let far = if truth[0] < 8.0 { [15.0, 15.0] } else { [0.0, 0.0] };
    let before = split.full;
    let p = split.locate_near(&f, Some(far)).unwrap();
    let full = single.locate(&f).unwrap();
    assert!((p[0] - full[0]).hypot(p[1] - full[1]) < 1e-4);
    assert_eq!(split.full, before + 1, "fell back to the full map");
    std::fs::remove_dir_all(&dir).unwrap();
}
