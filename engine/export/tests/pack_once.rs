//! The runtime's hold-once pass (`engine/runtime/src/pack_once.rs`) against tract's own
//! decluttering and code generation: the same outputs bit for bit, and a weight-shared latent
//! block applied several times holds its weights once, in f32 and in int8 (where decluttering
//! derives a weight per matmul before code generation packs it). One test in its own binary: the
//! switch is process-wide.

use perceiver_edge_export::{build, Checkpoint, ExportOptions, Precision, QuantOptions};
use perceiver_edge_runtime::{set_pack_once, Session, Tensor};
use std::path::Path;

fn digits() -> Checkpoint {
    Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits")).unwrap()
}

fn resident(s: &Session) -> usize {
    s.resident_weights().iter().map(|e| e.1).sum()
}

#[test]
fn pack_once_keeps_outputs_and_holds_a_repeated_block_once() {
    let dir = std::env::temp_dir().join(format!("pe-pack-once-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |b: usize, p: &str| dir.join(format!("b{b}-{p}.onnx"));
    for b in [1, 6] {
        for p in [Precision::F32, Precision::Int8] {
            let o = ExportOptions { blocks: Some(b), ..Default::default() };
            let mut g = build(&digits(), &o).unwrap();
            let q = QuantOptions { precision: p, ..Default::default() };
            g.quantize(&q, &dir, &mut |_, _| {}).unwrap();
            g.write(&path(b, if p == Precision::F32 { "f32" } else { "int8" })).unwrap();
        }
    }
    let run = |s: &mut Session| -> Vec<Tensor> {
        let inputs: Vec<Tensor> = s
            .inputs()
            .iter()
            .map(|i| {
                let n: usize = i.shape.iter().product();
                let x: Vec<f32> = (0..n).map(|j| ((j * 37) % 101) as f32 / 50.0 - 1.0).collect();
                perceiver_edge_runtime::tensor(&i.shape, &x).unwrap()
            })
            .collect();
        s.run(inputs).unwrap()
    };
    for p in ["f32", "int8"] {
        set_pack_once(false);
        let mut tract_one = Session::load(&path(1, p)).unwrap();
        let mut tract_six = Session::load(&path(6, p)).unwrap();
        set_pack_once(true);
        let mut once_one = Session::load(&path(1, p)).unwrap();
        let mut once_six = Session::load(&path(6, p)).unwrap();

        // Same kernels on the same bytes: bit-identical.
        assert_eq!(run(&mut once_six), run(&mut tract_six), "{p}");
        assert_eq!(run(&mut once_one), run(&mut tract_one), "{p}");
        // tract alone holds part of the block once per application (less since its vendored
        // Rewriter merges reshapes of a shared weight, vendor/tract-core/PATCHES.md); the pass
        // holds it once, so six applications hold what one does.
        let (t1, t6, o1, o6) = (resident(&tract_one), resident(&tract_six), resident(&once_one), resident(&once_six));
        assert!(t6 > t1, "{p}: without the pass 6 applications should hold more: {t1} vs {t6}");
        assert_eq!(o6, o1, "{p}: with the pass 6 applications hold what one does");
        assert!(o1 <= t1, "{p}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
