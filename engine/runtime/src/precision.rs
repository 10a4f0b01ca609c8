//! Numeric precision of a graph: the one type the exporter, the board profiles, `tune` and the
//! CLI share. Subsets (the weight pack's f32 / int8) narrow it with `TryFrom`. Board profiles and
//! `tune` list [`PrecisionChoice`]s: a precision plus the exporter's 7-bit weight option.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Numeric precision of an exported graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit float (no quantisation pass).
    #[default]
    F32,
    /// f16 weights and arithmetic.
    F16,
    /// int8 weights, activations quantised at run time.
    Int8,
    /// int8 weights, activation scales from calibration data.
    Int8Static,
    /// 4-bit block-quantised weights (MatMulNBits, block 32).
    Q4,
}

/// A precision name that is none of [`Precision::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision \"{name}\" (expected f32, f16, int8, int8-static or q4{hint})", name = .0, hint = seven_bit_hint(.0))]
pub struct UnknownPrecision(pub String);

/// For a `tune` / profile name such as `int8-7bit`, how `export` says it.
fn seven_bit_hint(name: &str) -> &'static str {
    if name.ends_with("-7bit") {
        "; 7-bit int8 weights are `--precision int8 --reduce-range`"
    } else {
        ""
    }
}

impl Precision {
    /// All precisions with their command-line names.
    pub const ALL: [(Precision, &'static str); 5] = [
        (Precision::F32, "f32"),
        (Precision::F16, "f16"),
        (Precision::Int8, "int8"),
        (Precision::Int8Static, "int8-static"),
        (Precision::Q4, "q4"),
    ];

    /// Bytes per stored weight (q4: half a byte, block scales aside).
    pub fn weight_bytes(self) -> f64 {
        match self {
            Precision::F32 => 4.0,
            Precision::F16 => 2.0,
            Precision::Int8 | Precision::Int8Static => 1.0,
            Precision::Q4 => 0.5,
        }
    }

    /// The command-line name (also used in profiles, metadata and reports).
    pub fn name(self) -> &'static str {
        Precision::ALL.iter().find(|(p, _)| *p == self).map(|(_, n)| *n).unwrap_or("?")
    }

    /// Whether weights are stored as integers (int8, int8-static, q4).
    pub fn is_integer(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int8Static | Precision::Q4)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = UnknownPrecision;
    fn from_str(s: &str) -> Result<Precision, UnknownPrecision> {
        Precision::ALL.iter().find(|(_, n)| *n == s).map(|(p, _)| *p).ok_or_else(|| UnknownPrecision(s.into()))
    }
}

impl Serialize for Precision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Precision, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A precision as board profiles and `tune` list it: a [`Precision`] and, for int8 and
/// int8-static, whether the integer products' weights are 7-bit (`export --reduce-range`), named
/// with a `-7bit` suffix. On x86 CPUs without VNNI those run on an exact kernel as fast as
/// onnxruntime's saturating one, at 7-bit weights' fidelity (docs/precision.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrecisionChoice {
    /// The graph's precision.
    pub precision: Precision,
    /// 7-bit integer-product weights (int8 and int8-static only).
    pub reduce_range: bool,
}

/// A name that is none of [`PrecisionChoice::NAMES`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision \"{0}\" (expected f32, f16, int8, int8-7bit, int8-static, int8-static-7bit or q4)")]
pub struct UnknownChoice(pub String);

impl PrecisionChoice {
    /// Every name a profile or `tune --precisions` accepts.
    pub const NAMES: [&'static str; 7] = ["f32", "f16", "int8", "int8-7bit", "int8-static", "int8-static-7bit", "q4"];

    /// The name (`int8-7bit` for int8 with 7-bit weights).
    pub fn name(self) -> String {
        if self.reduce_range {
            format!("{}-7bit", self.precision.name())
        } else {
            self.precision.name().to_string()
        }
    }
}

impl From<Precision> for PrecisionChoice {
    fn from(precision: Precision) -> PrecisionChoice {
        PrecisionChoice { precision, reduce_range: false }
    }
}

impl fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for PrecisionChoice {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<PrecisionChoice, UnknownChoice> {
        let (base, reduce_range) = match s.strip_suffix("-7bit") {
            Some(base) => (base, true),
            None => (s, false),
        };
        match base.parse::<Precision>() {
            Ok(p) if !reduce_range || matches!(p, Precision::Int8 | Precision::Int8Static) => {
                Ok(PrecisionChoice { precision: p, reduce_range })
            }
            _ => Err(UnknownChoice(s.into())),
        }
    }
}

impl Serialize for PrecisionChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (p, n) in Precision::ALL {
            assert_eq!(n.parse::<Precision>().unwrap(), p);
            assert_eq!(p.to_string(), n);
        }
        assert!("int4".parse::<Precision>().unwrap_err().to_string().contains("expected f32, f16"));
        let e = "int8-7bit".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("--precision int8 --reduce-range"), "{e}");
    }

    #[test]
    fn choices_name_the_seven_bit_variants() {
        for n in PrecisionChoice::NAMES {
            assert_eq!(n.parse::<PrecisionChoice>().unwrap().to_string(), n);
        }
        // Every graph precision is a choice too.
        for (_, n) in Precision::ALL {
            assert!(PrecisionChoice::NAMES.contains(&n), "{n} missing from NAMES");
        }
        let c: PrecisionChoice = "int8-static-7bit".parse().unwrap();
        assert_eq!((c.precision, c.reduce_range), (Precision::Int8Static, true));
        assert_eq!("q4".parse::<PrecisionChoice>().unwrap(), PrecisionChoice::from(Precision::Q4));
        for bad in ["f32-7bit", "q4-7bit", "int8-7bit-7bit", "int7", ""] {
            let e = bad.parse::<PrecisionChoice>().unwrap_err().to_string();
            assert!(e.contains(&format!("\"{bad}\"")) && e.contains("int8-7bit"), "{e}");
        }
    }
}
