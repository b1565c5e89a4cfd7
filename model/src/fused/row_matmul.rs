//! The matrix products of decoding, one input row times a weight stored a row per output (`[n, k]`,
//! PyTorch's layout), as a kernel made to read the weight once at the memory's speed, and in as few
//! launches as a decoder layer allows. Decoding a 7B model multiplies one row by each of ~14 GB of weights
//! per token; Burn's autotuned product picks among tiled kernels made for many rows, and on an H200
//! through wgpu a whole token took 80 ms with it, 4 % of the memory-bandwidth floor (BENCHMARKS.md, GPU).
//! So on CubeCL runtimes the float weights of linear layers are stored `[out, in]` ([`crate::linear`]),
//! and products of inputs of at most [`ROW_MATMUL_MAX_ROWS`] rows take this kernel by default
//! (`LLAVA_MED_GPU_ROW_MATMUL=0` switches back to Burn's product over the transposed view, for
//! comparison); longer inputs and other backends take Burn's product.
//!
//! A warp's 32 units read 32 neighbouring vectors of one row at a time (the widest loads the runtime offers
//! that divide the row) and each output's whole sum stays in one cube, so a product is one launch; the layer's neighbouring steps come along in it (the RMSNorm
//! before q/k/v and gate/up, SwiGLU's activation after gate/up, the residual addition after the output and
//! down projections: [`super::extension::FusedOps::norm_row_matmul`], `row_matmul_add`). Launches, not
//! bytes, bounded decoding through wgpu (~40 µs of the host's time each, BENCHMARKS.md): a layer is 5 of
//! them this way (with q/k/v's attention step; `lm::DecoderLayer::forward_in_products`), against 10 with
//! a split product whose chunks a second launch summed and the norms and sums in passes of their own. On lavapipe the kernel is far slower than Burn's product (`examples/gpu_ops.rs`), which
//! says nothing about a GPU: the CPU runs a cube's 256 units as a loop, and no one decodes on lavapipe
//! (`--device auto` skips it).

use burn::tensor::Tensor;

use super::extension;
use crate::kernels;

/// Inputs of at most this many rows may take the kernel (each row is its own pass over the weight).
pub const ROW_MATMUL_MAX_ROWS: usize = 8;

/// Whether the kernel is on: unless `LLAVA_MED_GPU_ROW_MATMUL=0` (read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        kernels::switch_on(std::env::var("LLAVA_MED_GPU_ROW_MATMUL").ok().as_deref())
    })
}

/// Inputs of at most this many rows may take the CPU's product (which past 8 rows needs AVX-512 or AVX2,
/// else hands them to Burn's); longer ones only where the CPU has AMX (`fused::cpu::amx_matmul`).
pub const CPU_MAX_ROWS: usize = 128;

/// Whether the CPU's few-row product is on: unless `LLAVA_MED_CPU_ROW_MATMUL=0` (read once; for
/// comparison with Burn's product).
pub fn cpu_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        kernels::switch_on(std::env::var("LLAVA_MED_CPU_ROW_MATMUL").ok().as_deref())
    })
}

/// Whether `x` `[m, k]` times a float weight `[k, n]` as the CPU backend stores it takes the CPU's
/// own product ([`extension::few_rows_matmul`], threaded over tiles of the weight; any row count where
/// the CPU has AMX) rather than Burn's (single-threaded gemm for decoding-sized products).
pub fn takes_cpu_kernel(x: &Tensor<2>, w: &Tensor<2>) -> bool {
    let max_rows = if kernels::has_amx_bf16() {
        usize::MAX
    } else {
        CPU_MAX_ROWS
    };
    cpu_takes(x, w, w.dims()[0], max_rows)
}

/// Whether a CPU product takes `x` `[m, k]` against a weight of `inputs` inputs: `m` at most
/// `max_rows`, one float type the CPU kernels have, and the kernels on.
fn cpu_takes(x: &Tensor<2>, w: &Tensor<2>, inputs: usize, max_rows: usize) -> bool {
    let [m, k] = x.dims();
    let device = x.device();
    m <= max_rows
        && k == inputs
        && x.dtype() == w.dtype()
        && !kernels::on_cube(&device)
        && kernels::applies(&device, x.dtype())
        && cpu_enabled()
}

/// Whether `x` `[m, k]` times the transpose of `w` `[n, k]` (on the CPU, a tied output head) takes the
/// CPU's threaded product by weight rows ([`extension::row_matmul`] on the CPU backend) rather than
/// Burn's (single-threaded for decoding: 10.5 ms for SmolLM2's 49,152 × 576 head, ~11 GB/s).
pub fn takes_cpu_rows_kernel(x: &Tensor<2>, w: &Tensor<2>) -> bool {
    cpu_takes(x, w, w.dims()[1], ROW_MATMUL_MAX_ROWS)
}

/// `x` `[m, k]` times the transpose of `w` `[n, k]`: `[m, n]`.
pub fn row_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if takes_kernel(&x, &w) || takes_cpu_rows_kernel(&x, &w) {
        return extension::row_matmul(x, w);
    }
    x.matmul(w.transpose())
}

/// Whether the kernel can take these operands (a CubeCL device, a few rows, one type).
pub fn fits_kernel(x: &Tensor<2>, w: &Tensor<2>) -> bool {
    let ([m, k], [_, wk]) = (x.dims(), w.dims());
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

    use super::super::extension;
    use super::super::rms_norm::rms_norm;
    use super::super::test_support::{host, reference_product, spread_values as values};

    /// Shapes with fewer outputs than a cube's rows, a partial last cube, inputs that are not a multiple
    /// of the lanes or of four loads, several cubes, 1 to 8 rows.
    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 64, 96),
        (3, 200, 130),
        (1, 3000, 1000),
        (8, 1037, 257),
        (2, 4096, 384),
        (1, 5, 3),
    ];

    /// `[rows, cols]` of `values` rounded to `dtype` on `device`, and the rounded values on the host (so
    /// references multiply what the device holds).
    fn operand(
        rows: usize,
        cols: usize,
        seed: usize,
        device: &Device,
        dtype: DType,
    ) -> (Tensor<2>, Vec<f32>) {
        let t = Tensor::<2>::from_data(
            TensorData::new(values(rows * cols, seed), [rows, cols]),
            device,
        )
        .cast(dtype);
        let h = host(t.clone());
        (t, h)
    }

    /// `got` against `want` within `tol` of the larger of `scale` and the value.
    fn assert_near(got: &[f32], want: &[f32], tol: f32, scale: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * scale.max(b.abs()),
                "{what} [{i}]: {a} vs {b}"
            );
        }
    }

    /// The kernel against an f64 product on the host.
    pub fn check_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (m, k, n) in SHAPES {
            let ((xt, xh), (wt, wh)) = (
                operand(m, k, m + k, device, dtype),
                operand(n, k, n, device, dtype),
            );
            assert!(
                super::fits_kernel(&xt, &wt),
                "{m}×{k}·({n}×{k})ᵀ {dtype:?} must fit the kernel"
            );
            // The kernel itself, and `row_matmul` when the switch routes it there (Burn's product is not
            // run otherwise: autotuning it on lavapipe takes a minute per shape).
            let routed = super::takes_kernel(&xt, &wt)
                .then(|| host(super::row_matmul(xt.clone(), wt.clone())));
            let got = extension::row_matmul(xt, wt);
            assert_eq!(got.dims(), [m, n]);
            let got = host(got);
            let want = reference_product(&xh, m, k, n, |i, j| wh[j * k + i]);
            // Relative to the size of the terms (a sum of k products of values up to 8).
            let what = format!("{m}×{k}·({n}×{k})ᵀ {dtype:?}");
            assert_near(&got, &want, tol, (k as f32).sqrt() * 4.0, &what);
            if let Some(routed) = routed {
                assert_eq!(routed, got, "{what}: row_matmul ≠ the kernel");
            }
        }
    }

    /// With the RMSNorm of the input in the same launch, against the RMSNorm kernel (itself held to the
    /// tensor ops) then an f64 product; and with SwiGLU's activation after it, against `silu(gate) · up` of
    /// that product in f64.
    pub fn check_norm_against_reference(device: &Device, dtype: DType, tol: f32) {
        for (m, k, n) in SHAPES {
            let (xt, _) = operand(m, k, m + k, device, dtype);
            let (gamma, _) = operand(1, k, 7, device, dtype);
            let gamma = gamma.reshape([k]);
            // Scaled so the gate's sums cover the sigmoid's range without saturating it everywhere.
            let (wt, _) = operand(2 * n, k, n + 1, device, dtype);
            let wt = wt / (k as f32).sqrt();
            let wh = host(wt.clone());
            let normed = host(rms_norm(xt.clone(), gamma.clone(), 1e-5));
            let h = reference_product(&normed, m, k, 2 * n, |i, j| wh[j * k + i]);
            let what = format!("norm {m}×{k}·({}×{k})ᵀ {dtype:?}", 2 * n);
            let got = host(extension::norm_row_matmul(
                xt.clone(),
                gamma.clone(),
                wt.clone(),
                1e-5,
                false,
            ));
            assert_near(&got, &h, tol, 4.0, &what);
            let got = host(extension::norm_row_matmul(xt, gamma, wt, 1e-5, true));
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    let (g, u) = (h[r * 2 * n + j] as f64, h[r * 2 * n + n + j] as f64);
                    (g / (1.0 + (-g).exp()) * u) as f32
                })
                .collect();
            assert_near(&got, &want, tol * 2.0, 4.0, &format!("silu {what}"));
        }
    }

    /// With the residual added in the same launch, against the sum on the host of the residual and the
    /// kernel's own product (each rounded to the tensors' type, as two launches would store them).
    pub fn check_add_against_reference(device: &Device, dtype: DType) {
        for (m, k, n) in SHAPES {
            let ((xt, _), (wt, _), (rt, rh)) = (
                operand(m, k, m + k, device, dtype),
                operand(n, k, n, device, dtype),
                operand(m, n, 3, device, dtype),
            );
            let product = host(extension::row_matmul(xt.clone(), wt.clone()));
            let want = host(
                Tensor::<2>::from_data(
                    TensorData::new(
                        rh.iter().zip(&product).map(|(a, b)| a + b).collect(),
                        [m, n],
                    ),
                    device,
                )
                .cast(dtype),
            );
            let got = host(extension::row_matmul_add(xt, wt, rt));
            // The same sums, so the same values up to the last bit of the type's addition.
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-3 };
            assert_near(
                &got,
                &want,
                tol,
                1.0,
                &format!("add {m}×{k}·({n}×{k})ᵀ {dtype:?}"),
            );
        }
    }
}
