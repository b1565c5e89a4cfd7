//! Decoding's float matrix products on the CPU: one input row (up to 8 where the CPU lacks AVX-512;
//! register tiles take the rest: `tiled_matmul.rs`) times a weight stored `[in, out]` (the layout the CPU
//! backend keeps, [`crate::linear`]; AVX2-only CPUs keep most layers in column panels instead, which the
//! tiles read at every row count: `crate::fused::panel_matmul`). Burn's product hands these to gemm
//! single-threaded below ~7 M multiply-adds (every decoder-layer product of the `base` shape), and one core reads memory at about
//! half the speed two do (BENCHMARKS.md: 13.6 against 21–27 GB/s on the Intel CI machine), so a decoding
//! step ran at one core's bandwidth. Here the weight is cut into tiles that each thread streams once: whole
//! rows when the outputs are few (one contiguous block per task, the prefetcher's best case), else column
//! blocks whose sums stay in L1; tiles that split the inputs add into their own partial sums, added up at
//! the end.

use super::{MIN_PARALLEL_WEIGHTS, dot_lanes, mad};
use crate::kernels::has_avx2_fma;
use crate::kernels::host::SharedOut;
use crate::kernels::team::{self, TASKS_PER_THREAD};

/// Widest column block, in output values per input row (its sums, `rows` × this, stay in L1).
const MAX_BLOCK: usize = 2048;
/// Fewest weight rows a task takes (shorter runs cost more in hand-offs than they spread).
const MIN_TASK_ROWS: usize = 64;

/// How a product is cut into tasks: `splits` ranges of input rows times `blocks` column blocks of
/// `width` outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    splits: usize,
    blocks: usize,
    width: usize,
    split_rows: usize,
}

impl Tiling {
    /// [`TASKS_PER_THREAD`] tasks per thread where the weight is large enough to share.
    fn new(m: usize, k: usize, n: usize, threads: usize) -> Self {
        let widest = (MAX_BLOCK / m.max(1)).max(16);
        let blocks = n.div_ceil(widest).max(1);
        // Even blocks, a multiple of 16 values (whole vectors and cache lines where `n` allows).
        let width = n.div_ceil(blocks).next_multiple_of(16).min(n.max(1));
        let blocks = n.div_ceil(width).max(1);
        let wanted_tasks = if k * n < MIN_PARALLEL_WEIGHTS {
            1
        } else {
            threads.max(1) * TASKS_PER_THREAD
        };
        let max_splits = k.div_ceil(MIN_TASK_ROWS).max(1);
        let splits = wanted_tasks.div_ceil(blocks).clamp(1, max_splits);
        // A task count the threads divide, where the inputs allow (the `base` shape's gate/up weight
        // went from 9 tasks to 12: 6 % faster against the other products, the last task no longer alone).
        let splits = match wanted_tasks {
            1 => splits,
            _ => (splits..=max_splits)
                .find(|s| (s * blocks).is_multiple_of(threads.max(1)))
                .unwrap_or(splits),
        };
        let split_rows = k.div_ceil(splits).max(1);
        let splits = k.div_ceil(split_rows).max(1);
        Self {
            splits,
            blocks,
            width,
            split_rows,
        }
    }

    fn tasks(&self) -> usize {
        self.splits * self.blocks
    }
}

/// `x` `[m, k]` times `w` `[k, n]`: `[m, n]`.
pub(super) fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), k * n);
    if m * n == 0 {
        return Vec::new();
    }
    let tiling = Tiling::new(m, k, n, rayon::current_num_threads());
    // One `[m, n]` partial sum per input range; each task adds into its own range's, in its own columns.
    let mut partial = vec![0.0f32; tiling.splits * m * n];
    let shared = SharedOut(partial.as_mut_ptr());
    let task = |t: usize| {
        let (split, block) = (t / tiling.blocks, t % tiling.blocks);
        let rows = split * tiling.split_rows..((split + 1) * tiling.split_rows).min(k);
        let c0 = block * tiling.width;
        let width = tiling.width.min(n - c0);
        let base = split * m * n;
        // SAFETY: task (split, block) alone writes columns `c0..c0 + width` of the rows of partial sum
        // `split`, and `partial` outlives the tasks.
        let mut out: Vec<&mut [f32]> = (0..m)
            .map(|r| unsafe { std::slice::from_raw_parts_mut(shared.at(base + r * n + c0), width) })
            .collect();
        tile(x, w, k, n, rows, c0, &mut out);
    };
    team::for_each(tiling.tasks(), task);
    if tiling.splits == 1 {
        return partial;
    }
    let (first, rest) = partial.split_at_mut(m * n);
    for part in rest.chunks_exact(m * n) {
        for (a, b) in first.iter_mut().zip(part) {
            *a += b;
        }
    }
    partial.truncate(m * n);
    partial
}

/// `x` `[m, k]` times the transpose of `w` `[n, k]` (a weight row per output: a tied output head, which is
/// the embedding table): `[m, n]`. Outputs are split across the threads, each task streaming its weight
/// rows once, a dot product per input row.
pub(super) fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), k * n);
    let mut out = vec![0.0f32; m * n];
    let threads = if k * n < MIN_PARALLEL_WEIGHTS {
        1
    } else {
        rayon::current_num_threads()
    };
    let per_task = n.div_ceil(TASKS_PER_THREAD * threads).max(1);
    let tasks = n.div_ceil(per_task);
    let shared = SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        for o in t * per_task..((t + 1) * per_task).min(n) {
            let row = &w[o * k..][..k];
            for r in 0..m {
                // SAFETY: task `t` alone writes outputs `(r, o)` of its outputs `o`, and `out` outlives
                // the tasks.
                unsafe { *shared.at(r * n + o) = dot(&x[r * k..][..k], row) };
            }
        }
    };
    team::for_each(tasks, task);
    out
}

/// Σ a·b in 16 lanes (two AVX2 vectors, so consecutive multiply-adds do not wait on each other), in AVX2
/// with fused multiply-adds where the CPU has them.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: `has_avx2_fma` found AVX2 and FMA on this CPU.
        return unsafe { dot_fma(a, b) };
    }
    dot_lanes::<16, false>(a, b)
}

/// [`dot`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<16, true>(a, b)
}

/// Adds input rows `rows` of `x` times the weight's rows `rows`, columns `c0..c0 + out[r].len()`, into
/// `out[r]` for each input row `r`.
fn tile(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    c0: usize,
    out: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: `has_avx2_fma` found AVX2 and FMA on this CPU.
        unsafe { tile_fma(x, w, k, n, rows, c0, out) };
        return;
    }
    tile_with::<false>(x, w, k, n, rows, c0, out);
}

/// [`tile_with`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn tile_fma(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    c0: usize,
    out: &mut [&mut [f32]],
) {
    tile_with::<true>(x, w, k, n, rows, c0, out)
}

/// [`tile`]: four weight rows at a time, so each partial sum is loaded and stored once per four.
#[inline(always)]
fn tile_with<const FMA: bool>(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    c0: usize,
    out: &mut [&mut [f32]],
) {
    let Some(width) = out.first().map(|o| o.len()) else {
        return;
    };
    let row = |i: usize| &w[i * n + c0..][..width];
    let mut i = rows.start;
    while i + 4 <= rows.end {
        let (w0, w1, w2, w3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
        for (r, o) in out.iter_mut().enumerate() {
            let xs = &x[r * k + i..][..4];
            let (a, b, c, d) = (xs[0], xs[1], xs[2], xs[3]);
            let weights = w0.iter().zip(w1).zip(w2).zip(w3);
            for (o, (((&p, &q), &s), &t)) in o.iter_mut().zip(weights) {
                *o = mad::<FMA>(
                    d,
                    t,
                    mad::<FMA>(c, s, mad::<FMA>(b, q, mad::<FMA>(a, p, *o))),
                );
            }
        }
        i += 4;
    }
    for i in i..rows.end {
        let wi = row(i);
        for (r, o) in out.iter_mut().enumerate() {
            let a = x[r * k + i];
            for (o, &p) in o.iter_mut().zip(wi) {
                *o = mad::<FMA>(a, p, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::{assert_relative, reference_product, unit_values};

    #[test]
    fn tilings_cover_the_product_and_share_it_out() {
        for (m, k, n, threads) in [
            (1, 768, 768, 2),
            (1, 768, 2304, 2),
            (1, 768, 32_000, 2),
            (8, 4096, 6144, 16),
            (3, 70, 33, 2),
            (1, 16, 16, 4),
        ] {
            let t = Tiling::new(m, k, n, threads);
            assert!(
                t.width * t.blocks >= n && t.width * (t.blocks - 1) < n,
                "{t:?}"
            );
            assert!(
                t.split_rows * t.splits >= k && t.split_rows * (t.splits - 1) < k,
                "{t:?}"
            );
            assert!(m * t.width <= MAX_BLOCK.max(16 * m), "{t:?}");
            if k * n >= MIN_PARALLEL_WEIGHTS {
                let wanted = TASKS_PER_THREAD * threads;
                assert!(t.tasks() >= wanted.min(k.div_ceil(MIN_TASK_ROWS)), "{t:?}");
            } else {
                assert_eq!(t.tasks(), t.blocks, "{t:?}");
            }
        }
        // The gate/up weight of the `base` shape: 3 column blocks × 4 input ranges, 6 tasks a thread.
        let gate_up = Tiling::new(1, 768, 6144, 2);
        assert_eq!((gate_up.splits, gate_up.blocks), (4, 3));
        // A square layer's weight on two threads: contiguous runs of whole rows, four a thread.
        let square = Tiling::new(1, 768, 768, 2);
        assert_eq!((square.splits, square.blocks), (2 * TASKS_PER_THREAD, 1));
    }

    #[test]
    fn products_match_the_reference_for_every_tiling() {
        // Shapes that take one task, input splits, column blocks, ragged edges, up to 8 rows, and empty
        // ones.
        for (m, k, n) in [
            (1, 0, 3),
            (1, 4, 0),
            (1, 7, 5),
            (1, 768, 768),
            (2, 301, 2500),
            (3, 1030, 130),
            (8, 257, 4100),
        ] {
            let (x, w) = (unit_values(m * k, 1), unit_values(k * n, 2));
            let want = reference_product(&x, m, k, n, |i, c| w[i * n + c]);
            let got = matmul(&x, &w, m, k, n);
            assert_relative(&format!("({m}, {k}, {n})"), &got, &want, 1e-4);
        }
    }

    #[test]
    fn products_by_weight_rows_match_the_reference() {
        // One task, several, ragged lengths (past and short of 16 lanes), up to 8 rows, and empty.
        for (m, k, n) in [
            (1, 0, 3),
            (2, 5, 0),
            (1, 7, 5),
            (1, 576, 300),
            (3, 37, 2000),
            (8, 100, 700),
        ] {
            let (x, w) = (unit_values(m * k, 5), unit_values(k * n, 6));
            let want = reference_product(&x, m, k, n, |i, o| w[o * k + i]);
            let got = matmul_t(&x, &w, m, k, n);
            assert_relative(&format!("({m}, {k}, {n})"), &got, &want, 1e-4);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_portable_and_fma_builds_agree() {
        if !has_avx2_fma() {
            return;
        }
        let (m, k, n) = (2, 37, 50);
        let (x, w) = (unit_values(m * k, 3), unit_values(k * n, 4));
        let run = |fma: bool| {
            let mut out = vec![vec![0.0f32; n]; m];
            let mut rows: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
            if fma {
                // SAFETY: `has_avx2_fma` found the instruction sets.
                unsafe { tile_fma(&x, &w, k, n, 0..k, 0, &mut rows) };
            } else {
                tile_with::<false>(&x, &w, k, n, 0..k, 0, &mut rows);
            }
            out.concat()
        };
        for (a, b) in run(true).iter().zip(run(false)) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
