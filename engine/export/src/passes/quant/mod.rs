//! Reduced-precision graphs: one [`Pass`] per precision over the exporter's [`Graph`].
//!
//! - [`ToF16`]: f16 constants and arithmetic; graph inputs and outputs stay f32 (a `Cast` at
//!   each end), and the sensitive ops (LayerNorm, Softmax) run in f32 between casts.
//! - [`Int8Dynamic`]: every Linear (`MatMul` by a constant weight) becomes
//!   `DynamicQuantizeLinear` + `MatMulInteger` with per-output-channel symmetric int8 weights,
//!   then one f32 rescale (`x_scale * w_scale[n]`). tract keeps the weight int8 and runs an
//!   int8 kernel with i32 accumulation.
//! - [`Int8Static`]: the same, with the activation scale and zero point fixed from calibration
//!   ranges (`QuantizeLinear` with constant parameters feeding `MatMulInteger`). A pure QDQ
//!   graph (`DequantizeLinear` on the weight) would be folded back to f32 weights by tract, so
//!   the integer matmul is written explicitly.
//! - [`Q4`]: `com.microsoft` `MatMulNBits` (4-bit, block 32, symmetric, implicit zero point 8;
//!   tract keeps it packed as Q4_0). K is zero-padded to a multiple of 32 where needed;
//!   Linears with K < 32 fall back to dynamic int8.
//!
//! The int8 and q4 passes also store the other large constants (position tables, latents,
//! embeddings, convolution kernels) as int8 with a per-axis `DequantizeLinear`: that shrinks
//! the file; tract folds them back to f32 at load.
//!
//! Every rewritten node keeps the name of the value it replaces, so the graphs stay comparable
//! layer by layer (`perceiver-edge compare`).

mod int8;
mod math;
mod policy;
mod q4;
mod storage;
mod to_f16;

pub mod calibrate;

pub use int8::*;
pub use math::*;
pub use policy::*;
pub use q4::*;
pub use storage::*;
pub use to_f16::*;

pub use perceiver_edge_runtime::precision::Precision;

use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Graph, Node, TensorData, Val};
use crate::metadata;
use crate::passes::{tables::is_table, Pass};
use half::f16;
use std::collections::{HashMap, HashSet};

fn node(name: String, op: &str, inputs: Vec<String>, out: Val, attrs: Vec<(&str, Attr)>) -> Node {
    Node {
        name,
        op: op.into(),
        domain: String::new(),
        inputs,
        outputs: vec![out],
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

fn val(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Val {
    Val { name: name.into(), dtype, shape: shape.to_vec() }
}

fn tensor(dtype: DType, shape: &[usize], bytes: Vec<u8>) -> TensorData {
    TensorData { dtype, shape: shape.to_vec(), bytes: bytes.into() }
}

/// The pass of `precision` (`None` for f32). `ranges` are needed for int8-static only;
/// `reduce_range` gives int8's integer products 7-bit weights (see [`crate::QuantOptions`]).
pub fn pass_for(
    precision: Precision,
    keep: &KeepF32,
    ranges: Option<HashMap<String, (f32, f32)>>,
    reduce_range: bool,
) -> Result<Option<Box<dyn Pass>>> {
    let bits = if reduce_range { 7 } else { 8 };
    Ok(match precision {
        Precision::F32 => None,
        Precision::F16 => Some(Box::new(ToF16 { keep: keep.clone() })),
        Precision::Int8 => Some(Box::new(Int8Dynamic { keep: keep.clone(), bits })),
        Precision::Int8Static => Some(Box::new(Int8Static {
            keep: keep.clone(),
            bits,
            ranges: ranges.ok_or_else(|| Error::invalid("int8-static needs calibration ranges"))?,
        })),
        Precision::Q4 => Some(Box::new(Q4 { keep: keep.clone() })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob_contains("query", "a.query.weight"));
        assert!(glob_contains("encoder.cross*key", "perceiver.encoder.cross_attention.self.key.weight.T"));
        assert!(!glob_contains("cross*query", "encoder.self.key"));
        assert!(glob_contains("*", "x"));
    }

    #[test]
    fn per_column_int8_roundtrips_within_half_a_step() {
        let w = [0.5f32, -2.0, 0.25, 1.0, -0.125, 0.0];
        let (q, s) = quantize_per_column(&w, 3, 2);
        assert_eq!(q[1], -127);
        for i in 0..6 {
            assert!((q[i] as f32 * s[i % 2] - w[i]).abs() <= s[i % 2] / 2.0 + 1e-7);
        }
    }

    #[test]
    fn seven_bit_weights_stay_within_63_and_half_a_step() {
        let w = [0.5f32, -2.0, 0.25, 1.0, -0.125, 0.0];
        let (q, s) = quantize_per_column_bits(&w, 3, 2, 7);
        assert_eq!(q[1], -63);
        assert_eq!(q[0], 63);
        for i in 0..6 {
            assert!((-63..=63).contains(&q[i]));
            assert!((q[i] as f32 * s[i % 2] - w[i]).abs() <= s[i % 2] / 2.0 + 1e-7);
        }
    }

    #[test]
    fn q4_packs_low_nibble_first() {
        let (k, n) = (32, 1);
        let w: Vec<f32> = (0..k).map(|i| i as f32 - 16.0).collect();
        let (b, s) = quantize_q4(&w, k, n);
        let d = s[0];
        assert_eq!(d, 2.0);
        let code = |i: usize| (b[i / 2] >> (4 * (i % 2))) & 15;
        assert_eq!(code(0), 0, "-16 = (0 - 8) * 2");
        for (i, wi) in w.iter().enumerate() {
            assert!(((code(i) as f32 - 8.0) * d - wi).abs() <= 1.0 + 1e-6);
        }
    }

    /// q4 keeps the Linears no graph input reaches (folded by tract at load) as weight-only int8,
    /// and quantises the others to 4 bits.
    #[test]
    fn q4_leaves_input_independent_linears_weight_only() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits");
        // Unrewritten: the latent-query projections stay Linears on the (constant) latents, as
        // in a published architecture whose tables do not pay.
        let mut o = crate::ExportOptions::default();
        o.perf.no_rewrites = true;
        let mut g = crate::build(&crate::Checkpoint::open(&dir).unwrap(), &o).unwrap().graph;
        let constant = input_independent(&g);
        let folded: Vec<String> = linears(&g)
            .iter()
            .filter(|l| constant.contains(&g.nodes[l.node].inputs[0]))
            .map(|l| g.nodes[l.node].name.clone())
            .collect();
        assert!(!folded.is_empty(), "digits has latent-query projections");
        Q4 { keep: KeepF32::default() }.run(&mut g).unwrap();
        for name in &folded {
            let n = g.nodes.iter().find(|n| &n.name == name).unwrap();
            assert_eq!(n.op, "MatMul", "{name}");
            assert!(g.nodes.iter().any(|d| d.op == "DequantizeLinear" && d.outputs[0].name == n.inputs[1]), "{name}");
        }
        assert!(g.nodes.iter().any(|n| n.op == "MatMulNBits"));
    }

    /// int8 leaves a Linear with a tiny weight (3 input channels) in f32, activations too, and
    /// quantises a larger one reading the same input.
    #[test]
    fn quantising_drops_a_weight_only_after_its_last_reader() {
        // `shared` is read by two Linears (a weight-shared block applied twice), `kept` by a
        // Linear --keep-f32 names: the first must still be there when the second Linear is
        // quantised, the second must stay f32.
        for q4 in [false, true] {
            let mut g = Graph::new();
            let x = g.input("x", DType::F32, &[8, 64]);
            let data: Vec<f32> = (0..64 * 64).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
            let shared = g.const_f32("shared", &[64, 64], &data);
            let kept = g.const_f32("kept", &[64, 64], &data);
            let a = g.matmul(&x, &shared);
            let b = g.matmul(&a, &shared);
            let c = g.matmul(&b, &kept);
            g.output(&c, "c");
            let keep = KeepF32::new(std::slice::from_ref(&kept.name));
            if q4 {
                Q4 { keep }.run(&mut g).unwrap();
            } else {
                Int8Dynamic { keep, bits: 8 }.run(&mut g).unwrap();
            }
            let quantised = if q4 { "MatMulNBits" } else { "MatMulInteger" };
            assert_eq!(g.nodes.iter().filter(|n| n.op == quantised).count(), 2, "q4 {q4}");
            assert!(g.constant_data(&shared.name).is_none(), "q4 {q4}: the f32 copy is gone");
            assert!(g.constant_data(&kept.name).is_some_and(|t| t.dtype == DType::F32), "q4 {q4}");
        }
    }

    /// With `reduce_range` every integer product's weight is within -63..=63 (7 bits), and uses
    /// that range.
    #[test]
    fn reduce_range_gives_seven_bit_product_weights() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[8, 64]);
        let data: Vec<f32> = (0..64 * 64).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let w = g.const_f32("w", &[64, 64], &data);
        let y = g.matmul(&x, &w);
        g.output(&y, "y");
        pass_for(Precision::Int8, &KeepF32::default(), None, true).unwrap().unwrap().run(&mut g).unwrap();
        let mm = g.nodes.iter().find(|n| n.op == "MatMulInteger").expect("an integer product");
        let codes = g.constant_data(&mm.inputs[1]).expect("a constant weight");
        assert_eq!(codes.dtype, DType::I8);
        let codes: Vec<i8> = codes.bytes.iter().map(|&b| b as i8).collect();
        assert!(codes.iter().all(|c| (-63..=63).contains(c)));
        assert!(codes.iter().any(|&c| c.abs() == 63));
    }

    #[test]
    fn int8_leaves_tiny_linears_f32() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[64, 3]);
        let small: Vec<f32> = (0..3 * 256).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect();
        let w = g.const_f32("small", &[3, 256], &small);
        let y = g.matmul(&x, &w);
        let big: Vec<f32> = (0..256 * 64).map(|i| (i % 11) as f32 / 11.0 - 0.5).collect();
        let w2 = g.const_f32("big", &[256, 64], &big);
        let z = g.matmul(&y, &w2);
        g.output(&z, "z");
        assert_eq!(int8_activation_inputs(&g, &KeepF32::default()), vec![y.name.clone()]);
        Int8Dynamic { keep: KeepF32::default(), bits: 8 }.run(&mut g).unwrap();
        let reads = |v: &str| {
            g.nodes.iter().filter(|n| n.inputs.iter().any(|i| i == v)).map(|n| n.op.clone()).collect::<Vec<_>>()
        };
        assert_eq!(reads(&x.name), vec!["MatMul".to_string()], "the 3 x 256 Linear stays f32");
        assert!(g.constant_data(&w.name).is_some_and(|t| t.dtype == DType::F32));
        assert!(g.nodes.iter().any(|n| n.op == "MatMulInteger"), "the 256 x 64 Linear is int8");
    }

    /// Storage quantises a large 2-D constant per channel, but leaves in f32 a 1-D one, where
    /// each value would get its own scale (5 bytes for 4, and not exact); the q4 pass's block
    /// scales stay f32, read by `MatMulNBits` directly.
    #[test]
    fn storage_keeps_one_dimensional_constants_in_f32() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 2048]);
        let data: Vec<f32> = (0..2048).map(|i| (i % 17) as f32 / 17.0 - 0.4).collect();
        let bias = g.const_f32("bias", &[2048], &data);
        let table = g.const_f32("table", &[2, 2048], &[data.clone(), data].concat());
        let y = g.add(&x, &bias);
        let y = g.add(&y, &table);
        g.output(&y, "y");
        quantize_storage(&mut g, &KeepF32::default());
        assert!(g.constant_data(&bias.name).is_some_and(|t| t.dtype == DType::F32 && t.shape == [2048]));
        assert!(g.constant_data(&table.name).is_none(), "the 2-D table is stored as int8");
        let dq: Vec<&str> =
            g.nodes.iter().filter(|n| n.op == "DequantizeLinear").map(|n| &n.outputs[0].name[..]).collect();
        assert_eq!(dq, [&table.name[..]]);

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits");
        let mut g = crate::build(&crate::Checkpoint::open(&dir).unwrap(), &Default::default()).unwrap().graph;
        Q4 { keep: KeepF32::default() }.run(&mut g).unwrap();
        for n in g.nodes.iter().filter(|n| n.op == "MatMulNBits") {
            let scales = g.constant_data(&n.inputs[2]);
            assert!(scales.is_some_and(|t| t.dtype == DType::F32 && t.shape.len() == 1), "{}", n.name);
        }
    }

    #[test]
    fn unknown_precision_is_one_line() {
        let e = "int4".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("int4") && e.contains("int8-static") && !e.contains('\n'));
    }
}
