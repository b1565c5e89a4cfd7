//! The packed-matrix operations as CubeCL kernels ([`super::extension`]), so they run on every CubeCL
//! runtime (wgpu/Vulkan, CUDA). Unpacking with generic tensor ops reads the codes a dozen times and
//! writes the float matrix before the product reads it again; here decoding reads each code word once
//! and multiplies in registers, and prefill dequantises in one pass before Burn's matrix product.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::extension::{FUSED_MAX_ROWS, PackedOps};
use super::pack::GROUP;
use crate::fused::cube::{RowExtras, cube_sum, lane_sum};
use crate::kernels::device::{MAX_CUBES_X, empty_like, per_value};

/// Units per cube of the product kernel.
const CUBE_UNITS: u32 = 256;
// `lane_sum`'s shared memory holds one value per unit of a cube.
const _: () = assert!(CUBE_UNITS == crate::fused::cube::NORM_UNITS);
/// Most units sharing one weight row in the product kernel.
const MAX_LANES: usize = 32;

/// Group `g` of weight row `o`: its scale and minimum (`gps` groups share a super-block's maxima).
#[cube]
fn group_scale_min<F: Float>(
    params: &Tensor<i32>,
    supers: &Tensor<F>,
    o: usize,
    g: usize,
    groups: usize,
    #[comptime] gps: u32,
) -> (f32, f32) {
    let sb = o * (groups / gps as usize) + g / gps as usize;
    let big_s = f32::cast_from(supers[2 * sb]);
    let big_m = f32::cast_from(supers[2 * sb + 1]);
    // Two groups per word, each a (scale code, minimum code + 128) byte pair.
    let pw = groups.div_ceil(2);
    let word = u32::cast_from(params[o * pw + g / 2]);
    let p = (word >> (16 * (g % 2) as u32)) & 0xffff;
    let scale = f32::cast_from(p & 0xff) * (big_s / 255.0);
    let min = (f32::cast_from(p >> 8) - 128.0) * (big_m / 127.0);
    (scale, min)
}

/// Input `at` of `x` (value `i` of its row) as the product takes it: as stored, or with `norm`
/// RMS-normalised by `inv` and scaled by `gamma`, rounded to the tensors' type first as a separate
/// RMSNorm would store it.
#[cube]
fn packed_input<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    at: usize,
    i: usize,
    inv: f32,
    #[comptime] norm: bool,
) -> f32 {
    let v = f32::cast_from(x[at]);
    if comptime!(norm) {
        let normed = F::cast_from(v * inv);
        f32::cast_from(normed * gamma[i])
    } else {
        v
    }
}

/// `out[r, o] = Σ_k x[r, k] · W[o, k]`. A cube holds `CUBE_UNITS / lanes` weight rows of one input row `r`;
/// the `lanes` units of a weight row take every `lanes`-th group, as Σ w·x = scale · Σ q·x + min · Σ x,
/// then sum their parts in shared memory. Each output's whole sum is in one cube, so the neighbouring
/// steps of a decoder layer can come along in the launch, as in the float one-row product
/// (`fused::cube`):
/// - `norm`: `x` is first RMS-normalised (`eps`) and scaled by `gamma` `[k]` (every cube reduces the
///   row's squares itself);
/// - `silu`: the packed rows are SwiGLU's gate rows then its up rows (`2 · n` of them) and
///   `out[r, o] = silu(g) · u` of rows `o` and `n + o` (which share the input values read);
/// - `add`: `out[r, o] = residual[r, o] + ` the product, in the tensors' type.
///
/// `gamma` and `residual` are read only with their flag.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn packed_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    codes: &Tensor<i32>,
    params: &Tensor<i32>,
    supers: &Tensor<F>,
    gamma: &Tensor<F>,
    residual: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[comptime] bits: u32,
    #[comptime] gps: u32,
    #[comptime] lanes: u32,
    #[comptime] norm: bool,
    #[comptime] silu: bool,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let n = out.shape(1);
    let k = x.shape(1);
    let rows_per_cube = comptime!(CUBE_UNITS / lanes) as usize;
    let o = (CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X) as usize * rows_per_cube + UNIT_POS_Y as usize;
    let r = CUBE_POS_Y as usize;
    let groups = k / 32;
    let per_word = comptime!(32 / bits);
    let mask = comptime!((1u32 << bits) - 1);
    let mut inv = 1.0f32;
    if comptime!(norm) {
        let mut squares = 0.0f32;
        let mut i = UNIT_POS as usize;
        while i < k {
            let v = f32::cast_from(x[r * k + i]);
            squares += v * v;
            i += comptime!(CUBE_UNITS) as usize;
        }
        let total = cube_sum(squares);
        inv = 1.0 / (total / f32::cast_from(k) + eps).sqrt();
    }
    let mut acc = 0.0f32;
    let mut up = 0.0f32;
    // Not an early exit: every unit must reach the barriers below.
    if o < n {
        let mut g = UNIT_POS_X as usize;
        while g < groups {
            let base = (o * groups + g) * bits as usize;
            let up_base = ((n + o) * groups + g) * bits as usize;
            let xb = r * k + g * 32;
            let mut dot = 0.0f32;
            let mut up_dot = 0.0f32;
            let mut sum = 0.0f32;
            #[unroll]
            for w in 0..bits {
                let word = u32::cast_from(codes[base + w as usize]);
                let mut up_word = 0u32;
                if comptime!(silu) {
                    up_word = u32::cast_from(codes[up_base + w as usize]);
                }
                #[unroll]
                for i in 0..per_word {
                    let at = (w * per_word + i) as usize;
                    let v = packed_input(x, gamma, xb + at, g * 32 + at, inv, norm);
                    dot += f32::cast_from((word >> (i * bits)) & mask) * v;
                    if comptime!(silu) {
                        up_dot += f32::cast_from((up_word >> (i * bits)) & mask) * v;
                    }
                    sum += v;
                }
            }
            let (scale, min) = group_scale_min::<F>(params, supers, o, g, groups, gps);
            acc += scale * dot + min * sum;
            if comptime!(silu) {
                let (up_scale, up_min) =
                    group_scale_min::<F>(params, supers, n + o, g, groups, gps);
                up += up_scale * up_dot + up_min * sum;
            }
            g += lanes as usize;
        }
    }
    let s = lane_sum(acc, lanes);
    let mut u = 0.0f32;
    if comptime!(silu) {
        u = lane_sum(up, lanes);
    }
    if UNIT_POS_X == 0 && o < n {
        let at = r * n + o;
        if comptime!(silu) {
            out[at] = F::cast_from(s / (1.0 + (-s).exp()) * u);
        } else if comptime!(add) {
            out[at] = residual[at] + F::cast_from(s);
        } else {
            out[at] = F::cast_from(s);
        }
    }
}

/// `out[o, g·32 + j] = code · scale + min`, one unit per (row, group).
#[cube(launch_unchecked)]
fn packed_dequantize_kernel<F: Float>(
    codes: &Tensor<i32>,
    params: &Tensor<i32>,
    supers: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] bits: u32,
    #[comptime] gps: u32,
    #[define(F)] _dtype: ElemType,
) {
    let k = out.shape(1);
    let groups = k / 32;
    let id = ABSOLUTE_POS;
    if id >= out.shape(0) * groups {
        terminate!();
    }
    let (o, g) = (id / groups, id % groups);
    let (scale, min) = group_scale_min::<F>(params, supers, o, g, groups, gps);
    let per_word = comptime!(32 / bits);
    let mask = comptime!((1u32 << bits) - 1);
    let base = id * bits as usize;
    let ob = o * k + g * 32;
    #[unroll]
    for w in 0..bits {
        let word = u32::cast_from(codes[base + w as usize]);
        #[unroll]
        for i in 0..per_word {
            let q = f32::cast_from((word >> (i * bits)) & mask);
            out[ob + (w * per_word + i) as usize] = F::cast_from(q * scale + min);
        }
    }
}

/// The dimensions of a cube tensor.
fn dims(t: &CubeTensor) -> Vec<usize> {
    t.meta.shape().to_vec()
}

/// The packed parts of a `[n, k]` matrix (`codes` `[n, k / 32, bits]`, group parameters, super-block
/// maxima) and their layout.
struct PackedParts {
    codes: IntTensor<CubeBackend>,
    group_params: IntTensor<CubeBackend>,
    supers: FloatTensor<CubeBackend>,
    bits: usize,
    groups_per_super: usize,
}

/// `x` `[m, k]` times the transpose of the packed matrix, with `extras`: `[m, n]`, or with `silu`
/// `[m, n / 2]`. At most [`FUSED_MAX_ROWS`] rows (decoding) take one launch of [`packed_matmul_kernel`];
/// longer inputs dequantise the matrix for Burn's product, with the extras in passes of their own.
fn packed_product(
    x: FloatTensor<CubeBackend>,
    parts: PackedParts,
    extras: RowExtras,
) -> FloatTensor<CubeBackend> {
    let (xd, rows) = (dims(&x), dims(&parts.codes)[0]);
    let (m, k) = (xd[0], xd[1]);
    if m > FUSED_MAX_ROWS {
        let PackedParts {
            codes,
            group_params,
            supers,
            bits,
            groups_per_super,
        } = parts;
        let dense =
            CubeBackend::packed_dequantize(codes, group_params, supers, bits, groups_per_super);
        let w = CubeBackend::float_transpose(dense);
        return extras.apart(x, |x| CubeBackend::float_matmul(x, w));
    }
    let dtype = parts.supers.dtype;
    debug_assert_eq!(x.dtype, dtype);
    let x = into_contiguous(x);
    let (codes, group_params, supers) = (
        into_contiguous(parts.codes),
        into_contiguous(parts.group_params),
        into_contiguous(parts.supers),
    );
    assert_eq!(
        dims(&codes)[1] * GROUP,
        k,
        "packed_matmul: x {xd:?} and a packed matrix of {rows} rows of {} do not chain",
        dims(&codes)[1] * GROUP
    );
    let (silu, n) = (extras.silu, extras.outputs(rows, "packed_matmul"));
    let out = empty_like(&supers, Shape::new([m, n]));
    if m == 0 || n == 0 {
        return out;
    }
    let (gamma, eps, residual) = extras.prepare(m, k, n, "packed_matmul");
    let (norm, add) = (gamma.is_some(), residual.is_some());
    // Units per weight row: a power of two up to 32 that leaves none without a group (a 768-wide
    // row has 24 groups: 16 lanes; a 4096-wide one 128: 32 lanes, 4 groups each).
    let groups = k / GROUP;
    let lanes = 1usize << groups.clamp(1, MAX_LANES).ilog2();
    let rows_per_cube = CUBE_UNITS as usize / lanes;
    let cubes = n.div_ceil(rows_per_cube);
    let cubes_x = cubes.clamp(1, MAX_CUBES_X);
    let count = CubeCount::Static(cubes_x as u32, m as u32, cubes.div_ceil(cubes_x) as u32);
    // SAFETY: every index the kernel reads is inside the contiguous inputs, whose shapes are tied by
    // the packed layout (`codes` `[rows, k/32, bits]`, two groups' parameters per word, `2 · groups /
    // groups_per_super` maxima per row), `gamma` `[k]` and `residual` `[m, n]` (checked above; without
    // their flag the kernel reads neither, bound to `x`); weight rows past `n` (`2n` with `silu`, whose
    // up rows are `n..2n`) are skipped, and each output element is written by one unit.
    unsafe {
        packed_matmul_kernel::launch_unchecked(
            &out.client,
            count,
            CubeDim::new_2d(lanes as u32, rows_per_cube as u32),
            x.clone().into_tensor_arg(),
            codes.into_tensor_arg(),
            group_params.into_tensor_arg(),
            supers.into_tensor_arg(),
            gamma.unwrap_or_else(|| x.clone()).into_tensor_arg(),
            residual.unwrap_or_else(|| x.clone()).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            eps,
            parts.bits as u32,
            parts.groups_per_super as u32,
            lanes as u32,
            norm,
            silu,
            add,
            dtype_to_storage_type(dtype),
        );
    }
    out
}

impl PackedOps for CubeBackend {
    fn packed_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let parts = PackedParts {
            codes,
            group_params,
            supers,
            bits,
            groups_per_super,
        };
        packed_product(x, parts, RowExtras::none())
    }

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
        let parts = PackedParts {
            codes,
            group_params,
            supers,
            bits,
            groups_per_super,
        };
        packed_product(x, parts, RowExtras::normed(norm, eps, silu))
    }

    fn packed_matmul_add(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let parts = PackedParts {
            codes,
            group_params,
            supers,
            bits,
            groups_per_super,
        };
        packed_product(x, parts, RowExtras::plus(residual))
    }

    fn packed_dequantize(
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let (codes, group_params, supers) = (
            into_contiguous(codes),
            into_contiguous(group_params),
            into_contiguous(supers),
        );
        let cd = dims(&codes);
        let (n, groups) = (cd[0], cd[1]);
        let dtype = supers.dtype;
        let out = empty_like(&supers, Shape::new([n, groups * GROUP]));
        let (count, cube_dim) = per_value(&supers, n * groups);
        // SAFETY: as for the product; unit `id` writes only its own group's 32 values.
        unsafe {
            packed_dequantize_kernel::launch_unchecked(
                &out.client,
                count,
                cube_dim,
                codes.into_tensor_arg(),
                group_params.into_tensor_arg(),
                supers.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                bits as u32,
                groups_per_super as u32,
                dtype_to_storage_type(dtype),
            );
        }
        out
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{DType, Device, DeviceKind, Tensor, TensorData};

    use super::super::QuantizedMatrix;
    use super::super::pack::quantize;
    use crate::fused::rms_norm::rms_norm;
    use crate::fused::test_support::{host, reference_product, spread_values as values};
    use crate::kernels::applies;

    /// Each kernel against the host reference ([`super::super::Packed::dequantize`]), in f32 and f16:
    /// 1 and 3 input rows take the fused product, 20 the dequantise-then-multiply path; 9 groups per row
    /// leave a half-used parameter word and 8 lanes per weight row, 24 make three super-blocks and 16
    /// lanes, and one group per row over 40 000 rows leaves the last cube partly past the matrix.
    #[test]
    fn kernels_match_the_host_reference_on_wgpu() {
        let gpu = Device::wgpu(DeviceKind::DefaultDevice);
        for (n, k, input_rows) in [
            (70, 9 * 32, &[1usize, 3, 20][..]),
            (33, 24 * 32, &[1, 20]),
            (40_000, 32, &[1]),
        ] {
            let w = values(n * k, n);
            for bits in [4, 8] {
                for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::F16, 4e-3)] {
                    // Maxima rounded to `dtype`, so the device computes with the reference's values.
                    let packed = quantize(&w, n, k, bits, dtype);
                    let reference = packed.dequantize();
                    assert!(applies(&gpu, dtype));
                    let m = QuantizedMatrix::upload(packed, &gpu, dtype);
                    let dense = host(m.dequantize());
                    let dense_ref: Vec<f32> = match dtype {
                        DType::F16 => reference
                            .iter()
                            .map(|&v| half::f16::from_f32(v).to_f32())
                            .collect(),
                        _ => reference.clone(),
                    };
                    let same = dense.iter().zip(&dense_ref).filter(|(a, b)| a == b).count();
                    assert_eq!(
                        same,
                        n * k,
                        "{n}×{k}, {bits} bits, {dtype:?}: dequantised values differ"
                    );
                    for &rows in input_rows {
                        let x = values(rows * k, rows + 1);
                        let want = reference_product(&x, rows, k, n, |i, o| reference[o * k + i]);
                        let xt =
                            Tensor::<2>::from_data(TensorData::new(x, [rows, k]), &gpu).cast(dtype);
                        let got = m.matmul_t(xt);
                        assert_eq!(got.dims(), [rows, n]);
                        let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
                        let what = format!("{n}×{k}, {bits} bits, {dtype:?}, {rows} rows");
                        assert_within(&host(got), &want, tol, scale, &what);
                    }
                }
            }
        }
    }

    /// `got` against `want` within `tol` of `scale` (`what` names the case).
    fn assert_within(got: &[f32], want: &[f32], tol: f32, scale: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= tol * scale, "{what} [{i}]: {a} vs {b}");
        }
    }

    /// The steps a decoder layer takes in the packed product's launch, against the same steps apart: the
    /// RMSNorm (its own kernel) then an f64 product of the dequantised matrix; SwiGLU's activation of
    /// that product's halves in f64; the residual plus the kernel's plain product, rounded to the type
    /// as two launches store it. Shapes as in the plain kernel's test, plus a 4096-wide input (32 lanes);
    /// 1 and 3 input rows take one launch, 20 the separate steps.
    #[test]
    fn fused_steps_match_the_separate_ones_on_wgpu() {
        let gpu = Device::wgpu(DeviceKind::DefaultDevice);
        for (n, k) in [(35, 9 * 32), (17, 24 * 32), (24, 128 * 32)] {
            // Gate rows then up rows, scaled so the gate's sums cover the sigmoid's range without
            // saturating it everywhere.
            let w: Vec<f32> = values(2 * n * k, n)
                .iter()
                .map(|v| v / (k as f32).sqrt())
                .collect();
            for bits in [4, 8] {
                for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::F16, 4e-3)] {
                    let packed = quantize(&w, 2 * n, k, bits, dtype);
                    let reference = packed.dequantize();
                    let m = QuantizedMatrix::upload(packed, &gpu, dtype);
                    let gamma = Tensor::<1>::from_data(TensorData::new(values(k, 7), [k]), &gpu)
                        .cast(dtype);
                    // 20 rows take the separate steps (`QuantizedMatrix`'s own fallback).
                    for rows in [1usize, 3, 20] {
                        let what = format!("{}×{k}, {bits} bits, {dtype:?}, {rows} rows", 2 * n);
                        let x = Tensor::<2>::from_data(
                            TensorData::new(values(rows * k, rows + 1), [rows, k]),
                            &gpu,
                        )
                        .cast(dtype);
                        assert_eq!(m.fuses(&x), rows <= 8, "{what}: the fused launch or not");
                        let normed = host(rms_norm(x.clone(), gamma.clone(), 1e-5));
                        let h =
                            reference_product(&normed, rows, k, 2 * n, |i, o| reference[o * k + i]);
                        let scale = h.iter().fold(1.0f32, |a, v| a.max(v.abs()));
                        let got = host(m.norm_matmul_t(x.clone(), gamma.clone(), 1e-5, false));
                        assert_within(&got, &h, tol, scale, &format!("norm {what}"));
                        let silu: Vec<f32> = (0..rows * n)
                            .map(|i| {
                                let (r, j) = (i / n, i % n);
                                let g = h[r * 2 * n + j] as f64;
                                let u = h[r * 2 * n + n + j] as f64;
                                (g / (1.0 + (-g).exp()) * u) as f32
                            })
                            .collect();
                        let got = m.norm_matmul_t(x.clone(), gamma.clone(), 1e-5, true);
                        assert_eq!(got.dims(), [rows, n]);
                        let silu_scale = silu.iter().fold(1.0f32, |a, v| a.max(v.abs()));
                        assert_within(
                            &host(got),
                            &silu,
                            2.0 * tol,
                            silu_scale,
                            &format!("silu {what}"),
                        );
                        let residual = Tensor::<2>::from_data(
                            TensorData::new(values(rows * 2 * n, 3), [rows, 2 * n]),
                            &gpu,
                        )
                        .cast(dtype);
                        let product = host(m.matmul_t(x.clone()));
                        let sum: Vec<f32> = host(residual.clone())
                            .iter()
                            .zip(&product)
                            .map(|(a, b)| a + b)
                            .collect();
                        let want = host(
                            Tensor::<2>::from_data(TensorData::new(sum, [rows, 2 * n]), &gpu)
                                .cast(dtype),
                        );
                        let got = host(m.matmul_t_add(x, residual));
                        let add_tol = if dtype == DType::F32 { 1e-6 } else { 1e-3 };
                        let add_scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
                        assert_within(&got, &want, add_tol, add_scale, &format!("add {what}"));
                    }
                }
            }
        }
    }
}
