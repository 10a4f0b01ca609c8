//! The runtime's hold-once pass (`engine/runtime/src/pack_once.rs`) against tract's own
//! decluttering and code generation: the same outputs bit for bit, and a weight-shared latent
//! block applied several times holds its weights once, in f32 and in int8 (where decluttering
//! derives a weight per matmul before code generation packs it). One test in its own binary: the
//! switch is process-wide. The same switch translates the parsed graph dropping each weight once
//! read (`weights_once::into_typed`): a q4 graph, whose `MatMulNBits` weights tract repacks as it
//! translates, gives the same outputs and loads with a lower heap peak (counted by the runtime's
//! allocator, installed here), and a weight-shared 4-bit block whose repeats replay their first
//! reader's translation (`set_repeats_once`) drops each parsed weight after its first reader; its
//! outputs are compared with tract's own translation of `MatMulNBits` (`set_nbits_import`).

use perceiver_edge_export::ir::{onnx, Attr, DType, Graph, TensorData};
use perceiver_edge_export::passes::quant::pass_for;
use perceiver_edge_export::{build, Checkpoint, ExportOptions, KeepF32, Precision, QuantOptions};
use perceiver_edge_runtime::alloc::{self, Counting};
use perceiver_edge_runtime::{set_nbits_import, set_pack_once, set_repeats_once, Session, Tensor};
use std::path::Path;
use std::sync::Arc;

#[global_allocator]
static HEAP: Counting = Counting;

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
        for p in [Precision::F32, Precision::Int8, Precision::Q4] {
            let o = ExportOptions { blocks: Some(b), ..Default::default() };
            let mut g = build(&digits(), &o).unwrap();
            let q = QuantOptions { precision: p, ..Default::default() };
            g.quantize(&q, &dir, &mut |_, _| {}).unwrap();
            g.write(&path(b, &p.to_string())).unwrap();
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
    // q4: tract repacks each MatMulNBits weight while translating; dropping the parsed copies as
    // they are read lowers the load's heap peak, with the same outputs. A chain of 16 matmuls of
    // 1024 x 1024, so the weights outweigh everything else a load allocates.
    let mut g = Graph::new();
    let mut x = g.input("x", DType::F32, &[4, 1024]);
    for l in 0..16 {
        let w: Vec<f32> = (0..1024 * 1024).map(|j| (((j * 31 + l * 7) % 257) as f32 - 128.0) / 4096.0).collect();
        let w = g.const_f32(&format!("w{l}"), &[1024, 1024], &w);
        x = g.matmul(&x, &w);
    }
    g.output(&x, "y");
    let q4 = pass_for(Precision::Q4, &KeepF32::new(&[]), None, false).unwrap().unwrap();
    q4.run(&mut g).unwrap();
    assert_eq!(g.nodes.iter().filter(|n| n.op == "MatMulNBits").count(), 16);
    let chain = dir.join("chain-q4.onnx");
    std::fs::write(&chain, onnx::to_bytes(&g)).unwrap();
    let load_peak = |once: bool| -> (Session, u64) {
        set_pack_once(once);
        let before = alloc::in_use().unwrap();
        alloc::reset_peak();
        let s = Session::load(&chain).unwrap();
        (s, alloc::peak().unwrap() - before)
    };
    let (mut tract, tract_peak) = load_peak(false);
    let (mut once, once_peak) = load_peak(true);
    set_pack_once(true);
    assert_eq!(run(&mut once), run(&mut tract), "q4 chain");
    set_nbits_import(false);
    let (mut tract_op, _) = load_peak(false);
    set_nbits_import(true);
    set_pack_once(true);
    assert_eq!(run(&mut once), run(&mut tract_op), "q4 chain, tract's MatMulNBits");
    // Weights: 8 MiB as q4 (plus scales), which tract held twice at the end of translation.
    assert!(
        once_peak + 4 * 1024 * 1024 < tract_peak,
        "q4 load heap peak: {once_peak} with the switch, {tract_peak} without"
    );

    // A weight-shared block of 8 products applied 3 times, and one more product by the block's
    // first weight on an activation of another shape: the repeats replay their first reader's
    // nodes (`set_repeats_once`), so each parsed weight is dropped after the first application,
    // where repacking it for every reader held all 8 to the last. Same outputs as tract's own
    // translation; the product of another shape still finds its weight. Three forms of the
    // products: as q4 exports write them; with zero points and a bias (tract then wires a
    // zero-point correction and a bias add, reading constants outside the replayed nodes); and
    // with blocks of 16 (tract then dequantises the weight to f32 instead of repacking it).
    let mut g = Graph::new();
    let mut x = g.input("x", DType::F32, &[4, 1024]);
    let other = g.input("other", DType::F32, &[2, 1024]);
    let block: Vec<_> = (0..8)
        .map(|l| {
            let w: Vec<f32> = (0..1024 * 1024).map(|j| (((j * 29 + l * 11) % 251) as f32 - 125.0) / 4096.0).collect();
            g.const_f32(&format!("w{l}"), &[1024, 1024], &w)
        })
        .collect();
    for _ in 0..3 {
        for w in &block {
            x = g.matmul(&x, w);
        }
    }
    let y2 = g.matmul(&other, &block[0]);
    g.output(&x, "y");
    g.output(&y2, "y2");
    q4.run(&mut g).unwrap();
    let weights: std::collections::HashSet<_> =
        g.nodes.iter().filter(|n| n.op == "MatMulNBits").map(|n| n.inputs[1].clone()).collect();
    assert_eq!(weights.len(), 8, "the q4 pass should keep the block's weights shared");
    let constant = |g: &Graph, name: &str| g.constants.iter().find(|c| c.0 == name).unwrap().1.clone();
    let mut zp_bias = g.clone();
    let mut block16 = g.clone();
    for w in &weights {
        // Zero points 0..15 (packed two to a byte, 32 blocks per column) and a bias per column.
        let zp: Vec<u8> = (0..1024 * 16).map(|j| ((j * 7) % 256) as u8).collect();
        let bias: Vec<f32> = (0..1024).map(|j| (j % 13) as f32 / 64.0 - 0.1).collect();
        let (zn, bn) = (format!("{w}.zp"), format!("{w}.bias"));
        zp_bias
            .constants
            .push((zn.clone(), TensorData { dtype: DType::U8, shape: vec![1024 * 16], bytes: Arc::new(zp) }));
        zp_bias.constants.push((bn.clone(), TensorData::f32(&[1024], &bias)));
        for n in zp_bias.nodes.iter_mut().filter(|n| n.op == "MatMulNBits" && &n.inputs[1] == w) {
            n.inputs.extend([zn.clone(), String::new(), bn.clone()]);
        }
        // The same weight in blocks of 16: the codes' bytes as they are, each scale twice.
        let scales = constant(&block16, &format!("{w}scale")).as_f32().unwrap();
        let doubled: Vec<f32> = scales.iter().flat_map(|s| [*s; 2]).collect();
        let sn = format!("{w}.scale16");
        block16.constants.push((sn.clone(), TensorData::f32(&[doubled.len()], &doubled)));
        for c in block16.constants.iter_mut().filter(|c| &c.0 == w) {
            c.1.shape = vec![1024, 64, 8];
        }
        for n in block16.nodes.iter_mut().filter(|n| n.op == "MatMulNBits" && &n.inputs[1] == w) {
            n.inputs[2] = sn.clone();
        }
    }
    for n in block16.nodes.iter_mut().filter(|n| n.op == "MatMulNBits") {
        for (key, value) in n.attrs.iter_mut() {
            if key == "block_size" {
                *value = Attr::Int(16);
            }
        }
    }
    for (form, g) in [("as exported", &g), ("zero points and bias", &zp_bias), ("blocks of 16", &block16)] {
        let shared = dir.join("shared-q4.onnx");
        std::fs::write(&shared, onnx::to_bytes(g)).unwrap();
        let load_peak = |once: bool, repeats: bool| -> (Session, u64) {
            set_pack_once(once);
            set_repeats_once(repeats);
            let before = alloc::in_use().unwrap();
            alloc::reset_peak();
            let s = Session::load(&shared).unwrap();
            (s, alloc::peak().unwrap() - before)
        };
        // tract's own translation of `MatMulNBits` too (the runtime reads the exported form's
        // weights straight into Q4_0 blocks: `set_nbits_import`).
        set_nbits_import(false);
        let (mut tract, _) = load_peak(false, false);
        set_nbits_import(true);
        let (mut each, each_peak) = load_peak(true, false);
        let (mut once, once_peak) = load_peak(true, true);
        set_pack_once(true);
        let expected = run(&mut tract);
        assert_eq!(run(&mut each), expected, "shared q4 block {form}, repacked per reader");
        assert_eq!(run(&mut once), expected, "shared q4 block {form}, repeats replayed");
        assert_eq!(resident(&once), resident(&each), "{form}");
        // Weights: 8 x 0.5 MiB parsed, 8 x 0.56 MiB repacked (or 4 MiB dequantised); the parsed
        // ones are gone after the first application instead of the third (as exported: measured
        // 12.2 -> 9.0 MB).
        assert!(
            once_peak + 2 * 1024 * 1024 < each_peak,
            "shared q4 block {form}, load heap peak: {once_peak} replaying repeats, {each_peak} repacking each"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
