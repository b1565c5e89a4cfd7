//! The activations between the matrix products, each fused into one pass: SwiGLU's `silu(gate) · up` (the
//! decoder's MLP) and CLIP's `quick_gelu` (the vision tower's MLP). As generic tensor ops these are three or
//! four passes each, and on the CPU backend its sigmoid is a scalar, single-threaded loop: a quarter of the
//! prefill time of the `base` shape. The kernels ([`extension`], [`cpu`], [`cube`]) compute them in one
//! pass; other backends, autodiff devices (training) and CPU models in a 16-bit type take the tensor ops.

#[cfg(feature = "cpu")]
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
pub mod cube;
pub mod extension;

use burn::tensor::{Tensor, activation};

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
mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::*;

    /// Values over the whole useful range and past where the sigmoid saturates.
    pub(super) fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919) % 4001) as f32 / 200.0 - 10.0;
                if i % 53 == 0 { v * 12.0 } else { v }
            })
            .collect()
    }

    pub(super) fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// The fused activations against the tensor-op reference on `device` in `dtype`, to `tol` relative to
    /// the largest magnitude; rank 3 and an odd width, and a non-contiguous input (a transposed view).
    pub(super) fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        assert!(kernels::applies(device, dtype));
        let (batch, seq, inner) = (2, 5, 37);
        let h = Tensor::<3>::from_data(
            TensorData::new(values(batch * seq * 2 * inner), [batch, seq, 2 * inner]),
            device,
        )
        .cast(dtype);
        let cases = [
            (
                "silu_mul",
                silu_mul(h.clone()),
                silu_mul_reference(h.clone()),
            ),
            (
                "quick_gelu",
                quick_gelu(h.clone()),
                quick_gelu_reference(h.clone()),
            ),
            (
                "quick_gelu, transposed",
                quick_gelu(h.clone().swap_dims(1, 2)),
                quick_gelu_reference(h.clone().swap_dims(1, 2)),
            ),
            (
                "silu_mul, transposed",
                silu_mul(h.clone().swap_dims(0, 1)),
                silu_mul_reference(h.swap_dims(0, 1)),
            ),
        ];
        for (name, got, want) in cases {
            assert_eq!(got.dims(), want.dims(), "{name}");
            let (got, want) = (host(got), host(want));
            let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= tol * scale.min(b.abs().max(1.0)),
                    "{name}, {dtype:?}, [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_kernels_match_the_tensor_ops() {
        check_against_reference(&Device::flex(), DType::F32, 1e-6);
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn other_types_and_autodiff_take_the_tensor_ops() {
        let device = Device::flex();
        assert!(!kernels::applies(&device, DType::BF16));
        let h = Tensor::<2>::from_data(TensorData::new(values(2 * 6), [2, 6]), &device)
            .cast(DType::BF16);
        assert_eq!(silu_mul(h.clone()).dims(), [2, 3]);
        assert_eq!(quick_gelu(h).dims(), [2, 6]);
    }
}
