//! The packed-matrix operations as a Burn backend extension, so each backend runs its own kernel: the CPU
//! backend (Flex, [`super::cpu`]) and every CubeCL runtime (wgpu, Vulkan, CUDA: [`super::cube`]). Generic
//! tensor ops unpack a matrix in a dozen passes over it; these read each code once. Other backends (and
//! autodiff devices: [`crate::kernels::applies`]) take the tensor-op path in [`super::QuantizedMatrix`].

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Dispatch, backend_extension};
#[cfg(feature = "fusion")]
use burn::tensor::Shape;
use burn::tensor::{Int, Tensor};

use crate::fused::extension::{FusedOps, norm_then};

/// Inputs of at most this many rows take the fused product (decoding); longer ones dequantise the matrix
/// and use the backend's matrix product.
pub const FUSED_MAX_ROWS: usize = 8;

/// Products and unpacking of a packed `[n, k]` matrix given by its parts (layout in [`super::pack`]).
#[backend_extension(
    Flex: cfg(feature = "cpu"),
    Cube: cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda")),
    Fusion: cfg(feature = "fusion")
)]
pub trait PackedOps: burn::backend::Backend + FusedOps {
    /// `x` `[m, k]` times the transpose of the packed matrix: `[m, n]`. `x` is in the type of `supers`.
    #[fusion(dtype = supers, shape = product_shape(x, codes))]
    fn packed_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self>;

    /// [`PackedOps::packed_matmul`] of `x`'s RMSNorm with `norm` `[k]` (`eps`): `[m, n]`; with `silu`,
    /// `silu(gate) · up` of the product's halves (the packed rows are SwiGLU's gate rows, then its up
    /// rows): `[m, n / 2]`. By default [`FusedOps::rms_norm`], the product and [`FusedOps::silu_mul`];
    /// one launch on CubeCL runtimes for inputs of at most [`FUSED_MAX_ROWS`] rows (decoding).
    #[fusion(dtype = x, shape = normed_product_shape(x, codes, *silu))]
    #[allow(clippy::too_many_arguments)]
    fn packed_norm_matmul(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self> {
        let product =
            |x| Self::packed_matmul(x, codes, group_params, supers, bits, groups_per_super);
        norm_then::<Self>(x, norm, eps, silu, product)
    }

    /// `residual + ` [`PackedOps::packed_matmul`] with `residual` `[m, n]` (the residual stream after a
    /// sublayer's output projection). By default the product, then an addition; one launch on CubeCL
    /// runtimes for inputs of at most [`FUSED_MAX_ROWS`] rows.
    #[fusion(dtype = x, shape = residual)]
    fn packed_matmul_add(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let y = Self::packed_matmul(x, codes, group_params, supers, bits, groups_per_super);
        Self::float_add(residual, y)
    }

    /// The packed matrix as floats, `[n, k]`, in the type of `supers`.
    #[fusion(dtype = supers, shape = dense_shape(codes))]
    fn packed_dequantize(
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self>;
}

/// `[m, n]` for `x` `[m, k]` and `codes` `[n, k / 32, bits]` (declared to the fusion backend).
#[cfg(feature = "fusion")]
fn product_shape(x: &Shape, codes: &Shape) -> Shape {
    Shape::new([x[0], codes[0]])
}

/// `[m, n]` for `x` `[m, k]` and `codes` `[n, k / 32, bits]`, or `[m, n / 2]` with `silu` (declared to
/// the fusion backend).
#[cfg(feature = "fusion")]
fn normed_product_shape(x: &Shape, codes: &Shape, silu: bool) -> Shape {
    Shape::new([x[0], if silu { codes[0] / 2 } else { codes[0] }])
}

/// `[n, k]` for `codes` `[n, k / 32, bits]` (declared to the fusion backend).
#[cfg(feature = "fusion")]
fn dense_shape(codes: &Shape) -> Shape {
    Shape::new([codes[0], codes[1] * super::pack::GROUP])
}

/// `x` `[m, k]` times the transpose of the packed matrix given by its parts: `[m, n]`.
pub fn packed_matmul(
    x: Tensor<2>,
    codes: Tensor<3, Int>,
    group_params: Tensor<2, Int>,
    supers: Tensor<3>,
    bits: usize,
    groups_per_super: usize,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as PackedOps>::packed_matmul(
        x.into_dispatch(),
        codes.into_dispatch(),
        group_params.into_dispatch(),
        supers.into_dispatch(),
        bits,
        groups_per_super,
    ))
}

/// The packed matrix given by its parts as floats, `[n, k]`, in the type of `supers`.
pub fn packed_dequantize(
    codes: Tensor<3, Int>,
    group_params: Tensor<2, Int>,
    supers: Tensor<3>,
    bits: usize,
    groups_per_super: usize,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as PackedOps>::packed_dequantize(
        codes.into_dispatch(),
        group_params.into_dispatch(),
        supers.into_dispatch(),
        bits,
        groups_per_super,
    ))
}

/// [`PackedOps::packed_norm_matmul`] on tensors.
#[allow(clippy::too_many_arguments)]
pub fn packed_norm_matmul(
    x: Tensor<2>,
    norm: Tensor<1>,
    codes: Tensor<3, Int>,
    group_params: Tensor<2, Int>,
    supers: Tensor<3>,
    bits: usize,
    groups_per_super: usize,
    eps: f32,
    silu: bool,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as PackedOps>::packed_norm_matmul(
        x.into_dispatch(),
        norm.into_dispatch(),
        codes.into_dispatch(),
        group_params.into_dispatch(),
        supers.into_dispatch(),
        bits,
        groups_per_super,
        eps,
        silu,
    ))
}

/// [`PackedOps::packed_matmul_add`] on tensors.
pub fn packed_matmul_add(
    x: Tensor<2>,
    codes: Tensor<3, Int>,
    group_params: Tensor<2, Int>,
    supers: Tensor<3>,
    residual: Tensor<2>,
    bits: usize,
    groups_per_super: usize,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as PackedOps>::packed_matmul_add(
        x.into_dispatch(),
        codes.into_dispatch(),
        group_params.into_dispatch(),
        supers.into_dispatch(),
        residual.into_dispatch(),
        bits,
        groups_per_super,
    ))
}
