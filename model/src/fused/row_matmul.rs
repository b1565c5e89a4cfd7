//! The matrix products of decoding, one input row times a `[k, n]` weight, as a kernel made for reading
//! the weight once at the memory's speed. Decoding a 7B model multiplies one row by each of ~14 GB of
//! weights per token; Burn's autotuned product picks among tiled kernels made for many rows, and on an
//! H200 through wgpu a whole token took 79 ms, 4 % of the memory-bandwidth floor (BENCHMARKS.md, GPU).
//! Off until a GPU has measured it (none has: the first GPU session found the problem but had no time
//! left): `LLAVA_MED_GPU_ROW_MATMUL=1` routes the products of inputs of at most [`ROW_MATMUL_MAX_ROWS`]
//! rows on CubeCL runtimes through this kernel; otherwise, and for longer inputs and other backends,
//! Burn's product runs. It splits the inputs into chunks so that even a 4096-wide product spreads over
//! ~1,000 cubes (a tiled kernel of one row gives a large GPU a few dozen warps), a warp's 32 units read
//! 32 neighbouring weights of one input row at a time, and the chunks' partial sums are added by a
//! second small kernel. On lavapipe it is 10–40× slower than Burn's product (`examples/gpu_ops.rs`),
//! which says little about a GPU: the CPU runs a cube's 256 units as a loop.

use burn::tensor::Tensor;

use super::extension;
use crate::kernels;

/// Inputs of at most this many rows may take the kernel (each row is its own pass over the weight).
pub const ROW_MATMUL_MAX_ROWS: usize = 8;

/// Whether `LLAVA_MED_GPU_ROW_MATMUL=1` switched the kernel on (read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LLAVA_MED_GPU_ROW_MATMUL").is_ok_and(|v| v == "1"))
}

/// `x` `[m, k]` times `w` `[k, n]`: `[m, n]`.
pub fn row_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if takes_kernel(&x, &w) {
        return extension::row_matmul(x, w);
    }
    x.matmul(w)
}

/// Whether the kernel can take these operands (a CubeCL device, a few rows, one type).
pub fn fits_kernel(x: &Tensor<2>, w: &Tensor<2>) -> bool {
    let ([m, k], [wk, _]) = (x.dims(), w.dims());
    let device = x.device();
    m <= ROW_MATMUL_MAX_ROWS
        && k == wk
        && x.dtype() == w.dtype()
        && kernels::on_cube(&device)
        && kernels::applies(&device, x.dtype())
}

/// Whether [`row_matmul`] runs the kernel for these operands.
pub fn takes_kernel(x: &Tensor<2>, w: &Tensor<2>) -> bool {
    enabled() && fits_kernel(x, w)
}

// Run by the CubeCL kernels' tests (`fused::cube`), on wgpu.
#[cfg(all(test, feature = "wgpu"))]
pub(crate) mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::super::test_support::{host, reference_product, spread_values as values};

    /// The kernel against an f64 product on the host, for shapes that leave partial column tiles (n not
    /// a multiple of 128), partial input chunks, several chunks and fewer inputs than a cube's slices,
    /// with 1 to 8 rows.
    pub fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (m, k, n) in [
            (1, 64, 96),
            (3, 200, 130),
            (1, 3000, 1000),
            (8, 1037, 257),
            (2, 4096, 384),
            (1, 5, 300),
        ] {
            let (x, w) = (values(m * k, m + k), values(k * n, n));
            // Rounded to `dtype` first, so the reference multiplies the values the device holds.
            let xt = Tensor::<2>::from_data(TensorData::new(x, [m, k]), device).cast(dtype);
            let wt = Tensor::<2>::from_data(TensorData::new(w, [k, n]), device).cast(dtype);
            assert!(
                super::fits_kernel(&xt, &wt),
                "{m}×{k}·{k}×{n} {dtype:?} must fit the kernel"
            );
            let (xh, wh) = (host(xt.clone()), host(wt.clone()));
            // The kernel itself, and `row_matmul` when the switch routes it there (Burn's product is not
            // run otherwise: autotuning it on lavapipe takes a minute per shape).
            let routed = super::takes_kernel(&xt, &wt)
                .then(|| host(super::row_matmul(xt.clone(), wt.clone())));
            let got = super::extension::row_matmul(xt, wt);
            assert_eq!(got.dims(), [m, n]);
            let got = host(got);
            let want = reference_product(&xh, m, k, n, |i, j| wh[i * n + j]);
            // Relative to the size of the terms (a sum of k products of values up to 8).
            let scale = (k as f32).sqrt() * 4.0;
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= tol * scale.max(b.abs()),
                    "{m}×{k}·{k}×{n} {dtype:?} [{i}]: {a} vs {b}"
                );
            }
            if let Some(routed) = routed {
                assert_eq!(
                    routed, got,
                    "{m}×{k}·{k}×{n} {dtype:?}: row_matmul ≠ the kernel"
                );
            }
        }
    }
}
