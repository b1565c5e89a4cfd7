//! The fused kernels for every CubeCL runtime (wgpu/Vulkan, CUDA) ([`super::extension`]): one launch and one
//! pass each instead of the tensor ops' three to ten, computed in f32 whatever the tensors' type.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;

use super::extension::FusedOps;
use crate::kernels::device::{cubes, empty_like, per_value};

/// Units per cube of the RMSNorm kernel (one cube per row).
const NORM_UNITS: u32 = 256;
/// Units per cube of the decode attention kernel (one cube per query head; one unit per head dimension
/// when summing the values).
const ATTENTION_UNITS: u32 = 256;
/// Cache positions whose scores a cube holds in shared memory at once (4 KiB).
const ATTENTION_CHUNK: u32 = 1024;

/// `out[r, i] = silu(h[r, i]) · h[r, inner + i]`, one unit per output value.
#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float>(h: &Tensor<F>, out: &mut Tensor<F>, #[define(F)] _dtype: ElemType) {
    let id = ABSOLUTE_POS;
    if id >= out.len() {
        terminate!();
    }
    let inner = out.shape(out.rank() - 1);
    let (row, col) = (id / inner, id % inner);
    let g = f32::cast_from(h[row * 2 * inner + col]);
    let u = f32::cast_from(h[row * 2 * inner + inner + col]);
    out[id] = F::cast_from(g / (1.0 + (-g).exp()) * u);
}

/// `out[i] = x[i] · sigmoid(1.702 · x[i])`, one unit per value.
#[cube(launch_unchecked)]
fn quick_gelu_kernel<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>, #[define(F)] _dtype: ElemType) {
    let id = ABSOLUTE_POS;
    if id >= out.len() {
        terminate!();
    }
    let v = f32::cast_from(x[id]);
    let a = -1.702f32;
    out[id] = F::cast_from(v / (1.0 + (v * a).exp()));
}

/// The sum of `value` over the cube's `NORM_UNITS` units, returned to every unit (a tree in shared memory).
#[cube]
fn cube_sum(value: f32) -> f32 {
    let u = UNIT_POS_X as usize;
    let mut parts = Shared::<[f32]>::new_slice(NORM_UNITS as usize);
    parts[u] = value;
    sync_cube();
    #[unroll]
    for step in 1..comptime!(NORM_UNITS.trailing_zeros() + 1) {
        let half = comptime!(NORM_UNITS >> step) as usize;
        if u < half {
            parts[u] += parts[u + half];
        }
        sync_cube();
    }
    parts[0]
}

/// RMSNorm of one row per cube: each unit sums the squares of every `NORM_UNITS`-th value, the cube adds
/// the parts, then each unit scales its values.
#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: ElemType,
) {
    let d = weight.len();
    let rows = out.len() / d;
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let stride = comptime!(NORM_UNITS) as usize;
    let mut acc = 0.0f32;
    // Not an early exit: every unit must reach the barriers in `cube_sum`.
    if row < rows {
        let mut i = UNIT_POS_X as usize;
        while i < d {
            let v = f32::cast_from(x[row * d + i]);
            acc += v * v;
            i += stride;
        }
    }
    let total = cube_sum(acc);
    if row < rows {
        let inv = 1.0 / (total / f32::cast_from(d) + eps).sqrt();
        let mut i = UNIT_POS_X as usize;
        while i < d {
            let v = F::cast_from(f32::cast_from(x[row * d + i]) * inv);
            out[row * d + i] = v * weight[i];
            i += stride;
        }
    }
}

/// [`rms_norm_kernel`] of `x + delta`, which it also writes to `sum`.
#[cube(launch_unchecked)]
fn add_rms_norm_kernel<F: Float>(
    x: &Tensor<F>,
    delta: &Tensor<F>,
    weight: &Tensor<F>,
    sum: &mut Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: ElemType,
) {
    let d = weight.len();
    let rows = out.len() / d;
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let stride = comptime!(NORM_UNITS) as usize;
    let mut acc = 0.0f32;
    if row < rows {
        let mut i = UNIT_POS_X as usize;
        while i < d {
            // The sum in the tensors' type, as `x + delta` in tensor ops would store it.
            let s = x[row * d + i] + delta[row * d + i];
            sum[row * d + i] = s;
            let v = f32::cast_from(s);
            acc += v * v;
            i += stride;
        }
    }
    let total = cube_sum(acc);
    if row < rows {
        let inv = 1.0 / (total / f32::cast_from(d) + eps).sqrt();
        let mut i = UNIT_POS_X as usize;
        while i < d {
            let v = F::cast_from(f32::cast_from(sum[row * d + i]) * inv);
            out[row * d + i] = v * weight[i];
            i += stride;
        }
    }
}

/// `out[b, h, s, i]`: value `i` of head `h` from column `start` of `qkv[b, s]`, rotated at position
/// `offset + s`; one unit per output value.
#[cube(launch_unchecked)]
fn rope_kernel<F: Float>(
    qkv: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    start: usize,
    offset: usize,
    #[define(F)] _dtype: ElemType,
) {
    let id = ABSOLUTE_POS;
    if id >= out.len() {
        terminate!();
    }
    let (heads, seq, d) = (out.shape(1), out.shape(2), out.shape(3));
    let i = id % d;
    let s = (id / d) % seq;
    let h = (id / (d * seq)) % heads;
    let b = id / (d * seq * heads);
    let src = (b * seq + s) * qkv.shape(2) + start + h * d;
    let half = d / 2;
    let x = f32::cast_from(qkv[src + i]);
    let partner = if i < half {
        -f32::cast_from(qkv[src + i + half])
    } else {
        f32::cast_from(qkv[src + i - half])
    };
    let p = (offset + s) * d + i;
    out[id] = F::cast_from(x * f32::cast_from(cos[p]) + partner * f32::cast_from(sin[p]));
}

/// Attention of one position for one query head per cube, over the cache in chunks of `ATTENTION_CHUNK`
/// positions with a running maximum and sum (online softmax): the units score positions into shared
/// memory, reduce the chunk's maximum and sum there, then unit `i` adds the chunk's weighted values of
/// dimension `i`.
#[cube(launch_unchecked)]
fn decode_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    len: usize,
    scale: f32,
    #[define(F)] _dtype: ElemType,
) {
    let (heads, d) = (q.shape(1), q.shape(3));
    let (kv_heads, capacity) = (k.shape(1), k.shape(2));
    let bh = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    // A whole cube past the last head leaves together, so no barrier below misses a unit.
    if bh >= q.shape(0) * heads {
        terminate!();
    }
    let (bi, h) = (bh / heads, bh % heads);
    let kv = h / (heads / kv_heads);
    let base = (bi * kv_heads + kv) * capacity * d;
    let qb = bh * d;
    let u = UNIT_POS_X as usize;
    let units = comptime!(ATTENTION_UNITS) as usize;
    let chunk = comptime!(ATTENTION_CHUNK) as usize;
    let mut scores = Shared::<[f32]>::new_slice(ATTENTION_CHUNK as usize);
    let mut parts = Shared::<[f32]>::new_slice(ATTENTION_UNITS as usize);
    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let mut acc = 0.0f32;
    let mut c0 = 0usize;
    while c0 < len {
        let n = min(len - c0, chunk);
        let mut local_max = f32::new(-3.0e38);
        let mut j = u;
        while j < n {
            let kr = base + (c0 + j) * d;
            let mut s = 0.0f32;
            let mut i = 0usize;
            while i < d {
                s += f32::cast_from(q[qb + i]) * f32::cast_from(k[kr + i]);
                i += 1;
            }
            s *= scale;
            scores[j] = s;
            local_max = max(local_max, s);
            j += units;
        }
        parts[u] = local_max;
        sync_cube();
        #[unroll]
        for step in 1..comptime!(ATTENTION_UNITS.trailing_zeros() + 1) {
            let half = comptime!(ATTENTION_UNITS >> step) as usize;
            if u < half {
                parts[u] = max(parts[u], parts[u + half]);
            }
            sync_cube();
        }
        let new_m = max(m, parts[0]);
        // Everyone has read the maximum before `parts` is reused.
        sync_cube();
        let correction = (m - new_m).exp();
        let mut local_sum = 0.0f32;
        let mut j = u;
        while j < n {
            let p = (scores[j] - new_m).exp();
            scores[j] = p;
            local_sum += p;
            j += units;
        }
        parts[u] = local_sum;
        sync_cube();
        #[unroll]
        for step in 1..comptime!(ATTENTION_UNITS.trailing_zeros() + 1) {
            let half = comptime!(ATTENTION_UNITS >> step) as usize;
            if u < half {
                parts[u] += parts[u + half];
            }
            sync_cube();
        }
        l = l * correction + parts[0];
        m = new_m;
        if u < d {
            let mut a = acc * correction;
            let mut jj = 0usize;
            while jj < n {
                a += scores[jj] * f32::cast_from(v[base + (c0 + jj) * d + u]);
                jj += 1;
            }
            acc = a;
        }
        // The chunk's scores and sums are read before the next chunk overwrites them.
        sync_cube();
        c0 += chunk;
    }
    if u < d {
        out[qb + u] = F::cast_from(acc / l);
    }
}

impl FusedOps for CubeBackend {
    fn silu_mul(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        let h = into_contiguous(gate_up);
        let mut dims = h.meta.shape().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        let units: usize = dims.iter().product();
        let out = empty_like(&h, Shape::from(dims));
        let (count, cube_dim) = per_value(&h, units);
        let dtype = h.dtype;
        // SAFETY: `h` is contiguous with twice the output's last dimension, so every index read is inside
        // it; units past the output's length stop first, and each writes only its own value.
        unsafe {
            silu_mul_kernel::launch_unchecked(
                &out.client,
                count,
                cube_dim,
                h.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                dtype_to_storage_type(dtype),
            );
        }
        out
    }

    fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let dims = x.meta.shape().to_vec();
        let units: usize = dims.iter().product();
        let out = empty_like(&x, Shape::from(dims));
        let (count, cube_dim) = per_value(&x, units);
        let dtype = x.dtype;
        // SAFETY: input and output are contiguous with the same shape; units past it stop first.
        unsafe {
            quick_gelu_kernel::launch_unchecked(
                &out.client,
                count,
                cube_dim,
                x.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                dtype_to_storage_type(dtype),
            );
        }
        out
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (x, weight) = (into_contiguous(x), into_contiguous(weight));
        let dims = x.meta.shape().to_vec();
        let d = dims.last().copied().unwrap_or(1).max(1);
        let rows = dims.iter().product::<usize>() / d;
        let out = empty_like(&x, Shape::from(dims));
        let dtype = x.dtype;
        // SAFETY: `x` and the output are contiguous `[rows, d]` and `weight` `[d]`; cubes past the last row
        // read and write nothing, and each value is written by one unit.
        unsafe {
            rms_norm_kernel::launch_unchecked(
                &out.client,
                cubes(rows),
                CubeDim::new_1d(NORM_UNITS),
                x.into_tensor_arg(),
                weight.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                eps,
                dtype_to_storage_type(dtype),
            );
        }
        out
    }

    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, delta, weight) = (
            into_contiguous(x),
            into_contiguous(delta),
            into_contiguous(weight),
        );
        let dims = x.meta.shape().to_vec();
        let d = dims.last().copied().unwrap_or(1).max(1);
        let rows = dims.iter().product::<usize>() / d;
        let (sum, out) = (
            empty_like(&x, Shape::from(dims.clone())),
            empty_like(&x, Shape::from(dims)),
        );
        let dtype = x.dtype;
        // SAFETY: as for `rms_norm`, with `delta` and `sum` the same shape as `x` (checked by the caller).
        unsafe {
            add_rms_norm_kernel::launch_unchecked(
                &out.client,
                cubes(rows),
                CubeDim::new_1d(NORM_UNITS),
                x.into_tensor_arg(),
                delta.into_tensor_arg(),
                weight.into_tensor_arg(),
                sum.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
                eps,
                dtype_to_storage_type(dtype),
            );
        }
        (sum, out)
    }

    fn rope_heads(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        start: usize,
        heads: usize,
        offset: usize,
    ) -> FloatTensor<Self> {
        let (qkv, cos, sin) = (
            into_contiguous(qkv),
            into_contiguous(cos),
            into_contiguous(sin),
        );
        let q = qkv.meta.shape().to_vec();
        let d = cos.meta.shape()[1];
        let out = empty_like(&qkv, Shape::new([q[0], heads, q[1], d]));
        let (count, cube_dim) = per_value(&qkv, q[0] * heads * q[1] * d);
        let dtype = qkv.dtype;
        // SAFETY: the caller's heads lie inside `qkv`'s rows (`start + heads · d ≤ w`) and the positions
        // inside the tables (`offset + s` < positions, as the KV cache's room check guarantees); units
        // past the output stop first and each writes only its own value.
        unsafe {
            rope_kernel::launch_unchecked(
                &out.client,
                count,
                cube_dim,
                qkv.into_tensor_arg(),
                cos.into_tensor_arg(),
                sin.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                start,
                offset,
                dtype_to_storage_type(dtype),
            );
        }
        out
    }

    fn decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        len: usize,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
        let qd = q.meta.shape().to_vec();
        let (b, heads, d) = (qd[0], qd[1], qd[3]);
        let out = empty_like(&q, Shape::new([b, 1, heads * d]));
        let dtype = q.dtype;
        // SAFETY: `decode_attention` checked the shapes (`k`, `v` `[b, kv_heads, capacity, d]` with
        // `heads` a multiple of `kv_heads`, `len` ≤ capacity, `d` ≤ the cube's units); one cube per query
        // head, each writing only that head's `d` values; cubes past the last head stop first.
        unsafe {
            decode_attention_kernel::launch_unchecked(
                &out.client,
                cubes(b * heads),
                CubeDim::new_1d(ATTENTION_UNITS),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                len,
                scale,
                dtype_to_storage_type(dtype),
            );
        }
        out
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Device, DeviceKind};

    use super::super::{activation, attention, rms_norm, rope};

    #[test]
    fn kernels_match_the_tensor_ops_on_wgpu() {
        let gpu = Device::wgpu(DeviceKind::DefaultDevice);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 4e-3)] {
            activation::tests::check_against_reference(&gpu, dtype, tol);
            rms_norm::tests::check_against_reference(&gpu, dtype, tol);
            rope::tests::check_against_reference(&gpu, dtype, tol);
            attention::tests::check_against_reference(&gpu, dtype, tol);
        }
    }
}
