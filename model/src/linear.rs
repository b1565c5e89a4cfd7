//! A linear layer whose weight is in the float type or quantised ([`crate::quant`]).

use burn::module::{Module, Param};
use burn::tensor::{Tensor, module::linear};

use crate::fused::extension;
use crate::fused::row_matmul::{self, ROW_MATMUL_MAX_ROWS};
use crate::quant::QuantizedMatrix;

/// Where a linear layer's weight lives.
#[derive(Module, Debug)]
pub enum LinearWeight {
    /// `[in, out]` in the float type.
    Float(Param<Tensor<2>>),
    /// `[out, in]` packed (PyTorch's layout: groups run along the inputs each output sums over).
    Quantized(QuantizedMatrix),
}

/// `y = x · W + b`.
#[derive(Module, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// A layer with a float weight `[in, out]`.
    pub fn float(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: LinearWeight::Float(Param::from_tensor(weight)),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// A layer with a quantised weight (`[out, in]`).
    pub fn quantized(weight: QuantizedMatrix, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: LinearWeight::Quantized(weight),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(Param::val);
        let mut dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let y = match &self.weight {
            LinearWeight::Float(w) => {
                let w = w.val();
                let [k, n] = w.dims();
                // Decoding on a GPU may take the one-row product kernel (`fused::row_matmul`).
                let flat = (rows <= ROW_MATMUL_MAX_ROWS)
                    .then(|| x.clone().reshape([rows, k]))
                    .filter(|flat| row_matmul::takes_kernel(flat, &w));
                let Some(flat) = flat else {
                    return linear(x, w, bias);
                };
                dims[D - 1] = n;
                extension::row_matmul(flat, w).reshape(dims)
            }
            LinearWeight::Quantized(q) => {
                dims[D - 1] = q.dims()[0];
                q.matmul_t(x.reshape([rows, q.dims()[1]])).reshape(dims)
            }
        };
        match bias {
            Some(b) => y + b.unsqueeze(),
            None => y,
        }
    }
}
