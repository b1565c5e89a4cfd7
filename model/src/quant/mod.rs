//! Weight-only quantisation, chosen at load time: every weight matrix (decoder, output head, vision tower,
//! projector) and the token embedding table as 8- or 4-bit codes with a scale and minimum per group of 32
//! values (see [`pack`]); a table tied to the output head stays at 8 bits even for int4, since its rounding
//! then reaches every logit (on SmolLM2 a 4-bit tied table alone costs ~10 points of greedy agreement).
//! Norms, biases, position embeddings and the patch convolution stay in the float type: well under 1 % of
//! a 7B model. Activations and the matrix products stay in the float type too; weights are dequantised a
//! slab at a time as they are used.

#[cfg(feature = "cpu")]
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
pub mod cube;
pub mod extension;
pub mod footprint;
pub mod matrix;
pub mod pack;

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

pub use matrix::QuantizedMatrix;
pub use pack::Packed;

/// How weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// In the float type (no quantisation).
    #[default]
    None,
    /// 8-bit codes (8.625 bits per weight with the scales, in a 16-bit model).
    Int8,
    /// 4-bit codes (4.625 bits per weight); a tied embedding table at 8 bits.
    Int4,
}

impl Quantization {
    /// Bits per code for linear layers' weights, `None` when not quantising.
    pub fn linear_bits(self) -> Option<usize> {
        match self {
            Quantization::None => None,
            Quantization::Int8 => Some(8),
            Quantization::Int4 => Some(4),
        }
    }

    /// Bits per code for the token embedding table (`tied`: it is also the output head), `None` when not
    /// quantising.
    pub fn embedding_bits(self, tied: bool) -> Option<usize> {
        self.linear_bits().map(|b| if tied { 8 } else { b })
    }
}

impl FromStr for Quantization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Quantization::None),
            "int8" | "q8" => Ok(Quantization::Int8),
            "int4" | "q4" => Ok(Quantization::Int4),
            _ => Err(Error::Input(format!(
                "unknown quantisation `{s}` (none, int8, int4)"
            ))),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
            Quantization::Int4 => "int4",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_a_tied_embedding_stays_at_eight_bits() {
        assert_eq!("INT4".parse::<Quantization>().unwrap(), Quantization::Int4);
        assert_eq!("q8".parse::<Quantization>().unwrap(), Quantization::Int8);
        let err = "int3".parse::<Quantization>().unwrap_err().to_string();
        assert!(err.contains("int3"), "{err}");
        assert_eq!(Quantization::Int4.linear_bits(), Some(4));
        assert_eq!(Quantization::Int4.embedding_bits(true), Some(8));
        assert_eq!(Quantization::Int4.embedding_bits(false), Some(4));
        assert_eq!(Quantization::None.embedding_bits(true), None);
        assert_eq!(Quantization::Int8.to_string(), "int8");
    }
}
