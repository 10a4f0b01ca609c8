//! Board profiles for the tuner: `targets/*.toml` read and validated by the runtime's parser
//! ([`perceiver_edge_runtime::profile`], the schema is documented there and in
//! targets/README.md), flattened to the figures the tuner and its cost model use.

use anyhow::Result;
use perceiver_edge_runtime::profile as board;
use serde::Serialize;
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
    /// Peak of f16 products over f32's, from the instruction set ([`board::Profile::peak_ratio`]).
    pub peak_ratio_f16: f64,
    /// Peak of int8 products over f32's, from the instruction set.
    pub peak_ratio_int8: f64,
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

impl From<board::Profile> for Profile {
    fn from(p: board::Profile) -> Profile {
        Profile {
            peak_ratio_f16: p.peak_ratio(board::Arithmetic::F16),
            peak_ratio_int8: p.peak_ratio(board::Arithmetic::Int8),
            name: p.name,
            arch: p.cpu.arch.as_str().to_string(),
            cores: p.cpu.cores,
            peak_gflops_f32: p.cpu.peak_gflops_f32,
            mem_bandwidth_gbs: p.cpu.mem_bandwidth_gbs,
            memory_mb: p.budget.memory_mb as f64,
            deadline_ms: p.budget.deadline_ms,
            rate_hz: p.budget.rate_hz,
            threads: p.budget.threads,
            precisions: p.budget.precisions.iter().map(|x| x.name()).collect(),
        }
    }
}

impl Profile {
    /// Reads and validates a profile file (errors name the file and the key).
    pub fn load(path: &Path) -> Result<Profile> {
        Ok(board::Profile::load(path)?.into())
    }

    /// Parses profile text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Profile> {
        Ok(board::Profile::parse(text, file)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_the_validated_profile() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let p = Profile::load(&root.join("targets/raspberry-pi-5.toml")).unwrap();
        assert_eq!(p.name, "Raspberry Pi 5");
        assert_eq!((p.arch.as_str(), p.cores, p.threads), ("aarch64", 4, 4));
        assert_eq!((p.memory_mb, p.rate_hz), (256.0, 30.0));
        assert_eq!(p.precisions, ["f16", "int8", "f32"]);
        assert_eq!((p.peak_ratio_f16, p.peak_ratio_int8), (2.0, 4.0));
        let text = std::fs::read_to_string(root.join("targets/raspberry-pi-5.toml")).unwrap();
        let err = format!("{:#}", Profile::parse(&text.replace("cores", "corez"), "bad.toml").unwrap_err());
        assert!(err.contains("bad.toml") && err.contains("corez"), "{err}");
    }
}
