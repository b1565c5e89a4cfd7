//! Prompt-sized float products on AVX-512 CPUs: `x` `[m, k]` times a weight stored `[k, n]` (the CPU
//! backend's layout) for 2 to 128 rows (a follow-up question's prefill, a text prompt, a batch's decoding
//! step). gemm, Burn's CPU product, falls off below 128 rows: on the `base` shape's products on the Intel
//! CI machine it reached ~100 GFLOP/s at 45–96 rows and ~200 from 128, where PyTorch reached 184 at 45
//! rows (BENCHMARKS.md). Here a panel of [`KC`] weight rows by [`NB`] columns is fetched from memory once
//! and used by every block of [`MR`] input rows, whose sums stay in registers, each multiply-add one
//! fused instruction on 16 lanes: 1.3–1.7× gemm's speed from 4 to 96 rows there, level with it from 128.
//! Longer inputs (a first prompt with an image, the vision tower) take AMX where the CPU has it
//! (`amx_matmul.rs`, from 64 rows: with the weights coming from memory it overtook these tiles there),
//! else stay with gemm, tuned for more CPUs than this was. Threads take ranges of
//! column blocks, which write disjoint outputs; each runs the input's panels in order over its blocks,
//! so a panel of `x` is reused from cache across them.

use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
    _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
};

use crate::kernels::has_avx512f;
use crate::kernels::host::{AlignedScratch, SharedOut};
use crate::kernels::team::{self, TASKS_PER_THREAD};

/// Input rows per register tile.
const MR: usize = 4;
/// 16-lane vectors of columns per register tile: `MR` × `NV` sums, `NV` weights and a broadcast input
/// take 31 of the 32 registers. (8 rows × 3 vectors, the other shape that fits, was 10–35 % slower
/// below 64 rows: twice the input rows' broadcasts per weight vector.)
const NV: usize = 6;
/// Columns per block.
const NB: usize = NV * 16;
/// Weight rows per panel: `KC` × [`NB`] values (24 KiB) stay in L1 across the row blocks (128, 48 KiB,
/// was 5–10 % slower from 232 rows).
const KC: usize = 64;
/// Above this many input rows (two register tiles) each panel is copied into contiguous rows first: read
/// in place, rows `n` apart fall into a few L1 sets (one when `n` is a multiple of 1,024) and evict each
/// other before the next row block comes back to them. Below it the copy cost more than it saved.
const PACK_MIN_ROWS: usize = 8;
/// Below this many multiply-adds the product runs on the calling thread.
const MIN_PARALLEL_MACS: usize = 1 << 20;

/// `x` `[m, k]` times `w` `[k, n]`: `[m, n]`. Only where [`has_avx512f`].
pub(super) fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(has_avx512f(), "the AVX-512 product needs AVX-512F");
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), k * n);
    let mut out = vec![0.0f32; m * n];
    let blocks = n.div_ceil(NB);
    let threads = if m * k * n < MIN_PARALLEL_MACS {
        1
    } else {
        rayon::current_num_threads()
    };
    // A few tasks per thread, so one that started late does not hold up the product.
    let per_task = blocks.div_ceil(TASKS_PER_THREAD * threads).max(1);
    let tasks = blocks.div_ceil(per_task);
    let shared = SharedOut(out.as_mut_ptr());
    let pack = m > PACK_MIN_ROWS;
    let task = |t: usize| {
        let mut panel = AlignedScratch::zeroed(if pack { KC * NB } else { 0 });
        for k0 in (0..k).step_by(KC) {
            for b in t * per_task..((t + 1) * per_task).min(blocks) {
                // SAFETY: `has_avx512f` found AVX-512F; block `b` writes only its own columns of `out`.
                unsafe { column_block(x, w, m, k, n, b * NB, k0, panel.as_mut_slice(), &shared) };
            }
        }
    };
    team::for_each(tasks, task);
    out
}

/// Adds `x` times the panel of `w` at rows `k0..k0 + KC` and columns `c0..c0 + NB` (or to the edges)
/// into `out`, the panel copied into `panel` first unless that is empty.
///
/// # Safety
/// AVX-512F; no other task writes these columns of `out` (`[m, n]`).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn column_block(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    k0: usize,
    panel: &mut [f32],
    out: &SharedOut,
) {
    let width = NB.min(n - c0);
    let vectors = width.div_ceil(16);
    // Lanes of the last vector inside the block.
    let tail = width - 16 * (vectors - 1);
    let mask: __mmask16 = if tail == 16 { !0 } else { (1u16 << tail) - 1 };
    let kc = KC.min(k - k0);
    let (panel_at, panel_stride) = if panel.is_empty() {
        (w[k0 * n + c0..].as_ptr(), n)
    } else {
        for (i, row) in panel.chunks_exact_mut(NB).take(kc).enumerate() {
            row[..width].copy_from_slice(&w[(k0 + i) * n + c0..][..width]);
        }
        (panel.as_ptr(), NB)
    };
    for r0 in (0..m).step_by(MR) {
        let tile = Tile {
            x: x[r0 * k + k0..].as_ptr(),
            k,
            w: panel_at,
            w_stride: panel_stride,
            n,
            kc,
            out: out.at(r0 * n + c0),
            mask,
        };
        // SAFETY: the tile's rows, panel and columns lie inside `x`, `w` and `out` (below).
        unsafe { tile.run(MR.min(m - r0), vectors) };
    }
}

/// One register tile's operands: `rows` input rows from `x` (stride `k`), the panel's `kc` weight rows
/// from `w` (stride `w_stride`: `n` read in place, [`NB`] copied), and the `rows` × `16 · vectors` outputs
/// at `out` (stride `n`), the last vector of each masked by `mask`.
struct Tile {
    x: *const f32,
    k: usize,
    w: *const f32,
    w_stride: usize,
    n: usize,
    kc: usize,
    out: *mut f32,
    mask: __mmask16,
}

impl Tile {
    /// Dispatches to the register tile for `rows` (1..=MR) and `vectors` (1..=NV).
    ///
    /// # Safety
    /// AVX-512F; `rows` rows of `kc` values at `x`, `kc` rows at `w` and `rows` rows at `out`, each of
    /// `16 · (vectors - 1)` values plus the masked lanes, are in bounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, rows: usize, vectors: usize) {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (rows, vectors) {
                    $(
                        ($r, 1) => unsafe { self.fma::<$r, 1>() },
                        ($r, 2) => unsafe { self.fma::<$r, 2>() },
                        ($r, 3) => unsafe { self.fma::<$r, 3>() },
                        ($r, 4) => unsafe { self.fma::<$r, 4>() },
                        ($r, 5) => unsafe { self.fma::<$r, 5>() },
                        ($r, 6) => unsafe { self.fma::<$r, 6>() },
                    )*
                    _ => unreachable!("tile of {rows} rows × {vectors} vectors"),
                }
            };
        }
        dispatch!(1 2 3 4);
    }

    /// `R` × `V` vectors of sums over the panel, then added into the outputs.
    ///
    /// # Safety
    /// As [`Tile::run`] with `rows = R`, `vectors = V`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn fma<const R: usize, const V: usize>(&self) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for i in 0..self.kc {
            // SAFETY: row `i` of the panel, its last vector masked to the block's columns.
            let weights: [__m512; V] = std::array::from_fn(|v| unsafe {
                let p = self.w.add(i * self.w_stride + 16 * v);
                if v + 1 == V {
                    _mm512_maskz_loadu_ps(self.mask, p)
                } else {
                    _mm512_loadu_ps(p)
                }
            });
            for (r, sums) in acc.iter_mut().enumerate() {
                // SAFETY: value `i` of input row `r`.
                let xr = _mm512_set1_ps(unsafe { *self.x.add(r * self.k + i) });
                for (s, wv) in sums.iter_mut().zip(&weights) {
                    *s = _mm512_fmadd_ps(xr, *wv, *s);
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            for (v, s) in sums.iter().enumerate() {
                // SAFETY: output row `r`'s vector `v` of this block (the last one masked).
                unsafe {
                    let p = self.out.add(r * self.n + 16 * v);
                    if v + 1 == V {
                        let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(self.mask, p), *s);
                        _mm512_mask_storeu_ps(p, self.mask, sum);
                    } else {
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *s));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::{assert_relative, reference_product, unit_values};

    #[test]
    fn products_match_the_reference_at_every_edge() {
        if !has_avx512f() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // Rows past and short of a register tile, columns short of a vector and of a block, panels
        // short of KC, and a product large enough to run in parallel.
        for (m, k, n) in [
            (2, 0, 3),
            (2, 4, 0),
            (1, 1, 1),
            (9, 130, 17),
            (8, 128, 48),
            (13, 300, 101),
            (45, 768, 784),
            (3, 5, 49),
        ] {
            let (x, w) = (unit_values(m * k, 1), unit_values(k * n, 2));
            let want = reference_product(&x, m, k, n, |i, c| w[i * n + c]);
            let got = matmul(&x, &w, m, k, n);
            assert_relative(&format!("({m}, {k}, {n})"), &got, &want, 1e-4);
        }
    }
}
