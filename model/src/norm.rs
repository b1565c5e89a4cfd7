//! Normalisation layers with the checkpoint's exact semantics (Burn's `LayerNorm` keeps its epsilon
//! private, so loaders could not set it).

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

use crate::error::Result;
use crate::weights::WeightLoader;

/// LayerNorm with weight and bias (CLIP).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Param<Tensor<1>>,
    /// Shift.
    pub bias: Param<Tensor<1>>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(w: &mut WeightLoader, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(&format!("{prefix}.weight"), [dim])?),
            bias: Param::from_tensor(w.tensor(&format!("{prefix}.bias"), [dim])?),
            eps,
        })
    }

    /// Normalises over the last axis (statistics in f32 whatever the input type).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let y = burn::tensor::module::layer_norm(
            x.cast(DType::F32),
            self.weight.val().cast(DType::F32),
            Some(self.bias.val().cast(DType::F32)),
            self.eps,
        );
        y.cast(dtype)
    }
}

/// RMSNorm with a weight only (LLaMA/Mistral), computed in f32 like transformers.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Loads `{prefix}.weight`.
    pub fn load(w: &mut WeightLoader, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(w.tensor(&format!("{prefix}.weight"), [dim])?),
            eps,
        })
    }

    /// x / sqrt(mean(x²) + eps) · weight over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::fused::rms_norm::rms_norm(x, self.weight.val(), self.eps)
    }

    /// The residual stream `x + delta` and its normalisation, in one pass.
    pub fn forward_residual<const D: usize>(
        &self,
        x: Tensor<D>,
        delta: Tensor<D>,
    ) -> (Tensor<D>, Tensor<D>) {
        crate::fused::rms_norm::add_rms_norm(x, delta, self.weight.val(), self.eps)
    }
}
