//! SwiGLU feed-forward block: down(silu(gate(x)) · up(x)).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Tensor, activation};

use crate::error::Result;
use crate::weights::WeightLoader;

/// LLaMA/Mistral MLP.
#[derive(Module, Debug)]
pub struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(w: &mut WeightLoader, prefix: &str, d: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: w.linear(&format!("{prefix}.gate_proj"), d, inner, false)?,
            up_proj: w.linear(&format!("{prefix}.up_proj"), d, inner, false)?,
            down_proj: w.linear(&format!("{prefix}.down_proj"), inner, d, false)?,
        })
    }

    /// `[.., d]` → `[.., d]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = activation::silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
