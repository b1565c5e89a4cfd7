//! The matrix products of decoding, one input row times a `[k, n]` weight, as a kernel made for reading
//! the weight once at the memory's speed. Decoding a 7B model multiplies one row by each of ~14 GB of
//! weights per token; Burn's autotuned product picks among tiled kernels made for many rows, and on an
//! H200 through wgpu a whole token took 80 ms with it, 4 % of the memory-bandwidth floor, and 17–27 ms
//! with this kernel (BENCHMARKS.md, GPU). So on CubeCL runtimes the products of inputs of at most
//! [`ROW_MATMUL_MAX_ROWS`] rows take it by default (`LLAVA_MED_GPU_ROW_MATMUL=0` switches back to Burn's
//! product, for comparison); longer inputs and other backends take Burn's product. It splits the inputs
//! into chunks so that even a 4096-wide product spreads over ~1,000 cubes (a tiled kernel of one row
//! gives a large GPU a few dozen warps), a warp's 32 units read 32 neighbouring weights of one input row
//! at a time, and the chunks' partial sums are added by a second small kernel (which for the MLP's gate/up
//! product also takes SwiGLU's activation, `Linear::forward_silu_mul`, saving it a launch). On lavapipe it is 10–40×
//! slower than Burn's product (`examples/gpu_ops.rs`), which says nothing about a GPU: the CPU runs a
//! cube's 256 units as a loop, and no one decodes on lavapipe (`--device auto` skips it).

use burn::tensor::Tensor;

use super::extension;
use crate::kernels;

/// Inputs of at most this many rows may take the kernel (each row is its own pass over the weight).
pub const ROW_MATMUL_MAX_ROWS: usize = 8;

/// Whether the kernel is on: unless `LLAVA_MED_GPU_ROW_MATMUL=0` (read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| switch_on(std::env::var("LLAVA_MED_GPU_ROW_MATMUL").ok().as_deref()))
}

/// The switch's meaning: on unless set to `0`, `off` or `false`.
fn switch_on(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "off" | "false")
    )
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

#[cfg(test)]
mod switch_tests {
    use super::switch_on;

    #[test]
    fn the_kernel_is_on_unless_switched_off() {
        for on in [None, Some("1"), Some("on"), Some("")] {
            assert!(switch_on(on), "{on:?}");
        }
        for off in ["0", "off", "FALSE", " 0 "] {
            assert!(!switch_on(Some(off)), "{off:?}");
        }
    }
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

    /// The kernel with SwiGLU's activation in its summing launch against `silu(gate) · up` of an f64
    /// product on the host (one and several chunks, a partial column tile, several rows).
    pub fn check_silu_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (m, k, inner) in [(1, 64, 48), (3, 1037, 130), (2, 4096, 256)] {
            let n = 2 * inner;
            let (x, w) = (values(m * k, m + k), values(k * n, n + 1));
            let xt = Tensor::<2>::from_data(TensorData::new(x, [m, k]), device).cast(dtype);
            // Scaled so the gate's sums cover the sigmoid's range without saturating it everywhere.
            let wt = Tensor::<2>::from_data(TensorData::new(w, [k, n]), device).cast(dtype)
                / (k as f32).sqrt();
            let (xh, wh) = (host(xt.clone()), host(wt.clone()));
            let got = host(super::extension::row_matmul_silu(xt, wt));
            let h = reference_product(&xh, m, k, n, |i, j| wh[i * n + j]);
            assert_eq!(got.len(), m * inner);
            for (i, a) in got.iter().enumerate() {
                let (r, j) = (i / inner, i % inner);
                let (g, u) = (h[r * n + j] as f64, h[r * n + inner + j] as f64);
                let b = (g / (1.0 + (-g).exp()) * u) as f32;
                assert!(
                    (a - b).abs() <= tol * 8.0 * b.abs().max(1.0),
                    "{m}×{k}·{k}×{n} {dtype:?} [{i}]: {a} vs {b}"
                );
            }
        }
    }
}
