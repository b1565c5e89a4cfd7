//! The fused kernels for every CubeCL runtime (wgpu/Vulkan, CUDA) ([`super::extension`]): one launch and one
//! pass each instead of the tensor ops' three to ten, computed in f32 whatever the tensors' type.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;

use super::extension::{FusedOps, norm_then};
use crate::kernels::device::{MAX_CUBES_X, cubes, empty_like, per_value};

/// Units per cube of the RMSNorm kernel (one cube per row).
pub(crate) const NORM_UNITS: u32 = 256;
/// Units per cube of the decode attention kernel (one cube per query head; one unit per head dimension
/// when summing the values).
const ATTENTION_UNITS: u32 = 256;
/// Cache positions whose scores a cube holds in shared memory at once (4 KiB).
const ATTENTION_CHUNK: u32 = 1024;

/// Units along one weight row in the one-row product: a warp's 32 units read 32 neighbouring weights.
const ROW_LANES: u32 = 32;
/// Weight rows (outputs) per cube in the one-row product.
const ROW_ROWS: u32 = 8;
// The norm's sum of squares is a `cube_sum` over all of the product's units.
const _: () = assert!(ROW_LANES * ROW_ROWS == NORM_UNITS);

/// Vector `i` of row `base` of `x` (in vectors) as the product takes it: as stored, or with `norm`
/// RMS-normalised by `inv` and scaled by `gamma`, rounded to the tensors' type first as a separate
/// RMSNorm would store it.
#[cube]
fn row_input<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    base: usize,
    i: usize,
    inv: f32,
    #[comptime] norm: bool,
) -> Vector<f32, N> {
    let v = Vector::<f32, N>::cast_from(x[base + i]);
    if comptime!(norm) {
        let normed = Vector::<F, N>::cast_from(v * Vector::broadcast(inv));
        Vector::<f32, N>::cast_from(normed * gamma[i])
    } else {
        v
    }
}

/// The sum of a vector's values.
#[cube]
fn vector_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = 0.0f32;
    #[unroll]
    for j in 0..v.vector_size() {
        s += v.extract(j);
    }
    s
}

/// The sum of `value` over the `lanes` units of the caller's cube row (`UNIT_POS_Y`; a power of two, and
/// `lanes` times the rows at most `NORM_UNITS`), for its first unit (a tree in shared memory; every unit
/// of the cube must call it).
#[cube]
pub(crate) fn lane_sum(value: f32, #[comptime] lanes: u32) -> f32 {
    let (u, row) = (UNIT_POS_X as usize, UNIT_POS_Y as usize * lanes as usize);
    let mut parts = Shared::<[f32]>::new_slice(NORM_UNITS as usize);
    parts[row + u] = value;
    sync_cube();
    #[unroll]
    for step in 1..comptime!(lanes.trailing_zeros() + 1) {
        let half = comptime!(lanes >> step) as usize;
        if u < half {
            parts[row + u] += parts[row + u + half];
        }
        sync_cube();
    }
    parts[row]
}

/// `out[r, o] = Σ_i x[r, i] · w[o, i]` for a weight stored a row per output (`[n, k]`, PyTorch's layout):
/// cube `(c, r)` holds `ROW_ROWS` weight rows for input row `r`, whose `ROW_LANES` units each take every
/// `ROW_LANES`-th vector of `N` inputs (a warp reads 32 neighbouring vectors, up to 512 bytes, at a time,
/// four loads in flight) and add their parts in shared memory. `x`, `w` and `gamma` are read as vectors
/// of `N` values (`N` divides `k`). Each output's whole sum is in one cube, so one launch does it; the
/// neighbouring steps of a decoder layer can come along in the same launch:
/// - `norm`: `x` is first RMS-normalised (`eps`) and scaled by `gamma` `[k]` (every cube reduces the
///   row's squares itself: `k` values, against its `8 · k` weights);
/// - `silu`: `w` is SwiGLU's gate rows then its up rows (`[2 · n, k]`) and `out[r, o] = silu(g) · u` of
///   rows `o` and `n + o`;
/// - `add`: `out[r, o] = residual[r, o] + ` the product, in the tensors' type (the residual stream).
///
/// `gamma` and `residual` are read only with their flag.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn row_matmul_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    w: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    residual: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[comptime] norm: bool,
    #[comptime] silu: bool,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let width = x.vector_size();
    // `k` in vectors.
    let k = x.shape(1) / width;
    let n = out.shape(1);
    let o = (CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X) as usize * comptime!(ROW_ROWS) as usize
        + UNIT_POS_Y as usize;
    let base = CUBE_POS_Y as usize * k;
    let lanes = comptime!(ROW_LANES) as usize;
    let mut inv = 1.0f32;
    if comptime!(norm) {
        let units = comptime!(NORM_UNITS) as usize;
        let mut squares = Vector::<f32, N>::broadcast(0.0);
        let mut i = UNIT_POS as usize;
        while i < k {
            let v = Vector::<f32, N>::cast_from(x[base + i]);
            squares += v * v;
            i += units;
        }
        let total = cube_sum(vector_sum(squares));
        inv = 1.0 / (total / f32::cast_from(k * width) + eps).sqrt();
    }
    let mut acc = Vector::<f32, N>::broadcast(0.0);
    let mut up = Vector::<f32, N>::broadcast(0.0);
    // Not an early exit: every unit must reach the barriers in `lane_sum`.
    if o < n {
        let (wa, wb) = (o * k, (n + o) * k);
        let mut i = UNIT_POS_X as usize;
        while i + 3 * lanes < k {
            let (x0, x1) = (
                row_input(x, gamma, base, i, inv, norm),
                row_input(x, gamma, base, i + lanes, inv, norm),
            );
            let (x2, x3) = (
                row_input(x, gamma, base, i + 2 * lanes, inv, norm),
                row_input(x, gamma, base, i + 3 * lanes, inv, norm),
            );
            acc += x0 * Vector::<f32, N>::cast_from(w[wa + i])
                + x1 * Vector::<f32, N>::cast_from(w[wa + i + lanes])
                + x2 * Vector::<f32, N>::cast_from(w[wa + i + 2 * lanes])
                + x3 * Vector::<f32, N>::cast_from(w[wa + i + 3 * lanes]);
            if comptime!(silu) {
                up += x0 * Vector::<f32, N>::cast_from(w[wb + i])
                    + x1 * Vector::<f32, N>::cast_from(w[wb + i + lanes])
                    + x2 * Vector::<f32, N>::cast_from(w[wb + i + 2 * lanes])
                    + x3 * Vector::<f32, N>::cast_from(w[wb + i + 3 * lanes]);
            }
            i += 4 * lanes;
        }
        while i < k {
            let xv = row_input(x, gamma, base, i, inv, norm);
            acc += xv * Vector::<f32, N>::cast_from(w[wa + i]);
            if comptime!(silu) {
                up += xv * Vector::<f32, N>::cast_from(w[wb + i]);
            }
            i += lanes;
        }
    }
    let s = lane_sum(vector_sum(acc), ROW_LANES);
    let mut u = 0.0f32;
    if comptime!(silu) {
        u = lane_sum(vector_sum(up), ROW_LANES);
    }
    if UNIT_POS_X == 0 && o < n {
        let at = CUBE_POS_Y as usize * n + o;
        if comptime!(silu) {
            out[at] = F::cast_from(s / (1.0 + (-s).exp()) * u);
        } else if comptime!(add) {
            out[at] = residual[at] + F::cast_from(s);
        } else {
            out[at] = F::cast_from(s);
        }
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
pub(crate) fn cube_sum(value: f32) -> f32 {
    let u = UNIT_POS as usize;
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

/// What a one-row product kernel ([`row_matmul_kernel`], the packed product in `quant::cube`) does
/// besides the product, in the same launch.
pub(crate) struct RowExtras {
    /// RMSNorm of the input first, with this weight `[k]` and epsilon.
    pub norm: Option<(FloatTensor<CubeBackend>, f32)>,
    /// SwiGLU's `silu(gate) · up` of the product's two halves.
    pub silu: bool,
    /// Added to the product (`[m, n]`).
    pub residual: Option<FloatTensor<CubeBackend>>,
}

impl RowExtras {
    /// The product alone.
    pub fn none() -> Self {
        Self {
            norm: None,
            silu: false,
            residual: None,
        }
    }

    /// The product of the input's RMSNorm (`norm` `[k]`, `eps`), with `silu` SwiGLU's activation after.
    pub fn normed(norm: FloatTensor<CubeBackend>, eps: f32, silu: bool) -> Self {
        Self {
            norm: Some((norm, eps)),
            silu,
            residual: None,
        }
    }

    /// `residual` `[m, n]` plus the product.
    pub fn plus(residual: FloatTensor<CubeBackend>) -> Self {
        Self {
            residual: Some(residual),
            ..Self::none()
        }
    }

    /// The extras around `product` of `x`, each step in a pass of its own (where one launch does not
    /// take them).
    pub fn apart(
        self,
        x: FloatTensor<CubeBackend>,
        product: impl FnOnce(FloatTensor<CubeBackend>) -> FloatTensor<CubeBackend>,
    ) -> FloatTensor<CubeBackend> {
        let y = match self.norm {
            Some((norm, eps)) => norm_then::<CubeBackend>(x, norm, eps, self.silu, product),
            None if self.silu => CubeBackend::silu_mul(product(x)),
            None => product(x),
        };
        match self.residual {
            Some(residual) => CubeBackend::float_add(residual, y),
            None => y,
        }
    }

    /// Outputs of a product by a weight of `rows` rows: `rows`, or half of them with `silu` (`what`
    /// names the product in the messages of broken invariants).
    pub fn outputs(&self, rows: usize, what: &str) -> usize {
        assert!(
            !self.silu || rows.is_multiple_of(2),
            "{what} silu: {rows} weight rows are not gate and up rows one after the other"
        );
        if self.silu { rows / 2 } else { rows }
    }

    /// The norm's weight (contiguous), its epsilon and the residual (contiguous), checked against a
    /// product of `m` rows of `k` values into `n` outputs.
    pub fn prepare(
        self,
        m: usize,
        k: usize,
        n: usize,
        what: &str,
    ) -> (
        Option<FloatTensor<CubeBackend>>,
        f32,
        Option<FloatTensor<CubeBackend>>,
    ) {
        let (gamma, eps) = match self.norm {
            Some((gamma, eps)) => (Some(into_contiguous(gamma)), eps),
            None => (None, 0.0),
        };
        let residual = self.residual.map(into_contiguous);
        if let Some(g) = &gamma {
            assert_eq!(
                g.meta.shape().to_vec(),
                [k],
                "{what} norm: weight is not [{k}]"
            );
        }
        if let Some(r) = &residual {
            assert_eq!(
                r.meta.shape().to_vec(),
                [m, n],
                "{what} add: residual is not [{m}, {n}]"
            );
        }
        (gamma, eps, residual)
    }
}

/// `x` `[m, k]` times the transpose of `w` `[n, k]` for a few rows, with `extras`, in one launch of
/// [`row_matmul_kernel`]: `[m, n]`, or with `silu` `[m, n / 2]`.
fn row_product(
    x: FloatTensor<CubeBackend>,
    w: FloatTensor<CubeBackend>,
    extras: RowExtras,
) -> FloatTensor<CubeBackend> {
    // A no-op for the contiguous inputs decoding passes (weights are stored `[out, in]` contiguous).
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    let (xd, wd) = (x.meta.shape().to_vec(), w.meta.shape().to_vec());
    let (m, k) = (xd[0], xd[1]);
    assert_eq!(
        wd[1], k,
        "row_matmul: x {xd:?} and w {wd:?} (one row per output) do not chain"
    );
    let silu = extras.silu;
    let n = extras.outputs(wd[0], "row_matmul");
    let out = empty_like(&x, Shape::new([m, n]));
    if m == 0 || n == 0 {
        return out;
    }
    let (gamma, eps, residual) = extras.prepare(m, k, n, "row_matmul");
    let (norm, add) = (gamma.is_some(), residual.is_some());
    let cubes = n.div_ceil(ROW_ROWS as usize);
    let cubes_x = cubes.clamp(1, MAX_CUBES_X);
    let count = CubeCount::Static(cubes_x as u32, m as u32, cubes.div_ceil(cubes_x) as u32);
    let dtype = x.dtype;
    // The widest vector loads whose width divides the rows (16 bytes where the runtime allows).
    let width = x
        .client
        .io_optimized_vector_sizes(dtype.size())
        .filter(|&v| k.is_multiple_of(v))
        .max()
        .unwrap_or(1);
    // SAFETY: `x` `[m, k]`, `w` `[n or 2n, k]`, `gamma` `[k]` and `residual` `[m, n]` are contiguous
    // (checked above; without their flag the kernel reads neither, bound to `x`); cube (c, r) reads row
    // `r < m` of `x` and weight rows below `n` (or `2n` with `silu`), and the first unit of each cube
    // row writes its one output. `x`, `w` and `gamma` are read as vectors of `width` values, which
    // divides `k`, so no vector runs past a row.
    unsafe {
        row_matmul_kernel::launch_unchecked(
            &out.client,
            count,
            CubeDim::new_2d(ROW_LANES, ROW_ROWS),
            width,
            x.clone().into_tensor_arg(),
            w.into_tensor_arg(),
            gamma.unwrap_or_else(|| x.clone()).into_tensor_arg(),
            residual.unwrap_or_else(|| x.clone()).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            eps,
            norm,
            silu,
            add,
            dtype_to_storage_type(dtype),
        );
    }
    out
}

impl FusedOps for CubeBackend {
    fn row_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        row_product(x, w, RowExtras::none())
    }

    fn norm_row_matmul(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self> {
        row_product(x, w, RowExtras::normed(norm, eps, silu))
    }

    fn row_matmul_add(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        row_product(x, w, RowExtras::plus(residual))
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
            row_matmul::tests::check_norm_against_reference(&gpu, dtype, tol);
            row_matmul::tests::check_add_against_reference(&gpu, dtype);
        }
    }
}
