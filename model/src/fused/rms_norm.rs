//! RMSNorm in one pass per row: `x / sqrt(mean(x²) + eps)` in f32, back to the input's type, times the
//! weight (Hugging Face's `LlamaRMSNorm` order); and the residual sum before it in the same pass.

use burn::tensor::{DType, Tensor};

use super::extension;
use crate::kernels;

/// RMSNorm over the last dimension of `x` with `weight` `[d]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    if kernels::applies(&x.device(), x.dtype()) && weight.dtype() == x.dtype() {
        return extension::rms_norm(x, weight, eps as f32);
    }
    reference(x, weight, eps)
}

/// `x + delta` (the residual stream after a block) and its RMSNorm with `weight`, in one pass.
pub fn add_rms_norm<const D: usize>(
    x: Tensor<D>,
    delta: Tensor<D>,
    weight: Tensor<1>,
    eps: f64,
) -> (Tensor<D>, Tensor<D>) {
    let dtype = x.dtype();
    if kernels::applies(&x.device(), dtype)
        && delta.dtype() == dtype
        && weight.dtype() == dtype
        && x.dims() == delta.dims()
    {
        return extension::add_rms_norm(x, delta, weight, eps as f32);
    }
    let sum = x + delta;
    (sum.clone(), reference(sum, weight, eps))
}

/// [`rms_norm`] as generic tensor ops.
fn reference<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let rms = (x32.clone().square().mean_dim(D - 1) + eps).sqrt();
    (x32 / rms).cast(dtype) * weight.unsqueeze()
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::super::test_support::{assert_close, values};
    use super::*;

    /// The kernel against the tensor ops: one row and many, widths below and above a cube's 256 units, a
    /// transposed input.
    pub fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (rows, d) in [(1, 768), (7, 37), (300, 64), (2, 1000)] {
            let x = Tensor::<2>::from_data(TensorData::new(values(rows * d), [rows, d]), device)
                .cast(dtype);
            let w =
                Tensor::<1>::from_data(TensorData::new(values(d + 3)[3..].to_vec(), [d]), device)
                    .cast(dtype)
                    / 10.0;
            let name = format!("rms_norm {rows}×{d}, {dtype:?}");
            let delta = (x.clone() * 0.37).flip([1]);
            let (sum, normed) = add_rms_norm(x.clone(), delta.clone(), w.clone(), 1e-5);
            assert_close(
                &format!("{name}, residual sum"),
                sum,
                x.clone() + delta.clone(),
                tol,
            );
            assert_close(
                &format!("{name}, after the residual"),
                normed,
                reference(x.clone() + delta, w.clone(), 1e-5),
                tol,
            );
            assert_close(
                &name,
                rms_norm(x.clone(), w.clone(), 1e-5),
                reference(x.clone(), w.clone(), 1e-5),
                tol,
            );
            if rows > 1 && d <= 64 {
                let xt = x.reshape([d, rows]).swap_dims(0, 1);
                assert_close(
                    &format!("{name}, transposed"),
                    rms_norm(xt.clone(), w.clone(), 1e-6),
                    reference(xt, w, 1e-6),
                    tol,
                );
            }
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_kernel_matches_the_tensor_ops() {
        check_against_reference(&Device::flex(), DType::F32, 2e-6);
    }
}
