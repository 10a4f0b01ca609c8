//! Reading a Hugging Face PerceiverIO checkpoint: `config.json` and safetensors weights
//! (single file or sharded), f32 / f16 / bf16. PyTorch pickles are refused, never executed.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An int or a list of ints in config.json (`image_size` may be either).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrList {
    /// One value, for both height and width.
    Int(usize),
    /// One value per axis.
    List(Vec<usize>),
}

/// The fields of transformers' `PerceiverConfig` that shape the computation; defaults match it.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PerceiverConfig {
    /// Head class names (`PerceiverForImageClassificationFourier`, ...).
    pub architectures: Vec<String>,
    /// N.
    pub num_latents: usize,
    /// D.
    pub d_latents: usize,
    /// Input width without a preprocessor; text embedding width with one.
    pub d_model: usize,
    /// Times the shared self-attention block is applied.
    pub num_blocks: usize,
    /// Self-attention layers (weight sets) per block.
    pub num_self_attends_per_block: usize,
    /// Heads in latent self-attention.
    pub num_self_attention_heads: usize,
    /// Heads in the encoder cross-attention.
    pub num_cross_attention_heads: usize,
    /// MLP activation (`gelu`, `relu`, ...).
    pub hidden_act: String,
    /// Text vocabulary size.
    pub vocab_size: usize,
    /// Text positions (and MLM output queries).
    pub max_position_embeddings: usize,
    /// Image size of the learned-position image head.
    pub image_size: IntOrList,
    /// Input size of the optical flow head.
    pub train_size: Vec<usize>,
    /// Video frames (multimodal).
    pub num_frames: usize,
    /// Audio samples per video frame (multimodal).
    pub audio_samples_per_frame: usize,
    /// Audio samples per patch (multimodal).
    pub samples_per_patch: usize,
    /// `[batch, frames, height, width]` of the video decoder queries (multimodal).
    pub output_shape: Vec<usize>,
    /// Channels of each multimodal decoder's output.
    pub output_num_channels: usize,
    /// Width of the multimodal label query.
    #[serde(rename = "_label_trainable_num_channels")]
    pub label_trainable_num_channels: usize,
    /// `kv` or `q`.
    pub cross_attention_shape_for_attention: String,
    /// Query residual in the encoder cross-attention.
    pub use_query_residual: bool,
}

impl Default for PerceiverConfig {
    fn default() -> Self {
        PerceiverConfig {
            architectures: vec![],
            num_latents: 256,
            d_latents: 1280,
            d_model: 768,
            num_blocks: 1,
            num_self_attends_per_block: 26,
            num_self_attention_heads: 8,
            num_cross_attention_heads: 8,
            hidden_act: "gelu".into(),
            vocab_size: 262,
            max_position_embeddings: 2048,
            image_size: IntOrList::Int(56),
            train_size: vec![368, 496],
            num_frames: 16,
            audio_samples_per_frame: 1920,
            samples_per_patch: 16,
            output_shape: vec![1, 16, 224, 224],
            output_num_channels: 512,
            label_trainable_num_channels: 1024,
            cross_attention_shape_for_attention: "kv".into(),
            use_query_residual: true,
        }
    }
}

impl PerceiverConfig {
    /// `image_size` as (height, width) (a one-element list is square). [`Checkpoint::open`]
    /// has checked the list's length and values.
    pub fn image_hw(&self) -> (usize, usize) {
        match &self.image_size {
            IntOrList::Int(s) => (*s, *s),
            IntOrList::List(v) if v.len() >= 2 => (v[0], v[1]),
            IntOrList::List(v) => (v.first().copied().unwrap_or(1), v.first().copied().unwrap_or(1)),
        }
    }

    /// `train_size` as (height, width). [`Checkpoint::open`] has checked it.
    pub fn train_hw(&self) -> (usize, usize) {
        match self.train_size[..] {
            [h, w] => (h, w),
            _ => (1, 1),
        }
    }

    /// Checks the values the graph's shapes come from: sizes at least 1, lists of the right
    /// length, nothing beyond the limits. The message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("num_latents", self.num_latents),
            ("d_latents", self.d_latents),
            ("d_model", self.d_model),
            ("num_blocks", self.num_blocks),
            ("num_self_attends_per_block", self.num_self_attends_per_block),
            ("num_self_attention_heads", self.num_self_attention_heads),
            ("num_cross_attention_heads", self.num_cross_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((k, v)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{k} is {v}, expected at least 1"));
        }
        match &self.image_size {
            IntOrList::Int(0) => return Err("image_size is 0, expected at least 1".into()),
            IntOrList::List(v) if v.is_empty() || v.len() > 2 || v.contains(&0) => {
                return Err(format!("image_size is {v:?}, expected one or two sizes of at least 1"))
            }
            _ => {}
        }
        if self.train_size.len() != 2 || self.train_size.contains(&0) {
            return Err(format!("train_size is {:?}, expected [height, width], each at least 1", self.train_size));
        }
        let layers = self.num_blocks.saturating_mul(self.num_self_attends_per_block);
        let max = perceiver_edge_runtime::limits::MAX_LATENT_LAYERS;
        if layers > max {
            return Err(format!(
                "num_blocks {} x num_self_attends_per_block {} = {layers} latent layers, more than the {max} accepted",
                self.num_blocks, self.num_self_attends_per_block
            ));
        }
        Ok(())
    }
}

/// One weight tensor, converted to f32.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Full name in the checkpoint.
    pub name: String,
    /// Shape as stored (Linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Where one tensor lies in a safetensors file (validated when the checkpoint was opened).
#[derive(Clone, Debug)]
struct Stored {
    file: std::sync::Arc<PathBuf>,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte offset of the tensor's data in the file, and its length.
    offset: u64,
    len: usize,
}

impl Stored {
    /// Reads the tensor from its file and converts it to f32.
    fn read(&self, name: &str) -> Result<Weight> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.file.as_path();
        let changed = |e: std::io::Error| {
            Error::file(path, format!("cannot read tensor `{name}` (changed since it was opened?): {e}"))
        };
        // A regular file still long enough (a FIFO or device put in its place would block or
        // never end).
        let (mut f, len) = perceiver_edge_runtime::fsio::open_regular(path).map_err(changed)?;
        if len < self.offset + self.len as u64 {
            return Err(changed(std::io::Error::other(format!("{len} bytes, shorter than when opened"))));
        }
        f.seek(SeekFrom::Start(self.offset)).map_err(changed)?;
        let mut raw = vec![0u8; self.len];
        f.read_exact(&mut raw).map_err(changed)?;
        let data =
            to_f32(self.dtype, &raw).ok_or_else(|| Error::file(path, format!("tensor `{name}`: unexpected dtype")))?;
        // Checked again: below f32 most weights are read back long after the checkpoint was opened.
        check_finite(name, &data).map_err(|e| Error::file(path, format!("{e} (changed since it was opened?)")))?;
        Ok(Weight { name: name.to_string(), shape: self.shape.clone(), data })
    }
}

/// Some of a checkpoint's tensors, read from their files when asked for, apart from the
/// [`Checkpoint`] (see [`Checkpoint::tensors`]).
#[derive(Clone, Debug)]
pub struct Tensors(HashMap<String, Stored>);

impl Tensors {
    /// Tensor `full` (full name), read from its file and converted to f32.
    pub fn read(&self, full: &str) -> Result<Weight> {
        self.0.get(full).ok_or_else(|| Error::tensor(full, "missing from the checkpoint"))?.read(full)
    }
}

/// The error for tensor `name` holding NaN or infinite values, if it does.
fn check_finite(name: &str, data: &[f32]) -> std::result::Result<(), String> {
    match data.iter().filter(|v| !v.is_finite()).count() {
        0 => Ok(()),
        bad => Err(format!("tensor `{name}` holds {bad} NaN or infinite value(s)")),
    }
}

/// Little-endian tensor bytes as f32 (`None` for a dtype the exporter does not read).
fn to_f32(dtype: safetensors::Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// An opened checkpoint directory: its configuration, and its tensors, validated at opening
/// and read from the files when asked for (so an export does not hold the checkpoint's weights
/// next to the graph's).
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Parsed `config.json`.
    pub config: PerceiverConfig,
    /// `config.json` as JSON (for fields the typed config does not name).
    pub raw_config: Value,
    tensors: HashMap<String, Stored>,
    /// `perceiver.` for head classes, empty for a bare `PerceiverModel`.
    prefix: String,
}

/// Validates the tensors of one safetensors file (dtype, shape, finite values) and records in
/// `out` where each lies. With `only`, the file must hold exactly the tensors a shard index
/// assigns to it. The header is read first and each tensor after it on its own, so opening a
/// checkpoint holds one tensor at a time, never the whole file.
fn read_safetensors(path: &Path, out: &mut HashMap<String, Stored>, only: Option<&[&str]>) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let invalid = |m: String| Error::file(path, format!("not a valid safetensors file: {m}"));
    let (mut f, len) =
        perceiver_edge_runtime::fsio::open_regular(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| invalid(format!("{len} bytes, shorter than the 8-byte header size")))?;
    let n = u64::from_le_bytes(n);
    // safetensors' own limit on the header (100 MB).
    if n > 100_000_000 || n > len.saturating_sub(8) {
        return Err(invalid(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let header = std::str::from_utf8(&header).map_err(|e| invalid(format!("the header is not UTF-8: {e}")))?;
    // Deserialising checks the offsets: in order, contiguous, each the size its dtype and
    // shape give.
    let meta: safetensors::tensor::Metadata = serde_json::from_str(header).map_err(|e| invalid(e.to_string()))?;
    let names = meta.offset_keys();
    let infos = meta.tensors();
    let data_len = names.last().map_or(0, |k| infos[k].data_offsets.1) as u64;
    // A header whose offsets pass u64 is refused here too (`None` never equals the length).
    let described = (8 + n).checked_add(data_len);
    if described != Some(len) {
        let described = described.map_or_else(|| "more than 2^64".to_string(), |d| d.to_string());
        return Err(invalid(format!("its header describes {described} bytes, the file holds {len}")));
    }
    if let Some(only) = only {
        if let Some(n) = only.iter().find(|n| !infos.contains_key(**n)) {
            return Err(Error::file(
                path,
                format!("the shard index assigns tensor `{n}` to this shard, but it is not in it"),
            ));
        }
        if let Some(n) = names.iter().find(|n| !only.contains(&n.as_str())) {
            return Err(Error::file(
                path,
                format!("holds tensor `{n}`, which the shard index assigns to another shard"),
            ));
        }
    }
    let file = std::sync::Arc::new(path.to_path_buf());
    for name in &names {
        let info = infos[name];
        if out.contains_key(name) {
            return Err(Error::file(path, format!("tensor `{name}` is defined twice in the checkpoint")));
        }
        use safetensors::Dtype;
        let (start, end) = info.data_offsets;
        let offset = 8 + n + start as u64;
        if to_f32(info.dtype, &[]).is_none() {
            if matches!(info.dtype, Dtype::I64 | Dtype::I32) && name.ends_with("num_batches_tracked") {
                continue;
            }
            return Err(Error::file(
                path,
                format!("tensor `{name}` has dtype {:?}, expected F32, F16 or BF16", info.dtype),
            ));
        }
        if start == end {
            return Err(Error::file(path, format!("tensor `{name}` has shape {:?}, with no elements", info.shape)));
        }
        perceiver_edge_runtime::limits::check_fits_memory((end - start) as u64).map_err(|m| Error::file(path, m))?;
        let mut raw = vec![0u8; end - start];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut raw))
            .map_err(|e| Error::file(path, format!("cannot read tensor `{name}`: {e}")))?;
        let data = to_f32(info.dtype, &raw).expect("a dtype to_f32 reads");
        check_finite(name, &data).map_err(|e| Error::file(path, e))?;
        let stored =
            Stored { file: file.clone(), dtype: info.dtype, shape: info.shape.clone(), offset, len: raw.len() };
        out.insert(name.to_string(), stored);
    }
    Ok(())
}

/// A shard named by `model.safetensors.index.json`, confined to the checkpoint folder: a plain
/// relative name, no `..`, resolving (through any symlink) to a regular file inside `dir`.
fn shard_path(dir: &Path, index: &Path, shard: &str) -> Result<PathBuf> {
    let rel = Path::new(shard);
    let plain = !shard.is_empty()
        && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        && !shard.contains('\\');
    if !plain {
        return Err(Error::file(index, format!("shard \"{shard}\" is not a file name inside the checkpoint folder")));
    }
    let path = dir.join(rel);
    let (real, real_dir) = match (path.canonicalize(), dir.canonicalize()) {
        (Ok(r), Ok(d)) => (r, d),
        _ => return Err(Error::file(&path, "missing (named by model.safetensors.index.json)")),
    };
    if !real.starts_with(&real_dir) || !real.is_file() {
        return Err(Error::file(
            index,
            format!("shard \"{shard}\" resolves to {}, not a file inside the checkpoint folder", real.display()),
        ));
    }
    Ok(path)
}

impl Checkpoint {
    /// Opens a checkpoint directory (`config.json` + `model.safetensors` or a sharded index).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "not a checkpoint directory (expected config.json + model.safetensors)"));
        }
        let cfg_path = dir.join("config.json");
        let text = perceiver_edge_runtime::fsio::read_text(&cfg_path, perceiver_edge_runtime::fsio::MAX_TEXT_BYTES)
            .map_err(|e| Error::file(&cfg_path, format!("cannot read: {e}")))?;
        let raw_config: Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
        let config: PerceiverConfig = serde_json::from_value(raw_config.clone())
            .map_err(|e| Error::file(&cfg_path, format!("not a PerceiverConfig: {e}")))?;
        config.validate().map_err(|m| Error::file(&cfg_path, m))?;
        if raw_config.get("model_type").and_then(Value::as_str).is_some_and(|t| t != "perceiver") {
            return Err(Error::file(
                &cfg_path,
                format!("model_type is {}, expected \"perceiver\"", raw_config["model_type"]),
            ));
        }

        let mut tensors = HashMap::new();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            read_safetensors(&single, &mut tensors, None)?;
        } else if index.is_file() {
            let text = perceiver_edge_runtime::fsio::read_text(&index, perceiver_edge_runtime::fsio::MAX_TEXT_BYTES)
                .map_err(|e| Error::file(&index, format!("cannot read: {e}")))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::file(&index, "no \"weight_map\" object"))?;
            // shard -> the tensors the index assigns to it
            let mut shards: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for (tensor, shard) in map {
                let shard = shard
                    .as_str()
                    .ok_or_else(|| Error::file(&index, format!("weight_map entry `{tensor}` is not a file name")))?;
                shards.entry(shard).or_default().push(tensor.as_str());
            }
            for (shard, names) in &shards {
                let path = shard_path(dir, &index, shard)?;
                read_safetensors(&path, &mut tensors, Some(names))?;
            }
        } else {
            for bin in ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth"] {
                if dir.join(bin).exists() {
                    return Err(Error::file(
                        &dir.join(bin),
                        "PyTorch pickle checkpoints are not read (loading one executes code); convert it to model.safetensors with \
                         transformers: `Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`",
                    ));
                }
            }
            return Err(Error::file(&single, "missing (expected model.safetensors or model.safetensors.index.json)"));
        }
        let prefix = if tensors.keys().any(|k| k.starts_with("perceiver.")) { "perceiver." } else { "" };
        let ck = Checkpoint { dir: dir.to_path_buf(), config, raw_config, tensors, prefix: prefix.to_string() };
        ck.check_config_against_weights().map_err(|m| Error::file(&cfg_path, m))?;
        Ok(ck)
    }

    /// The config keys the weights also state must agree with them: `num_latents` and
    /// `d_latents` (the latent array's shape), `num_self_attends_per_block` (the stored latent
    /// layers: fewer would silently drop trained layers).
    fn check_config_against_weights(&self) -> std::result::Result<(), String> {
        let c = &self.config;
        if let Ok(l) = self.get("embeddings.latents") {
            if l.shape.len() != 2 {
                return Err(format!("the weights' latent array {} has shape {:?}, expected [N, D]", l.name, l.shape));
            }
            if l.shape[0] != c.num_latents {
                return Err(format!(
                    "num_latents is {}, the weights' {} has {} rows",
                    c.num_latents, l.name, l.shape[0]
                ));
            }
            if l.shape[1] != c.d_latents {
                return Err(format!("d_latents is {}, the weights' {} is {} wide", c.d_latents, l.name, l.shape[1]));
            }
        }
        let marker = format!("{}encoder.self_attends.", self.prefix);
        let stored = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(&marker)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1);
        if stored > c.num_self_attends_per_block {
            return Err(format!(
                "num_self_attends_per_block is {}, the weights hold {stored} latent self-attention layers",
                c.num_self_attends_per_block
            ));
        }
        Ok(())
    }

    /// The head class named by `architectures[0]`.
    pub fn architecture(&self) -> Result<&str> {
        self.config.architectures.first().map(String::as_str).ok_or_else(|| {
            Error::file(&self.dir.join("config.json"), "no \"architectures\" entry naming the Perceiver head class")
        })
    }

    /// `name` with the model's prefix (`perceiver.` for head classes): the tensor's full name.
    pub fn full_name(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// True when the model (under its `perceiver.` prefix, if any) has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(&self.full_name(name))
    }

    /// A model tensor by its name under the `perceiver.` prefix (`encoder.cross_attention...`).
    pub fn get(&self, name: &str) -> Result<Weight> {
        self.get_top(&self.full_name(name))
    }

    /// A tensor by its full name (`embedding_decoder.bias`).
    pub fn get_top(&self, full: &str) -> Result<Weight> {
        self.stored(full)?.read(full)
    }

    /// The tensors of these full names the checkpoint has, to read after this value is gone.
    pub fn tensors<'n>(&self, full: impl IntoIterator<Item = &'n str>) -> Tensors {
        Tensors(full.into_iter().filter_map(|n| Some((n.to_string(), self.tensors.get(n)?.clone()))).collect())
    }

    /// The stored shape of tensor `full` (full name), if the checkpoint has it.
    pub fn stored_shape(&self, full: &str) -> Option<&[usize]> {
        self.tensors.get(full).map(|t| t.shape.as_slice())
    }

    /// Where tensor `full` lies, or the error naming it as missing.
    fn stored(&self, full: &str) -> Result<&Stored> {
        self.tensors
            .get(full)
            .ok_or_else(|| Error::tensor(full, format!("missing from the checkpoint in {}", self.dir.display())))
    }

    /// A model tensor whose shape must be `shape` (`None` entries match any size).
    pub fn get_shaped(&self, name: &str, shape: &[Option<usize>]) -> Result<Weight> {
        let w = self.get(name)?;
        check_shape(&w, shape)?;
        Ok(w)
    }

    /// Checks the stored shape of tensor `name` against `shape` (`None` = any size) without
    /// reading the tensor: the error [`Checkpoint::get_shaped`] gives.
    pub fn check_stored_shape(&self, name: &str, shape: &[Option<usize>]) -> Result<()> {
        let full = self.full_name(name);
        shape_matches(&full, &self.stored(&full)?.shape, shape)
    }

    /// Number of parameters (elements of every stored tensor).
    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|w| w.shape.iter().product::<usize>()).sum()
    }
}

/// Checks `w`'s shape against `shape` (`None` = any size) with a one-line error.
pub fn check_shape(w: &Weight, shape: &[Option<usize>]) -> Result<()> {
    shape_matches(&w.name, &w.shape, shape)
}

/// Tensor `name` of shape `have` against `shape` (`None` = any size), with a one-line error.
fn shape_matches(name: &str, have: &[usize], shape: &[Option<usize>]) -> Result<()> {
    let ok = have.len() == shape.len() && have.iter().zip(shape).all(|(a, b)| b.is_none_or(|b| *a == b));
    if ok {
        return Ok(());
    }
    let want: Vec<String> = shape.iter().map(|d| d.map_or("_".to_string(), |d| d.to_string())).collect();
    Err(Error::tensor(name, format!("has shape {have:?}, expected [{}]", want.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors are read when asked for: a file cut short after opening gives an error naming it
    /// and the tensor, not a panic or a short tensor; one replaced by a folder likewise.
    #[test]
    fn a_file_changed_after_opening_is_an_error() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits");
        let dir = std::env::temp_dir().join(format!("pe-ck-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let ck = Checkpoint::open(&dir).unwrap();
        let latents = ck.get("embeddings.latents").unwrap();
        assert_eq!(latents.data.len(), latents.shape.iter().product::<usize>());
        let st = dir.join("model.safetensors");
        // A NaN written over a weight after opening: refused when read back, as at opening.
        let mut bytes = std::fs::read(&st).unwrap();
        let at = ck.tensors[&ck.full_name("embeddings.latents")].offset as usize;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&st, &bytes).unwrap();
        let e = ck.get("embeddings.latents").unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("embeddings.latents") && e.contains("NaN"), "{e}");
        std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(8).unwrap();
        let e = ck.get("embeddings.latents").unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("embeddings.latents") && e.contains("changed"), "{e}");
        std::fs::remove_file(&st).unwrap();
        std::fs::create_dir(&st).unwrap();
        let e = ck.get("embeddings.latents").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Headers are checked before anything is allocated from them: a header size past the file,
    /// offsets that sum past 2^64, data shorter or longer than the header says. One-line errors
    /// naming the file.
    #[test]
    fn safetensors_headers_are_checked() {
        let dir = std::env::temp_dir().join(format!("pe-ck-headers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let file = |header: &str, data: usize| {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend(header.as_bytes());
            b.resize(b.len() + data, 0);
            b
        };
        // 15 tensors of 2^60 bytes and one of 2^60 - 4: the data would end at 2^64 - 4.
        let big: Vec<String> = (0..16u64)
            .map(|i| {
                let (s, e) = (i << 60, if i == 15 { u64::MAX - 3 } else { (i + 1) << 60 });
                format!("\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{s},{e}]}}", (e - s) / 4)
            })
            .collect();
        let big = format!("{{{}}}", big.join(","));
        let one = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut huge = file(one, 8);
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        for (bytes, want) in [
            (file(&big, 4), "more than 2^64"),
            (huge, "a header of 1099511627776 bytes"),
            (file(one, 4), "describes"),
            (file(one, 12), "describes"),
            (file("{", 0), "not a valid safetensors file"),
            (vec![1, 2, 3], "shorter than the 8-byte header size"),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let e = read_safetensors(&path, &mut HashMap::new(), None).unwrap_err().to_string();
            assert!(e.contains("model.safetensors") && e.contains(want) && !e.contains('\n'), "{want}: {e}");
        }
        std::fs::write(&path, file(one, 8)).unwrap();
        let mut out = HashMap::new();
        read_safetensors(&path, &mut out, None).unwrap();
        assert_eq!((out["a"].offset, out["a"].len, out["a"].shape.as_slice()), (8 + one.len() as u64, 8, &[2][..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
