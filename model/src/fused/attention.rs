//! Attention of one new position over the KV cache (decoding), in one pass: as tensor ops it is a product,
//! a scale, casts, a five-op softmax, a second product and a copy to put the heads side by side, each a
//! launch on a GPU, for every layer of every token. On CubeCL runtimes [`decode_step`] also takes the
//! rotary embedding of q and k and the cache writes into the same launch: decoding on a GPU is bound by
//! the number of launches (~40 µs each back to back through wgpu on the H200; BENCHMARKS.md, GPU), and
//! those were four more per layer.

use burn::tensor::{DType, Tensor, activation};

use super::extension;
use super::rope::rope_heads;
use crate::kernels;

/// One decoding step's attention from the fused projection `qkv` `[batch, 1, (heads + 2 · kv_heads) ·
/// head_dim]` (q, k, v heads side by side) at `position`: q and k rotated with the tables `cos`, `sin`
/// `[positions, head_dim]`, the new key and value written into the caches `k`, `v` `[batch, kv_heads,
/// capacity, head_dim]` at `position` (in place where nothing else holds them), and the query attending
/// positions `0..=position`. Returns `[batch, 1, heads · head_dim]` and the caches.
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
    let ([b, one, width], [kb, kv_heads, capacity, d]) = (qkv.dims(), k.dims());
    let [positions, table_d] = cos.dims();
    // Out-of-range reads and writes on a GPU are undefined, so the shapes are checked for every path.
    assert!(
        one == 1
            && kb == b
            && v.dims() == k.dims()
            && sin.dims() == cos.dims()
            && table_d == d
            && d.is_multiple_of(2)
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && width == (heads + 2 * kv_heads) * d
            && position < capacity
            && position < positions,
        "decode step: qkv {:?}, {heads} heads, caches {:?}, tables {:?}, position {position}",
        qkv.dims(),
        k.dims(),
        cos.dims()
    );
    let (device, dtype) = (qkv.device(), qkv.dtype());
    if kernels::on_cube(&device)
        && kernels::applies(&device, dtype)
        && [cos.dtype(), sin.dtype(), k.dtype(), v.dtype()]
            .iter()
            .all(|t| *t == dtype)
        && d <= extension::ATTENTION_MAX_HEAD_DIM
    {
        return extension::decode_step(qkv, cos, sin, k, v, heads, position, scale);
    }
    step_reference(qkv, cos, sin, k, v, heads, position, scale)
}

/// [`decode_step`] as its parts: two rotary embeddings, two cache writes and [`decode_attention`].
#[allow(clippy::too_many_arguments)]
fn step_reference(
    qkv: Tensor<3>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    k: Tensor<4>,
    v: Tensor<4>,
    heads: usize,
    position: usize,
    scale: f32,
) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
    let ([b, _, _], [_, kv_heads, _, d]) = (qkv.dims(), k.dims());
    let q = rope_heads(qkv.clone(), cos.clone(), sin.clone(), 0, heads, position);
    let new_k = rope_heads(qkv.clone(), cos, sin, heads * d, kv_heads, position);
    let new_v = qkv
        .narrow(2, (heads + kv_heads) * d, kv_heads * d)
        .reshape([b, 1, kv_heads, d])
        .swap_dims(1, 2);
    let at = [0..b, 0..kv_heads, position..position + 1, 0..d];
    let k = k.slice_assign(at.clone(), new_k);
    let v = v.slice_assign(at, new_v);
    let out = decode_attention(q, k.clone(), v.clone(), position + 1, scale);
    (out, k, v)
}

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
            && heads.is_multiple_of(kv_heads)
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

    /// The one-launch step against its parts: grouped and plain heads, the first position, a position
    /// past one chunk of the attention kernel, and caches another holder shares (left as they were).
    pub fn check_step_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (b, heads, kv_heads, d, capacity, position) in [
            (1, 4, 2, 8, 8, 0),
            (2, 3, 3, 16, 9, 5),
            (1, 8, 2, 64, 1300, 1100),
            (1, 2, 1, 128, 40, 39),
        ] {
            let t = |n: usize, seed: usize| {
                let v: Vec<f32> = values(n + seed)[seed..].iter().map(|x| x / 8.0).collect();
                Tensor::<1>::from_data(TensorData::new(v, [n]), device).cast(dtype)
            };
            let width = (heads + 2 * kv_heads) * d;
            let qkv = t(b * width, 3).reshape([b, 1, width]);
            let positions = capacity + 2;
            let cos = t(positions * d, 11).reshape([positions, d]);
            let sin = t(positions * d, 17).reshape([positions, d]);
            let cache_len = b * kv_heads * capacity * d;
            let k = t(cache_len, 7).reshape([b, kv_heads, capacity, d]);
            let v = t(cache_len, 31).reshape([b, kv_heads, capacity, d]);
            let (k_before, v_before) = (k.clone().into_data(), v.clone().into_data());
            let scale = (d as f32).powf(-0.5);
            let name = format!(
                "decode step {b}×{heads}/{kv_heads}×{d}, position {position} of {capacity}, {dtype:?}"
            );
            // `k`, `v` stay held here, so the step must write into copies.
            let (got, got_k, got_v) = decode_step(
                qkv.clone(),
                cos.clone(),
                sin.clone(),
                k.clone(),
                v.clone(),
                heads,
                position,
                scale,
            );
            let (want, want_k, want_v) =
                step_reference(qkv, cos, sin, k.clone(), v.clone(), heads, position, scale);
            assert_close(&name, got, want, tol);
            assert_close(&format!("{name}: keys"), got_k, want_k, tol);
            assert_close(&format!("{name}: values"), got_v, want_v, tol);
            assert_eq!(
                k.into_data(),
                k_before,
                "{name}: a shared key cache was written"
            );
            assert_eq!(
                v.into_data(),
                v_before,
                "{name}: a shared value cache was written"
            );
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_kernel_matches_the_tensor_ops() {
        check_against_reference(&Device::flex(), DType::F32, 1e-5);
        check_step_against_reference(&Device::flex(), DType::F32, 1e-5);
    }
}
