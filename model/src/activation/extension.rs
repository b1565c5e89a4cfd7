//! The fused activations as a Burn backend extension, so each backend runs its own kernel: the CPU backend
//! (Flex, [`super::cpu`]) and every CubeCL runtime (wgpu, Vulkan, CUDA: [`super::cube`]).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, backend_extension};
#[cfg(feature = "fusion")]
use burn::tensor::Shape;
use burn::tensor::Tensor;

/// One-pass activations (see [`super`]).
#[backend_extension(
    Flex: cfg(feature = "cpu"),
    Cube: cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda")),
    Fusion: cfg(feature = "fusion")
)]
pub trait ActivationOps: burn::backend::Backend {
    /// `silu(gate) · up` for `gate_up` `[.., 2 · inner]`: `[.., inner]`, in the input's type.
    #[fusion(dtype = gate_up, shape = half_last(gate_up))]
    fn silu_mul(gate_up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x · sigmoid(1.702 · x)`, same shape and type.
    #[fusion(dtype = x, shape = same(x))]
    fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The shape with its last dimension halved (declared to the fusion backend).
#[cfg(feature = "fusion")]
fn half_last(shape: &Shape) -> Shape {
    let mut dims = shape.to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Shape::from(dims)
}

/// The same shape (declared to the fusion backend).
#[cfg(feature = "fusion")]
fn same(shape: &Shape) -> Shape {
    shape.clone()
}

/// [`ActivationOps::silu_mul`] on a tensor.
pub fn silu_mul<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as ActivationOps>::silu_mul(
        gate_up.into_dispatch(),
    ))
}

/// [`ActivationOps::quick_gelu`] on a tensor.
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as ActivationOps>::quick_gelu(x.into_dispatch()))
}
