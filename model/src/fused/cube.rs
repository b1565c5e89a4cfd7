//! The fused kernels for every CubeCL runtime (wgpu/Vulkan, CUDA) ([`super::extension`]): one launch and one
//! pass each instead of the tensor ops' three to ten, computed in f32 whatever the tensors' type.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;

use super::extension::FusedOps;
use crate::kernels::device::{cubes, empty_like, per_value};

/// Units per cube of the RMSNorm kernel (one cube per row).
const NORM_UNITS: u32 = 256;
/// Units per cube of the decode attention kernel (one cube per query head; one unit per head dimension
/// when summing the values).
const ATTENTION_UNITS: u32 = 256;
/// Cache positions whose scores a cube holds in shared memory at once (4 KiB).
const ATTENTION_CHUNK: u32 = 1024;

/// Units along the output columns in the one-row product (one warp's loads: 32 neighbouring columns).
const ROW_X: u32 = 32;
/// Units along the inputs in the one-row product (each takes every `ROW_Y`-th input of the cube's chunk).
const ROW_Y: u32 = 8;
/// Columns per unit in the one-row product, `ROW_X` apart (a cube covers `ROW_X · ROW_COLS` columns).
const ROW_COLS: u32 = 4;
/// Cubes the one-row product aims for per input row: enough loads in flight to keep a large GPU's
/// memory busy, got by splitting the inputs into chunks when the columns alone give too few cubes.
const ROW_TARGET_CUBES: usize = 1024;
/// Fewest inputs per unit in a chunk (below it the partial sums cost more than they spread).
const ROW_MIN_STEPS: usize = 8;

/// Partial sums of `x[r, :] · w[:, j]` over one chunk of the inputs: cube `(cx, r, c)` covers columns
/// `cx · 128 ..` and inputs `c · chunk ..`. A warp's 32 units load 32 neighbouring weights of one input
/// row at a time (one contiguous read), each unit keeps 4 columns' sums, and the cube's 8 slices of
/// inputs are added in shared memory; `partial[c, r, j]` holds the chunk's sum (added up by
/// [`row_matmul_sum_kernel`]).
#[cube(launch_unchecked)]
fn row_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    partial: &mut Tensor<f32>,
    chunk: usize,
    #[define(F)] _dtype: ElemType,
) {
    let (m, k, n) = (x.shape(0), x.shape(1), w.shape(1));
    let r = CUBE_POS_Y as usize;
    let c = CUBE_POS_Z as usize;
    let (ux, uy) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let stride = comptime!(ROW_X) as usize;
    let col = CUBE_POS_X as usize * comptime!(ROW_X * ROW_COLS) as usize + ux;
    let (c1, c2, c3) = (col + stride, col + 2 * stride, col + 3 * stride);
    let stop = c * chunk + chunk;
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut a3 = 0.0f32;
    let mut i = c * chunk + uy;
    let ys = comptime!(ROW_Y) as usize;
    if c3 < n {
        // The whole tile inside the matrix: no per-load checks, and two input rows per step, so each unit
        // has eight loads in flight rather than four (a GPU hides memory latency with loads in flight).
        while i + ys < stop && i + ys < k {
            let (xv, xw) = (
                f32::cast_from(x[r * k + i]),
                f32::cast_from(x[r * k + i + ys]),
            );
            let (row, next) = (i * n, (i + ys) * n);
            let (w0, w1, w2, w3) = (w[row + col], w[row + c1], w[row + c2], w[row + c3]);
            let (v0, v1, v2, v3) = (w[next + col], w[next + c1], w[next + c2], w[next + c3]);
            a0 += xv * f32::cast_from(w0) + xw * f32::cast_from(v0);
            a1 += xv * f32::cast_from(w1) + xw * f32::cast_from(v1);
            a2 += xv * f32::cast_from(w2) + xw * f32::cast_from(v2);
            a3 += xv * f32::cast_from(w3) + xw * f32::cast_from(v3);
            i += 2 * ys;
        }
    }
    // One input row at a time with each column checked: a partial tile's rows, or a full tile's last.
    while i < stop && i < k {
        let xv = f32::cast_from(x[r * k + i]);
        let row = i * n;
        if col < n {
            a0 += xv * f32::cast_from(w[row + col]);
        }
        if c1 < n {
            a1 += xv * f32::cast_from(w[row + c1]);
        }
        if c2 < n {
            a2 += xv * f32::cast_from(w[row + c2]);
        }
        if c3 < n {
            a3 += xv * f32::cast_from(w[row + c3]);
        }
        i += ys;
    }
    // parts[(column slot · ROW_Y + slice) · ROW_X + unit]
    let mut parts = Shared::<[f32]>::new_slice(comptime!(ROW_X * ROW_Y * ROW_COLS) as usize);
    parts[uy * stride + ux] = a0;
    parts[(ys + uy) * stride + ux] = a1;
    parts[(2 * ys + uy) * stride + ux] = a2;
    parts[(3 * ys + uy) * stride + ux] = a3;
    sync_cube();
    // The first ROW_COLS slices of units each add up one column slot's ROW_Y parts.
    if uy < comptime!(ROW_COLS) as usize {
        let mut s = 0.0f32;
        #[unroll]
        for y in 0..ROW_Y {
            s += parts[(uy * ys + y as usize) * stride + ux];
        }
        let j = col + uy * stride;
        if j < n {
            partial[(c * m + r) * n + j] = s;
        }
    }
}

/// `out[r, j] = Σ_c partial[c, r, j]` in the output's type, one unit per output value; with `silu`,
/// `out[r, j] = silu(g) · u` of the sums `g` of column `j` and `u` of column `inner + j` (SwiGLU's gate and
/// up side by side), which saves the activation its own launch.
#[cube(launch_unchecked)]
fn row_matmul_sum_kernel<F: Float>(
    partial: &Tensor<f32>,
    out: &mut Tensor<F>,
    #[comptime] silu: bool,
    #[define(F)] _dtype: ElemType,
) {
    let id = ABSOLUTE_POS;
    let len = out.len();
    if id >= len {
        terminate!();
    }
    let (chunks, m, n) = (partial.shape(0), partial.shape(1), partial.shape(2));
    if comptime!(silu) {
        let inner = out.shape(1);
        let (r, j) = (id / inner, id % inner);
        let mut g = 0.0f32;
        let mut u = 0.0f32;
        let mut c = 0usize;
        while c < chunks {
            let row = (c * m + r) * n;
            g += partial[row + j];
            u += partial[row + inner + j];
            c += 1;
        }
        out[id] = F::cast_from(g / (1.0 + (-g).exp()) * u);
    } else {
        let mut s = 0.0f32;
        let mut c = 0usize;
        while c < chunks {
            s += partial[c * len + id];
            c += 1;
        }
        out[id] = F::cast_from(s);
    }
}

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
///
/// With `step` false, `src` is the query `[b, heads, 1, d]` and the cache's first `len` positions are
/// attended (`cos`, `sin` are unused). With `step` true it is one decoding step from the fused projection
/// `src` `[b, 1, w]` (q heads, then k heads, then v heads): the cube rotates its query head and its kv
/// head's new key at position `len - 1` with `cos`, `sin` `[positions, d]`, takes the new value, the
/// first query head of each kv group writes both into the caches at `len - 1`, and every cube attends
/// the new position from its own copy (another cube's write to the cache is not visible within the
/// launch). Both are rounded to the tensors' type first, as the separate kernels would store them.
#[cube(launch_unchecked)]
fn decode_attention_kernel<F: Float>(
    src: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    k: &mut Tensor<F>,
    v: &mut Tensor<F>,
    out: &mut Tensor<F>,
    len: usize,
    scale: f32,
    heads: usize,
    #[comptime] step: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (kv_heads, capacity, d) = (k.shape(1), k.shape(2), k.shape(3));
    let batch = src.shape(0);
    let bh = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    // A whole cube past the last head leaves together, so no barrier below misses a unit.
    if bh >= batch * heads {
        terminate!();
    }
    let (bi, h) = (bh / heads, bh % heads);
    let group = heads / kv_heads;
    let kv = h / group;
    let base = (bi * kv_heads + kv) * capacity * d;
    let u = UNIT_POS_X as usize;
    let units = comptime!(ATTENTION_UNITS) as usize;
    let chunk = comptime!(ATTENTION_CHUNK) as usize;
    let mut qs = Shared::<[f32]>::new_slice(ATTENTION_UNITS as usize);
    let mut kn = Shared::<[f32]>::new_slice(ATTENTION_UNITS as usize);
    let mut vn = Shared::<[f32]>::new_slice(ATTENTION_UNITS as usize);
    // The position read from `kn`, `vn` rather than the cache (none without `step`).
    let mut fresh = len;
    if u < d {
        if comptime!(step) {
            fresh = len - 1;
            let row = bi * src.shape(2);
            let (qh, kh) = (row + h * d, row + (heads + kv) * d);
            let vh = row + (heads + kv_heads + kv) * d;
            let half = d / 2;
            let p = fresh * d + u;
            let (c, sn) = (f32::cast_from(cos[p]), f32::cast_from(sin[p]));
            let (qx, kx) = (f32::cast_from(src[qh + u]), f32::cast_from(src[kh + u]));
            // "Rotate half": dimension i pairs with i + d/2.
            let qp = if u < half {
                -f32::cast_from(src[qh + u + half])
            } else {
                f32::cast_from(src[qh + u - half])
            };
            let kp = if u < half {
                -f32::cast_from(src[kh + u + half])
            } else {
                f32::cast_from(src[kh + u - half])
            };
            let (qr, kr, vr) = (
                F::cast_from(qx * c + qp * sn),
                F::cast_from(kx * c + kp * sn),
                src[vh + u],
            );
            qs[u] = f32::cast_from(qr);
            kn[u] = f32::cast_from(kr);
            vn[u] = f32::cast_from(vr);
            if h % group == 0 {
                k[base + fresh * d + u] = kr;
                v[base + fresh * d + u] = vr;
            }
        } else {
            qs[u] = f32::cast_from(src[bh * d + u]);
        }
    }
    sync_cube();
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
            let mut s = 0.0f32;
            let mut i = 0usize;
            if c0 + j == fresh {
                while i < d {
                    s += qs[i] * kn[i];
                    i += 1;
                }
            } else {
                let kr = base + (c0 + j) * d;
                while i < d {
                    s += qs[i] * f32::cast_from(k[kr + i]);
                    i += 1;
                }
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
                let mut value = vn[u];
                if c0 + jj != fresh {
                    value = f32::cast_from(v[base + (c0 + jj) * d + u]);
                }
                a += scores[jj] * value;
                jj += 1;
            }
            acc = a;
        }
        // The chunk's scores and sums are read before the next chunk overwrites them.
        sync_cube();
        c0 += chunk;
    }
    if u < d {
        out[bh * d + u] = F::cast_from(acc / l);
    }
}

/// Launches [`decode_attention_kernel`] for `heads` query heads of `src` over the caches `k`, `v` (all
/// contiguous), one cube per query head: `[b, 1, heads · d]`.
///
/// # Safety
/// The shapes must be what the kernel takes for `step` (see [`decode_attention_kernel`]), `len` at most the
/// caches' capacity and `d` at most [`ATTENTION_UNITS`]: the kernel does not check its reads. Each cube
/// writes only its head's `d` outputs, and cubes past the last head stop first.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_decode_attention(
    src: FloatTensor<CubeBackend>,
    cos: FloatTensor<CubeBackend>,
    sin: FloatTensor<CubeBackend>,
    k: FloatTensor<CubeBackend>,
    v: FloatTensor<CubeBackend>,
    heads: usize,
    len: usize,
    scale: f32,
    step: bool,
) -> FloatTensor<CubeBackend> {
    let (b, d) = (src.meta.shape()[0], k.meta.shape()[3]);
    let out = empty_like(&src, Shape::new([b, 1, heads * d]));
    let dtype = src.dtype;
    // SAFETY: the caller's (above).
    unsafe {
        decode_attention_kernel::launch_unchecked(
            &out.client,
            cubes(b * heads),
            CubeDim::new_1d(ATTENTION_UNITS),
            src.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            len,
            scale,
            heads,
            step,
            dtype_to_storage_type(dtype),
        );
    }
    out
}

/// `x` `[m, k]` times `w` `[k, n]` for a few rows: the chunks' partial sums ([`row_matmul_kernel`]), then
/// their sum ([`row_matmul_sum_kernel`]): `[m, n]`, or with `silu` `[m, n / 2]` (SwiGLU's activation of the
/// two halves).
fn row_product(
    x: FloatTensor<CubeBackend>,
    w: FloatTensor<CubeBackend>,
    silu: bool,
) -> FloatTensor<CubeBackend> {
    // A no-op for the contiguous inputs decoding passes (weights are stored `[in, out]` contiguous).
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    let (xd, wd) = (x.meta.shape().to_vec(), w.meta.shape().to_vec());
    let (m, k, n) = (xd[0], xd[1], wd[1]);
    assert_eq!(wd[0], k, "row_matmul: x {xd:?} and w {wd:?} do not chain");
    assert!(
        !silu || n.is_multiple_of(2),
        "row_matmul_silu: w {wd:?} is not gate and up side by side"
    );
    let dtype = x.dtype;
    let out = empty_like(&x, Shape::new([m, if silu { n / 2 } else { n }]));
    if m == 0 || n == 0 {
        return out;
    }
    // Column tiles × input chunks ≈ ROW_TARGET_CUBES per row, each unit still taking at least
    // ROW_MIN_STEPS inputs; the chunk is a multiple of the cube's input slices.
    let tiles = n.div_ceil((ROW_X * ROW_COLS) as usize);
    let most_chunks = k.div_ceil(ROW_Y as usize * ROW_MIN_STEPS).max(1);
    let wanted = ROW_TARGET_CUBES.div_ceil(tiles).clamp(1, most_chunks);
    let chunk = k
        .div_ceil(wanted)
        .next_multiple_of(ROW_Y as usize)
        .max(ROW_Y as usize);
    let chunks = k.div_ceil(chunk).max(1);
    let partial = empty_device_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::new([chunks, m, n]),
        DType::F32,
    );
    // SAFETY: `x` `[m, k]` and `w` `[k, n]` are contiguous (checked to chain); cube (tile, r, c)
    // reads rows `r < m` of `x`, inputs below `k` and columns below `n` (checked per tile), and each
    // unit of the first ROW_COLS slices writes its own column of `partial` `[chunks, m, n]` once.
    unsafe {
        row_matmul_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(tiles as u32, m as u32, chunks as u32),
            CubeDim::new_2d(ROW_X, ROW_Y),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            chunk,
            dtype_to_storage_type(dtype),
        );
    }
    let units = out.meta.shape().num_elements();
    let (count, cube_dim) = per_value(&out, units);
    // SAFETY: `partial` `[chunks, m, n]` holds `chunks` blocks of the product's `m · n` values (with
    // `silu`, the output's `m · n / 2` units read columns `j` and `n / 2 + j < n` of them); units past the
    // output stop first, and each writes only its own value.
    unsafe {
        row_matmul_sum_kernel::launch_unchecked(
            &out.client,
            count,
            cube_dim,
            partial.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            silu,
            dtype_to_storage_type(dtype),
        );
    }
    out
}

impl FusedOps for CubeBackend {
    fn row_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        row_product(x, w, false)
    }

    fn row_matmul_silu(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        row_product(x, w, true)
    }

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
        let heads = q.meta.shape()[1];
        // SAFETY: `decode_attention` checked the shapes (`q` `[b, heads, 1, d]`, `k`, `v` `[b, kv_heads,
        // capacity, d]` with `heads` a multiple of `kv_heads`, `len` ≤ capacity, `d` ≤ the cube's units).
        // Without `step` the kernel reads neither `cos` nor `sin` (bound to `q`) and writes neither cache.
        unsafe { launch_decode_attention(q.clone(), q.clone(), q, k, v, heads, len, scale, false) }
    }

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
        let (qkv, cos, sin) = (
            into_contiguous(qkv),
            into_contiguous(cos),
            into_contiguous(sin),
        );
        // The caches are written in place when nothing else holds them (a prompt cache's copy does).
        let owned = |t: FloatTensor<Self>| {
            let t = into_contiguous(t);
            if t.can_mut() { t } else { t.copy() }
        };
        let (k, v) = (owned(k), owned(v));
        // SAFETY: `decode_step` checked the shapes (`qkv` `[b, 1, (heads + 2 · kv_heads) · d]`, caches
        // `[b, kv_heads, capacity, d]`, `position` < capacity and < the tables' positions, `d` even and
        // ≤ the cube's units); the first cube of each kv group writes the group's new key and value at
        // `position`, which no cube reads from the caches.
        let out = unsafe {
            launch_decode_attention(
                qkv,
                cos,
                sin,
                k.clone(),
                v.clone(),
                heads,
                position + 1,
                scale,
                true,
            )
        };
        (out, k, v)
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Device, DeviceKind};

    use super::super::{activation, attention, rms_norm, rope, row_matmul};

    #[test]
    fn kernels_match_the_tensor_ops_on_wgpu() {
        let gpu = Device::wgpu(DeviceKind::DefaultDevice);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 4e-3)] {
            activation::tests::check_against_reference(&gpu, dtype, tol);
            rms_norm::tests::check_against_reference(&gpu, dtype, tol);
            rope::tests::check_against_reference(&gpu, dtype, tol);
            attention::tests::check_against_reference(&gpu, dtype, tol);
            attention::tests::check_step_against_reference(&gpu, dtype, tol);
            row_matmul::tests::check_against_reference(&gpu, dtype, tol);
            row_matmul::tests::check_silu_against_reference(&gpu, dtype, tol);
        }
    }
}
