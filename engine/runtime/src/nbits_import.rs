//! ONNX `MatMulNBits` read straight into tract's Q4_0 format.
//!
//! A q4 export's Linears are `com.microsoft` `MatMulNBits` with 4-bit weights in blocks of 32
//! (`B`: `[N, K / 32, 16]` bytes, two weights a byte, low nibble first; one f32 scale a block).
//! tract-onnx 0.23.9 translates one by widening `B` to a byte per weight, then packing those into
//! Q4_0 blocks (an f16 scale and 16 bytes, byte `j` holding weights `j` and `j + 16`) one nibble
//! at a time through a generic writer: on language-perceiver q4, 0.55 s of a 1.8 s load, and a
//! transient twice the weight's size.
//!
//! [`register`] puts [`parse`] in tract's op register in its place. For the form the exporter
//! writes (4 bits, blocks of 32, `K` a multiple of 32, no zero points, `g_idx` or bias) it wires
//! exactly the nodes tract's translation wires, the Q4_0 blocks built from `B`'s bytes as they are
//! by tract-linalg's `pack_prequantized_nibbles` (a byte at a time since this repository's patch
//! 3, `vendor/tract-linalg/PATCHES.md`); any other form goes to tract's own translation. The blocks are
//! byte-identical to tract's (tested below and, through whole models, in
//! `engine/export/tests/pack_once.rs`). (A scale beyond f16's range, infinite or NaN, makes
//! tract wire a zero-point correction of infinities or NaNs too; the outputs are not finite
//! either way.)

use std::sync::OnceLock;
use tract_linalg::block_quant::{BlockQuantFact, BlockQuantStorage, Q4_0};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{expand, Expansion};
use tract_onnx::Onnx;

/// Weights in a Q4_0 block.
const QK: usize = 32;
/// Bytes of a Q4_0 block: an f16 scale and 16 bytes of nibbles.
const BLOCK_BYTES: usize = 18;

/// Whether models loaded from now on translate `MatMulNBits` with [`parse`] (the default) or with
/// tract's own translation (see [`crate::set_nbits_import`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// A translation of an ONNX node into an inference op, as tract's op register holds them.
type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own `MatMulNBits` translation, for the forms [`parse`] leaves to it.
static TRACTS: OnceLock<Option<Builder>> = OnceLock::new();

/// Puts [`parse`] in `onnx`'s op register for `MatMulNBits` (when [`ENABLED`]).
pub(crate) fn register(onnx: &mut Onnx) {
    if !ENABLED.get() {
        return;
    }
    let tracts = *TRACTS.get_or_init(|| tract_onnx::onnx().op_register.0.get("MatMulNBits").copied());
    if tracts.is_some() {
        onnx.op_register.insert("MatMulNBits", parse);
    }
}

/// Translates a `MatMulNBits` node: [`Q4Linear`] for the exporter's form, tract's op otherwise.
fn parse(ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: usize = node.get_attr("K")?;
    let n: usize = node.get_attr("N")?;
    let bits: usize = node.get_attr_opt("bits")?.unwrap_or(4);
    let block_size: usize = node.get_attr("block_size")?;
    // A, B and scales given; zero points, g_idx and bias absent (or named "").
    ensure!(node.input.len() >= 3, "MatMulNBits: expected inputs A, B and scales, got {}", node.input.len());
    let three = node.input.len() >= 3 && node.input[..3].iter().all(|s| !s.is_empty());
    let rest_absent = node.input.iter().skip(3).all(|s| s.is_empty());
    if bits == 4 && block_size == QK && k > 0 && k.is_multiple_of(QK) && n > 0 && three && rest_absent {
        return Ok((expand(Q4Linear { k, n }), vec![]));
    }
    let tracts = TRACTS.get().copied().flatten().context("tract's MatMulNBits translation is missing")?;
    tracts(ctx, node)
}

/// `Y = A @ dequant(B)^T` for a 4-bit weight in blocks of 32 with the default zero point (8),
/// wired as tract-onnx wires it: a Q4_0 constant read by an f32 `EinSum`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Q4Linear {
    k: usize,
    n: usize,
}

impl Expansion for Q4Linear {
    fn name(&self) -> StaticName {
        "MatMulNBits".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        let n = self.n.to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            s.equals(&outputs[0].rank, rank as i64)?;
            for ax in 0..rank.saturating_sub(1) {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            if rank > 0 {
                s.equals(&outputs[0].shape[rank - 1], n.clone())?;
            }
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let (k, n) = (self.k, self.n);
        let b = model
            .outlet_fact(inputs[1])?
            .konst
            .clone()
            .context("MatMulNBits: quantized weight B must be a constant")?;
        let scales = model.outlet_fact(inputs[2])?.konst.clone().context("MatMulNBits: scales must be a constant")?;
        let blocks = n.checked_mul(k / QK).filter(|b| b.checked_mul(BLOCK_BYTES).is_some());
        let blocks = blocks.with_context(|| format!("MatMulNBits: N={n} x K={k} is too large"))?;
        ensure!(
            b.datum_type() == u8::datum_type() && b.len() == blocks * 16,
            "MatMulNBits: B is {:?} {:?}, expected {blocks} blocks of 16 bytes (N={n}, K={k})",
            b.datum_type(),
            b.shape()
        );
        ensure!(
            scales.len() == blocks,
            "MatMulNBits: scales has {} values, expected {blocks} (N={n}, K={k})",
            scales.len()
        );
        let scales = scales.cast_to::<f32>()?;
        let (b, scales) = (b.try_as_plain_ram()?, scales.try_as_plain_ram()?);
        clear_upper_vector_state();
        let blob = Q4_0.pack_prequantized_nibbles(b.as_slice::<u8>()?, scales.as_slice::<f32>()?, n, k)?;

        let input = model.outlet_fact(inputs[0])?;
        let (dt, rank) = (input.datum_type, input.rank());
        ensure!(
            rank >= 1 && input.shape[rank - 1] == k.to_dim(),
            "MatMulNBits: the input A is {:?}, expected a last axis of K={k}",
            input.shape
        );
        let a = model.wire_node(format!("{prefix}.cast_a"), cast(f32::datum_type()), &[inputs[0]])?[0];
        let lead: String = "abcdefgh".chars().take(rank - 1).collect();
        let storage = BlockQuantStorage::new(Box::new(Q4_0), n, k, Arc::new(blob))?;
        let fact = Box::new(BlockQuantFact::new(Box::new(Q4_0), tvec!(1, n, k)));
        let weight = model.wire_node(
            format!("{prefix}.weight_bq"),
            Const::new_with_exotic_fact(Arc::new(storage.into_tensor_with_shape(f32::datum_type(), &[1, n, k])), fact)?,
            &[],
        )?[0];
        let axes = AxesMapping::from_strs(&[format!("{lead}k"), "gnk".to_string()], &[format!("{lead}n")])?;
        let y = model.wire_node(format!("{prefix}.matmul"), EinSum::new(axes, f32::datum_type()), &[a, weight])?[0];
        model.wire_node(format!("{prefix}.cast_y"), cast(dt), &[y])
    }
}

/// `vzeroupper` where the CPU has AVX: clears the upper halves of the vector registers before
/// `pack_prequantized_nibbles`, whose loop (SSE code) converts each block's scale with one F16C
/// instruction (VEX code). On Intel CPUs, while those upper halves hold data (left by code run
/// earlier in the load: tract-linalg's assembly kernels, for one, return without `vzeroupper`),
/// every switch between SSE and VEX code costs a state transition: two a block, which made the
/// packing most of a q4 load (language-perceiver q4 on a Xeon with AMX: 1.68-1.78 s -> 0.65-0.70
/// s, `bench --runs 1`; a `vzeroupper` at the start of the load did not help). AMD's cores have
/// no such transitions. Values are unchanged.
fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX. `vzeroupper` zeroes bits 128 and up of ymm0-15 / zmm0-15 and
        // keeps their low 128 bits; the operands tell the compiler those registers are clobbered.
        unsafe {
            std::arch::asm!(
                "vzeroupper",
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nomem, nostack, preserves_flags)
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::block_quant::BlockQuant;

    /// Q4_0 blocks as tract-onnx builds them: the weights widened to a byte each, then packed by
    /// tract-linalg.
    fn tracts(b: &[u8], scales: &[f32], n: usize, k: usize) -> Vec<u8> {
        let q: Vec<u8> = b.iter().flat_map(|byte| [byte & 0x0F, byte >> 4]).collect();
        Q4_0.pack_prequantized(&q, scales, n, k).unwrap().as_bytes().to_vec()
    }

    /// Q4_0 blocks from the bytes as they are (what [`Q4Linear`] builds).
    fn nibbles(b: &[u8], scales: &[f32], n: usize, k: usize) -> TractResult<Blob> {
        Q4_0.pack_prequantized_nibbles(b, scales, n, k)
    }

    #[test]
    fn blocks_match_tract_linalgs_packing() {
        let (n, k) = (5, 96);
        let b: Vec<u8> = (0..n * k / 2).map(|i| ((i * 7919 + 13) % 256) as u8).collect();
        let scales: Vec<f32> = (0..n * k / QK).map(|i| (i as f32 - 7.0) * 0.037).collect();
        let blob = nibbles(&b, &scales, n, k).unwrap();
        assert_eq!(blob.as_bytes(), tracts(&b, &scales, n, k).as_slice());
        assert_eq!(blob.as_bytes().as_ptr() as usize % 128, 0);
    }

    #[test]
    fn blocks_decode_to_the_weights() {
        // Weight i of a block = i % 16, scale 1: Q4_0 decodes (nibble - 8) * scale.
        let b: Vec<u8> = (0..16).map(|j| (((2 * j) % 16) | (((2 * j + 1) % 16) << 4)) as u8).collect();
        let blob = nibbles(&b, &[1.0], 1, 32).unwrap();
        let values = Q4_0.dequant_f32(&blob).unwrap();
        let values = values.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let want: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 8.0).collect();
        assert_eq!(values, want);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(nibbles(&[0u8; 15], &[1.0], 1, 32).is_err());
        assert!(nibbles(&[0u8; 32], &[1.0], 1, 32).is_err());
        assert!(nibbles(&[0u8; 16], &[1.0, 2.0], 1, 32).is_err());
        assert!(nibbles(&[0u8; 16], &[1.0], 1, 33).is_err());
        assert!(nibbles(&[], &[], usize::MAX, 64).is_err());
        assert!(nibbles(&[], &[], usize::MAX / 8, 32).is_err());
    }
}
