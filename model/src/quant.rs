//! Weight-only quantisation of the decoder's linear layers, chosen at load time: symmetric int8 or int4
//! values with one f32 scale per block of the weight matrix (Burn's quantised tensors). Embeddings, norms,
//! the vision tower and the projector stay in the float type: together they are a few percent of a 7B
//! model's weights, and the vision tower is the part most sensitive to rounding.

use std::fmt;
use std::str::FromStr;

use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};
use burn::tensor::{Device, Tensor};

use crate::error::Error;

/// How the decoder's linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// In the float type (no quantisation).
    #[default]
    None,
    /// 8-bit integers, one scale per block of [`Quantization::INT8_BLOCK`] values.
    Int8,
    /// 4-bit integers, one scale per block of [`Quantization::INT4_BLOCK`] values.
    Int4,
}

impl Quantization {
    /// Largest values-per-scale for int8 (8.25 bits per weight with the f32 scale).
    pub const INT8_BLOCK: u8 = 128;
    /// Largest values-per-scale for int4 (5 bits per weight).
    pub const INT4_BLOCK: u8 = 32;

    /// Burn's scheme for a weight whose rows hold `row` values: blocks run along the rows, of the largest
    /// size up to the type's that divides `row`; `None` when not quantising or no block size fits.
    pub fn scheme(self, device: &Device, row: usize) -> Option<QuantScheme> {
        let (value, largest) = match self {
            Quantization::None => return None,
            Quantization::Int8 => (QuantValue::Q8S, Self::INT8_BLOCK),
            Quantization::Int4 => (QuantValue::Q4S, Self::INT4_BLOCK),
        };
        let block = [largest, 64, 32, 16]
            .into_iter()
            .filter(|&b| b <= largest)
            .find(|&b| row.is_multiple_of(usize::from(b)))?;
        Some(
            device
                .settings()
                .quantization
                .scheme
                .with_value(value)
                .per_block([block], ScaleDtype::F32),
        )
    }

    /// Quantises a weight (min-max calibration per block), or returns it unchanged. A linear weight
    /// `[in, out]` gets its blocks along `in`, the dimension each output sums over, as GPTQ and llama.cpp
    /// group them: one scale then serves the weights of one output channel.
    pub fn apply<const D: usize>(self, weight: Tensor<D>) -> Tensor<D> {
        if D != 2 {
            let row = weight.dims()[D - 1];
            return match self.scheme(&weight.device(), row) {
                Some(scheme) => weight.quantize_dynamic(&scheme),
                None => weight,
            };
        }
        let d_in = weight.dims()[0];
        match self.scheme(&weight.device(), d_in) {
            Some(scheme) => weight.transpose().quantize_dynamic(&scheme).transpose(),
            None => weight,
        }
    }
}

/// Bytes a quantised tensor of `numel` values takes: the values plus one f32 scale per block.
pub fn quantised_bytes(scheme: &QuantScheme, numel: usize) -> f64 {
    let block: usize = scheme.block_size().map_or(numel, |b| {
        b.as_slice().iter().map(|&x| usize::from(x)).product()
    });
    numel as f64 * scheme.size_bits_value() as f64 / 8.0 + (numel / block.max(1)) as f64 * 4.0
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
    use burn::tensor::Distribution;

    #[test]
    fn quantised_weights_stay_close_and_multiply_like_the_originals() {
        let device = Device::default();
        let w = Tensor::<2>::random([256, 192], Distribution::Normal(0.0, 0.02), &device);
        let x = Tensor::<2>::random([3, 256], Distribution::Normal(0.0, 1.0), &device);
        let exact: Vec<f32> = x
            .clone()
            .matmul(w.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        for (q, tolerance) in [(Quantization::Int8, 0.01), (Quantization::Int4, 0.15)] {
            let qw = q.apply(w.clone());
            let got: Vec<f32> = x
                .clone()
                .matmul(qw)
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .unwrap();
            let scale = exact.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            let err = exact
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                err / scale < tolerance,
                "{q}: relative error {}",
                err / scale
            );
        }
        assert_eq!("INT4".parse::<Quantization>().unwrap(), Quantization::Int4);
        assert!("int3".parse::<Quantization>().is_err());
    }
}
