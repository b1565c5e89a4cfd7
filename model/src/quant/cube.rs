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
use crate::fused::cube::lane_sum;
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

/// `out[r, o] = Σ_k x[r, k] · W[o, k]`. A cube holds `CUBE_UNITS / lanes` weight rows of one input row `r`;
/// the `lanes` units of a weight row take every `lanes`-th group, as Σ w·x = scale · Σ q·x + min · Σ x,
/// then sum their parts in shared memory.
#[cube(launch_unchecked)]
fn packed_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    codes: &Tensor<i32>,
    params: &Tensor<i32>,
    supers: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] bits: u32,
    #[comptime] gps: u32,
    #[comptime] lanes: u32,
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
    let mut acc = 0.0f32;
    // Not an early exit: every unit must reach the barriers below.
    if o < n {
        let mut g = UNIT_POS_X as usize;
        while g < groups {
            let (scale, min) = group_scale_min::<F>(params, supers, o, g, groups, gps);
            let base = (o * groups + g) * bits as usize;
            let xb = r * k + g * 32;
            let mut dot = 0.0f32;
            let mut sum = 0.0f32;
            #[unroll]
            for w in 0..bits {
                let word = u32::cast_from(codes[base + w as usize]);
                #[unroll]
                for i in 0..per_word {
                    let q = f32::cast_from((word >> (i * bits)) & mask);
                    let v = f32::cast_from(x[xb + (w * per_word + i) as usize]);
                    dot += q * v;
                    sum += v;
                }
            }
            acc += scale * dot + min * sum;
            g += lanes as usize;
        }
    }
    let total = lane_sum(acc, lanes);
    if UNIT_POS_X == 0 && o < n {
        out[r * n + o] = F::cast_from(total);
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

impl PackedOps for CubeBackend {
    fn packed_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let (xd, n) = (dims(&x), dims(&codes)[0]);
        let (m, k) = (xd[0], xd[1]);
        if m > FUSED_MAX_ROWS {
            let dense =
                Self::packed_dequantize(codes, group_params, supers, bits, groups_per_super);
            return Self::float_matmul(x, Self::float_transpose(dense));
        }
        let dtype = supers.dtype;
        debug_assert_eq!(x.dtype, dtype);
        let x = into_contiguous(x);
        let (codes, group_params, supers) = (
            into_contiguous(codes),
            into_contiguous(group_params),
            into_contiguous(supers),
        );
        debug_assert_eq!(dims(&codes)[1] * GROUP, k);
        let out = empty_like(&supers, Shape::new([m, n]));
        // Units per weight row: a power of two up to 32 that leaves none without a group (a 768-wide
        // row has 24 groups: 16 lanes; a 4096-wide one 128: 32 lanes, 4 groups each).
        let groups = k / GROUP;
        let lanes = 1usize << groups.clamp(1, MAX_LANES).ilog2();
        let rows_per_cube = CUBE_UNITS as usize / lanes;
        let cubes = n.div_ceil(rows_per_cube);
        let cubes_x = cubes.clamp(1, MAX_CUBES_X);
        let count = CubeCount::Static(cubes_x as u32, m as u32, cubes.div_ceil(cubes_x) as u32);
        // SAFETY: every index the kernel reads is inside the contiguous inputs, whose shapes are tied by
        // the packed layout (`codes` `[n, k/32, bits]`, two groups' parameters per word, `2 · groups /
        // groups_per_super` maxima per row), weight rows past `n` are skipped, and each output element is
        // written by one unit.
        unsafe {
            packed_matmul_kernel::launch_unchecked(
                &out.client,
                count,
                CubeDim::new_2d(lanes as u32, rows_per_cube as u32),
                x.into_tensor_arg(),
                codes.into_tensor_arg(),
                group_params.into_tensor_arg(),
                supers.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                bits as u32,
                groups_per_super as u32,
                lanes as u32,
                dtype_to_storage_type(dtype),
            );
        }
        out
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
                        let got = host(got);
                        let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= tol * scale,
                                "{n}×{k}, {bits} bits, {dtype:?}, {rows} rows, [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
