//! Attention of one new position over the KV cache (decoding), in one pass: as tensor ops it is a product,
//! a scale, casts, a five-op softmax, a second product and a copy to put the heads side by side, each a
//! launch on a GPU, for every layer of every token.

use burn::tensor::{DType, Tensor, activation};

use super::extension;
use crate::kernels;

/// `softmax(q · kᵀ · scale) · v` for one position: `q` `[batch, heads, 1, head_dim]`, `k`, `v`
/// `[batch, kv_heads, capacity, head_dim]` whose first `len` positions are filled (grouped-query: each
/// kv head serves `heads / kv_heads` query heads). Returns `[batch, 1, heads · head_dim]`, the heads side
/// by side as the output projection takes them.
pub fn decode_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
    scale: f32,
) -> Tensor<3> {
    let ([b, heads, one, d], [kb, kv_heads, capacity, kd]) = (q.dims(), k.dims());
    // Out-of-range reads on a GPU are undefined, so the shapes are checked here for every path.
    assert!(
        one == 1
            && kb == b
            && kd == d
            && v.dims() == k.dims()
            && kv_heads > 0
            && heads % kv_heads == 0
            && (1..=capacity).contains(&len),
        "decode attention: q {:?}, k {:?}, v {:?}, {len} positions",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let dtype = q.dtype();
    // The GPU kernel gives each unit of a 256-unit cube one dimension of a head.
    if kernels::applies(&q.device(), dtype)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && d <= extension::ATTENTION_MAX_HEAD_DIM
    {
        return extension::decode_attention(q, k, v, len, scale);
    }
    reference(q, k, v, len, scale)
}

/// [`decode_attention`] as generic tensor ops.
fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, len: usize, scale: f32) -> Tensor<3> {
    let ([b, heads, _, d], kv_heads) = (q.dims(), k.dims()[1]);
    let (k, v) = (k.narrow(2, 0, len), v.narrow(2, 0, len));
    // Each kv head's query heads as rows of one product: no copy of the cache per query head.
    let q = q.reshape([b, kv_heads, heads / kv_heads, d]);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let probs = activation::softmax(scores.cast(DType::F32), 3).cast(v.dtype());
    probs.matmul(v).reshape([b, 1, heads * d])
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::super::test_support::{assert_close, values};
    use super::*;

    /// The kernel against the tensor ops: grouped and plain heads, a cache filled to 1, 5 and past one
    /// chunk of the GPU kernel (1024 positions).
    pub fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (b, heads, kv_heads, d, capacity, len) in [
            (1, 4, 2, 8, 8, 1),
            (2, 3, 3, 16, 9, 5),
            (1, 8, 2, 64, 1300, 1300),
            (1, 2, 1, 128, 1100, 1030),
        ] {
            let t = |n: usize, seed: usize, shape: [usize; 4]| {
                let v: Vec<f32> = values(n + seed)[seed..].iter().map(|x| x / 8.0).collect();
                Tensor::<4>::from_data(TensorData::new(v, shape), device).cast(dtype)
            };
            let q = t(b * heads * d, 0, [b, heads, 1, d]);
            let k = t(b * kv_heads * capacity * d, 7, [b, kv_heads, capacity, d]);
            let v = t(b * kv_heads * capacity * d, 31, [b, kv_heads, capacity, d]);
            let scale = (d as f32).powf(-0.5);
            assert_close(
                &format!(
                    "decode attention {b}×{heads}/{kv_heads}×{d}, {len} of {capacity}, {dtype:?}"
                ),
                decode_attention(q.clone(), k.clone(), v.clone(), len, scale),
                // In f32 from the same rounded inputs: the kernel accumulates in f32, while the tensor ops
                // in f16 round every score (off by 1 % over 1300 positions).
                reference(
                    q.cast(DType::F32),
                    k.cast(DType::F32),
                    v.cast(DType::F32),
                    len,
                    scale,
                ),
                tol,
            );
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_kernel_matches_the_tensor_ops() {
        check_against_reference(&Device::flex(), DType::F32, 1e-5);
    }
}
