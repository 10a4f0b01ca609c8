//! Encode once, query many: a split model folder (`export --split`) holds the encoder
//! (inputs -> latents `[B, N, D]`), the weight-shared latent block (latents -> latents, when the
//! checkpoint has one) and decoders (latents + query-side inputs -> outputs), one per query-count
//! bucket, plus `manifest.json` naming them. [`Model`] runs them: encode once, apply the block as
//! many times as wanted or as a deadline allows, decode any set of output positions.

use crate::{dtype_name, Error, IoSpec, Result, Session};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

/// File name of the manifest inside a split model folder.
pub const MANIFEST: &str = "manifest.json";
/// The `format` value of a manifest.
pub const FORMAT: &str = "perceiver-edge-split";
/// Name of the latents input / output of every part.
pub const LATENTS: &str = "latents";
/// Name of input-dependent decoder queries the encoder computes once and the decoders read
/// (optical flow's preprocessed inputs).
pub const QUERIES: &str = "queries";
/// Name of the block part's output.
pub const LATENTS_OUT: &str = "latents_out";

/// One decoder part: the file and the number of query positions it decodes (`None`: all, in the
/// single-graph output layout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecoderPart {
    /// File name inside the folder.
    pub file: String,
    /// Query positions decoded (the `index_input` length), or `None` for every position.
    pub queries: Option<usize>,
}

/// `manifest.json` of a split model folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Manifest version (1).
    pub version: u32,
    /// transformers head class.
    pub architecture: String,
    /// Encoder file: the model's inputs -> [`LATENTS`].
    pub encoder: String,
    /// Block file: [`LATENTS`] -> [`LATENTS_OUT`], one application of the weight-shared block.
    pub block: Option<String>,
    /// Block applications of the trained (or exported) depth; 0 without a block part.
    pub blocks: usize,
    /// Decoders, the full one first, then the query buckets by size.
    pub decoders: Vec<DecoderPart>,
    /// Name of the decoders' query index input (int64 `[K]`), when they take one.
    pub index_input: Option<String>,
    /// Output positions of a full decode.
    pub num_queries: usize,
    /// Named index inputs decoded together (multimodal: `image_points`, `audio_points`),
    /// instead of one `index_input`; absent (empty) otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub point_inputs: Vec<PointInput>,
}

/// One of several named index inputs of the query buckets ([`Manifest::point_inputs`]). The
/// bucket of K queries takes `min(K, positions)` int64 indices in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointInput {
    /// Input name.
    pub name: String,
    /// Positions of a full decode it chooses from (flat indices `0..positions`).
    pub positions: usize,
    /// The output whose positions it chooses (axis 1 holds them, in equal blocks); the
    /// outputs no index input names are decoded whole.
    pub output: String,
}

fn bad(dir: &Path, msg: impl Into<String>) -> Error {
    Error::Load { path: dir.join(MANIFEST).display().to_string(), msg: msg.into() }
}

/// A confined part file name: a plain name inside the folder.
fn part_path(dir: &Path, file: &str) -> Result<PathBuf> {
    if !crate::fsio::is_plain_file_name(file) {
        return Err(bad(dir, format!("part \"{file}\" is not a file name inside the folder")));
    }
    let p = dir.join(file);
    if !p.is_file() {
        return Err(bad(dir, format!("names the part {file}, which is missing")));
    }
    Ok(p)
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = crate::fsio::read_text(&path, crate::fsio::MAX_TEXT_BYTES)
            .map_err(|e| bad(dir, format!("cannot read: {e}")))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(dir, format!("not a split manifest: {e}")))?;
        if m.format != FORMAT || m.version != 1 {
            return Err(bad(dir, format!("format {} version {}, expected {FORMAT} version 1", m.format, m.version)));
        }
        if m.decoders.is_empty() || m.decoders[0].queries.is_some() {
            return Err(bad(dir, "the first decoder must decode every position (\"queries\": null)"));
        }
        if m.block.is_none() != (m.blocks == 0) {
            return Err(bad(dir, "\"blocks\" must be 0 exactly when there is no block part"));
        }
        if m.blocks > crate::limits::MAX_LATENT_LAYERS {
            return Err(bad(dir, format!("\"blocks\" {} is more than {}", m.blocks, crate::limits::MAX_LATENT_LAYERS)));
        }
        if m.decoders.iter().skip(1).any(|d| d.queries.is_none_or(|k| k == 0 || k > m.num_queries)) {
            return Err(bad(dir, format!("bucket sizes must be in 1..={}", m.num_queries)));
        }
        if m.index_input.is_some() && !m.point_inputs.is_empty() {
            return Err(bad(dir, "give \"index_input\" or \"point_inputs\", not both"));
        }
        if m.decoders.len() > 1 && m.index_input.is_none() && m.point_inputs.is_empty() {
            return Err(bad(dir, "query buckets need an \"index_input\" or \"point_inputs\""));
        }
        for (i, p) in m.point_inputs.iter().enumerate() {
            if p.positions == 0 || p.name == LATENTS {
                return Err(bad(
                    dir,
                    format!("point input `{}`: expected a name other than `{LATENTS}` and positions >= 1", p.name),
                ));
            }
            if m.point_inputs[..i].iter().any(|q| q.name == p.name || q.output == p.output) {
                return Err(bad(
                    dir,
                    format!("point input `{}`: its name or output `{}` is given twice", p.name, p.output),
                ));
            }
        }
        Ok(m)
    }
}

/// True when `path` is a split model folder (it holds a manifest).
pub fn is_split(path: &Path) -> bool {
    path.is_dir() && path.join(MANIFEST).is_file()
}

/// Latents of one encoding, reusable across decode calls.
#[derive(Clone, Debug)]
pub struct Latents {
    /// The latent array `[B, N, D]`.
    pub value: Tensor,
    /// Block applications it has had.
    pub blocks: usize,
    /// The model inputs and encoder outputs the decoders also read (query-side values), by name.
    side: Vec<(String, Tensor)>,
}

/// An index input of the query buckets, normalised: the one `index_input` of a single-index
/// head chooses positions of every output (`output` `None`).
#[derive(Clone, Debug)]
struct IndexSet {
    name: String,
    positions: usize,
    output: Option<String>,
}

impl IndexSet {
    /// Whether this set chooses the positions of output `name`.
    fn indexes(&self, name: &str) -> bool {
        self.output.as_deref().is_none_or(|o| o == name)
    }
}

/// A loaded split model.
pub struct Model {
    dir: PathBuf,
    manifest: Manifest,
    encoder: Session,
    block: Option<Session>,
    decoders: Vec<(Option<usize>, Session)>,
    inputs: Vec<IoSpec>,
    sets: Vec<IndexSet>,
    /// Measured seconds per block application and per full decode (running means), for
    /// deadline mode.
    block_s: Option<f64>,
    decode_s: Option<f64>,
}

fn check_part(dir: &Path, file: &str, s: &Session, needs_latents: bool, gives: &str) -> Result<()> {
    let has_in = s.inputs().iter().any(|i| i.name == LATENTS);
    let has_out = s.outputs().iter().any(|o| o.name == gives);
    if has_in != needs_latents || !has_out {
        return Err(bad(
            dir,
            format!(
                "part {file} does not fit its role ({} `{LATENTS}` input, `{gives}` output expected)",
                if needs_latents { "a" } else { "no" }
            ),
        ));
    }
    Ok(())
}

/// Load-time check of a decoder of an indexed folder: a bucket decoder takes every index input;
/// each output an index input chooses positions of is there and holds them on axis 1 in equal
/// blocks (`queries` of them in a bucket, every position in the full decoder).
fn check_indexed_outputs(dir: &Path, file: &str, queries: Option<usize>, s: &Session, sets: &[IndexSet]) -> Result<()> {
    for x in sets {
        if queries.is_some() && !s.inputs().iter().any(|i| i.name == x.name) {
            return Err(bad(dir, format!("decoder {file} has no index input `{}`", x.name)));
        }
        if let Some(o) = &x.output {
            if !s.outputs().iter().any(|spec| spec.name == *o) {
                return Err(bad(dir, format!("decoder {file} has no output `{o}` (chosen by `{}`)", x.name)));
            }
        }
        let n = queries.map_or(x.positions, |q| q.min(x.positions));
        for spec in s.outputs().iter().filter(|spec| x.indexes(&spec.name)) {
            let fits = match queries {
                Some(_) => spec.shape.len() >= 2 && spec.shape[1].is_multiple_of(n),
                None => spec.shape.len() >= 2 && spec.shape[1..].iter().product::<usize>().is_multiple_of(n),
            };
            if !fits {
                return Err(bad(
                    dir,
                    format!(
                        "decoder {file} output `{}` {:?} does not hold {n} positions of `{}`",
                        spec.name, spec.shape, x.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Model {
    /// Loads a split model folder (checks the manifest against the parts' inputs and outputs).
    pub fn load(dir: &Path) -> Result<Model> {
        let m = Manifest::load(dir)?;
        let load = |file: &str| -> Result<Session> { Session::load(&part_path(dir, file)?) };
        let encoder = load(&m.encoder)?;
        check_part(dir, &m.encoder, &encoder, false, LATENTS)?;
        let block = match &m.block {
            Some(f) => {
                let s = load(f)?;
                check_part(dir, f, &s, true, LATENTS_OUT)?;
                Some(s)
            }
            None => None,
        };
        let z = encoder.outputs().iter().find(|o| o.name == LATENTS).expect("checked").clone();
        if let Some(b) = &block {
            let (i, o) = (&b.inputs()[0], &b.outputs()[0]);
            if b.inputs().len() != 1 || i.shape != z.shape || o.shape != z.shape {
                return Err(bad(dir, format!("block part shapes disagree with the encoder's latents {:?}", z.shape)));
            }
        }
        let mut decoders = vec![];
        let mut inputs: Vec<IoSpec> = encoder.inputs().to_vec();
        // Encoder outputs besides the latents are handed to the decoders (not model inputs).
        let carried: Vec<IoSpec> = encoder.outputs().iter().filter(|o| o.name != LATENTS).cloned().collect();
        let indexed = m.index_input.is_some() || !m.point_inputs.is_empty();
        let sets: Vec<IndexSet> = if m.point_inputs.is_empty() {
            let name = m.index_input.clone().unwrap_or_else(|| "points".into());
            vec![IndexSet { name, positions: m.num_queries, output: None }]
        } else {
            m.point_inputs
                .iter()
                .map(|p| IndexSet { name: p.name.clone(), positions: p.positions, output: Some(p.output.clone()) })
                .collect()
        };
        for d in &m.decoders {
            let s = load(&d.file)?;
            for spec in s.inputs() {
                let set = sets.iter().find(|x| indexed && x.name == spec.name);
                if spec.name == LATENTS {
                    if spec.shape != z.shape {
                        return Err(bad(
                            dir,
                            format!(
                                "decoder {} takes latents {:?}, the encoder gives {:?}",
                                d.file, spec.shape, z.shape
                            ),
                        ));
                    }
                } else if let Some(x) = set {
                    let want = d.queries.map(|q| q.min(x.positions));
                    if want.is_none_or(|k| spec.shape != [k] || spec.dtype != i64::datum_type()) {
                        let want = want.map_or("none (it decodes every position)".into(), |k| format!("int64 [{k}]"));
                        return Err(bad(
                            dir,
                            format!(
                                "decoder {} index input is {:?} (`{}`, {}), the manifest says {want}",
                                d.file,
                                spec.shape,
                                x.name,
                                dtype_name(spec.dtype)
                            ),
                        ));
                    }
                } else if let Some(c) = carried.iter().find(|c| c.name == spec.name) {
                    if c.shape != spec.shape {
                        return Err(bad(
                            dir,
                            format!(
                                "decoder {} takes `{}` {:?}, the encoder gives {:?}",
                                d.file, spec.name, spec.shape, c.shape
                            ),
                        ));
                    }
                } else if !inputs.iter().any(|i| i.name == spec.name) {
                    inputs.push(spec.clone());
                }
            }
            if !s.inputs().iter().any(|i| i.name == LATENTS) {
                return Err(bad(dir, format!("decoder {} has no `{LATENTS}` input", d.file)));
            }
            if indexed {
                check_indexed_outputs(dir, &d.file, d.queries, &s, &sets)?;
            }
            decoders.push((d.queries, s));
        }
        Ok(Model {
            dir: dir.to_path_buf(),
            manifest: m,
            encoder,
            block,
            decoders,
            inputs,
            sets,
            block_s: None,
            decode_s: None,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The model's inputs (what [`Model::encode`] takes, in this order).
    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    /// Declared value range of model input `i` (token ids), from the part that takes it.
    pub fn input_range(&self, i: usize) -> Option<(i64, i64)> {
        let name = &self.inputs.get(i)?.name;
        std::iter::once(&self.encoder).chain(self.decoders.iter().map(|(_, s)| s)).find_map(|s| {
            let at = s.inputs().iter().position(|x| x.name == *name)?;
            s.input_range(at)
        })
    }

    /// One more application of the block to a copy of `z` (for benchmarks).
    pub fn apply_block_once(&mut self, z: &Latents) -> Result<Latents> {
        let mut z = z.clone();
        if self.block.is_none() {
            return Err(Error::Run(format!("{} has no weight-shared block", self.dir.display())));
        }
        self.apply_block(&mut z)?;
        Ok(z)
    }

    /// The outputs of a full decode.
    pub fn outputs(&self) -> &[IoSpec] {
        self.decoders[0].1.outputs()
    }

    /// Encodes `inputs` with the trained (exported) number of block applications.
    pub fn encode(&mut self, inputs: Vec<Tensor>) -> Result<Latents> {
        self.encode_with_blocks(inputs, self.manifest.blocks)
    }

    /// Encodes `inputs` applying the shared block `blocks` times (0: the cross-attention only).
    /// A model without a block part has a fixed depth and takes only `blocks` = 0.
    pub fn encode_with_blocks(&mut self, inputs: Vec<Tensor>, blocks: usize) -> Result<Latents> {
        let mut z = self.encode_cross(inputs)?;
        self.check_blocks(blocks)?;
        while z.blocks < blocks {
            self.apply_block(&mut z)?;
        }
        Ok(z)
    }

    /// Encodes `inputs` and applies blocks while the measured time per block (and the decode
    /// that follows) fits in `deadline` from now; at least one block. [`Latents::blocks`] says
    /// how many ran.
    pub fn encode_within(&mut self, inputs: Vec<Tensor>, deadline: Duration) -> Result<Latents> {
        let start = Instant::now();
        let mut z = self.encode_cross(inputs)?;
        if self.block.is_none() {
            return Ok(z);
        }
        self.apply_block(&mut z)?;
        while z.blocks < self.manifest.blocks {
            let need = self.block_s.unwrap_or(0.0) + self.decode_s.unwrap_or(0.0);
            if start.elapsed().as_secs_f64() + need > deadline.as_secs_f64() {
                break;
            }
            self.apply_block(&mut z)?;
        }
        Ok(z)
    }

    fn check_blocks(&self, blocks: usize) -> Result<()> {
        let ok = match self.block {
            Some(_) => blocks <= crate::limits::MAX_LATENT_LAYERS,
            None => blocks == 0,
        };
        if !ok {
            let msg = match self.block {
                Some(_) => format!("--blocks {blocks}: expected at most {}", crate::limits::MAX_LATENT_LAYERS),
                None => format!("--blocks {blocks}: {} has no weight-shared block to repeat", self.dir.display()),
            };
            return Err(Error::Run(msg));
        }
        Ok(())
    }

    fn encode_cross(&mut self, inputs: Vec<Tensor>) -> Result<Latents> {
        if inputs.len() != self.inputs.len() {
            let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::Input {
                name: names.join(", "),
                msg: format!("got {} input(s), the model takes {}", inputs.len(), names.len()),
            });
        }
        let side: Vec<(String, Tensor)> = self.inputs.iter().map(|i| i.name.clone()).zip(inputs).collect();
        let enc: Vec<Tensor> = self
            .encoder
            .inputs()
            .iter()
            .map(|spec| side.iter().find(|(n, _)| *n == spec.name).map(|(_, t)| t.clone()).expect("encoder input"))
            .collect();
        let out = self.encoder.run(enc)?;
        let mut side = side;
        let mut value = None;
        for (spec, t) in self.encoder.outputs().iter().zip(out) {
            if spec.name == LATENTS {
                value = Some(t);
            } else {
                side.push((spec.name.clone(), t));
            }
        }
        let value = value.expect("checked at load");
        let blocks = if self.block.is_some() { 0 } else { self.manifest.blocks };
        Ok(Latents { value, blocks, side })
    }

    fn apply_block(&mut self, z: &mut Latents) -> Result<()> {
        let block = self.block.as_mut().expect("checked");
        let t = Instant::now();
        let out = block.run(vec![z.value.clone()])?;
        let s = t.elapsed().as_secs_f64();
        self.block_s = Some(self.block_s.map_or(s, |m| 0.8 * m + 0.2 * s));
        z.value = out.into_iter().next().expect("one output");
        z.blocks += 1;
        Ok(())
    }

    /// Decodes every output position of `z` (the single-graph outputs).
    pub fn decode_all(&mut self, z: &Latents) -> Result<Vec<Tensor>> {
        let t = Instant::now();
        let out = self.run_decoder(0, z, &[])?;
        let s = t.elapsed().as_secs_f64();
        self.decode_s = Some(self.decode_s.map_or(s, |m| 0.8 * m + 0.2 * s));
        Ok(out)
    }

    /// Decodes the output positions `indices` (flat positions in `0..num_queries`) of `z`:
    /// outputs `[B, K, ...]` in the order given. Uses the smallest bucket that holds them
    /// (padding the rest), or the full decode and a selection. Heads with several index inputs
    /// (multimodal) take [`Model::decode_points`].
    pub fn decode(&mut self, z: &Latents, indices: &[i64]) -> Result<Vec<Tensor>> {
        if self.sets.len() > 1 {
            return Err(Error::Input {
                name: self.set_names(),
                msg: "this model decodes several point sets together: give each by name (decode_points, run --points NAME=FILE)".into(),
            });
        }
        let name = self.sets[0].name.clone();
        self.decode_points(z, &[(&name, indices)])
    }

    /// The index inputs [`Model::decode_points`] takes: name and the positions of a full decode
    /// (indices `0..positions`). Single-index heads have one (the manifest's `index_input`).
    pub fn index_inputs(&self) -> Vec<(String, usize)> {
        self.sets.iter().map(|x| (x.name.clone(), x.positions)).collect()
    }

    fn set_names(&self) -> String {
        self.sets.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Checks chosen points for [`Model::decode_points`]: every index input named once, no
    /// other name, each set non-empty and in range.
    pub fn check_points(&self, points: &[(&str, &[i64])]) -> Result<()> {
        for (i, (name, idx)) in points.iter().enumerate() {
            let Some(x) = self.sets.iter().find(|x| x.name == *name) else {
                return Err(Error::Input {
                    name: name.to_string(),
                    msg: format!("not an index input of this model (it takes {})", self.set_names()),
                });
            };
            if points[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Input { name: name.to_string(), msg: "given twice".into() });
            }
            if idx.is_empty() {
                return Err(Error::Input {
                    name: name.to_string(),
                    msg: "no query positions given (an empty set)".into(),
                });
            }
            let n = x.positions as i64;
            if let Some((at, v)) = idx.iter().enumerate().find(|(_, v)| !(0..n).contains(v)) {
                return Err(Error::Input {
                    name: name.to_string(),
                    msg: format!("position {v} at index {at} is out of range 0..={}", n - 1),
                });
            }
        }
        if let Some(x) = self.sets.iter().find(|x| !points.iter().any(|(n, _)| *n == x.name)) {
            return Err(Error::Input {
                name: x.name.clone(),
                msg: format!("no points given; this model decodes {} together", self.set_names()),
            });
        }
        Ok(())
    }

    /// Decodes chosen positions of `z` for every index input at once (multimodal:
    /// `[("image_points", &[..]), ("audio_points", &[..])]`): each output an index input chooses
    /// holds its positions in the order given (`image_logits` `[B, Ki, 3]`, `audio_logits`
    /// `[B, Ka * samples_per_patch]`), the others are whole (`label_logits`). Uses the smallest
    /// bucket that holds every set (each padded with its last index), or the full decode and a
    /// selection; equals the full output at those positions.
    pub fn decode_points(&mut self, z: &Latents, points: &[(&str, &[i64])]) -> Result<Vec<Tensor>> {
        self.check_points(points)?;
        let sets = self.sets.clone();
        let chosen: Vec<&[i64]> =
            sets.iter().map(|x| points.iter().find(|(n, _)| *n == x.name).expect("checked").1).collect();
        let fits = |q: usize| sets.iter().zip(&chosen).all(|(x, c)| c.len() <= q.min(x.positions));
        let bucket = (1..self.decoders.len())
            .filter(|&i| self.decoders[i].0.is_some_and(fits))
            .min_by_key(|&i| self.decoders[i].0);
        let names: Vec<String> = self.outputs().iter().map(|o| o.name.clone()).collect();
        let which = |name: &str| sets.iter().zip(&chosen).find(|(x, _)| x.indexes(name));
        match bucket {
            Some(i) => {
                let q = self.decoders[i].0.expect("bucket");
                let padded: Vec<(String, Vec<i64>)> = sets
                    .iter()
                    .zip(&chosen)
                    .map(|(x, c)| {
                        let mut v = c.to_vec();
                        v.resize(q.min(x.positions), *c.last().expect("non-empty"));
                        (x.name.clone(), v)
                    })
                    .collect();
                let out = self.run_decoder(i, z, &padded)?;
                let out_names: Vec<String> = self.decoders[i].1.outputs().iter().map(|o| o.name.clone()).collect();
                out.into_iter()
                    .zip(&out_names)
                    .map(|(t, name)| match which(name) {
                        Some((x, c)) => {
                            let per = t.shape()[1] / q.min(x.positions);
                            t.slice(1, 0, c.len() * per).map_err(|e| Error::Run(e.to_string()))
                        }
                        None => Ok(t),
                    })
                    .collect()
            }
            None => {
                let all = self.decode_all(z)?;
                all.into_iter()
                    .zip(&names)
                    .map(|(t, name)| match which(name) {
                        Some((x, c)) => select_positions(&t, x.positions, c),
                        None => Ok(t),
                    })
                    .collect()
            }
        }
    }

    /// Runs decoder `i` on `z`, its index inputs from `indices` (by name).
    fn run_decoder(&mut self, i: usize, z: &Latents, indices: &[(String, Vec<i64>)]) -> Result<Vec<Tensor>> {
        let dec = &mut self.decoders[i].1;
        let args: Vec<Tensor> = dec
            .inputs()
            .iter()
            .map(|spec| {
                if spec.name == LATENTS {
                    Ok(z.value.clone())
                } else if let Some((_, idx)) = indices.iter().find(|(n, _)| *n == spec.name) {
                    Tensor::from_shape(&[idx.len()], idx).map_err(|e| Error::Run(e.to_string()))
                } else {
                    z.side.iter().find(|(n, _)| *n == spec.name).map(|(_, t)| t.clone()).ok_or_else(|| Error::Input {
                        name: spec.name.clone(),
                        msg: format!("the decoder reads it but it is not a model input ({})", dtype_name(spec.dtype)),
                    })
                }
            })
            .collect::<Result<_>>()?;
        dec.run(args)
    }

    /// Encodes with `blocks` block applications and decodes every position (the single graph
    /// exported with `--blocks blocks`).
    pub fn run_with_blocks(&mut self, inputs: Vec<Tensor>, blocks: usize) -> Result<Vec<Tensor>> {
        let z = self.encode_with_blocks(inputs, blocks)?;
        self.decode_all(&z)
    }
}

/// Positions `indices` of a full output `t` holding `n` positions after the batch axis: either
/// whole axes (`[B, H, W, F]` with `H * W = n`, or `[B, n, F]`; gives `[B, K, F]`), or equal
/// blocks of axis 1 of a `[B, n * r]` output (multimodal audio; gives `[B, K * r]`).
fn select_positions(t: &Tensor, n: usize, indices: &[i64]) -> Result<Tensor> {
    let shape = t.shape();
    let mut prod = 1;
    let mut end = 1;
    while end < shape.len() && prod < n {
        prod *= shape[end];
        end += 1;
    }
    let k = indices.len();
    let out_shape: Vec<usize> = if prod == n {
        [&[shape[0], k][..], &shape[end..]].concat()
    } else if shape.len() == 2 && shape[1].is_multiple_of(n) {
        vec![shape[0], k * (shape[1] / n)]
    } else {
        return Err(Error::Run(format!("output shape {shape:?} does not hold {n} positions after the batch axis")));
    };
    let per = shape[1..].iter().product::<usize>() / n;
    let t = t.clone().into_shape(&[shape[0], n, per]).map_err(|e| Error::Run(e.to_string()))?;
    let parts: Vec<Tensor> = indices
        .iter()
        .map(|&i| t.slice(1, i as usize, i as usize + 1))
        .collect::<TractResult<_>>()
        .map_err(|e| Error::Run(e.to_string()))?;
    let picked = Tensor::stack_tensors(1, &parts).map_err(|e| Error::Run(e.to_string()))?;
    picked.into_shape(&out_shape).map_err(|e| Error::Run(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_positions_takes_whole_axes_or_blocks_of_axis_1() {
        // [1, 2, 3, 2]: 6 positions of 2 values.
        let t = Tensor::from_shape(&[1, 2, 3, 2], &(0..12).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let s = select_positions(&t, 6, &[5, 0]).unwrap();
        assert_eq!(s.shape(), &[1, 2, 2]);
        assert_eq!(crate::to_vec::<f32>(&s).unwrap(), &[10.0, 11.0, 0.0, 1.0]);
        // [1, 8]: 2 positions (audio patches) of 4 samples each.
        let t = Tensor::from_shape(&[1, 8], &(0..8).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let s = select_positions(&t, 2, &[1, 1, 0]).unwrap();
        assert_eq!(s.shape(), &[1, 12]);
        assert_eq!(crate::to_vec::<f32>(&s).unwrap(), &[4.0, 5.0, 6.0, 7.0, 4.0, 5.0, 6.0, 7.0, 0.0, 1.0, 2.0, 3.0]);
        assert!(select_positions(&t, 3, &[0]).is_err());
    }
}
