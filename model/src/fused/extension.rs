//! The fused kernels as a Burn backend extension, so each backend runs its own: the CPU backend (Flex,
//! [`super::cpu`]) and every CubeCL runtime (wgpu, Vulkan, CUDA: [`super::cube`]). Callers go through the
//! functions in [`super::activation`], [`super::rms_norm`], [`super::rope`], [`super::attention`] and
//! [`super::row_matmul`], which
//! check [`crate::kernels::applies`] first.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Slice, Tensor};

#[cfg(feature = "fusion")]
use burn::backend::fusion::custom::TensorSpec;

/// Largest head dimension [`FusedOps::decode_attention`] takes.
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;

/// One-pass element-wise and per-row operations (see [`super`]).
#[backend_extension(
    Flex: cfg(feature = "cpu"),
    Cube: cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda")),
    Fusion: cfg(feature = "fusion")
)]
pub trait FusedOps: burn::backend::Backend {
    /// `silu(gate) · up` for `gate_up` `[.., 2 · inner]`: `[.., inner]`, in the input's type.
    #[fusion(dtype = gate_up, shape = half_last(gate_up))]
    fn silu_mul(gate_up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x · sigmoid(1.702 · x)`, same shape and type.
    #[fusion(dtype = x, shape = x)]
    fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// RMSNorm over the last dimension with `weight` `[d]` (same type as `x`).
    #[fusion(dtype = x, shape = x)]
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;

    /// `x + delta` and its RMSNorm with `weight` `[d]` (all one type).
    #[fusion(meta = |x, _delta, _weight, _eps| (x.clone(), x.clone()))]
    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `heads` heads from column `start` of `qkv` `[b, s, w]`, rotated at positions `offset..` with
    /// `cos`, `sin` `[positions, head_dim]`: `[b, heads, s, head_dim]`.
    #[fusion(dtype = qkv, shape = heads_shape(qkv, cos, *heads))]
    fn rope_heads(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        start: usize,
        heads: usize,
        offset: usize,
    ) -> FloatTensor<Self>;

    /// `x` `[m, k]` times the transpose of `w` `[n, k]` (a weight row per output, PyTorch's layout) for a
    /// few rows (decoding): `[m, n]`, in `x`'s type.
    #[fusion(dtype = x, shape = row_product_shape(x, w, false))]
    fn row_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x` `[m, k]` times `w` `[k, n]` (the CPU backend's `[in, out]` layout) for up to
    /// [`super::row_matmul::CPU_MAX_ROWS`] rows (decoding, a question), or any number where the CPU has
    /// AMX: `[m, n]`. By default Burn's product; on the CPU backend, one row streams tiles of the weight
    /// on every thread (`cpu/few_rows.rs`, also up to 8 rows without AVX-512), more take register tiles
    /// in AVX-512 or AVX2 (`cpu/tiled_matmul.rs`), and past that AMX's tiles (`cpu/amx_matmul.rs`).
    #[fusion(dtype = x, shape = Shape::new([x[0], w[1]]))]
    fn few_rows_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }

    /// `x` `[m, k]` times the weight stored in column panels `panels` `[n / w, k, w]`
    /// ([`super::panel_matmul`]): `[m, n]`. By default Burn's product over the panels laid back out as
    /// `[k, n]`; on the CPU backend the AVX2 register tiles read them in place (`cpu/tiled_matmul.rs`).
    #[fusion(dtype = x, shape = Shape::new([x[0], panels[0] * panels[2]]))]
    fn panel_matmul(x: FloatTensor<Self>, panels: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, panel_columns::<Self>(panels))
    }

    /// [`FusedOps::row_matmul`] of `x`'s RMSNorm with `norm` `[k]`: `[m, n]`; with `silu`, `silu(gate) ·
    /// up` of the product's halves (`w` holds SwiGLU's gate rows, then its up rows): `[m, n / 2]`. By
    /// default [`FusedOps::rms_norm`], the product and [`FusedOps::silu_mul`]; one launch on CubeCL
    /// runtimes.
    #[fusion(dtype = x, shape = row_product_shape(x, w, *silu))]
    fn norm_row_matmul(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self> {
        norm_then::<Self>(x, norm, eps, silu, |x| Self::row_matmul(x, w))
    }

    /// `residual + ` [`FusedOps::row_matmul`]`(x, w)` with `residual` `[m, n]` (the residual stream after
    /// a sublayer's output projection). By default the product, then an addition; one launch on CubeCL
    /// runtimes.
    #[fusion(dtype = x, shape = residual)]
    fn row_matmul_add(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(residual, Self::row_matmul(x, w))
    }

    /// Attention of one position `q` `[b, heads, 1, d]` over the first `len` positions of the caches `k`,
    /// `v` `[b, kv_heads, capacity, d]`: `[b, 1, heads · d]`.
    #[fusion(dtype = q, shape = decode_shape(q))]
    fn decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        len: usize,
        scale: f32,
    ) -> FloatTensor<Self>;

    /// One decoding step's attention from the fused projection `qkv` `[b, 1, (heads + 2 · kv_heads) · d]`
    /// at `position`: q and k rotated with `cos`, `sin` `[positions, d]`, the new key and value written
    /// into the caches `k`, `v` `[b, kv_heads, capacity, d]` at `position`, and the query attending
    /// positions `0..=position`. Returns the attention `[b, 1, heads · d]` and the caches. By default
    /// [`FusedOps::rope_heads`] twice, two cache writes and [`FusedOps::decode_attention`]; one kernel on
    /// CubeCL runtimes (with the fusion backend too: declared to it as one opaque operation).
    #[fusion(meta = |qkv, _cos, _sin, k, v, heads, _position, _scale| step_meta(qkv, k, v, *heads))]
    #[allow(clippy::too_many_arguments)]
    fn decode_step(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        position: usize,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (b, d, kv_heads) = (qkv.shape()[0], cos.shape()[1], k.shape()[1]);
        let q = Self::rope_heads(qkv.clone(), cos.clone(), sin.clone(), 0, heads, position);
        let new_k = Self::rope_heads(qkv.clone(), cos, sin, heads * d, kv_heads, position);
        let start = (heads + kv_heads) * d;
        let new_v = Self::float_slice(
            qkv,
            &[
                Slice::from(0..b),
                Slice::from(0..1),
                Slice::from(start..start + kv_heads * d),
            ],
        );
        let new_v = Self::float_swap_dims(
            Self::float_reshape(new_v, Shape::new([b, 1, kv_heads, d])),
            1,
            2,
        );
        let at = [
            Slice::from(0..b),
            Slice::from(0..kv_heads),
            Slice::from(position..position + 1),
            Slice::from(0..d),
        ];
        let k = Self::float_slice_assign(k, &at, new_k);
        let v = Self::float_slice_assign(v, &at, new_v);
        let out = Self::decode_attention(q, k.clone(), v.clone(), position + 1, scale);
        (out, k, v)
    }
}

/// `product` of `x`'s RMSNorm with `norm` (`eps`), then with `silu` SwiGLU's activation of its halves, each
/// step in its own pass: what the one-launch normed products ([`FusedOps::norm_row_matmul`], the packed
/// one in `quant`) do where one launch does not take them.
pub(crate) fn norm_then<B: FusedOps>(
    x: FloatTensor<B>,
    norm: FloatTensor<B>,
    eps: f32,
    silu: bool,
    product: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let y = product(B::rms_norm(x, norm, eps));
    if silu { B::silu_mul(y) } else { y }
}

/// Column panels `[n / w, k, w]` laid back out as the `[k, n]` weight they hold.
pub(crate) fn panel_columns<B: FusedOps>(panels: FloatTensor<B>) -> FloatTensor<B> {
    let shape = panels.shape();
    let (k, n) = (shape[1], shape[0] * shape[2]);
    B::float_reshape(B::float_swap_dims(panels, 0, 1), Shape::new([k, n]))
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

/// `[b, heads, s, head_dim]` for `qkv` `[b, s, w]` and tables `[positions, head_dim]` (declared to the
/// fusion backend).
#[cfg(feature = "fusion")]
fn heads_shape(qkv: &Shape, table: &Shape, heads: usize) -> Shape {
    Shape::new([qkv[0], heads, qkv[1], table[1]])
}

/// `[m, n]` for `x` `[m, k]` and `w` `[n, k]`, or `[m, n / 2]` with `silu` (declared to the fusion
/// backend).
#[cfg(feature = "fusion")]
fn row_product_shape(x: &Shape, w: &Shape, silu: bool) -> Shape {
    Shape::new([x[0], if silu { w[0] / 2 } else { w[0] }])
}

/// [`FusedOps::decode_step`]'s outputs for `qkv` `[b, 1, w]` and caches `k`, `v` `[b, kv_heads, capacity,
/// d]`: the attention `[b, 1, heads · d]` in `qkv`'s type and the caches as they were (declared to the
/// fusion backend).
#[cfg(feature = "fusion")]
fn step_meta(
    qkv: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    heads: usize,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let out = Shape::new([qkv.shape[0], 1, heads * k.shape[3]]);
    (TensorSpec::new(out, qkv.dtype), k.clone(), v.clone())
}

/// `[b, 1, heads · d]` for `q` `[b, heads, 1, d]` (declared to the fusion backend).
#[cfg(feature = "fusion")]
fn decode_shape(q: &Shape) -> Shape {
    Shape::new([q[0], 1, q[1] * q[3]])
}

/// [`FusedOps::silu_mul`] on a tensor.
pub fn silu_mul<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::silu_mul(gate_up.into_dispatch()))
}

/// [`FusedOps::quick_gelu`] on a tensor.
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::quick_gelu(x.into_dispatch()))
}

/// [`FusedOps::rms_norm`] on a tensor.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f32) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::rms_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        eps,
    ))
}

/// [`FusedOps::add_rms_norm`] on tensors.
pub fn add_rms_norm<const D: usize>(
    x: Tensor<D>,
    delta: Tensor<D>,
    weight: Tensor<1>,
    eps: f32,
) -> (Tensor<D>, Tensor<D>) {
    let (sum, normed) = <Dispatch as FusedOps>::add_rms_norm(
        x.into_dispatch(),
        delta.into_dispatch(),
        weight.into_dispatch(),
        eps,
    );
    (Tensor::from_dispatch(sum), Tensor::from_dispatch(normed))
}

/// [`FusedOps::rope_heads`] on tensors.
pub fn rope_heads(
    qkv: Tensor<3>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    start: usize,
    heads: usize,
    offset: usize,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::rope_heads(
        qkv.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        start,
        heads,
        offset,
    ))
}

/// [`FusedOps::decode_attention`] on tensors.
pub fn decode_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
    scale: f32,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::decode_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        len,
        scale,
    ))
}

/// [`FusedOps::decode_step`] on tensors.
#[allow(clippy::too_many_arguments)]
pub fn decode_step(
    qkv: Tensor<3>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    k: Tensor<4>,
    v: Tensor<4>,
    heads: usize,
    position: usize,
    scale: f32,
) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
    let (out, k, v) = <Dispatch as FusedOps>::decode_step(
        qkv.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        heads,
        position,
        scale,
    );
    (
        Tensor::from_dispatch(out),
        Tensor::from_dispatch(k),
        Tensor::from_dispatch(v),
    )
}

/// [`FusedOps::row_matmul`] on tensors.
pub fn row_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::row_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// [`FusedOps::few_rows_matmul`] on tensors.
pub fn few_rows_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::few_rows_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// [`FusedOps::panel_matmul`] on tensors.
pub fn panel_matmul(x: Tensor<2>, panels: Tensor<3>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::panel_matmul(
        x.into_dispatch(),
        panels.into_dispatch(),
    ))
}

/// [`FusedOps::norm_row_matmul`] on tensors.
pub fn norm_row_matmul(
    x: Tensor<2>,
    norm: Tensor<1>,
    w: Tensor<2>,
    eps: f32,
    silu: bool,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::norm_row_matmul(
        x.into_dispatch(),
        norm.into_dispatch(),
        w.into_dispatch(),
        eps,
        silu,
    ))
}

/// [`FusedOps::row_matmul_add`] on tensors.
pub fn row_matmul_add(x: Tensor<2>, w: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::row_matmul_add(
        x.into_dispatch(),
        w.into_dispatch(),
        residual.into_dispatch(),
    ))
}
