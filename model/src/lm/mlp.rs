//! SwiGLU feed-forward block: down(silu(gate(x)) · up(x)), with gate and up fused into one projection.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::fused::activation::silu_mul;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::weights::WeightLoader;

/// LLaMA/Mistral MLP.
#[derive(Module, Debug)]
pub struct SwiGlu {
    /// `gate_proj` and `up_proj` side by side: `[d, 2 · inner]`.
    gate_up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    /// Loads `{prefix}.{gate,up,down}_proj`.
    pub fn load(w: &mut WeightLoader, prefix: &str, d: usize, inner: usize) -> Result<Self> {
        let names = [format!("{prefix}.gate_proj"), format!("{prefix}.up_proj")];
        Ok(Self {
            gate_up_proj: w.fused_linear(&names, d, &[inner, inner], false)?,
            down_proj: w.linear(&format!("{prefix}.down_proj"), inner, d, false)?,
        })
    }

    /// `[.., d]` → `[.., d]`.
    pub fn forward<const D: usize>(&self, h: Tensor<D>) -> Tensor<D> {
        self.down_proj
            .forward(silu_mul(self.gate_up_proj.forward(h)))
    }

    /// [`Self::forward`] of `norm(x)` added to the residual stream `x`. Where the projections take the
    /// one-row kernel (decoding on a GPU) that is two launches: the norm, gate/up and the activation in
    /// one, down and the sum in the other.
    pub fn forward_residual<const D: usize>(&self, x: Tensor<D>, norm: &RmsNorm) -> Tensor<D> {
        let inner = self.gate_up_proj.forward_normed_silu(x.clone(), norm);
        self.down_proj.forward_residual(x, inner)
    }
}
