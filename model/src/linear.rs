//! A linear layer whose weight is in the float type or quantised ([`crate::quant`]).

use burn::module::{Module, Param};
use burn::tensor::{Tensor, module::linear};

use crate::fused::activation::silu_mul;
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

    /// `silu(gate) · up` of this layer's output `[.., 2 · inner]`, whose halves are SwiGLU's gate and up
    /// projections side by side: `[.., inner]`. Decoding on a GPU takes the activation in the one-row
    /// product's last launch rather than a launch of its own.
    pub fn forward_silu_mul<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.bias.is_none()
            && let Some((flat, w)) = self.row_operands(&x)
        {
            let mut dims = x.dims();
            dims[D - 1] = w.dims()[1] / 2;
            return extension::row_matmul_silu(flat, w).reshape(dims);
        }
        silu_mul(self.forward(x))
    }

    /// `x` as `[rows, in]` and the float weight, when the one-row product kernel takes them.
    fn row_operands<const D: usize>(&self, x: &Tensor<D>) -> Option<(Tensor<2>, Tensor<2>)> {
        let LinearWeight::Float(w) = &self.weight else {
            return None;
        };
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let w = w.val();
        (rows <= ROW_MATMUL_MAX_ROWS)
            .then(|| x.clone().reshape([rows, w.dims()[0]]))
            .filter(|flat| row_matmul::takes_kernel(flat, &w))
            .map(|flat| (flat, w))
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(Param::val);
        let mut dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let y = match &self.weight {
            LinearWeight::Float(w) => {
                // Decoding on a GPU may take the one-row product kernel (`fused::row_matmul`).
                let Some((flat, w)) = self.row_operands(&x) else {
                    return linear(x, w.val(), bias);
                };
                dims[D - 1] = w.dims()[1];
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
