//! The multimodal projector: `linear` or `mlp{N}x_gelu` (linear layers with exact GELU between them).

use burn::module::Module;
use burn::tensor::{Tensor, activation};

use crate::config::ProjectorKind;
use crate::error::Result;
use crate::linear::Linear;
use crate::weights::WeightLoader;

/// Maps vision features to the decoder's embedding width.
#[derive(Module, Debug)]
pub struct Projector {
    layers: Vec<Linear>,
}

impl Projector {
    /// Loads the projector; `names` gives the checkpoint prefix of each linear layer in order.
    pub fn load(
        w: &mut WeightLoader,
        names: &[String],
        kind: ProjectorKind,
        d_in: usize,
        d_out: usize,
    ) -> Result<Self> {
        let depth = match kind {
            ProjectorKind::Linear => 1,
            ProjectorKind::MlpGelu { depth } => depth,
        };
        let layers = (0..depth)
            .map(|i| w.linear(&names[i], if i == 0 { d_in } else { d_out }, d_out, true))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// `[.., d_in]` → `[.., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |x, (i, layer)| {
            let y = layer.forward(x);
            if i < last { activation::gelu(y) } else { y }
        })
    }
}
