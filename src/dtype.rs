//! Element types a DoRA layer's tensors may have, and the tolerances they are held to.

use anyhow::{bail, Result};
use std::fmt;

/// Storage dtype of one tensor. Each tensor of a layer has its own; arithmetic is always
/// accumulated in at least f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// All supported dtypes, in a fixed order (used by tests and kernel tables).
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The short name used in kernel entry points and file metadata: `f32`, `f16`, `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses `f32`, `f16`, `bf16` (also `float32`, `float16`, `bfloat16`).
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => DType::F32,
            "f16" | "float16" | "fp16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            other => bail!("unknown dtype {other:?} (expected f32, f16 or bf16)"),
        })
    }

    /// Maps a safetensors dtype to ours.
    ///
    /// # Errors
    /// Any safetensors dtype other than F32, F16, BF16, naming it.
    pub fn from_safetensors(d: safetensors::Dtype) -> Result<Self> {
        Ok(match d {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => bail!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
        })
    }

    /// The safetensors dtype for this one.
    pub const fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Unit roundoff of the storage format (half the distance from 1 to the next value).
    pub const fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => 5.960_464_477_539_063e-8, // 2^-24
            DType::F16 => 4.882_812_5e-4,           // 2^-11
            DType::BF16 => 3.906_25e-3,             // 2^-8
        }
    }

    /// Relative L2 tolerance against a float64 truth (docs/design.md §4): f32 1e-5, f16 1e-3,
    /// bf16 8e-3. A result computed in this dtype (inputs rounded to it, output rounded to
    /// it, f32 accumulation) lands well inside these bounds.
    pub const fn tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-5,
            DType::F16 => 1e-3,
            DType::BF16 => 8e-3,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        DType::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()).unwrap(), d);
            assert_eq!(DType::from_safetensors(d.to_safetensors()).unwrap(), d);
        }
        let err = DType::parse("int8").unwrap_err().to_string();
        assert!(err.contains("int8"), "{err}");
        assert!(DType::from_safetensors(safetensors::Dtype::I64).is_err());
    }
}
