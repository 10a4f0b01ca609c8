//! Flat weight pack for microcontrollers (`perceiver-edge export --format pack`): every tensor
//! the forward pass needs, in a fixed order, behind a small header, so `no_std` firmware can
//! include the file from flash and read it without parsing (see firmware-examples/cortex-m).
//!
//! Supported head: `PerceiverForImageClassificationFourier` (image pixels + Fourier features,
//! encoder, classification decoder). Input-independent parts are precomputed here: the Fourier
//! position table of the export's image size is stored, not recomputed on the device.
//!
//! Layout: the `perceiver-edge-pack-format` crate (magic, version, [`DIMS`], header, tensor
//! table); every section 4-byte aligned, weight precision 0 = f32, 1 = int8 (Linear weights
//! only, see below), tensor kind 0 = f32, 1 = int8.
//!
//! int8 tensors (Linear weights `[out, in]` in int8 mode) are symmetric per output row:
//! `w[r][c] = q[r][c] * scale[r]`, `scale[r] = max_c |w[r][c]| / 127`, scales as f32 at
//! `scale_offset`. Everything else (biases, LayerNorms, latents, queries, position table) is f32.
//!
//! Tensor order: position table `[M, C - 3]`; latents `[N, D]`; encoder cross-attention layer;
//! `S_LAYERS` self-attention layers; decoder query `[1, E]`; decoder cross-attention layer;
//! final layer weight and bias. A layer is: layernorm1 w, b; (cross only) layernorm2 w, b; query
//! w, b; key w, b; value w, b; output dense w, b; layernorm w, b; mlp dense1 w, b; dense2 w, b.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::heads::Head;
use crate::model::position::Fourier;
use crate::options::ExportOptions;
use perceiver_edge_pack_format::{self as pack_format, dim, Kind, TensorEntry, NUM_DIMS};
use std::path::Path;

// The format version and the header dims table, in file order, as before.
pub use perceiver_edge_pack_format::{DIMS, VERSION};

/// Weight precision of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Every tensor f32 (bit-exact weights).
    F32,
    /// Linear weights int8 with one f32 scale per output row; the rest f32.
    Int8,
}

impl Precision {
    fn to_format(self) -> pack_format::Precision {
        match self {
            Precision::F32 => pack_format::Precision::F32,
            Precision::Int8 => pack_format::Precision::Int8,
        }
    }
}

/// The pack stores a subset of the exporter's precisions.
impl TryFrom<crate::Precision> for Precision {
    type Error = String;
    fn try_from(p: crate::Precision) -> std::result::Result<Precision, String> {
        match p {
            crate::Precision::F32 => Ok(Precision::F32),
            crate::Precision::Int8 => Ok(Precision::Int8),
            other => Err(format!("a pack stores f32 or int8 weights, not {other}")),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Precision, String> {
        s.parse::<crate::Precision>()
            .ok()
            .and_then(|p| Precision::try_from(p).ok())
            .ok_or_else(|| format!("unknown pack precision {s} (expected f32 or int8)"))
    }
}

/// A pack in memory.
pub struct Pack {
    /// Header dims, in [`DIMS`] order.
    pub dims: Vec<u32>,
    /// The file contents.
    pub bytes: Vec<u8>,
}

impl Pack {
    /// Value of header dim `name`.
    pub fn dim(&self, name: &str) -> Option<u32> {
        pack_format::dim_index(name).and_then(|i| self.dims.get(i).copied())
    }

    /// Writes the pack atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        perceiver_edge_runtime::fsio::write_atomic(path, &self.bytes).map_err(|e| Error::write(path, e))
    }
}

struct Entry {
    data: Vec<f32>,
    rows: usize,
    quantise: bool,
}

fn layer(ck: &Checkpoint, prefix: &str, cross: bool, out: &mut Vec<Entry>) -> Result<()> {
    let mut names = vec!["attention.self.layernorm1"];
    if cross {
        names.push("attention.self.layernorm2");
    }
    names.extend([
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "layernorm",
        "mlp.dense1",
        "mlp.dense2",
    ]);
    for n in names {
        let w = ck.get(&format!("{prefix}.{n}.weight"))?;
        let b = ck.get(&format!("{prefix}.{n}.bias"))?;
        let matrix = w.shape.len() == 2;
        out.push(Entry { data: w.data.clone(), rows: w.shape[0], quantise: matrix });
        out.push(Entry { data: b.data.clone(), rows: 1, quantise: false });
    }
    Ok(())
}

fn rows(ck: &Checkpoint, name: &str) -> Result<u32> {
    Ok(ck.get(name)?.shape[0] as u32)
}

/// Builds the pack of an opened checkpoint (`opts.image_size` overrides the config's size).
pub fn build(ck: &Checkpoint, opts: &ExportOptions, precision: Precision) -> Result<Pack> {
    let head = Head::of(ck)?;
    if head != Head::ImageFourier {
        return Err(Error::invalid(format!(
            "--format pack supports PerceiverForImageClassificationFourier only, not {}",
            head.class_name()
        )));
    }
    let unsupported = opts.batch.is_some_and(|b| b != 1)
        || opts.seq_len.is_some()
        || opts.attention_mask
        || opts.decode_subset.is_some()
        || opts.image_points.is_some()
        || opts.audio_points.is_some()
        || opts.decoder.is_some();
    if unsupported {
        return Err(Error::invalid("--format pack takes --image-size only (batch 1)"));
    }
    let cfg = &ck.config;
    let (h, w) = opts.image_size.unwrap_or_else(|| cfg.image_hw());
    if h == 0 || w == 0 {
        return Err(Error::invalid("--image-size must be positive"));
    }
    let f = Fourier { num_bands: 64, max_resolution: vec![224, 224], concat_pos: true, sine_only: false };
    let lat = ck.get_shaped("embeddings.latents", &[None, None])?;
    let (n, d) = (lat.shape[0], lat.shape[1]);
    let x = "encoder.cross_attention";
    let s0 = "encoder.self_attends.0";
    let dec = "decoder.decoder";
    let dx = format!("{dec}.decoding_cross_attention");
    let query = ck.get_shaped(&format!("{dec}.output_position_encodings.position_embeddings"), &[Some(1), None])?;
    let e = query.shape[1];
    let labels = ck.get_shaped(&format!("{dec}.final_layer.weight"), &[None, Some(e)])?.shape[0];
    let c = 3 + f.width();
    ck.get_shaped(&format!("{x}.attention.self.key.weight"), &[None, Some(c)])?;
    let dims: [u32; NUM_DIMS] = [
        h as u32,
        w as u32,
        3,
        (h * w) as u32,
        c as u32,
        n as u32,
        d as u32,
        rows(ck, &format!("{x}.attention.self.query.weight"))?,
        rows(ck, &format!("{x}.attention.self.value.weight"))?,
        cfg.num_cross_attention_heads as u32,
        rows(ck, &format!("{x}.mlp.dense1.weight"))?,
        u32::from(cfg.use_query_residual),
        rows(ck, &format!("{s0}.attention.self.query.weight"))?,
        rows(ck, &format!("{s0}.attention.self.value.weight"))?,
        cfg.num_self_attention_heads as u32,
        rows(ck, &format!("{s0}.mlp.dense1.weight"))?,
        cfg.num_self_attends_per_block as u32,
        cfg.num_blocks as u32,
        e as u32,
        rows(ck, &format!("{dx}.attention.self.query.weight"))?,
        rows(ck, &format!("{dx}.attention.self.value.weight"))?,
        1,
        rows(ck, &format!("{dx}.mlp.dense1.weight"))?,
        1,
        labels as u32,
    ];
    for (name, heads, qk, v) in [
        ("cross", dim::X_HEADS, dim::X_QK, dim::X_V),
        ("self", dim::S_HEADS, dim::S_QK, dim::S_V),
        ("decoder", dim::O_HEADS, dim::O_QK, dim::O_V),
    ] {
        if dims[heads] == 0 || !dims[qk].is_multiple_of(dims[heads]) || !dims[v].is_multiple_of(dims[heads]) {
            return Err(Error::invalid(format!("{name} attention: qk/v widths do not split into heads")));
        }
    }

    let mut entries = vec![
        Entry { data: f.grid(&[h, w])?, rows: h * w, quantise: false },
        Entry { data: lat.data.clone(), rows: n, quantise: false },
    ];
    layer(ck, x, true, &mut entries)?;
    for i in 0..cfg.num_self_attends_per_block {
        layer(ck, &format!("encoder.self_attends.{i}"), false, &mut entries)?;
    }
    entries.push(Entry { data: query.data.clone(), rows: 1, quantise: false });
    layer(ck, &dx, true, &mut entries)?;
    let fw = ck.get(&format!("{dec}.final_layer.weight"))?;
    entries.push(Entry { data: fw.data.clone(), rows: labels, quantise: true });
    entries.push(Entry { data: ck.get(&format!("{dec}.final_layer.bias"))?.data.clone(), rows: 1, quantise: false });

    // Header space first (written once the data offsets are known), then the data.
    let mut out = vec![0u8; pack_format::header_len(entries.len())];
    let mut table = Vec::with_capacity(entries.len());
    for en in &entries {
        let int8 = precision == Precision::Int8 && en.quantise;
        let mut scale_offset = 0u32;
        let offset;
        if int8 {
            let cols = en.data.len() / en.rows;
            let scales: Vec<f32> = en
                .data
                .chunks_exact(cols)
                .map(|r| {
                    let m = r.iter().fold(0f32, |a, &x| a.max(x.abs()));
                    if m > 0.0 {
                        m / 127.0
                    } else {
                        1.0
                    }
                })
                .collect();
            scale_offset = out.len() as u32;
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            offset = out.len() as u32;
            for (r, row) in en.data.chunks_exact(cols).enumerate() {
                out.extend(row.iter().map(|&x| (x / scales[r]).round().clamp(-127.0, 127.0) as i8 as u8));
            }
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        } else {
            offset = out.len() as u32;
            for v in &en.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let kind = if int8 { Kind::Int8 } else { Kind::F32 };
        table.push(TensorEntry { offset, elements: en.data.len() as u32, kind, scale_offset });
    }
    if u32::try_from(out.len()).is_err() {
        return Err(Error::invalid("pack larger than 4 GiB: its u32 offsets cannot address it"));
    }
    pack_format::write_header(&mut out, precision.to_format(), &dims, &table)
        .map_err(|e| Error::invalid(format!("pack header: {e}")))?;
    // What the firmware's reader accepts: check the header as it will.
    pack_format::Header::parse(&out).map_err(|e| Error::invalid(format!("pack header: {e}")))?;
    Ok(Pack { dims: dims.to_vec(), bytes: out })
}

/// Opens checkpoint directory `dir` and builds its pack.
pub fn export_pack(dir: &Path, opts: &ExportOptions, precision: Precision) -> Result<Pack> {
    build(&Checkpoint::open(dir)?, opts, precision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
    }

    fn tensors(p: &Pack) -> usize {
        pack_format::Header::parse(&p.bytes).unwrap().tensor_count()
    }

    /// (offset, elements, kind, scale offset) of tensor `k`, through the format crate's parser.
    fn entry(p: &Pack, k: usize) -> [usize; 4] {
        let e = pack_format::Header::parse(&p.bytes).unwrap().entry(k).unwrap();
        [e.offset, e.elements, e.kind.code(), e.scale_offset].map(|v| v as usize)
    }

    fn f32s(p: &Pack, k: usize) -> Vec<f32> {
        let [off, n, kind, _] = entry(p, k);
        assert_eq!(kind, 0);
        p.bytes[off..off + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn f32_pack_holds_the_checkpoint_weights_in_order() {
        let ck = Checkpoint::open(&dir("models/digits")).unwrap();
        let p = build(&ck, &ExportOptions::default(), Precision::F32).unwrap();
        assert_eq!(&p.bytes[..4], b"PEPK");
        for (k, v) in [("M", 64), ("C", 261), ("N", 16), ("D", 64), ("LABELS", 10), ("S_LAYERS", 2), ("S_HEADS", 4)] {
            assert_eq!(p.dim(k), Some(v), "{k}");
        }
        // position table, latents, 18 cross, 2 x 16 self, query, 18 decoder, final w + b.
        let count = tensors(&p);
        assert_eq!(count, 2 + 18 + 2 * 16 + 1 + 18 + 2);
        let f = Fourier { num_bands: 64, max_resolution: vec![224, 224], concat_pos: true, sine_only: false };
        assert_eq!(f32s(&p, 0), f.grid(&[8, 8]).unwrap());
        assert_eq!(f32s(&p, 1), ck.get("embeddings.latents").unwrap().data);
        assert_eq!(f32s(&p, 6), ck.get("encoder.cross_attention.attention.self.query.weight").unwrap().data);
        assert_eq!(f32s(&p, count - 1), ck.get("decoder.decoder.final_layer.bias").unwrap().data);
        for k in 0..count {
            assert_eq!(entry(&p, k)[0] % 4, 0, "tensor {k} is not 4-byte aligned");
        }
        assert_eq!(entry(&p, count - 1)[0] + 4 * 10, p.bytes.len());
    }

    #[test]
    fn int8_pack_quantises_linear_weights_per_row() {
        let ck = Checkpoint::open(&dir("models/digits")).unwrap();
        let p = build(&ck, &ExportOptions::default(), Precision::Int8).unwrap();
        let count = tensors(&p);
        let [off, n, kind, so] = entry(&p, count - 2);
        assert_eq!((n, kind), (10 * 64, 1));
        let w = &ck.get("decoder.decoder.final_layer.weight").unwrap().data;
        for r in 0..10 {
            let scale = f32::from_le_bytes(p.bytes[so + 4 * r..so + 4 * r + 4].try_into().unwrap());
            let row = &w[r * 64..(r + 1) * 64];
            assert_eq!(scale, row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0);
            for (c, x) in row.iter().enumerate() {
                let q = p.bytes[off + r * 64 + c] as i8;
                assert!((f32::from(q) * scale - x).abs() <= scale / 2.0 + 1e-7);
            }
        }
        // Biases stay f32.
        assert_eq!(f32s(&p, count - 1), ck.get("decoder.decoder.final_layer.bias").unwrap().data);
        assert!(p.bytes.len() < 200_000);
    }

    #[test]
    fn refuses_other_heads_and_options() {
        let text = Checkpoint::open(&dir("models/reference/fixtures/seqcls")).unwrap();
        let e = build(&text, &ExportOptions::default(), Precision::F32).err().unwrap().to_string();
        assert!(e.contains("PerceiverForImageClassificationFourier"), "{e}");
        let ck = Checkpoint::open(&dir("models/digits")).unwrap();
        let opts = ExportOptions { batch: Some(2), ..Default::default() };
        assert!(build(&ck, &opts, Precision::F32).is_err());
    }
}
