//! Rotary position embedding in the Hugging Face "rotate half" layout: dimension i is paired with
//! i + head_dim/2 (not with its neighbour, as Burn's `RotaryEncoding` does).

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor, TensorData};

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Module, Debug)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    /// Tables for `head_dim` and base `theta`, computed like transformers (inverse frequencies and angles
    /// in f32), stored in `dtype`.
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_positions: usize,
        device: &Device,
        dtype: DType,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            for _ in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<2>::from_data(
                TensorData::new(v, [max_positions, head_dim]),
                (device, DType::F32),
            )
            .cast(dtype)
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// The cos and sin tables `[positions, head_dim]`.
    pub fn tables(&self) -> (Tensor<2>, Tensor<2>) {
        (self.cos.clone(), self.sin.clone())
    }

    /// Largest position + 1 the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The `heads` heads from column `start` of the fused projection `qkv` `[batch, seq, width]`, rotated
    /// for positions `offset..offset + seq`: `[batch, heads, seq, head_dim]`.
    pub fn heads(&self, qkv: Tensor<3>, start: usize, heads: usize, offset: usize) -> Tensor<4> {
        crate::fused::rope::rope_heads(
            qkv,
            self.cos.clone(),
            self.sin.clone(),
            start,
            heads,
            offset,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_half_pairs() {
        let device = Device::default();
        let rope = Rope::new(4, 10_000.0, 8, &device, DType::F32);
        // x = (1, 0, 0, 0) at position 3: pair (0, 2) rotates by 3 rad, pair (1, 3) by 3/100 rad.
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0], [1, 1, 4]),
            &device,
        );
        let y: Vec<f32> = rope.heads(x, 0, 1, 3).into_data().try_into_vec().unwrap();
        let expected = [3f32.cos(), 0.0, 3f32.sin(), 0.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
