//! SwiGLU's `silu(gate) · up` (the decoder's MLP) and CLIP's `quick_gelu` (the vision tower's MLP), each one
//! pass (see [`super`]).

use burn::tensor::{Tensor, activation};

use super::extension;
use crate::kernels;

/// `silu(gate) · up` for `gate_up` `[.., 2 · inner]` holding the gate and up projections side by side:
/// `[.., inner]`.
pub fn silu_mul<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    if kernels::applies(&gate_up.device(), gate_up.dtype()) {
        return extension::silu_mul(gate_up);
    }
    silu_mul_reference(gate_up)
}

/// CLIP's `quick_gelu`: `x · sigmoid(1.702 · x)`.
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if kernels::applies(&x.device(), x.dtype()) {
        return extension::quick_gelu(x);
    }
    quick_gelu_reference(x)
}

/// [`silu_mul`] as generic tensor ops.
fn silu_mul_reference<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    let inner = gate_up.dims()[D - 1] / 2;
    let gate = activation::silu(gate_up.clone().narrow(D - 1, 0, inner));
    gate * gate_up.narrow(D - 1, inner, inner)
}

/// [`quick_gelu`] as generic tensor ops.
fn quick_gelu_reference<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * activation::sigmoid(x * 1.702)
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::super::test_support::{assert_close, values};
    use super::*;

    /// The kernels against the tensor ops on `device` in `dtype`: rank 3 with an odd width, and
    /// non-contiguous inputs (transposed views).
    pub fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        assert!(kernels::applies(device, dtype));
        let (batch, seq, inner) = (2, 5, 37);
        let h = Tensor::<3>::from_data(
            TensorData::new(values(batch * seq * 2 * inner), [batch, seq, 2 * inner]),
            device,
        )
        .cast(dtype);
        let t = |name: &str| format!("{name}, {dtype:?}");
        assert_close(
            &t("silu_mul"),
            silu_mul(h.clone()),
            silu_mul_reference(h.clone()),
            tol,
        );
        assert_close(
            &t("quick_gelu"),
            quick_gelu(h.clone()),
            quick_gelu_reference(h.clone()),
            tol,
        );
        assert_close(
            &t("quick_gelu, transposed"),
            quick_gelu(h.clone().swap_dims(1, 2)),
            quick_gelu_reference(h.clone().swap_dims(1, 2)),
            tol,
        );
        assert_close(
            &t("silu_mul, transposed"),
            silu_mul(h.clone().swap_dims(0, 1)),
            silu_mul_reference(h.swap_dims(0, 1)),
            tol,
        );
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_kernels_match_the_tensor_ops() {
        check_against_reference(&Device::flex(), DType::F32, 1e-6);
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn other_types_take_the_tensor_ops() {
        let device = Device::flex();
        assert!(!kernels::applies(&device, DType::BF16));
        let h = Tensor::<2>::from_data(TensorData::new(values(2 * 6), [2, 6]), &device)
            .cast(DType::BF16);
        assert_eq!(silu_mul(h.clone()).dims(), [2, 3]);
        assert_eq!(quick_gelu(h).dims(), [2, 6]);
    }
}
