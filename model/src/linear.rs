//! A linear layer whose weight is in the float type or quantised ([`crate::quant`]).

use burn::module::{Module, Param};
use burn::tensor::{Tensor, module::linear};

use crate::fused::activation::silu_mul;
use crate::fused::extension;
use crate::fused::panel_matmul;
use crate::fused::row_matmul::{self, ROW_MATMUL_MAX_ROWS};
use crate::norm::RmsNorm;
use crate::quant::QuantizedMatrix;

/// Where a linear layer's weight lives.
#[derive(Module, Debug)]
pub enum LinearWeight {
    /// `[in, out]` in the float type: Burn's product takes it as it is (the CPU's layout).
    Float(Param<Tensor<2>>),
    /// `[out, in]` in the float type (PyTorch's layout), on CubeCL devices: decoding's one-row kernel
    /// reads a weight row per output ([`row_matmul`]); longer inputs take Burn's product over the
    /// transposed view.
    FloatRows(Param<Tensor<2>>),
    /// `[out, in]` packed (PyTorch's layout: groups run along the inputs each output sums over).
    Quantized(QuantizedMatrix),
    /// `[out / 16, in, 16]` in the float type: column panels, on AVX2-only CPUs ([`panel_matmul`]).
    Panels(Param<Tensor<3>>),
}

/// `y = x · W + b`.
#[derive(Module, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// A layer with a float weight `[in, out]`, laid out in column panels where the CPU reads those
    /// ([`panel_matmul::wanted`]).
    pub fn float(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        if panel_matmul::wanted(&weight.device(), weight.dtype(), weight.dims()[1]) {
            return Self::panels(panel_matmul::of_columns(weight), bias);
        }
        Self {
            weight: LinearWeight::Float(Param::from_tensor(weight)),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// A layer with a float weight stored a row per output, `[out, in]` (for CubeCL devices).
    pub fn float_rows(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: LinearWeight::FloatRows(Param::from_tensor(weight)),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// A layer with a float weight in column panels `[out / 16, in, 16]` ([`panel_matmul`]).
    pub fn panels(panels: Tensor<3>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: LinearWeight::Panels(Param::from_tensor(panels)),
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
                // Decoding on the CPU takes the threaded few-row product (`fused::cpu`).
                let w = w.val();
                let flat = x.clone().reshape([rows, dims[D - 1]]);
                if !row_matmul::takes_cpu_kernel(&flat, &w) {
                    return linear(x, w, bias);
                }
                dims[D - 1] = w.dims()[1];
                extension::few_rows_matmul(flat, w)
            }
            LinearWeight::FloatRows(w) => {
                // Decoding on a GPU takes the one-row product kernel (`fused::row_matmul`).
                let Some((flat, w)) = self.row_operands(&x) else {
                    return linear(x, w.val().transpose(), bias);
                };
                dims[D - 1] = w.dims()[0];
                extension::row_matmul(flat, w)
            }
            LinearWeight::Quantized(q) => {
                dims[D - 1] = q.dims()[0];
                q.matmul_t(x.reshape([rows, q.dims()[1]]))
            }
            LinearWeight::Panels(p) => {
                let [blocks, inputs, width] = p.dims();
                dims[D - 1] = blocks * width;
                panel_matmul::panel_matmul(x.reshape([rows, inputs]), p.val())
            }
        };
        let y = y.reshape(dims);
        match bias {
            Some(b) => y + b.unsqueeze(),
            None => y,
        }
    }

    /// The layer of `norm(x)`: on the one-row kernels' path the normalisation is taken in the product's
    /// launch rather than one of its own.
    pub fn forward_normed<const D: usize>(&self, x: Tensor<D>, norm: &RmsNorm) -> Tensor<D> {
        match self.fused_operands(&x) {
            Some(fused) => {
                let mut dims = x.dims();
                dims[D - 1] = fused.outputs();
                fused.normed(norm, false).reshape(dims)
            }
            None => self.forward(norm.forward(x)),
        }
    }

    /// SwiGLU's `silu(gate) · up` of the layer of `norm(x)`, whose outputs `[.., 2 · inner]` are the gate
    /// and up projections side by side: `[.., inner]`. On the one-row kernels' path, one launch.
    pub fn forward_normed_silu<const D: usize>(&self, x: Tensor<D>, norm: &RmsNorm) -> Tensor<D> {
        match self.fused_operands(&x) {
            Some(fused) => {
                let mut dims = x.dims();
                dims[D - 1] = fused.outputs() / 2;
                fused.normed(norm, true).reshape(dims)
            }
            None => silu_mul(self.forward(norm.forward(x))),
        }
    }

    /// `residual + ` the layer of `x` (the residual stream after a sublayer's output projection). On the
    /// one-row kernels' path the addition is taken in the product's launch.
    pub fn forward_residual<const D: usize>(&self, residual: Tensor<D>, x: Tensor<D>) -> Tensor<D> {
        match self.fused_operands(&x) {
            Some(fused) if residual.dims()[D - 1] == fused.outputs() => {
                let dims = residual.dims();
                let flat_residual = residual.reshape([fused.rows(), fused.outputs()]);
                fused.plus(flat_residual).reshape(dims)
            }
            _ => residual + self.forward(x),
        }
    }

    /// Whether this layer's product of `x` takes a one-row kernel (the float [`row_matmul`] or the packed
    /// product), where the fused steps ([`Self::forward_normed`], [`Self::forward_normed_silu`],
    /// [`Self::forward_residual`]) come along.
    pub fn takes_row_kernel<const D: usize>(&self, x: &Tensor<D>) -> bool {
        self.fused_operands(x).is_some()
    }

    /// The operands of the fused steps, which have no bias term, when a one-row kernel takes them.
    fn fused_operands<const D: usize>(&self, x: &Tensor<D>) -> Option<FusedOperands<'_>> {
        if self.bias.is_some() {
            return None;
        }
        if let LinearWeight::Quantized(q) = &self.weight {
            let dims = x.dims();
            let rows: usize = dims[..D - 1].iter().product();
            let flat = x.clone().reshape([rows, q.dims()[1]]);
            let weight = FusedWeight::Packed(q);
            return q.fuses(&flat).then_some(FusedOperands { x: flat, weight });
        }
        self.row_operands(x).map(|(x, w)| FusedOperands {
            x,
            weight: FusedWeight::Rows(Box::new(w)),
        })
    }

    /// `x` as `[rows, in]` and the `[out, in]` weight, when the one-row product kernel takes them.
    fn row_operands<const D: usize>(&self, x: &Tensor<D>) -> Option<(Tensor<2>, Tensor<2>)> {
        let LinearWeight::FloatRows(w) = &self.weight else {
            return None;
        };
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let w = w.val();
        (rows <= ROW_MATMUL_MAX_ROWS)
            .then(|| x.clone().reshape([rows, w.dims()[1]]))
            .filter(|flat| row_matmul::takes_kernel(flat, &w))
            .map(|flat| (flat, w))
    }
}

/// The operands of a fused step: the input as `[rows, in]` and the weight.
struct FusedOperands<'a> {
    x: Tensor<2>,
    weight: FusedWeight<'a>,
}

/// The weight of a fused step: float `[out, in]` (the one-row product, [`row_matmul`]) or packed (its
/// product kernel).
enum FusedWeight<'a> {
    Rows(Box<Tensor<2>>),
    Packed(&'a QuantizedMatrix),
}

impl FusedOperands<'_> {
    /// Input rows.
    fn rows(&self) -> usize {
        self.x.dims()[0]
    }

    /// The weight's outputs (rows).
    fn outputs(&self) -> usize {
        match &self.weight {
            FusedWeight::Rows(w) => w.dims()[0],
            FusedWeight::Packed(q) => q.dims()[0],
        }
    }

    /// The product of `norm(x)`, then with `silu` SwiGLU's activation of its halves: one launch.
    fn normed(self, norm: &RmsNorm, silu: bool) -> Tensor<2> {
        let gamma = norm.weight.val();
        match self.weight {
            FusedWeight::Rows(w) => {
                extension::norm_row_matmul(self.x, gamma, *w, norm.eps as f32, silu)
            }
            FusedWeight::Packed(q) => q.norm_matmul_t(self.x, gamma, norm.eps, silu),
        }
    }

    /// `residual` `[rows, outputs]` plus the product: one launch.
    fn plus(self, residual: Tensor<2>) -> Tensor<2> {
        match self.weight {
            FusedWeight::Rows(w) => extension::row_matmul_add(self.x, *w, residual),
            FusedWeight::Packed(q) => q.matmul_t_add(self.x, residual),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor, module::linear};

    use super::{Linear, LinearWeight};
    use crate::fused::panel_matmul;
    use crate::fused::row_matmul::{CPU_MAX_ROWS, takes_cpu_kernel};

    /// The float layer on the CPU takes this crate's products up to [`CPU_MAX_ROWS`] rows (one row,
    /// register tiles in AVX-512 or AVX2 or, without either, Burn's) and past it the AMX product where the CPU has one,
    /// else Burn's: every row count gives Burn's values, with the bias and the batch dimension kept.
    #[test]
    fn float_layers_on_the_cpu_match_burns_product_at_every_row_count() {
        let device = Device::flex();
        let (k, n) = (203, 150);
        let w = Tensor::<2>::random([k, n], Distribution::Uniform(-1.0, 1.0), &device);
        let b = Tensor::<1>::random([n], Distribution::Uniform(-1.0, 1.0), &device);
        let layer = Linear::float(w.clone(), Some(b.clone()));
        for rows in [1, 2, 5, 8, 9, 45, CPU_MAX_ROWS, CPU_MAX_ROWS + 1, 242] {
            let x = Tensor::<3>::random([1, rows, k], Distribution::Uniform(-1.0, 1.0), &device);
            let flat = x.clone().reshape([rows, k]);
            assert_eq!(
                takes_cpu_kernel(&flat, &w),
                rows <= CPU_MAX_ROWS || crate::kernels::has_amx_bf16(),
                "{rows} rows"
            );
            let want = linear(x.clone(), w.clone(), Some(b.clone()));
            let got = layer.forward(x);
            assert_eq!(got.dims(), [1, rows, n]);
            got.into_data().assert_approx_eq::<f32>(
                &want.into_data(),
                burn::tensor::Tolerance::absolute(1e-4),
            );
        }
    }

    /// A float layer whose outputs are a multiple of 16 is stored in column panels exactly where
    /// [`panel_matmul::wanted`] says (AVX2-only CPUs), and gives Burn's values at every row count either
    /// way; so does one built from panels directly on any CPU (Burn's product over the panels laid back
    /// out where the CPU lacks AVX2).
    #[test]
    fn layers_over_panels_match_burns_product_at_every_row_count() {
        let device = Device::flex();
        let (k, n) = (203, 160);
        let w = Tensor::<2>::random([k, n], Distribution::Uniform(-1.0, 1.0), &device);
        let b = Tensor::<1>::random([n], Distribution::Uniform(-1.0, 1.0), &device);
        let layer = Linear::float(w.clone(), Some(b.clone()));
        assert_eq!(
            matches!(layer.weight, LinearWeight::Panels(_)),
            panel_matmul::wanted(&device, w.dtype(), n)
        );
        let direct = Linear::panels(panel_matmul::of_columns(w.clone()), Some(b.clone()));
        for rows in [1, 2, 7, 9, 45, CPU_MAX_ROWS + 1, 242] {
            let x = Tensor::<3>::random([1, rows, k], Distribution::Uniform(-1.0, 1.0), &device);
            let want = linear(x.clone(), w.clone(), Some(b.clone())).into_data();
            for got in [layer.forward(x.clone()), direct.forward(x)] {
                assert_eq!(got.dims(), [1, rows, n]);
                got.into_data()
                    .assert_approx_eq::<f32>(&want, burn::tensor::Tolerance::absolute(1e-4));
            }
        }
    }
}
