//! The bundled digits model run in f16 (tract's `f32_to_f16` transform) agrees with f32. On an
//! aarch64 CPU with fp16 arithmetic (and under `qemu-aarch64 -cpu max`, targets/test-aarch64.sh)
//! this executes tract's native fp16 NEON kernels; on x86-64 f16 is emulated.

use perceiver_edge_export::{export, ExportOptions};
use perceiver_edge_runtime::{npy, to_vec};
use std::path::Path;
use tract_onnx::prelude::*;

#[test]
fn digits_in_f16_matches_f32() -> TractResult<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("perceiver-edge-f16-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let onnx = dir.join("digits.onnx");
    export(&root.join("models/digits"), &ExportOptions::default())?.write(&onnx)?;
    let model = tract_onnx::onnx().model_for_path(&onnx)?.into_typed()?.into_decluttered()?;
    std::fs::remove_dir_all(&dir)?;

    let mut half = model.clone();
    tract_onnx::tract_core::transform::get_transform("f32_to_f16")?
        .expect("f32_to_f16 transform")
        .transform(&mut half)?;
    let f32_plan = model.into_optimized()?.into_runnable()?;
    let f16_plan = half.into_optimized()?.into_runnable()?;

    for digit in [0, 3, 4] {
        let x = npy::read_npy(&root.join(format!("models/digits/samples/digit_{digit}.npy")))?;
        let want: Vec<f32> = to_vec(&f32_plan.run(tvec!(x.clone().into()))?[0].clone().into_tensor()).unwrap();
        let x16 = x.cast_to_dt(DatumType::F16)?.into_owned();
        let out16 = f16_plan.run(tvec!(x16.into()))?[0].clone().into_tensor();
        assert_eq!(out16.datum_type(), DatumType::F16, "the transform makes outputs f16 too");
        let as_f32 = out16.cast_to_dt(DatumType::F32)?;
        let got: Vec<f32> = to_vec(&as_f32).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        eprintln!("digit {digit}: f16 vs f32 logits max |diff| {worst:.3e} (max |logit| {scale:.2})");
        assert!(worst <= 0.02 * scale + 0.02, "digit {digit}: f16 differs from f32 by {worst}");
        assert_eq!(argmax(&got), argmax(&want), "digit {digit}: f16 changes the class");
    }
    Ok(())
}
