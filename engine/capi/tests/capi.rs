//! The C API gives what the Rust runtime gives, bit for bit, and what transformers gives within
//! the fixtures' tolerance: the bundled models (digits, marker) and every reference fixture case
//! (float and int64 inputs, several inputs and outputs), loaded from a file and from memory.

use perceiver_edge::*;
use perceiver_edge_runtime::{Session, Tensor};

mod common;
use common::*;

/// The specs the C API reports equal the runtime's.
fn assert_same_specs(m: &Model, s: &Session) {
    let want = |list: &[perceiver_edge_runtime::IoSpec]| -> Vec<Spec> {
        list.iter()
            .map(|io| Spec {
                name: io.name.clone(),
                dtype: dtype_of(io.dtype),
                shape: io.shape.clone(),
                bytes: io.shape.iter().product::<usize>() * io.dtype.size_of(),
            })
            .collect()
    };
    assert_eq!(m.inputs(), want(s.inputs()));
    assert_eq!(m.outputs(), want(s.outputs()));
}

/// Runs `inputs` through the C API and the runtime; asserts identical bytes; returns them.
fn run_both(m: &Model, s: &mut Session, inputs: &[Tensor], what: &str) -> Vec<Vec<u8>> {
    let got = m.run(&inputs.iter().map(bytes_of).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let want: Vec<Vec<u8>> = s.run(inputs.to_vec()).unwrap().iter().map(bytes_of).collect();
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "{what}: output {i} differs from the runtime's");
    }
    got
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

#[test]
fn digits_through_the_c_api_equals_the_runtime_and_the_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let path = digits(tmp.path());
    let from_file = Model::load(&path);
    let from_memory = Model::from_memory(&std::fs::read(&path).unwrap());
    let mut session = Session::load(&path).unwrap();
    assert_same_specs(&from_file, &session);
    assert_same_specs(&from_memory, &session);
    let i = &from_file.inputs()[0];
    assert_eq!(
        (i.name.as_str(), i.dtype, i.shape.as_slice(), i.bytes),
        ("pixel_values", pe_dtype::PE_DTYPE_F32, &[1, 3, 8, 8][..], 768)
    );
    let o = &from_file.outputs()[0];
    assert_eq!(
        (o.name.as_str(), o.dtype, o.shape.as_slice(), o.bytes),
        ("logits", pe_dtype::PE_DTYPE_F32, &[1, 10][..], 40)
    );

    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("models/digits/samples/labels.json")).unwrap())
            .unwrap();
    for (name, x) in digit_samples() {
        let a = run_both(&from_file, &mut session, std::slice::from_ref(&x), &name);
        let b = run_both(&from_memory, &mut session, std::slice::from_ref(&x), &name);
        assert_eq!(a, b, "{name}: file and memory loads agree");
        let class = argmax(&f32s(&a[0]));
        assert_eq!(class as u64, labels[&name].as_u64().unwrap(), "{name}: class");
        eprintln!("digits {name}: class {class} (label {})", labels[&name]);
    }
    // Runs repeat exactly on the reused state.
    let x = &digit_samples()[3].1;
    let first = from_file.run(&[bytes_of(x)]).unwrap();
    for _ in 0..3 {
        assert_eq!(from_file.run(&[bytes_of(x)]).unwrap(), first);
    }
}

#[test]
fn marker_through_the_c_api_equals_the_runtime_and_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let path = marker(tmp.path());
    let m = Model::from_memory(&std::fs::read(&path).unwrap());
    let mut session = Session::load(&path).unwrap();
    assert_same_specs(&m, &session);
    assert_eq!(m.inputs()[0].shape, [1, 256, 27]);
    assert_eq!(m.outputs()[0].shape, [1, 256, 1]);
    let samples = root().join("models/marker/samples");
    for k in 0..3 {
        let x = read_npy(&samples.join(format!("tokens_{k}.npy")));
        let got = f32s(&run_both(&m, &mut session, &[x], &format!("tokens_{k}"))[0]);
        // PyTorch's logits for the same frame (models/marker/README.md: the ONNX export matches
        // them to 3.2e-5 in onnxruntime).
        let want: Vec<f32> =
            perceiver_edge_runtime::to_vec(&read_npy(&samples.join(format!("logits_{k}.npy")))).unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "tokens_{k}: max |C API - PyTorch| {worst:.2e}");
        assert_eq!(argmax(&got), argmax(&want), "tokens_{k}: heat-map peak");
        eprintln!("marker tokens_{k}: peak pixel {}, max |C API - PyTorch| {worst:.2e}", argmax(&got));
    }
}

#[test]
fn every_fixture_case_matches_transformers_and_the_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 20, "fixtures missing: found {} cases", cases.len());
    for c in &cases {
        let what = c.name();
        let path = tmp.path().join(format!("{}.onnx", what.replace('/', "__")));
        export_to(&c.dir, &c.options(), &path);
        let m = Model::load(&path);
        let mut session = Session::load(&path).unwrap();
        assert_same_specs(&m, &session);
        // Fixture inputs by name, in the graph's order.
        let files = c.inputs();
        let inputs: Vec<Tensor> = m
            .inputs()
            .iter()
            .map(|spec| {
                let (_, f) =
                    files.iter().find(|(n, _)| *n == spec.name).unwrap_or_else(|| panic!("{what}: no {}", spec.name));
                let t = read_npy(f);
                assert_eq!(dtype_of(t.datum_type()), spec.dtype, "{what} {}: dtype", spec.name);
                t
            })
            .collect();
        let got = run_both(&m, &mut session, &inputs, &what);
        let out_specs = m.outputs();
        let mut worst = 0f64;
        for (name, file) in c.outputs() {
            let at =
                out_specs.iter().position(|s| s.name == name).unwrap_or_else(|| panic!("{what}: no output {name}"));
            let g = f32s(&got[at]);
            let w: Vec<f32> = perceiver_edge_runtime::to_vec(&read_npy(&file)).unwrap();
            assert_eq!(g.len(), w.len(), "{what} {name}: size");
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                let err = (*a as f64 - *b as f64).abs();
                let tol = c.atol + c.rtol * (*b as f64).abs();
                assert!(err <= tol, "{what} {name}[{i}]: C API {a}, transformers {b} (|err| {err:.3e} > {tol:.3e})");
                worst = worst.max(err);
            }
        }
        eprintln!(
            "{what:<22} inputs {:<40} max |C API - transformers| {worst:.2e}",
            m.inputs().iter().map(|s| format!("{}:{:?}", s.name, s.dtype)).collect::<Vec<_>>().join(" ")
        );
    }
}

#[test]
fn external_data_loads_by_path_and_is_refused_from_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let single = digits(tmp.path());
    let ext = tmp.path().join("digits-ext.onnx");
    let e = perceiver_edge_export::export(&root().join("models/digits"), &Default::default()).unwrap();
    assert!(e.write_with(&ext, true).unwrap().is_some());
    let (a, b) = (Model::load(&single), Model::load(&ext));
    for (name, x) in digit_samples() {
        assert_eq!(a.run(&[bytes_of(&x)]).unwrap(), b.run(&[bytes_of(&x)]).unwrap(), "{name}");
    }
    // From memory there is no folder to read the side file from: refused, the tensor named.
    let bytes = std::fs::read(&ext).unwrap();
    let mut m = std::ptr::null_mut();
    let status = unsafe { pe_model_load_from_memory(bytes.as_ptr().cast(), bytes.len(), &mut m) };
    assert_eq!(status, pe_status::PE_LOAD);
    assert!(m.is_null());
    let err = last_error();
    assert!(err.contains("external file") && err.contains("digits-ext.onnx.data"), "{err}");
}
