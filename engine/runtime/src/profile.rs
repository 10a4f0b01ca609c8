//! Board profiles (`targets/*.toml`): what a board's CPU can do and the budget a model must fit.
//!
//! ```toml
//! name = "Raspberry Pi 5"
//! [cpu]
//! arch = "aarch64"          # aarch64 | armv7 | x86_64
//! target = "aarch64-unknown-linux-gnu"
//! cores = 4
//! neon = true
//! fp16 = true               # fp16 arithmetic (asimdhp)
//! dotprod = true            # SDOT/UDOT
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
//! Every key is required and no other key is allowed, so a typo is an error rather than a
//! silently ignored setting. Errors are one line: `FILE: KEY: what is wrong`.

use serde::Serialize;
use std::fmt;
use std::path::Path;

/// A board profile, validated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// Human name of the board.
    pub name: String,
    /// The board's CPU.
    pub cpu: Cpu,
    /// What a model may use on it.
    pub budget: Budget,
}

/// CPU capabilities (vendor figures; measure before relying on them).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cpu {
    /// Instruction set.
    pub arch: Arch,
    /// Rust target triple of a build for this board.
    pub target: String,
    /// CPU cores.
    pub cores: usize,
    /// Advanced SIMD (NEON).
    pub neon: bool,
    /// Native fp16 arithmetic (aarch64 `asimdhp`: Cortex-A76/A78 yes, Cortex-A72 no).
    pub fp16: bool,
    /// int8 dot-product instructions (aarch64 SDOT/UDOT).
    pub dotprod: bool,
    /// Peak f32 throughput of all cores, GFLOP/s.
    pub peak_gflops_f32: f64,
    /// Memory bandwidth, GB/s.
    pub mem_bandwidth_gbs: f64,
}

/// The budget a model must fit on the board.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Budget {
    /// Memory the model may use, MiB.
    pub memory_mb: u64,
    /// Per-frame latency limit, ms.
    pub deadline_ms: f64,
    /// Frame rate the model runs at, Hz.
    pub rate_hz: f64,
    /// Threads the model may use.
    pub threads: usize,
    /// Precisions to try, preferred first (`int8-7bit`: int8 with 7-bit weights).
    pub precisions: Vec<PrecisionChoice>,
}

/// CPU instruction set of a board.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 64-bit ARM (Cortex-A53/A72/A76/A78...).
    Aarch64,
    /// 32-bit ARM with NEON (armhf).
    Armv7,
    /// x86-64.
    X86_64,
}

impl Arch {
    /// The name used in profiles and target triples.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
            Arch::X86_64 => "x86_64",
        }
    }
}

pub use crate::precision::{Precision, PrecisionChoice};

/// A profile that could not be read or is invalid: `FILE: KEY: message` on one line.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileError {
    /// The profile file (or `<memory>`).
    pub file: String,
    /// The key at fault (`cpu.cores`), if one.
    pub key: Option<String>,
    /// What is wrong.
    pub msg: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}: {k}: {}", self.file, self.msg),
            None => write!(f, "{}: {}", self.file, self.msg),
        }
    }
}

impl std::error::Error for ProfileError {}

const TOP_KEYS: &[&str] = &["name", "cpu", "budget"];
const CPU_KEYS: &[&str] =
    &["arch", "target", "cores", "neon", "fp16", "dotprod", "peak_gflops_f32", "mem_bandwidth_gbs"];
const BUDGET_KEYS: &[&str] = &["memory_mb", "deadline_ms", "rate_hz", "threads", "precisions"];

/// Reads keys of one table, remembering the file and table for error messages.
struct Reader<'a> {
    file: &'a str,
    table: &'a toml::Table,
    prefix: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, msg: impl Into<String>) -> ProfileError {
        let key = if self.prefix.is_empty() { key.to_string() } else { format!("{}.{key}", self.prefix) };
        ProfileError { file: self.file.to_string(), key: Some(key), msg: msg.into() }
    }

    fn check_keys(&self, allowed: &[&str]) -> Result<(), ProfileError> {
        // Unknown keys first (a typo explains a "missing" key), in file order.
        if let Some(k) = self.table.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(self.err(k, format!("unknown key (allowed: {})", allowed.join(", "))));
        }
        if let Some(k) = allowed.iter().find(|k| !self.table.contains_key(**k)) {
            return Err(self.err(k, "missing"));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> &'a toml::Value {
        &self.table[key]
    }

    fn string(&self, key: &str) -> Result<String, ProfileError> {
        match self.get(key) {
            toml::Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            toml::Value::String(_) => Err(self.err(key, "must not be empty")),
            v => Err(self.err(key, format!("expected a string, got {}", show(v)))),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, ProfileError> {
        self.get(key)
            .as_bool()
            .ok_or_else(|| self.err(key, format!("expected true or false, got {}", show(self.get(key)))))
    }

    fn int(&self, key: &str, lo: i64, hi: i64) -> Result<i64, ProfileError> {
        match self.get(key) {
            toml::Value::Integer(i) if (lo..=hi).contains(i) => Ok(*i),
            toml::Value::Integer(i) => Err(self.err(key, format!("{i} is out of range {lo}..={hi}"))),
            v => Err(self.err(key, format!("expected an integer, got {}", show(v)))),
        }
    }

    /// A positive, finite number (integers accepted).
    fn positive(&self, key: &str) -> Result<f64, ProfileError> {
        let v = match self.get(key) {
            toml::Value::Float(f) => *f,
            toml::Value::Integer(i) => *i as f64,
            v => return Err(self.err(key, format!("expected a number, got {}", show(v)))),
        };
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(self.err(key, format!("must be a positive number, got {v}")))
        }
    }

    fn table(&self, key: &str) -> Result<&'a toml::Table, ProfileError> {
        self.get(key)
            .as_table()
            .ok_or_else(|| self.err(key, format!("expected a table [{key}], got {}", show(self.get(key)))))
    }
}

/// A short description of a TOML value for error messages.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("string \"{s}\""),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(f) => format!("number {f}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("date {d}"),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Profile {
    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let file = path.display().to_string();
        let text = crate::fsio::read_text(path, crate::fsio::MAX_TEXT_BYTES).map_err(|e| ProfileError {
            file: file.clone(),
            key: None,
            msg: format!("cannot read: {e}"),
        })?;
        Profile::parse(&text, &file)
    }

    /// Parses and validates profile text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Profile, ProfileError> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    format!(" at line {l}, column {c}")
                }
                None => String::new(),
            };
            let msg = e.message().lines().next().unwrap_or("").trim().to_string();
            ProfileError { file: file.to_string(), key: None, msg: format!("not valid TOML{at}: {msg}") }
        })?;
        let top = Reader { file, table: &doc, prefix: "" };
        top.check_keys(TOP_KEYS)?;
        let name = top.string("name")?;

        let cpu_t = top.table("cpu")?;
        let c = Reader { file, table: cpu_t, prefix: "cpu" };
        c.check_keys(CPU_KEYS)?;
        let arch = match c.string("arch")?.as_str() {
            "aarch64" => Arch::Aarch64,
            "armv7" => Arch::Armv7,
            "x86_64" => Arch::X86_64,
            other => return Err(c.err("arch", format!("\"{other}\" is not one of aarch64, armv7, x86_64"))),
        };
        let target = c.string("target")?;
        if !target.starts_with(arch.as_str()) {
            return Err(c.err("target", format!("\"{target}\" is not a target triple for arch {}", arch.as_str())));
        }
        let cores = c.int("cores", 1, 1024)? as usize;
        let neon = c.bool("neon")?;
        let fp16 = c.bool("fp16")?;
        let dotprod = c.bool("dotprod")?;
        if neon && arch == Arch::X86_64 {
            return Err(c.err("neon", "NEON is an ARM extension; must be false for x86_64"));
        }
        if fp16 && arch != Arch::Aarch64 {
            return Err(c.err("fp16", format!("fp16 arithmetic (asimdhp) needs aarch64, arch is {}", arch.as_str())));
        }
        if dotprod && arch != Arch::Aarch64 {
            return Err(c.err("dotprod", format!("SDOT/UDOT need aarch64, arch is {}", arch.as_str())));
        }
        if (fp16 || dotprod) && !neon {
            return Err(c.err("neon", "must be true when fp16 or dotprod is (both are NEON extensions)"));
        }
        let cpu = Cpu {
            arch,
            target,
            cores,
            neon,
            fp16,
            dotprod,
            peak_gflops_f32: c.positive("peak_gflops_f32")?,
            mem_bandwidth_gbs: c.positive("mem_bandwidth_gbs")?,
        };

        let budget_t = top.table("budget")?;
        let b = Reader { file, table: budget_t, prefix: "budget" };
        b.check_keys(BUDGET_KEYS)?;
        let memory_mb = b.int("memory_mb", 1, i64::MAX)? as u64;
        let deadline_ms = b.positive("deadline_ms")?;
        let rate_hz = b.positive("rate_hz")?;
        let period = 1000.0 / rate_hz;
        // 0.1 % slack so that 33.3 ms at 30 Hz (period 33.33 ms) and rounded figures pass.
        if deadline_ms > period * 1.001 {
            return Err(b.err(
                "deadline_ms",
                format!("{deadline_ms} ms is longer than the frame period at {rate_hz} Hz ({period:.2} ms)"),
            ));
        }
        let threads = b.int("threads", 1, 1024)? as usize;
        if threads > cores {
            return Err(b.err("threads", format!("{threads} is more than cpu.cores ({cores})")));
        }
        let list = b.get("precisions").as_array().ok_or_else(|| {
            b.err("precisions", format!("expected an array like [\"f16\", \"f32\"], got {}", show(b.get("precisions"))))
        })?;
        if list.is_empty() {
            let names = PrecisionChoice::NAMES.join(", ");
            return Err(b.err("precisions", format!("must list at least one of {names}")));
        }
        let mut precisions = Vec::with_capacity(list.len());
        for v in list {
            let Some(p) = v.as_str().and_then(|s| s.parse::<PrecisionChoice>().ok()) else {
                let names: Vec<String> = PrecisionChoice::NAMES.iter().map(|n| format!("\"{n}\"")).collect();
                return Err(b.err("precisions", format!("{} is not one of {}", show(v), names.join(", "))));
            };
            if precisions.contains(&p) {
                return Err(b.err("precisions", format!("\"{}\" is listed twice", p.name())));
            }
            precisions.push(p);
        }
        let budget = Budget { memory_mb, deadline_ms, rate_hz, threads, precisions };
        Ok(Profile { name, cpu, budget })
    }

    /// Frame period at `budget.rate_hz`, ms.
    pub fn period_ms(&self) -> f64 {
        1000.0 / self.budget.rate_hz
    }

    /// Whether the board computes in `p` natively (f16 needs `fp16`; int8 is native everywhere
    /// but only fast with `dotprod` on ARM or VNNI on x86, which must be measured).
    pub fn native(&self, p: Precision) -> bool {
        match p {
            Precision::F32 | Precision::Int8 | Precision::Int8Static | Precision::Q4 => true,
            Precision::F16 => self.cpu.fp16,
        }
    }

    /// Peak throughput of products computed in `arithmetic` relative to f32 products on this
    /// board, from its instruction set (an upper bound, not a measurement): 2 for f16 with fp16
    /// arithmetic (a 128-bit FMLA does 8 f16 multiply-adds where FMLA.4S does 4 f32), 4 for int8
    /// with dotprod (an SDOT does 16 int8 multiply-adds); 1 otherwise (f16 is computed in f32
    /// without fp16; int8 on SMLAL does 4 per instruction, as f32 does; x86's VNNI and AMX are not
    /// described by this schema, and 4-bit weights are decoded to f32).
    pub fn peak_ratio(&self, arithmetic: Arithmetic) -> f64 {
        match arithmetic {
            Arithmetic::F16 if self.cpu.fp16 => 2.0,
            Arithmetic::Int8 if self.cpu.dotprod => 4.0,
            _ => 1.0,
        }
    }
}

/// The arithmetic a product runs in (what [`Profile::peak_ratio`] rates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    /// f32 multiply-adds.
    F32,
    /// f16 multiply-adds.
    F16,
    /// int8 multiply-adds into i32.
    Int8,
}

/// The CPU this program runs on, as the OS reports it (on aarch64 from the kernel's HWCAP, which
/// `qemu-aarch64 -cpu max` fills in too).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostCpu {
    /// `aarch64`, `armv7`, `x86_64` or another `target_arch`.
    pub arch: &'static str,
    /// Cores available to this process.
    pub cores: usize,
    /// NEON.
    pub neon: bool,
    /// fp16 arithmetic (asimdhp).
    pub fp16: bool,
    /// SDOT/UDOT (asimddp).
    pub dotprod: bool,
}

/// Detects [`HostCpu`].
pub fn host_cpu() -> HostCpu {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(target_arch = "aarch64")]
    return HostCpu {
        arch: "aarch64",
        cores,
        neon: std::arch::is_aarch64_feature_detected!("neon"),
        fp16: std::arch::is_aarch64_feature_detected!("fp16"),
        dotprod: std::arch::is_aarch64_feature_detected!("dotprod"),
    };
    #[cfg(target_arch = "arm")]
    return HostCpu { arch: "armv7", cores, neon: cfg!(target_feature = "neon"), fp16: false, dotprod: false };
    #[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
    HostCpu { arch: std::env::consts::ARCH, cores, neon: false, fp16: false, dotprod: false }
}

impl Profile {
    /// Where `host` falls short of what this profile claims (empty: it can be this board).
    pub fn host_mismatches(&self, host: &HostCpu) -> Vec<String> {
        let c = &self.cpu;
        if host.arch != c.arch.as_str() {
            return vec![format!("cpu.arch is {}, this machine is {}", c.arch.as_str(), host.arch)];
        }
        let mut out = vec![];
        for (key, claimed, has) in
            [("neon", c.neon, host.neon), ("fp16", c.fp16, host.fp16), ("dotprod", c.dotprod, host.dotprod)]
        {
            if claimed && !has {
                out.push(format!("cpu.{key} = true, this CPU has no {key}"));
            }
        }
        if host.cores < c.cores {
            out.push(format!("cpu.cores = {}, {} available here", c.cores, host.cores));
        }
        out
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cpu;
        let b = &self.budget;
        let yn = |x: bool| if x { "yes" } else { "no" };
        writeln!(f, "name           {}", self.name)?;
        writeln!(f, "cpu            {} ({}), {} cores", c.arch.as_str(), c.target, c.cores)?;
        writeln!(f, "features       neon {}, fp16 {}, dotprod {}", yn(c.neon), yn(c.fp16), yn(c.dotprod))?;
        writeln!(f, "peak           {:.1} GFLOP/s f32, {:.1} GB/s memory", c.peak_gflops_f32, c.mem_bandwidth_gbs)?;
        writeln!(
            f,
            "products       f16 {}x, int8 {}x f32's peak (instruction set)",
            self.peak_ratio(Arithmetic::F16),
            self.peak_ratio(Arithmetic::Int8)
        )?;
        writeln!(f, "memory budget  {} MiB", b.memory_mb)?;
        writeln!(
            f,
            "latency        deadline {} ms at {} Hz (period {:.2} ms), {} thread(s)",
            b.deadline_ms,
            b.rate_hz,
            self.period_ms(),
            b.threads
        )?;
        let ps: Vec<String> = b
            .precisions
            .iter()
            .map(|p| if self.native(p.precision) { p.name() } else { format!("{} (emulated here)", p.name()) })
            .collect();
        writeln!(f, "precisions     {}", ps.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PI5: &str = r#"
name = "Raspberry Pi 5"
[cpu]
arch = "aarch64"
target = "aarch64-unknown-linux-gnu"
cores = 4
neon = true
fp16 = true
dotprod = true
peak_gflops_f32 = 154.0
mem_bandwidth_gbs = 17
[budget]
memory_mb = 256
deadline_ms = 33.3
rate_hz = 30
threads = 4
precisions = ["f16", "int8", "f32"]
"#;

    fn err(text: &str) -> String {
        Profile::parse(text, "x.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_the_schema() {
        let p = Profile::parse(PI5, "x.toml").unwrap();
        assert_eq!(p.name, "Raspberry Pi 5");
        assert_eq!(p.cpu.arch, Arch::Aarch64);
        assert_eq!(p.cpu.cores, 4);
        assert!(p.cpu.fp16 && p.cpu.dotprod && p.cpu.neon);
        assert_eq!(p.cpu.mem_bandwidth_gbs, 17.0); // integer accepted as a number
        assert_eq!(p.budget.memory_mb, 256);
        let expected: Vec<PrecisionChoice> = [Precision::F16, Precision::Int8, Precision::F32].map(Into::into).into();
        assert_eq!(p.budget.precisions, expected);
        assert!((p.period_ms() - 33.333).abs() < 1e-3);
        let shown = p.to_string();
        assert!(shown.contains("fp16 yes") && shown.contains("f16, int8, f32"), "{shown}");
        assert!(shown.contains("f16 2x, int8 4x f32's peak"), "{shown}");
    }

    #[test]
    fn peak_ratios_follow_the_instruction_set() {
        let a76 = Profile::parse(PI5, "x.toml").unwrap();
        let ratios = |p: &Profile| [Arithmetic::F32, Arithmetic::F16, Arithmetic::Int8].map(|a| p.peak_ratio(a));
        assert_eq!(ratios(&a76), [1.0, 2.0, 4.0]);
        // Cortex-A72 (Raspberry Pi 4): neither fp16 arithmetic nor SDOT.
        let a72 = Profile::parse(
            &PI5.replace("fp16 = true", "fp16 = false").replace("dotprod = true", "dotprod = false"),
            "x.toml",
        )
        .unwrap();
        assert_eq!(ratios(&a72), [1.0, 1.0, 1.0]);
        let dot_only = Profile::parse(&PI5.replace("fp16 = true", "fp16 = false"), "x.toml").unwrap();
        assert_eq!(ratios(&dot_only), [1.0, 1.0, 4.0]);
    }

    #[test]
    fn every_bundled_profile_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../targets");
        let mut names = vec![];
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                let p = Profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                names.push(path.file_stem().unwrap().to_string_lossy().to_string());
                assert!(p.budget.threads <= p.cpu.cores);
            }
        }
        names.sort();
        assert_eq!(
            names,
            ["jetson-agx-orin", "jetson-orin-nano", "raspberry-pi-4", "raspberry-pi-5", "x86-64-amx", "x86-64-host"]
        );
        // The A72 has neither fp16 arithmetic nor SDOT; the A76 has both.
        let pi4 = Profile::load(&dir.join("raspberry-pi-4.toml")).unwrap();
        assert!(!pi4.cpu.fp16 && !pi4.cpu.dotprod);
        let pi5 = Profile::load(&dir.join("raspberry-pi-5.toml")).unwrap();
        assert!(pi5.cpu.fp16 && pi5.cpu.dotprod);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&PI5.replace("cores = 4", "cores = 4\ncorez = 4"));
        assert_eq!(e.lines().count(), 1);
        assert!(e.starts_with("x.toml: cpu.corez: unknown key (allowed: arch, target"), "{e}");
        let e = err(&format!("extra = 1\n{PI5}"));
        assert!(e.starts_with("x.toml: extra: unknown key"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        assert_eq!(err(&PI5.replace("threads = 4\n", "")), "x.toml: budget.threads: missing");
        assert_eq!(err(&PI5.replace("name = \"Raspberry Pi 5\"\n", "")), "x.toml: name: missing");
        let no_budget = PI5.split("[budget]").next().unwrap();
        assert_eq!(err(no_budget), "x.toml: budget: missing");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("cores = 4", "cores = 0", "x.toml: cpu.cores: 0 is out of range 1..=1024"),
            ("cores = 4", "cores = \"four\"", "x.toml: cpu.cores: expected an integer, got string \"four\""),
            (
                "arch = \"aarch64\"",
                "arch = \"arm64\"",
                "x.toml: cpu.arch: \"arm64\" is not one of aarch64, armv7, x86_64",
            ),
            ("neon = true", "neon = 1", "x.toml: cpu.neon: expected true or false, got integer 1"),
            (
                "peak_gflops_f32 = 154.0",
                "peak_gflops_f32 = -1.0",
                "x.toml: cpu.peak_gflops_f32: must be a positive number, got -1",
            ),
            ("memory_mb = 256", "memory_mb = 256.5", "x.toml: budget.memory_mb: expected an integer, got number 256.5"),
            ("threads = 4", "threads = 8", "x.toml: budget.threads: 8 is more than cpu.cores (4)"),
            (
                "rate_hz = 30",
                "rate_hz = 60",
                "x.toml: budget.deadline_ms: 33.3 ms is longer than the frame period at 60 Hz (16.67 ms)",
            ),
            (
                "[\"f16\", \"int8\", \"f32\"]",
                "[\"f16\", \"bf16\"]",
                "x.toml: budget.precisions: string \"bf16\" is not one of \"f32\", \"f16\", \"int8\", \"int8-7bit\", \"int8-static\", \"int8-static-7bit\", \"q4\"",
            ),
            (
                "[\"f16\", \"int8\", \"f32\"]",
                "[]",
                "x.toml: budget.precisions: must list at least one of f32, f16, int8, int8-7bit, int8-static, int8-static-7bit, q4",
            ),
            (
                "[\"f16\", \"int8\", \"f32\"]",
                "[\"f16\", \"f16\"]",
                "x.toml: budget.precisions: \"f16\" is listed twice",
            ),
            (
                "[\"f16\", \"int8\", \"f32\"]",
                "\"f16\"",
                "x.toml: budget.precisions: expected an array like [\"f16\", \"f32\"], got string \"f16\"",
            ),
            (
                "target = \"aarch64-unknown-linux-gnu\"",
                "target = \"x86_64-unknown-linux-gnu\"",
                "x.toml: cpu.target: \"x86_64-unknown-linux-gnu\" is not a target triple for arch aarch64",
            ),
        ];
        for (from, to, want) in cases {
            assert!(PI5.contains(from), "{from}");
            assert_eq!(err(&PI5.replace(from, to)), want);
        }
    }

    #[test]
    fn arm_features_must_fit_the_arch() {
        let v7 = PI5
            .replace("\"aarch64\"", "\"armv7\"")
            .replace("aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf");
        assert_eq!(err(&v7), "x.toml: cpu.fp16: fp16 arithmetic (asimdhp) needs aarch64, arch is armv7");
        let v7 = v7.replace("fp16 = true", "fp16 = false");
        assert_eq!(err(&v7), "x.toml: cpu.dotprod: SDOT/UDOT need aarch64, arch is armv7");
        assert!(Profile::parse(&v7.replace("dotprod = true", "dotprod = false"), "x.toml").is_ok());
        let x86 = PI5.replace("\"aarch64\"", "\"x86_64\"").replace("aarch64-unknown", "x86_64-unknown");
        assert_eq!(err(&x86), "x.toml: cpu.neon: NEON is an ARM extension; must be false for x86_64");
    }

    #[test]
    fn syntax_errors_are_one_line_with_position() {
        let e = err(&PI5.replace("cores = 4", "cores = = 4"));
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("x.toml: not valid TOML at line 6, column"), "{e}");
        let e = err("[cpu]\n[cpu]\n");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("x.toml: not valid TOML at line 2"), "{e}");
        let e = err("name = \"x\"\ncpu = 3\nbudget = {}\n");
        assert_eq!(e, "x.toml: cpu: expected a table [cpu], got integer 3");
    }

    #[test]
    fn host_comparison() {
        let p = Profile::parse(PI5, "x.toml").unwrap();
        let pi5 = HostCpu { arch: "aarch64", cores: 4, neon: true, fp16: true, dotprod: true };
        assert!(p.host_mismatches(&pi5).is_empty());
        let pi4 = HostCpu { fp16: false, dotprod: false, ..pi5.clone() };
        assert_eq!(
            p.host_mismatches(&pi4),
            ["cpu.fp16 = true, this CPU has no fp16", "cpu.dotprod = true, this CPU has no dotprod"]
        );
        let x86 = HostCpu { arch: "x86_64", cores: 2, neon: false, fp16: false, dotprod: false };
        assert_eq!(p.host_mismatches(&x86), ["cpu.arch is aarch64, this machine is x86_64"]);
        // Under `qemu-aarch64 -cpu max` (targets/test-aarch64.sh) the emulated CPU has every
        // feature tract's ARM kernels use; this checks that the emulation really exposes them.
        #[cfg(target_arch = "aarch64")]
        if std::env::var_os("PERCEIVER_EDGE_TEST_RUNNER").is_some() {
            let h = host_cpu();
            assert!(h.neon && h.fp16 && h.dotprod, "qemu -cpu max should expose neon, fp16, dotprod: {h:?}");
        }
    }

    #[test]
    fn missing_file_is_named() {
        let e = Profile::load(Path::new("/nonexistent/board.toml")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/board.toml: cannot read: "), "{e}");
    }
}
