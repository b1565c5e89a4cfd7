//! A linear layer whose weight is in the float type or quantised ([`crate::quant`]).

use burn::module::{Module, Param};
use burn::tensor::{Tensor, module::linear};

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
        let bias = || self.bias.as_ref().map(Param::val);
        match &self.weight {
            LinearWeight::Float(w) => {
                let w = w.val();
                let mut dims = x.dims();
                let rows: usize = dims[..D - 1].iter().product();
                if rows <= ROW_MATMUL_MAX_ROWS {
                    // Decoding on a GPU: the one-row product kernel (`fused::row_matmul`).
                    let [k, n] = w.dims();
                    let flat = x.clone().reshape([rows, k]);
                    if row_matmul::takes_kernel(&flat, &w) {
                        dims[D - 1] = n;
                        let y = row_matmul::row_matmul(flat, w).reshape(dims);
                        return match bias() {
                            Some(b) => y + b.unsqueeze(),
                            None => y,
                        };
                    }
                }
                linear(x, w, bias())
            }
            LinearWeight::Quantized(q) => {
                let mut dims = x.dims();
                let rows: usize = dims[..D - 1].iter().product();
                dims[D - 1] = q.dims()[0];
                let y = q.matmul_t(x.reshape([rows, q.dims()[1]])).reshape(dims);
                match bias() {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
        }
    }
}
