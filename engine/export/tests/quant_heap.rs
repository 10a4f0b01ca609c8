//! The int8 and q4 passes drop each f32 weight once the last Linear reading it is quantised, so
//! quantising a graph never holds every f32 weight next to every quantised one. Heap counted by
//! the runtime's allocator (installed here; one test in its own binary, the count is
//! process-wide).

use perceiver_edge_export::ir::{DType, Graph};
use perceiver_edge_export::passes::quant::pass_for;
use perceiver_edge_export::{KeepF32, Precision};
use perceiver_edge_runtime::alloc::{self, Counting};

#[global_allocator]
static HEAP: Counting = Counting;

#[test]
fn quantising_holds_each_f32_weight_only_until_it_is_replaced() {
    const K: usize = 512;
    const LAYERS: usize = 16;
    let f32_bytes = (K * K * 4) as u64;
    for precision in [Precision::Int8, Precision::Q4] {
        let mut g = Graph::new();
        let mut x = g.input("x", DType::F32, &[4, K]);
        for l in 0..LAYERS {
            let w: Vec<f32> = (0..K * K).map(|i| ((i * 7 + l) % 23) as f32 / 23.0 - 0.5).collect();
            let w = g.const_f32("w", &[K, K], &w);
            x = g.matmul(&x, &w);
        }
        g.output(&x, "y");
        let pass = pass_for(precision, &KeepF32::default(), None, false).unwrap().unwrap();
        alloc::reset_peak();
        let before = alloc::in_use().unwrap();
        pass.run(&mut g).unwrap();
        let growth = alloc::peak().unwrap() - before;
        // Above the f32 weights already held (16 x 1 MiB): one weight's working copies (1.6 MB
        // measured for int8). Holding every quantised weight next to every f32 one until the
        // end added 5.6 MB (int8) / 3.7 MB (q4).
        let bound = 3 * f32_bytes;
        assert!(growth < bound, "{precision}: heap grew by {growth} B while quantising, expected below {bound} B");
        let quantised = g.nodes.iter().filter(|n| n.op == "MatMulInteger" || n.op == "MatMulNBits").count();
        assert_eq!(quantised, LAYERS, "{precision}");
    }
}
