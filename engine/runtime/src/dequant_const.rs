//! Constants stored as 8-bit codes, decoded at every run in one pass: a rewrite of the optimised
//! plan.
//!
//! An int8 or q4 export stores a large constant table (the bench model's `[4096, 258]` Fourier
//! position features) as int8 codes with a per-channel scale (`DequantizeLinear`), which tract
//! runs as `Cast` then a broadcasting `Mul`: it does not fold a constant over 4 MiB, and folding
//! it would hold the f32 table (4x the codes) resident. The `Mul` broadcasts value by value:
//! 3.1 ms of the bench model's 27 ms int8 run went to decoding that one table. [`DequantConst`]
//! decodes the codes into f32 in one vectorised pass (`code as f32 * scale[channel]`, the same
//! arithmetic, so the output is bit-identical), keeping only the codes resident.

use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::math::Mul;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// `codes as f32 * scale`, the scale a constant over the codes' last axis (or a scalar).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct DequantConst {
    /// i8 or u8 codes.
    codes: Arc<Tensor>,
    /// One scale per channel of the last axis, or one for all.
    scale: Arc<Tensor>,
}

/// `out = codes * scale` row by row, `scale` one value per column (or one for all).
#[inline(always)]
fn decode_generic<T: Copy + Into<f32>>(codes: &[T], scale: &[f32], out: &mut [f32]) {
    if scale.len() == 1 {
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = c.into() * scale[0];
        }
        return;
    }
    for (o, c) in out.chunks_exact_mut(scale.len()).zip(codes.chunks_exact(scale.len())) {
        for ((o, &c), &s) in o.iter_mut().zip(c).zip(scale) {
            *o = c.into() * s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_avx512<T: Copy + Into<f32>>(codes: &[T], scale: &[f32], out: &mut [f32]) {
    decode_generic(codes, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_avx2<T: Copy + Into<f32>>(codes: &[T], scale: &[f32], out: &mut [f32]) {
    decode_generic(codes, scale, out)
}

/// Decodes with the widest vectors this CPU has.
fn decode<T: Copy + Into<f32>>(codes: &[T], scale: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { decode_avx512(codes, scale, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { decode_avx2(codes, scale, out) };
        }
    }
    decode_generic(codes, scale, out)
}

impl DequantConst {
    /// The codes and scales this op holds (for the resident-weight count).
    pub(crate) fn constants(&self) -> [&Arc<Tensor>; 2] {
        [&self.codes, &self.scale]
    }
}

impl Op for DequantConst {
    fn name(&self) -> StaticName {
        "DequantConst".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} codes {:?}, {} scales", self.codes.datum_type(), self.codes.shape(), self.scale.len())])
    }

    op_as_typed_op!();
}

impl EvalOp for DequantConst {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let scale = self.scale.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut out = unsafe { Tensor::uninitialized_dt(f32::datum_type(), self.codes.shape())? };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let o = plain.as_slice_mut::<f32>()?;
            ensure!(o.len().is_multiple_of(scale.len()), "DequantConst: scales do not divide the codes");
            match self.codes.datum_type() {
                DatumType::I8 => decode(self.codes.try_as_plain_ram()?.as_slice::<i8>()?, scale, o),
                DatumType::U8 => decode(self.codes.try_as_plain_ram()?.as_slice::<u8>()?, scale, o),
                dt => bail!("DequantConst: {dt:?} codes"),
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DequantConst {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.codes.shape())))
    }

    as_op!();
}

/// The constant value of outlet `o`, if a `Const` node makes it.
fn konst(model: &TypedModel, o: OutletId) -> Option<Arc<Tensor>> {
    model.node(o.node).op_as::<Const>().map(|c| c.val().clone())
}

/// The op replacing the f32 `Mul` node `node`, if it multiplies a cast of constant 8-bit codes by
/// a constant scale over their last axis.
fn candidate(model: &TypedModel, node: &TypedNode) -> Option<DequantConst> {
    let op = node.op_as::<TypedBinOp>()?;
    if !op.0.is::<Mul>() || node.inputs.len() != 2 || node.outputs[0].fact.datum_type != f32::datum_type() {
        return None;
    }
    for (x, y) in [(0, 1), (1, 0)] {
        let cast_node = model.node(node.inputs[x].node);
        let Some(cast) = cast_node.op_as::<Cast>() else { continue };
        let Some(codes) = konst(model, cast_node.inputs[0]) else { continue };
        let Some(scale) = konst(model, node.inputs[y]) else { continue };
        let shape = codes.shape();
        let channels = shape.last().copied().unwrap_or(1);
        let per_channel = scale.rank() <= shape.len()
            && scale.shape().last() == Some(&channels)
            && scale.shape()[..scale.rank() - 1].iter().all(|&d| d == 1);
        if cast.to != f32::datum_type()
            || !matches!(codes.datum_type(), DatumType::I8 | DatumType::U8)
            || !codes.is_plain()
            || scale.datum_type() != f32::datum_type()
            || !(scale.len() == 1 || per_channel)
            || node.outputs[0].fact.shape.as_concrete() != Some(shape)
        {
            continue;
        }
        let scale = scale.clone().into_tensor().into_shape(&[scale.len()]).ok()?.into_arc_tensor();
        return Some(DequantConst { codes, scale });
    }
    None
}

/// Replaces every decoding of constant 8-bit codes in the optimised `model` with
/// [`DequantConst`]; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, DequantConst)> =
        model.nodes().iter().filter_map(|n| Some((n.id, candidate(model, n)?))).collect();
    let mut subs = crate::Substitutions::default();
    for (id, op) in &found {
        let name = format!("{}.dequant", model.node(*id).name);
        subs.substitute(model, OutletId::new(*id, 0), name, op.clone(), &[])?;
    }
    model.compact()?;
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `codes * scale` through tract's own `Cast` and `Mul`, and through the rewrite.
    fn both(codes: Tensor, scale: Tensor) -> (Tensor, Tensor, usize) {
        let mut model = TypedModel::default();
        let c = model.add_const("codes", codes).unwrap();
        let s = model.add_const("scale", scale).unwrap();
        let f = model.wire_node("cast", Cast { to: f32::datum_type() }, &[c]).unwrap()[0];
        let y = model.wire_node("mul", TypedBinOp(Box::new(Mul), None), &[f, s]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let run = |m: TypedModel| m.into_runnable().unwrap().run(tvec!()).unwrap()[0].clone().into_tensor();
        let plain = run(model.clone());
        let mut rewritten = model;
        let n = rewrite(&mut rewritten).unwrap();
        (plain, run(rewritten), n)
    }

    #[test]
    fn decodes_as_tracts_cast_and_mul() {
        let codes: Vec<i8> = (0..6 * 37).map(|i| ((i * 53) % 255) as i8).collect();
        let scale: Vec<f32> = (0..37).map(|i| 0.01 + i as f32 / 300.0).collect();
        let cases = [
            (Tensor::from_shape(&[1, 6, 37], &codes).unwrap(), Tensor::from_shape(&[1, 1, 37], &scale).unwrap()),
            (Tensor::from_shape(&[6, 37], &codes).unwrap(), Tensor::from_shape(&[1, 1], &[0.25f32]).unwrap()),
            (
                Tensor::from_shape(&[6, 37], &codes.iter().map(|&c| c as u8).collect::<Vec<_>>()).unwrap(),
                Tensor::from_shape(&[1, 37], &scale).unwrap(),
            ),
        ];
        for (codes, scale) in cases {
            let (plain, got, n) = both(codes, scale);
            assert_eq!(n, 1);
            assert_eq!(plain, got);
        }
        // A scale over another axis is left to tract.
        let codes = Tensor::from_shape(&[6, 37], &codes).unwrap();
        let scale = Tensor::from_shape(&[6, 1], &[0.5f32; 6]).unwrap();
        let (plain, got, n) = both(codes, scale);
        assert_eq!((n, plain), (0, got));
    }
}
