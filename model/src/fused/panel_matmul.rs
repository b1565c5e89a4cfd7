//! Float weights stored in column panels on AVX2-only CPUs: `[n / 16, k, 16]`, each block of 16
//! outputs a contiguous `k` × 16 run, the order the AVX2 register tiles read (`cpu/tiled_matmul.rs`). In
//! the CPU backend's `[in, out]` layout a block's rows lie `n` values apart, so every product copied its
//! panels first (the tiles; gemm packs its own copy too, ~8 % of a first prompt's time on the Zen 3 CI
//! machine): here they are laid out once, at load. On that machine, weights from memory, the tiles over
//! panels ran 1.2–2× the copying tiles at 4–45 rows, level to 1.1× the one-row kernel (`few_rows.rs`)
//! and 3–25 % ahead of gemm at 197–242 rows, level at 512 (BENCHMARKS.md), so every product of a
//! panel-stored layer takes them. CPUs with AVX-512 keep `[in, out]` (their tiles and AMX read it), as
//! does every other backend, a 16-bit model, a width not a multiple of 16, and
//! `LLAVA_MED_CPU_ROW_MATMUL=0` (Burn's product, for comparison).

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::extension;
use super::row_matmul::cpu_enabled;
use crate::host_memory::zeroed_on_huge_pages;
use crate::kernels;

/// Outputs per panel: two AVX2 vectors, the width of the AVX2 register tile.
pub const PANEL_WIDTH: usize = 16;

/// Whether a float layer of `outputs` outputs on `device` in `dtype` is stored in panels: the CPU
/// backend in f32 on a CPU with AVX2 and FMA but not AVX-512, `outputs` a multiple of
/// [`PANEL_WIDTH`], and the CPU kernels on.
pub fn wanted(device: &Device, dtype: DType, outputs: usize) -> bool {
    outputs > 0
        && outputs.is_multiple_of(PANEL_WIDTH)
        && kernels::on_cpu(device)
        && kernels::applies(device, dtype)
        && kernels::has_avx2_fma()
        && !kernels::has_avx512f()
        && cpu_enabled()
}

/// The panels of a weight stored a row per output, `rows` `[n, k]` (PyTorch's layout), on huge pages
/// where Linux grants them (as the loader's other weights: [`zeroed_on_huge_pages`]).
pub fn from_rows(rows: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(rows.len(), n * k, "a [{n}, {k}] weight");
    assert!(n.is_multiple_of(PANEL_WIDTH), "{n} outputs");
    let mut panels = zeroed_on_huge_pages::<f32>(n * k);
    fill_panels(&mut panels, k, |b, panel| {
        // Written in order, read as 16 rows side by side (each a stream the prefetcher follows).
        let block = &rows[b * PANEL_WIDTH * k..][..PANEL_WIDTH * k];
        for (i, out) in panel.chunks_exact_mut(PANEL_WIDTH).enumerate() {
            for (c, o) in out.iter_mut().enumerate() {
                *o = block[c * k + i];
            }
        }
    });
    panels
}

/// The panels of a weight stored `[k, n]` (the CPU backend's `[in, out]`), on huge pages as
/// [`from_rows`]'.
pub fn from_columns(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "a [{k}, {n}] weight");
    // Its rows are the stretches, in order.
    from_stretches(k, n, n.max(1), |i, row| {
        row.copy_from_slice(&w[i * n..][..row.len()])
    })
}

/// The panels of a `[k, n]` weight whose values, in row-major order, come in stretches of `stretch`
/// values: stretch `s` (values `s · stretch..`) drawn by `draw(s, values)` on one of the cores and
/// written into place from there (a random model's weights, without a `[k, n]` copy first).
pub fn from_stretches(
    k: usize,
    n: usize,
    stretch: usize,
    draw: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    assert!(n.is_multiple_of(PANEL_WIDTH) && stretch > 0, "{n} outputs");
    let len = k * n;
    let mut panels = zeroed_on_huge_pages::<f32>(len);
    let stretches = len.div_ceil(stretch);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = stretches.div_ceil(threads).max(1);
    let out = Disjoint(panels.as_mut_ptr());
    let (out, draw) = (&out, &draw);
    std::thread::scope(|scope| {
        for t in 0..threads.min(stretches) {
            scope.spawn(move || {
                let mut values = vec![0.0f32; stretch];
                for s in t * per_thread..((t + 1) * per_thread).min(stretches) {
                    let start = s * stretch;
                    let values = &mut values[..stretch.min(len - start)];
                    draw(s, values);
                    // Runs of a row inside one panel: value (i, c) goes to panel c / 16, row i.
                    let (mut i, mut c) = (start / n, start % n);
                    let mut rest = &values[..];
                    while !rest.is_empty() {
                        let run = (PANEL_WIDTH - c % PANEL_WIDTH).min(rest.len());
                        let at = ((c / PANEL_WIDTH) * k + i) * PANEL_WIDTH + c % PANEL_WIDTH;
                        // SAFETY: (i, c) ↦ `at` is one-to-one onto `0..len`, and the stretches, so
                        // their runs, are disjoint: no two threads write one value; `at + run` stays
                        // inside the run's panel row.
                        unsafe {
                            std::ptr::copy_nonoverlapping(rest.as_ptr(), out.0.add(at), run);
                        }
                        rest = &rest[run..];
                        c += run;
                        if c == n {
                            (i, c) = (i + 1, 0);
                        }
                    }
                }
            });
        }
    });
    panels
}

/// The panels' buffer, written by several threads at disjoint places ([`from_stretches`]).
struct Disjoint(*mut f32);

// SAFETY: the threads holding it write disjoint values, and the buffer outlives them (a scope).
unsafe impl Sync for Disjoint {}

/// Calls `fill(b, panel)` for each panel (`k` × 16 values) of `panels`, the panels shared out over
/// every core (a model's weights are laid out at load, ~1 GB for `base`).
fn fill_panels(panels: &mut [f32], k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) {
    let size = k * PANEL_WIDTH;
    if size == 0 || panels.is_empty() {
        return;
    }
    let blocks = panels.len() / size;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = blocks.div_ceil(threads).max(1);
    let fill = &fill;
    std::thread::scope(|scope| {
        for (t, part) in panels.chunks_mut(per_thread * size).enumerate() {
            scope.spawn(move || {
                for (j, panel) in part.chunks_exact_mut(size).enumerate() {
                    fill(t * per_thread + j, panel);
                }
            });
        }
    });
}

/// `panels` (`[n · k]` values from [`from_rows`] or [`from_columns`]) as a tensor `[n / 16, k, 16]`.
pub fn upload(panels: Vec<f32>, k: usize, n: usize, device: &Device) -> Tensor<3> {
    Tensor::from_data(
        TensorData::new(panels, [n / PANEL_WIDTH, k, PANEL_WIDTH]),
        device,
    )
}

/// A `[k, n]` weight's panels, on its device.
pub fn of_columns(w: Tensor<2>) -> Tensor<3> {
    let [k, n] = w.dims();
    let device = w.device();
    let values = w
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values after convert");
    upload(from_columns(&values, k, n), k, n, &device)
}

/// `x` `[m, k]` times the weight whose panels are `panels` `[n / 16, k, 16]`: `[m, n]`.
pub fn panel_matmul(x: Tensor<2>, panels: Tensor<3>) -> Tensor<2> {
    extension::panel_matmul(x, panels)
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;
    use crate::fused::test_support::{assert_relative, reference_product, unit_values};

    /// Both packings put `w[i][c]` at panel `c / 16`, row `i`, lane `c % 16`, and the product over
    /// panels gives the reference at row counts across every kernel path (one row to past a register
    /// tile and past a panel's rows).
    #[test]
    fn panels_hold_the_weight_and_multiply_like_it() {
        let device = Device::flex();
        for (m, k, n) in [
            (1, 5, 16),
            (3, 130, 48),
            (9, 400, 32),
            (45, 768, 64),
            (200, 70, 16),
        ] {
            let w = unit_values(k * n, 3);
            let rows: Vec<f32> = (0..n * k).map(|j| w[(j % k) * n + j / k]).collect();
            let panels = from_columns(&w, k, n);
            assert_eq!(panels, from_rows(&rows, n, k), "({k}, {n})");
            for stretch in [1, 7, 16, 100, k * n] {
                let drawn = from_stretches(k, n, stretch, |s, values| {
                    values.copy_from_slice(&w[s * stretch..][..values.len()])
                });
                assert_eq!(panels, drawn, "({k}, {n}) in stretches of {stretch}");
            }
            for (i, c) in [(0, 0), (k - 1, n - 1), (k / 2, 17 % n)] {
                let at = ((c / PANEL_WIDTH) * k + i) * PANEL_WIDTH + c % PANEL_WIDTH;
                assert_eq!(panels[at], w[i * n + c]);
            }
            let x = unit_values(m * k, 4);
            let want = reference_product(&x, m, k, n, |i, c| w[i * n + c]);
            let got = panel_matmul(
                Tensor::from_data(TensorData::new(x, [m, k]), &device),
                upload(panels, k, n, &device),
            );
            let got = got.into_data().try_into_vec::<f32>().unwrap();
            assert_relative(&format!("({m}, {k}, {n})"), &got, &want, 1e-4);
        }
    }
}
