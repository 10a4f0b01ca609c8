//! Board profiles (`targets/*.toml`): a minimal reader of the agreed schema, used until the
//! runtime's `profile` module lands (then `Profile::load` is replaced by it).
//!
//! ```toml
//! name = "Raspberry Pi 5"
//! [cpu]
//! arch = "aarch64"
//! cores = 4
//! peak_gflops_f32 = 154.0
//! mem_bandwidth_gbs = 17.0
//! [budget]
//! memory_mb = 256
//! deadline_ms = 33.3
//! rate_hz = 30
//! threads = 4
//! precisions = ["f16", "int8", "f32"]
//! ```
//!
//! Only the subset of TOML these files use is read: `[section]` headers and `key = value` lines
//! with strings, numbers, booleans and arrays of strings; `#` comments. Unknown keys are kept
//! out of the way (other tools read them); missing required keys are errors.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What the tuner needs from a board profile.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Profile {
    /// Board name.
    pub name: String,
    /// CPU architecture (`aarch64`, `armv7`, `x86_64`).
    pub arch: String,
    /// CPU cores.
    pub cores: usize,
    /// Peak f32 GFLOP/s of the whole CPU.
    pub peak_gflops_f32: f64,
    /// Memory bandwidth, GB/s.
    pub mem_bandwidth_gbs: f64,
    /// Memory the model may use, MB (MiB).
    pub memory_mb: f64,
    /// Latency deadline, ms.
    pub deadline_ms: f64,
    /// Frame rate, Hz.
    pub rate_hz: f64,
    /// Threads the application gives the model.
    pub threads: usize,
    /// Preferred precisions, best first.
    pub precisions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Str(String),
    Num(f64),
    Bool(bool),
    List(Vec<Value>),
}

fn parse_value(s: &str) -> Option<Value> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return Some(Value::Str(inner.to_string()));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let items: Option<Vec<Value>> =
            inner.split(',').map(str::trim).filter(|t| !t.is_empty()).map(parse_value).collect();
        return items.map(Value::List);
    }
    match s {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        _ => s.replace('_', "").parse::<f64>().ok().map(Value::Num),
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

impl Profile {
    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Profile::parse(&text).with_context(|| format!("{}: invalid board profile", path.display()))
    }

    /// Parses profile text.
    pub fn parse(text: &str) -> Result<Profile> {
        let mut keys: BTreeMap<String, Value> = BTreeMap::new();
        let mut section = String::new();
        for (no, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                section = format!("{}.", name.trim());
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| anyhow!("line {}: expected `key = value`", no + 1))?;
            let value = parse_value(v).ok_or_else(|| anyhow!("line {}: cannot read value `{}`", no + 1, v.trim()))?;
            keys.insert(format!("{section}{}", k.trim()), value);
        }
        let get = |k: &str| keys.get(k).ok_or_else(|| anyhow!("missing `{k}`"));
        let num = |k: &str| -> Result<f64> {
            match get(k)? {
                Value::Num(n) if n.is_finite() && *n > 0.0 => Ok(*n),
                _ => bail!("`{k}` must be a positive number"),
            }
        };
        let int = |k: &str| -> Result<usize> {
            let n = num(k)?;
            if n.fract() != 0.0 {
                bail!("`{k}` must be a positive integer");
            }
            Ok(n as usize)
        };
        let string = |k: &str| -> Result<String> {
            match get(k)? {
                Value::Str(s) => Ok(s.clone()),
                _ => bail!("`{k}` must be a string"),
            }
        };
        let precisions = match keys.get("budget.precisions") {
            None => vec!["f32".to_string()],
            Some(Value::List(v)) => v
                .iter()
                .map(|x| match x {
                    Value::Str(s) => Ok(s.clone()),
                    _ => Err(anyhow!("`budget.precisions` must be a list of strings")),
                })
                .collect::<Result<_>>()?,
            Some(_) => bail!("`budget.precisions` must be a list of strings"),
        };
        let cores = int("cpu.cores")?;
        Ok(Profile {
            name: string("name")?,
            arch: string("cpu.arch")?,
            cores,
            peak_gflops_f32: num("cpu.peak_gflops_f32")?,
            mem_bandwidth_gbs: num("cpu.mem_bandwidth_gbs")?,
            memory_mb: num("budget.memory_mb")?,
            deadline_ms: num("budget.deadline_ms")?,
            rate_hz: num("budget.rate_hz")?,
            threads: if keys.contains_key("budget.threads") { int("budget.threads")? } else { cores },
            precisions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PI5: &str = r#"
name = "Raspberry Pi 5"   # comment
[cpu]
arch = "aarch64"
target = "aarch64-unknown-linux-gnu"
cores = 4
neon = true
peak_gflops_f32 = 154.0
mem_bandwidth_gbs = 17.0
[budget]
memory_mb = 256
deadline_ms = 33.3
rate_hz = 30
threads = 4
precisions = ["f16", "int8", "f32"]
"#;

    #[test]
    fn reads_the_agreed_schema() {
        let p = Profile::parse(PI5).unwrap();
        assert_eq!(p.name, "Raspberry Pi 5");
        assert_eq!((p.arch.as_str(), p.cores, p.threads), ("aarch64", 4, 4));
        assert_eq!((p.peak_gflops_f32, p.mem_bandwidth_gbs), (154.0, 17.0));
        assert_eq!((p.memory_mb, p.deadline_ms, p.rate_hz), (256.0, 33.3, 30.0));
        assert_eq!(p.precisions, vec!["f16", "int8", "f32"]);
    }

    #[test]
    fn malformed_profiles_get_clear_errors() {
        let err = |t: &str| format!("{:#}", Profile::parse(t).unwrap_err());
        assert!(err(&PI5.replace("cores = 4", "cores = four")).contains("cannot read value `four`"));
        assert!(err(&PI5.replace("cores = 4", "")).contains("missing `cpu.cores`"));
        assert!(err(&PI5.replace("cores = 4", "cores = 2.5")).contains("positive integer"));
        assert!(err(&PI5.replace("deadline_ms = 33.3", "deadline_ms = -1")).contains("positive number"));
        assert!(err(&PI5.replace("memory_mb = 256", "memory_mb 256")).contains("expected `key = value`"));
    }
}
