//! Split export (`export --split`): the model cut at its latents into an encoder (inputs ->
//! latents), the weight-shared block (latents -> latents, once) when the checkpoint repeats one,
//! and decoders (latents + query-side inputs -> outputs): one for every position and, for heads
//! that decode chosen positions, one per query-count bucket. Each part is a standard ONNX graph
//! that went through the same exact rewrites as a single-graph export (the constant-query
//! rewrites land in the encoder, few-query in the decoders). The runtime side is
//! [`perceiver_edge_runtime::split`].

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::heads::{self, Head};
use crate::ir::{Graph, Val};
use crate::model::decoder::MARK_QUERIES;
use crate::model::encoder::{MARK_BLOCK, MARK_CROSS};
use crate::options::ExportOptions;
use crate::summary::Summary;
use crate::{metadata, passes, Exported};
use perceiver_edge_runtime::split::{
    DecoderPart, Manifest, PointInput, FORMAT, LATENTS, LATENTS_OUT, MANIFEST, QUERIES,
};
use std::collections::HashSet;
use std::path::Path;

/// Default query-count buckets (each smaller than the full output count is exported).
pub const DEFAULT_BUCKETS: [usize; 3] = [1, 64, 1024];

/// A split export: the parts by file name, and the manifest.
pub struct Split {
    /// `(file name, part)`, encoder first.
    pub parts: Vec<(String, Exported)>,
    /// What the folder's `manifest.json` says.
    pub manifest: Manifest,
}

/// The mark named `name` in `g`.
fn mark(g: &Graph, name: &str) -> Result<Val> {
    g.marks
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| Error::invalid(format!("internal: the graph has no mark {name}")))
}

/// The part of `g` that reads the values `from` as inputs (under the given names) instead of
/// computing them, and outputs `outputs` (`None`: the graph's own outputs) under the given names.
fn cut(g: &Graph, from: &[(Val, &str)], outputs: Option<&[(Val, &str)]>) -> Graph {
    let mut p = g.clone();
    p.marks.clear();
    if let Some(outs) = outputs {
        let old: HashSet<String> = p.outputs.iter().map(|o| o.name.clone()).collect();
        p.nodes.retain(|n| !(n.op == "Identity" && n.outputs.iter().any(|o| old.contains(&o.name))));
        p.outputs.clear();
        for (v, name) in outs {
            p.output(v, name);
        }
    }
    for (z, name) in from {
        for n in &mut p.nodes {
            for i in &mut n.inputs {
                if *i == z.name {
                    *i = name.to_string();
                }
            }
        }
        p.inputs.push(Val { name: name.to_string(), ..z.clone() });
    }
    p.prune();
    let used: HashSet<String> = p.nodes.iter().flat_map(|n| n.inputs.iter().cloned()).collect();
    p.inputs.retain(|i| used.contains(&i.name));
    let names: HashSet<String> = p.inputs.iter().map(|i| i.name.clone()).collect();
    // Keep value-range metadata only for inputs this part has.
    p.metadata.retain(|(k, _)| {
        k.strip_prefix(perceiver_edge_runtime::metadata::RANGE_PREFIX).is_none_or(|name| names.contains(name))
    });
    p
}

/// Runs the default passes on a part and wraps it with its summary and role.
fn finish(mut g: Graph, role: &str, ck: &Checkpoint, opts: &ExportOptions, template: &Summary) -> Result<Exported> {
    let dims = template.dims.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>();
    let dims: std::collections::BTreeMap<&str, usize> = dims.into_iter().collect();
    let mut summary = Summary::new(&g, &template.architecture, &dims, &ck.config, template.batch, template.parameters);
    summary.depth = template.depth;
    let decisions = passes::run_default(&mut g, &opts.perf)?;
    if let Some(e) = g.error.take() {
        return Err(Error::invalid(format!("{}: {role}: {e}", ck.dir.display())));
    }
    summary.after_passes(&g);
    summary.table_decisions = decisions;
    g.metadata.push((metadata::SUMMARY.into(), serde_json::to_string(&summary).expect("summary serialises")));
    g.metadata.push((metadata::PART.into(), role.into()));
    Ok(Exported { graph: g, summary })
}

/// The output positions a model built with `summary` can decode a chosen subset of
/// (`--decode-subset K`, split query buckets, `tune`'s query axis): `Some(O)` for optical flow,
/// masked LM and bare decoders with more than one query; `None` for heads that decode their
/// outputs at once (classification, multimodal).
pub fn choosable_positions(head: Head, summary: &Summary) -> Option<usize> {
    let o = summary.dims.get("O").copied().unwrap_or(1);
    (matches!(head, Head::MaskedLm | Head::OpticalFlow) || (head == Head::Bare && o > 1)).then_some(o)
}

/// Builds the split export of `ck`: the depth is `opts.blocks` or the trained `num_blocks`;
/// `buckets` are the query counts of the extra decoders (default [`DEFAULT_BUCKETS`]; only
/// counts below the full output count, and only for heads that decode chosen positions;
/// multimodal: below the larger of its video-point and audio-patch counts, each index input
/// `min(K, its count)` long).
pub fn build_split(ck: &Checkpoint, opts: &ExportOptions, buckets: Option<&[usize]>) -> Result<Split> {
    let head = Head::of(ck)?;
    if opts.decode_subset.is_some() || opts.image_points.is_some() || opts.audio_points.is_some() {
        return Err(Error::invalid(
            "--split exports query buckets itself (--buckets); --decode-subset/--image-points/--audio-points do not apply",
        ));
    }
    let depth = opts.blocks.unwrap_or(ck.config.num_blocks);
    let shared = depth > 1 || ck.config.num_blocks > 1;
    let one = ExportOptions { blocks: shared.then_some(1), ..opts.clone() };
    let (g, summary) = heads::build_graph(ck, &one)?;
    // The table policy's share is of the whole model's weights, as for the single graph: a part
    // alone (an encoder without its latent layers) would refuse the tables the model affords.
    let mut opts = opts.clone();
    opts.perf.table_share_of.get_or_insert(passes::tables::live_cost(&g).0);
    let opts = &opts;
    let cross = mark(&g, MARK_CROSS)?;
    let block0 = mark(&g, &format!("{MARK_BLOCK}0"))?;
    let mut template = summary.clone();
    template.depth.0 = depth;

    // Input-dependent decoder queries (optical flow) are computed once, by the encoder.
    let queries = mark(&g, MARK_QUERIES).ok();
    let carried = |z: &Val, q: Option<&Val>| -> Vec<(Val, &'static str)> {
        std::iter::once((z.clone(), LATENTS)).chain(q.map(|q| (q.clone(), QUERIES))).collect()
    };
    let mut parts = vec![];
    let enc_out = if shared { &cross } else { &block0 };
    let encoder = cut(&g, &[], Some(&carried(enc_out, queries.as_ref())));
    parts.push(("encoder.onnx".to_string(), finish(encoder, "encoder", ck, opts, &template)?));
    if shared {
        let block = cut(&g, &[(cross.clone(), LATENTS)], Some(&[(block0.clone(), LATENTS_OUT)]));
        parts.push(("block.onnx".to_string(), finish(block, "block", ck, opts, &template)?));
    }
    let decoder = cut(&g, &carried(&block0, queries.as_ref()), None);
    parts.push(("decoder.onnx".to_string(), finish(decoder, "decoder", ck, opts, &template)?));

    let num_queries = summary.dims.get("O").copied().unwrap_or(1);
    let chooses = choosable_positions(head, &summary).is_some();
    // Multimodal decodes video points and audio patches together, chosen by two index inputs.
    let point_sets = (head == Head::MultimodalAutoencoding).then(|| heads::multimodal::point_inputs(&ck.config));
    let most = point_sets.as_ref().map_or(num_queries, |p| p.iter().map(|x| x.1).max().unwrap_or(1));
    let mut decoders = vec![DecoderPart { file: "decoder.onnx".into(), queries: None }];
    let mut index_input = None;
    if chooses || point_sets.is_some() {
        let mut sizes: Vec<usize> = buckets.unwrap_or(&DEFAULT_BUCKETS).iter().copied().filter(|&k| k < most).collect();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.contains(&0) {
            return Err(Error::invalid("--buckets: sizes must be at least 1"));
        }
        for k in sizes {
            // Subset queries are rows of the full query grid: a chosen point equals the full output.
            let o = match &point_sets {
                Some([(_, images, _), (_, audio, _)]) => ExportOptions {
                    image_points: Some(k.min(*images)),
                    audio_points: Some(k.min(*audio)),
                    grid_subset: true,
                    ..one.clone()
                },
                None => ExportOptions { decode_subset: Some(k), grid_subset: true, ..one.clone() },
            };
            let (gk, _) = heads::build_graph(ck, &o)?;
            let z = mark(&gk, &format!("{MARK_BLOCK}0"))?;
            let q = mark(&gk, MARK_QUERIES).ok();
            let file = format!("decoder_q{k}.onnx");
            let decoder = cut(&gk, &carried(&z, q.as_ref()), None);
            parts.push((file.clone(), finish(decoder, "decoder", ck, opts, &template)?));
            decoders.push(DecoderPart { file, queries: Some(k) });
            if chooses {
                index_input = Some("output_indices".to_string());
            }
        }
    } else if buckets.is_some_and(|b| !b.is_empty()) {
        return Err(Error::invalid(format!(
            "--buckets does not apply to {}: it decodes {num_queries} position(s) at once",
            head.class_name()
        )));
    }
    let point_inputs = point_sets
        .iter()
        .flatten()
        .map(|&(name, positions, output)| PointInput { name: name.into(), positions, output: output.into() })
        .collect();
    let manifest = Manifest {
        format: FORMAT.into(),
        version: 1,
        architecture: head.class_name().into(),
        encoder: "encoder.onnx".into(),
        block: shared.then(|| "block.onnx".into()),
        blocks: if shared { depth } else { 0 },
        decoders,
        index_input,
        num_queries,
        point_inputs,
    };
    Ok(Split { parts, manifest })
}

impl Split {
    /// Writes the parts and `manifest.json` into folder `dir` (created if missing), all or
    /// nothing: every file is staged first, then all are renamed into place.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
        let res = (|| -> Result<()> {
            let mut staged = vec![];
            for (file, part) in &self.parts {
                let path = dir.join(file);
                let bytes = part.to_bytes();
                staged.push(
                    perceiver_edge_runtime::fsio::stage_with(&path, |w| w.write_all(&bytes))
                        .map_err(|e| Error::write(&path, e))?,
                );
            }
            let path = dir.join(MANIFEST);
            let json = serde_json::to_string_pretty(&self.manifest).expect("manifest serialises") + "\n";
            staged.push(
                perceiver_edge_runtime::fsio::stage_with(&path, |w| w.write_all(json.as_bytes()))
                    .map_err(|e| Error::write(&path, e))?,
            );
            for s in staged {
                let p = s.path().to_path_buf();
                s.commit().map_err(|e| Error::write(&p, e))?;
            }
            Ok(())
        })();
        if res.is_err() && created {
            let _ = std::fs::remove_dir_all(dir);
        }
        res
    }
}
