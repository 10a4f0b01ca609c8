//! Numeric precision of a graph: the one type the exporter, the board profiles, `tune` and the
//! CLI share. Subsets (the weight pack's f32 / int8) narrow it with `TryFrom`.

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
#[error("unknown precision \"{0}\" (expected f32, f16, int8, int8-static or q4)")]
pub struct UnknownPrecision(pub String);

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
    }
}
