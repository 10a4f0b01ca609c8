//! The streamed single-file writer (`ir::onnx::write_single`, what `export` writes) against the
//! protobuf library's own encoding of the whole model (`ir::onnx::to_bytes`): byte for byte, on
//! a trained model, a bare model with a declared decoder, a conv model and an int8 export (every
//! kind of constant: f32, int8, int64, empty), and the file `Exported::write` leaves.

use perceiver_edge_export::{export, ir::onnx, ExportOptions, Precision, QuantOptions};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn streamed_file_is_the_protobuf_encoding() {
    let cases = [
        ("models/digits", ExportOptions::default()),
        ("models/marker", ExportOptions { seq_len: Some(256), ..Default::default() }),
        ("models/reference/fixtures/image_conv", ExportOptions::default()),
        ("models/digits", ExportOptions::default()),
    ];
    let dir = std::env::temp_dir().join(format!("pe-write-single-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (ck, opts)) in cases.iter().enumerate() {
        let mut e = export(&root().join(ck), opts).unwrap();
        if i == 3 {
            let q = QuantOptions { precision: Precision::Int8, ..Default::default() };
            e.quantize(&q, &root().join(ck), &mut |_, _| {}).unwrap();
        }
        let want = onnx::to_bytes(&e.graph);
        let mut got = vec![];
        onnx::write_single(&e.graph, &mut got).unwrap();
        assert!(got == want, "{ck} case {i}: {} streamed bytes vs {} encoded", got.len(), want.len());
        let path = dir.join(format!("m{i}.onnx"));
        e.write(&path).unwrap();
        assert!(std::fs::read(&path).unwrap() == want, "{ck} case {i}: the written file");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
