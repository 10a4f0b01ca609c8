//! Sets of model inputs read from `.npy` files: for calibration (`export --calibrate`) and
//! `compare --inputs`.
//!
//! A DATA path is one of:
//! - one `.npy` file (single-input models): one input of the graph's shape, or a stack
//!   `[n * batch, ...]` of them along the first axis;
//! - a folder of `.npy` files, each one input or a stack (single-input models), or, for models
//!   with several inputs, `NAME.npy` stacks, one per graph input; files whose name contains
//!   `label` are not inputs and are skipped;
//! - a fixture folder (files named `<case>.in.<INPUT>.npy`, as in `models/reference/fixtures`):
//!   cases whose input names and shapes fit the graph are used, the others skipped (they belong
//!   to other export variants).

use crate::npy::read_npy;
use crate::{dtype_name, Error, IoSpec, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Npy { path: path.display().to_string(), msg: msg.into() }
}

/// Splits stacked data `[S, ...]` into samples shaped like graph input `shape` (`[batch, ...]`);
/// `S` must be a multiple of the batch size. A tensor shaped exactly like the input is one
/// sample. `what` names the data in the error.
pub fn split_samples(t: &Tensor, shape: &[usize], what: &str) -> Result<Vec<Tensor>> {
    let ts = t.shape();
    let bad = || err(Path::new(what), format!("shape {ts:?} does not stack samples of shape {shape:?}"));
    if ts.len() != shape.len()
        || shape.is_empty()
        || ts[1..] != shape[1..]
        || shape[0] == 0
        || !ts[0].is_multiple_of(shape[0])
        || ts[0] == 0
    {
        return Err(bad());
    }
    (0..ts[0] / shape[0]).map(|i| t.slice(0, i * shape[0], (i + 1) * shape[0]).map_err(|_| bad())).collect()
}

/// Splits `t` (read from `path`) into inputs of `spec`: `t` is one input or a stack of them
/// along axis 0.
fn split(path: &Path, t: Tensor, spec: &IoSpec) -> Result<Vec<Tensor>> {
    if t.datum_type() != spec.dtype {
        return Err(err(
            path,
            format!(
                "dtype {}, the model's input `{}` takes {}",
                dtype_name(t.datum_type()),
                spec.name,
                dtype_name(spec.dtype)
            ),
        ));
    }
    if t.shape() == spec.shape.as_slice() {
        return Ok(vec![t]);
    }
    let b = spec.shape.first().copied().unwrap_or(1).max(1);
    let stack_ok = t.rank() == spec.shape.len()
        && t.rank() > 0
        && t.shape()[1..] == spec.shape[1..]
        && t.shape()[0].is_multiple_of(b);
    if !stack_ok {
        return Err(err(
            path,
            format!(
                "shape {:?}, the model's input `{}` is {:?} (or a stack [n*{b}, {}])",
                t.shape(),
                spec.name,
                spec.shape,
                spec.shape[1..].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if t.shape()[0] == 0 {
        return Ok(vec![]); // an empty stack holds no inputs (reported by the caller)
    }
    split_samples(&t, &spec.shape, &path.display().to_string())
}

fn npy_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| err(dir, format!("cannot read folder: {e}")))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "npy"))
        .filter(|p| !p.file_stem().is_some_and(|s| s.to_string_lossy().contains("label")))
        .collect();
    files.sort();
    Ok(files)
}

/// Input sets of one fixture case (`<input name> -> file`).
fn fixture_case(files: &BTreeMap<String, PathBuf>, specs: &[IoSpec]) -> Result<Vec<Vec<Tensor>>> {
    if specs.len() == 1 {
        let f = &files[&specs[0].name];
        return Ok(split(f, read_npy(f)?, &specs[0])?.into_iter().map(|t| vec![t]).collect());
    }
    let mut set = vec![];
    for s in specs {
        let f = &files[&s.name];
        let t = read_npy(f)?;
        if t.shape() != s.shape.as_slice() || t.datum_type() != s.dtype {
            return Err(err(
                f,
                format!(
                    "{} {:?}, the model's input `{}` is {} {:?}",
                    dtype_name(t.datum_type()),
                    t.shape(),
                    s.name,
                    dtype_name(s.dtype),
                    s.shape
                ),
            ));
        }
        set.push(t);
    }
    Ok(vec![set])
}

/// Reads input sets for a model with inputs `specs` from `path` (see the module docs). Every
/// returned set is in graph-input order and matches the specs' dtypes and shapes.
pub fn load_inputs(path: &Path, specs: &[IoSpec]) -> Result<Vec<Vec<Tensor>>> {
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let sets = if path.is_dir() {
        let files = npy_files(path)?;
        let fixture: Vec<&PathBuf> = files
            .iter()
            .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".in.")))
            .collect();
        if !fixture.is_empty() {
            // <case>.in.<name>.npy, grouped by case.
            let mut cases: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
            for f in fixture {
                let n = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let (case, rest) = n.split_once(".in.").unwrap_or_default();
                let input = rest.strip_suffix(".npy").unwrap_or(rest);
                cases.entry(case.to_string()).or_default().insert(input.to_string(), f.clone());
            }
            // A case whose files do not fit is another export variant's (batch, size): skipped,
            // but its error is reported if no case fits.
            let mut sets = vec![];
            let mut first_err = None;
            for files in cases.values() {
                let mut have: Vec<&str> = files.keys().map(|s| s.as_str()).collect();
                let mut want = names.clone();
                have.sort();
                want.sort();
                if have != want {
                    continue;
                }
                match fixture_case(files, specs) {
                    Ok(mut v) => sets.append(&mut v),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let (true, Some(e)) = (sets.is_empty(), first_err) {
                return Err(e);
            }
            sets
        } else if specs.len() == 1 {
            let mut sets = vec![];
            for f in &files {
                sets.extend(split(f, read_npy(f)?, &specs[0])?.into_iter().map(|t| vec![t]));
            }
            sets
        } else {
            // NAME.npy stacks, one per input, with the same number of inputs each.
            let mut per_input = vec![];
            for s in specs {
                let f = path.join(format!("{}.npy", s.name));
                if !f.is_file() {
                    return Err(err(
                        path,
                        format!(
                            "the model takes {} inputs ({}): expected {}.npy here",
                            specs.len(),
                            names.join(", "),
                            s.name
                        ),
                    ));
                }
                per_input.push((f.clone(), split(&f, read_npy(&f)?, s)?));
            }
            let n = per_input[0].1.len();
            if let Some((f, v)) = per_input.iter().find(|(_, v)| v.len() != n) {
                return Err(err(f, format!("holds {} inputs, {} holds {n}", v.len(), per_input[0].0.display())));
            }
            (0..n).map(|i| per_input.iter().map(|(_, v)| v[i].clone()).collect()).collect()
        }
    } else {
        if specs.len() != 1 {
            return Err(err(
                path,
                format!(
                    "the model takes {} inputs ({}): give a folder with one NAME.npy per input",
                    specs.len(),
                    names.join(", ")
                ),
            ));
        }
        split(path, read_npy(path)?, &specs[0])?.into_iter().map(|t| vec![t]).collect()
    };
    if sets.is_empty() {
        return Err(err(path, format!("no inputs found for the model's input(s) {}", names.join(", "))));
    }
    Ok(sets)
}
