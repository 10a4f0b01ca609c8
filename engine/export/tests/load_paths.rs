//! The runtime's file loader (`engine/runtime/src/weights_once.rs`: the protobuf decoded through
//! a window, the weights handed to tract one by one) against loading the same bytes from memory
//! and against a plain matrix product computed here.

use perceiver_edge_export::ir::{onnx, DType, Graph};
use perceiver_edge_runtime::{tensor, to_vec, Session};

fn weights(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 31) % 211) as f32 / 105.0 - 1.0).collect()
}

#[test]
fn a_file_loads_like_its_bytes_and_computes_the_product() {
    let (m, k, n) = (4, 300, 70);
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[m, k]);
    let w = weights(k * n, 1);
    let wc = g.const_f32("w", &[k, n], &w);
    let y = g.matmul(&x, &wc);
    g.output(&y, "y");
    let bytes = onnx::to_bytes(&g);
    let dir = std::env::temp_dir().join(format!("pe-load-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.onnx");
    std::fs::write(&path, &bytes).unwrap();

    let xs = weights(m * k, 2);
    let input = tensor(&[m, k], &xs).unwrap();
    let from_file = Session::load(&path).unwrap().run(vec![input.clone()]).unwrap();
    let from_bytes = Session::from_bytes(&bytes).unwrap().run(vec![input]).unwrap();
    assert_eq!(from_file, from_bytes);
    let got = to_vec::<f32>(&from_file[0]).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|t| xs[i * k + t] * w[t * n + j]).sum();
            assert!((got[i * n + j] - want).abs() < 1e-3, "y[{i},{j}] = {} vs {want}", got[i * n + j]);
        }
    }

    // A model file that is a symlink out of its folder loads too (its weights stay in the
    // protobuf: tract takes external data only from inside the folder).
    #[cfg(unix)]
    {
        let other = dir.join("elsewhere");
        std::fs::create_dir_all(&other).unwrap();
        let link = other.join("link.onnx");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let input = tensor(&[m, k], &xs).unwrap();
        assert_eq!(Session::load(&link).unwrap().run(vec![input]).unwrap(), from_bytes);
    }

    // A truncated file is one error line, not a panic.
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = Session::load(&cut).err().expect("a truncated model must not load").to_string();
    assert!(e.contains("cut.onnx") && e.contains("not a loadable ONNX model") && !e.contains('\n'), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
