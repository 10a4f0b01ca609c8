//! The table policy (`--tables auto|all|none`, issue #12) on the bundled digits model: `auto`
//! keeps the tables where they shrink the graph and fit the share (byte-identical to `all`
//! there), a share too small for them gives exactly the `none` graph, every decision is
//! reported, and the graph without tables computes the same outputs.

use perceiver_edge_export::{build, Checkpoint, ExportOptions, Tables};
use std::path::PathBuf;
use tract_onnx::prelude::*;

fn digits() -> Checkpoint {
    Checkpoint::open(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/digits")).unwrap()
}

fn with(tables: Tables, share: Option<f64>) -> ExportOptions {
    let mut o = ExportOptions::default();
    o.perf.tables = tables;
    o.perf.max_table_share = share;
    o
}

fn outputs(bytes: &[u8]) -> Vec<f32> {
    let plan =
        tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap().into_optimized().unwrap().into_runnable().unwrap();
    let x: Vec<f32> = (0..3 * 8 * 8).map(|i| ((i * 37) % 17) as f32 / 17.0).collect();
    let out = plan.run(tvec![Tensor::from_shape(&[1, 3, 8, 8], &x).unwrap().into()]).unwrap();
    out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
}

#[test]
fn auto_keeps_tables_that_pay_and_drops_the_rest() {
    let ck = digits();
    let auto = build(&ck, &with(Tables::Auto, None)).unwrap();
    let all = build(&ck, &with(Tables::All, None)).unwrap();
    let none = build(&ck, &with(Tables::None, None)).unwrap();
    assert_eq!(auto.to_bytes(), all.to_bytes(), "digits: auto keeps both tables");
    let d = &auto.summary.table_decisions;
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d.iter().all(|d| d.kept && d.bytes > 0 && d.flops_saved > 0 && d.replaces.unwrap() >= d.bytes), "{d:?}");
    let report = auto.summary.to_string();
    assert!(report.contains("kept    position_split") && report.contains("GFLOPs per inference"), "{report}");

    // Here the tables shrink the graph, so even a zero share keeps them.
    let zero = build(&ck, &with(Tables::Auto, Some(0.0))).unwrap();
    assert_eq!(zero.to_bytes(), all.to_bytes());
    // A negative share stands for a budget the tables cannot meet: auto skips them and the
    // graph is exactly the `none` graph.
    let tight = build(&ck, &with(Tables::Auto, Some(-0.5))).unwrap();
    assert_eq!(tight.to_bytes(), none.to_bytes());
    let d = &tight.summary.table_decisions;
    assert!(!d[0].kept && d[0].reason.contains("would grow"), "{d:?}");
    assert!(!d[1].kept && d[1].reason.contains("needs position_split"), "{d:?}");
    assert!(none.summary.table_decisions.iter().all(|d| !d.kept));
    assert!(none.summary.tables.is_empty() && !all.summary.tables.is_empty());
    assert!(none.summary.weight_bytes > all.summary.weight_bytes, "digits' tables replace larger position features");

    let (a, n) = (outputs(&all.to_bytes()), outputs(&none.to_bytes()));
    for (x, y) in a.iter().zip(&n) {
        assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "{a:?} vs {n:?}");
    }
}

#[test]
fn external_data_round_trips() {
    let ck = digits();
    let e = build(&ck, &ExportOptions::default()).unwrap();
    // The size bound that switches to external data past 2 GiB is an upper bound, and close.
    let (bound, real) = (perceiver_edge_export::ir::onnx::single_file_bound(&e.graph), e.to_bytes().len() as u64);
    assert!(bound >= real && bound < real + real / 20, "bound {bound}, file {real}");
    assert!(!perceiver_edge_export::ir::onnx::needs_external_data(&e.graph));
    let dir = tempfile_dir();
    let single = dir.join("m.onnx");
    let ext = dir.join("e.onnx");
    assert_eq!(e.write_with(&single, false).unwrap(), None);
    let side = e.write_with(&ext, true).unwrap().unwrap();
    assert_eq!(side, dir.join("e.onnx.data"));
    let a = perceiver_edge_runtime::Session::load(&single).unwrap().resident_weights();
    let b = perceiver_edge_runtime::Session::load(&ext).unwrap().resident_weights();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("pe-export-tables-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A split export decides tables as the single graph does: the share is of the whole model's
/// weights, not of the encoder part's (an encoder without its latent layers holds a fraction of
/// them and used to refuse tables the single graph keeps). Swept over shares around the point
/// where the decision flips.
#[test]
fn split_parts_decide_tables_like_the_single_graph() {
    let ck = digits();
    let kept = |d: &[perceiver_edge_export::summary::TableDecision]| d.iter().map(|d| d.kept).collect::<Vec<_>>();
    let mut flips = 0;
    let mut last = None;
    for i in -60..=20 {
        let share = i as f64 / 100.0;
        let mut o = with(Tables::Auto, Some(share));
        o.blocks = Some(2);
        let single = kept(&build(&ck, &o).unwrap().summary.table_decisions);
        let split = perceiver_edge_export::split::build_split(&ck, &o, None).unwrap();
        let enc = &split.parts.iter().find(|(f, _)| f == "encoder.onnx").unwrap().1;
        assert_eq!(kept(&enc.summary.table_decisions), single, "share {share}");
        flips += usize::from(last.is_some_and(|l| l != single));
        last = Some(single);
    }
    assert!(flips >= 1, "the sweep crosses the share where auto changes its mind");
}
