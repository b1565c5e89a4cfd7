//! The token embedding table, in the float type or quantised ([`crate::quant`]).

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, module::embedding};

use crate::quant::QuantizedMatrix;

/// `[vocab, hidden]` rows looked up by token id.
#[derive(Module, Debug)]
pub enum TokenEmbedding {
    /// In the float type.
    Float(Param<Tensor<2>>),
    /// Packed, one row per token.
    Quantized(QuantizedMatrix),
}

impl TokenEmbedding {
    /// `[batch, seq]` ids → `[batch, seq, hidden]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            TokenEmbedding::Float(w) => embedding(w.val(), ids),
            TokenEmbedding::Quantized(q) => {
                let [b, s] = ids.dims();
                q.select_rows(ids.reshape([b * s]))
                    .reshape([b, s, q.dims()[1]])
            }
        }
    }

    /// Logits through the table as a tied output head: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub fn project(&self, h: Tensor<3>) -> Tensor<3> {
        match self {
            // W·hᵀ then transpose the (small) result: transposing the [vocab, hidden] table instead would
            // materialise a copy of it on every call.
            TokenEmbedding::Float(w) => w
                .val()
                .unsqueeze::<3>()
                .matmul(h.swap_dims(1, 2))
                .swap_dims(1, 2),
            TokenEmbedding::Quantized(q) => {
                let [b, s, d] = h.dims();
                q.matmul_t(h.reshape([b * s, d]))
                    .reshape([b, s, q.dims()[0]])
            }
        }
    }

    /// The float type of the looked-up rows.
    pub fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Float(w) => w.val().dtype(),
            TokenEmbedding::Quantized(q) => q.dtype(),
        }
    }

    /// The device the table lives on.
    pub fn device(&self) -> Device {
        match self {
            TokenEmbedding::Float(w) => w.val().device(),
            TokenEmbedding::Quantized(q) => q.device(),
        }
    }
}
