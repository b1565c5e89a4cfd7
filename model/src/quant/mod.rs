//! Weight-only quantisation, chosen at load time: every weight matrix (decoder, vision tower, projector) and
//! the token embedding table as 8- or 4-bit codes with a scale and minimum per group of 32 values (see
//! [`pack`]). The output head (and an embedding table tied to it) is kept one step finer, as GPTQ, AWQ and
//! llama.cpp's mixed formats do: its rounding reaches every logit directly. On SmolLM2 an 8-bit tied head
//! alone held int8's greedy agreement at 98.1 % (99.5 % with it in the float type), and a 4-bit one cost
//! int4 ~10 points. Norms, biases, position embeddings and the patch convolution stay in the float type: well
//! under 1 % of a 7B model. Activations and the matrix products stay in the float type too; weights are
//! dequantised a slab at a time as they are used.

pub mod cache;
pub mod cache_writer;
pub mod cached_models;
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
    /// 8-bit codes (8.625 bits per weight with the scales, in a 16-bit model); the output head in the
    /// float type.
    Int8,
    /// 4-bit codes (4.625 bits per weight); the output head at 8 bits.
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

    /// Bits per code for the output head, one step finer than the other matrices: 8 under int4, the float
    /// type (`None`) under int8 and without quantisation.
    pub fn head_bits(self) -> Option<usize> {
        match self {
            Quantization::Int4 => Some(8),
            Quantization::None | Quantization::Int8 => None,
        }
    }

    /// Bits per code for the token embedding table (`tied`: it is also the output head), `None` when it
    /// stays in the float type.
    pub fn embedding_bits(self, tied: bool) -> Option<usize> {
        if tied {
            self.head_bits()
        } else {
            self.linear_bits()
        }
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
    fn names_parse_and_the_output_head_is_one_step_finer() {
        assert_eq!("INT4".parse::<Quantization>().unwrap(), Quantization::Int4);
        assert_eq!("q8".parse::<Quantization>().unwrap(), Quantization::Int8);
        let err = "int3".parse::<Quantization>().unwrap_err().to_string();
        assert!(err.contains("int3"), "{err}");
        assert_eq!(Quantization::Int4.linear_bits(), Some(4));
        assert_eq!(Quantization::Int4.embedding_bits(true), Some(8));
        assert_eq!(Quantization::Int4.embedding_bits(false), Some(4));
        assert_eq!(Quantization::Int8.embedding_bits(true), None);
        assert_eq!(Quantization::Int8.embedding_bits(false), Some(8));
        assert_eq!(Quantization::Int8.head_bits(), None);
        assert_eq!(Quantization::Int4.head_bits(), Some(8));
        assert_eq!(Quantization::None.embedding_bits(true), None);
        assert_eq!(Quantization::Int8.to_string(), "int8");
    }
}
