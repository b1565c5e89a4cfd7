//! Float products in x86 register tiles: `x` `[m, k]` times a weight stored `[k, n]` (the CPU backend's
//! layout) for a few to 128 rows (a follow-up question's prefill, a text prompt, a batch's decoding step),
//! in AVX-512 (2 rows and up) or, without it, AVX2 with FMA (from 9 rows; fewer take `few_rows.rs`); and
//! on AVX2-only CPUs every product of a layer stored in column panels (`crate::fused::panel_matmul`),
//! from one row to a prompt with an image. gemm, Burn's CPU product, falls off below 128 rows: on the
//! `base` shape's products it reached ~100 GFLOP/s at 45–96 rows and ~200 from 128 on the Intel CI
//! machine, where PyTorch reached 184 at 45 rows, and 40–80 GFLOP/s at 16–64 rows on the AVX2-only EPYC
//! (Zen 3; BENCHMARKS.md). Here a panel of [`PANEL_BYTES`] of weight rows by a block of columns is
//! fetched from memory once and used by every block of [`Lanes::MR`] input rows, whose sums stay in
//! registers, each multiply-add one fused instruction on a vector's lanes. From `[k, n]` a panel is
//! copied into contiguous rows first; stored in panels it is read in place (which put the AVX2 tiles
//! 3–25 % ahead of gemm at 197–242 rows, level at 512, gemm packing its own copy of the weight on every
//! call). Longer inputs against `[k, n]` (a first prompt with an image, the vision tower) take AMX where
//! the CPU has it (`amx_matmul.rs`, from 64 rows: with the weights coming from memory it overtook these
//! tiles there), else stay with gemm. Threads take ranges of column blocks, which write disjoint outputs; each runs the
//! input's panels in order over its blocks, so a panel of `x` is reused from cache across them.

use std::arch::x86_64::*;

use crate::kernels::host::{AlignedScratch, SharedOut};
use crate::kernels::team::{self, TASKS_PER_THREAD};
use crate::kernels::{has_avx2_fma, has_avx512f};

/// Bytes of weights per panel, which stay in L1 across the row blocks (AVX-512: 64 rows of 96 columns;
/// 128 rows, 48 KiB, was 5–10 % slower from 232 rows).
const PANEL_BYTES: usize = 24 * 1024;
/// Above this many input rows (two register tiles) each panel is copied into contiguous rows first: read
/// in place, rows `n` apart fall into a few L1 sets (one when `n` is a multiple of 1,024) and evict each
/// other before the next row block comes back to them. Below it the copy cost more than it saved.
const PACK_MIN_ROWS: usize = 8;
/// Below this many multiply-adds the product runs on the calling thread.
const MIN_PARALLEL_MACS: usize = 1 << 20;

/// Whether this CPU has the instructions of either width.
pub(super) fn available() -> bool {
    has_avx512f() || has_avx2_fma()
}

/// Whether an input of `m` rows (at most [`super::TILED_MAX_ROWS`]) takes the tiles: from 2 rows in
/// AVX-512, past [`super::FEW_ROWS_MAX`] in AVX2 (fewer stream the weight in `few_rows.rs`).
pub(super) fn takes(m: usize) -> bool {
    has_avx512f() && m > 1 || has_avx2_fma() && m > super::FEW_ROWS_MAX
}

/// `x` `[m, k]` times `w` `[k, n]`: `[m, n]`, in AVX-512 where the CPU has it, else AVX2. Only where
/// [`available`].
pub(super) fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        available(),
        "the tiled product needs AVX-512F or AVX2 with FMA"
    );
    assert_eq!(w.len(), k * n);
    if has_avx512f() {
        matmul_with::<Avx512>(x, Weight::Columns(w), m, k, n)
    } else {
        matmul_with::<Avx2>(x, Weight::Columns(w), m, k, n)
    }
}

/// `x` `[m, k]` times the weight whose AVX2 column panels are `panels` (`[n / 16, k, 16]`,
/// [`crate::fused::panel_matmul`]): `[m, n]`, for any `m`. Only where the CPU has AVX2 and FMA.
pub(super) fn matmul_panels(x: &[f32], panels: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(has_avx2_fma(), "the panel product needs AVX2 with FMA");
    assert_eq!(
        Avx2::NV * Avx2::WIDTH,
        crate::fused::panel_matmul::PANEL_WIDTH
    );
    assert!(n.is_multiple_of(Avx2::NV * Avx2::WIDTH) && panels.len() == k * n);
    matmul_with::<Avx2>(x, Weight::Panels(panels), m, k, n)
}

/// Where a product's weight `[k, n]` lies.
#[derive(Clone, Copy)]
enum Weight<'a> {
    /// `[k, n]` itself, a block's rows `n` apart: copied panel by panel.
    Columns(&'a [f32]),
    /// Already in panels of this width's block, `[n / block, k, block]`: read in place.
    Panels(&'a [f32]),
}

fn matmul_with<L: Lanes>(x: &[f32], w: Weight, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    let mut out = vec![0.0f32; m * n];
    let block_width = L::NV * L::WIDTH;
    // Inputs of one register tile's rows run each block's whole panel at once: a task's blocks are then
    // one contiguous stream (the prefetcher's best case), and `x` is small enough to stay in cache.
    let whole = matches!(w, Weight::Panels(_)) && m <= L::MR;
    let panel_rows = if whole {
        k.max(1)
    } else {
        PANEL_BYTES / (4 * block_width)
    };
    let blocks = n.div_ceil(block_width);
    // Panels are streamed from memory at any row count: from a few rows, the more threads read, the
    // sooner they are through (as `few_rows.rs`).
    let streamed = matches!(w, Weight::Panels(_)) && k * n >= super::MIN_PARALLEL_WEIGHTS;
    let threads = if m * k * n < MIN_PARALLEL_MACS && !streamed {
        1
    } else {
        rayon::current_num_threads()
    };
    // A few tasks per thread, so one that started late does not hold up the product.
    let per_task = blocks.div_ceil(TASKS_PER_THREAD * threads).max(1);
    let tasks = blocks.div_ceil(per_task);
    let out_at = SharedOut(out.as_mut_ptr());
    let copy = m > PACK_MIN_ROWS && matches!(w, Weight::Columns(_));
    let task = |t: usize| {
        let mut panel = AlignedScratch::zeroed(if copy { panel_rows * block_width } else { 0 });
        for k0 in (0..k).step_by(panel_rows) {
            for b in t * per_task..((t + 1) * per_task).min(blocks) {
                let block = Block {
                    x,
                    w,
                    m,
                    k,
                    n,
                    c0: b * block_width,
                    k0,
                    kc: panel_rows.min(k - k0),
                    out: &out_at,
                };
                // SAFETY: `available` found `L`'s instructions; block `b` writes only its own columns
                // of `out`.
                unsafe { L::column_block(&block, panel.as_mut_slice()) };
            }
        }
    };
    team::for_each(tasks, task);
    out
}

/// One column block's share of a product: `x` `[m, k]` times the panel of `w` `[k, n]` at rows
/// `k0..k0 + kc` and the block's columns from `c0`, added into `out` `[m, n]`.
struct Block<'a> {
    x: &'a [f32],
    w: Weight<'a>,
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    k0: usize,
    kc: usize,
    out: &'a SharedOut,
}

/// One vector width's instructions for the tiles. The methods inline into their width's
/// [`Lanes::column_block`], compiled for its instruction set, where the intrinsics become instructions.
trait Lanes {
    /// f32 lanes per vector.
    const WIDTH: usize;
    /// Input rows per register tile.
    const MR: usize;
    /// Vectors of columns per register tile: `MR` × `NV` sums, `NV` weights and a broadcast input fit
    /// the registers. AVX-512: 4 × 6 of 32 (8 rows × 3 vectors, the other shape that fits, was 10–35 %
    /// slower below 64 rows, twice the broadcasts per weight vector). AVX2: 6 × 2 of 16, as gemm's
    /// kernel (4 × 3 needs all 16 and the compiler spilled a sum to memory: ~80 GFLOP/s on Zen 3).
    const NV: usize;
    /// A vector of f32 lanes.
    type V: Copy;
    /// The lanes of a block's last vector that lie inside the block.
    type Mask: Copy;

    /// Adds `block`'s product into its outputs, its panel copied into `panel` first unless that is
    /// empty.
    ///
    /// # Safety
    /// The CPU has this width's instructions; no other task writes the block's columns of `out`.
    unsafe fn column_block(block: &Block, panel: &mut [f32]);
    /// The first `lanes` lanes (1..=WIDTH).
    unsafe fn mask(lanes: usize) -> Self::Mask;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    /// `a · b + c`, one rounding.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// The masked lanes from `p`, zeros in the others (which are not read).
    unsafe fn load_masked(mask: Self::Mask, p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The masked lanes to `p` (the others are not written).
    unsafe fn store_masked(mask: Self::Mask, p: *mut f32, v: Self::V);
}

/// 16 lanes (AVX-512 F).
struct Avx512;
/// 8 lanes (AVX2 and FMA).
struct Avx2;

// SAFETY (every method): the callers guarantee the instruction set and the pointers' ranges.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Lanes for Avx512 {
    const WIDTH: usize = 16;
    const MR: usize = 4;
    const NV: usize = 6;
    type V = __m512;
    type Mask = __mmask16;

    #[target_feature(enable = "avx512f")]
    unsafe fn column_block(block: &Block, panel: &mut [f32]) {
        unsafe { column_block::<Avx512>(block, panel) }
    }
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> __mmask16 {
        if lanes >= 16 { !0 } else { (1u16 << lanes) - 1 }
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_masked(mask: __mmask16, p: *const f32) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn store_masked(mask: __mmask16, p: *mut f32, v: __m512) {
        unsafe { _mm512_mask_storeu_ps(p, mask, v) }
    }
}

// SAFETY (every method): the callers guarantee the instruction set and the pointers' ranges.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Lanes for Avx2 {
    const WIDTH: usize = 8;
    const MR: usize = 6;
    const NV: usize = 2;
    type V = __m256;
    type Mask = __m256i;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn column_block(block: &Block, panel: &mut [f32]) {
        unsafe { column_block::<Avx2>(block, panel) }
    }
    #[inline(always)]
    unsafe fn mask(lanes: usize) -> __m256i {
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(lanes as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m256 {
        unsafe { _mm256_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_masked(mask: __m256i, p: *const f32) -> __m256 {
        unsafe { _mm256_maskload_ps(p, mask) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn store_masked(mask: __m256i, p: *mut f32, v: __m256) {
        unsafe { _mm256_maskstore_ps(p, mask, v) }
    }
}

/// [`Lanes::column_block`] for width `L`, inlined into that width's `target_feature` function.
///
/// # Safety
/// As [`Lanes::column_block`].
#[inline(always)]
unsafe fn column_block<L: Lanes>(block: &Block, panel: &mut [f32]) {
    let Block {
        x,
        w,
        m,
        k,
        n,
        c0,
        k0,
        kc,
        out,
    } = *block;
    let block_width = L::NV * L::WIDTH;
    let width = block_width.min(n - c0);
    let vectors = width.div_ceil(L::WIDTH);
    // Lanes of the last vector inside the block.
    let tail = width - L::WIDTH * (vectors - 1);
    // SAFETY: the caller checked the instruction set.
    let mask = unsafe { L::mask(tail) };
    let (panel_at, panel_stride) = match w {
        Weight::Panels(panels) => (
            panels[(c0 / block_width * k + k0) * block_width..].as_ptr(),
            block_width,
        ),
        Weight::Columns(w) if panel.is_empty() => (w[k0 * n + c0..].as_ptr(), n),
        Weight::Columns(w) => {
            for (i, row) in panel.chunks_exact_mut(block_width).take(kc).enumerate() {
                let src = &w[(k0 + i) * n + c0..][..width];
                if width == block_width {
                    // Whole vectors in registers: a `memcpy` call per row (its length known only at
                    // run time) cost as much as the row's arithmetic at AVX2's 16 columns.
                    for v in 0..L::NV {
                        // SAFETY: `src` and `row` hold `NV` vectors.
                        unsafe {
                            let at = L::WIDTH * v;
                            L::store(row.as_mut_ptr().add(at), L::load(src.as_ptr().add(at)));
                        }
                    }
                } else {
                    row[..width].copy_from_slice(src);
                }
            }
            (panel.as_ptr(), block_width)
        }
    };
    for r0 in (0..m).step_by(L::MR) {
        let tile = Tile::<L> {
            x: x[r0 * k + k0..].as_ptr(),
            k,
            w: panel_at,
            w_stride: panel_stride,
            n,
            kc,
            out: out.at(r0 * n + c0),
            mask,
            partial: tail < L::WIDTH,
        };
        // SAFETY: the tile's rows, panel and columns lie inside `x`, `w` and `out` (above).
        unsafe { tile.run(L::MR.min(m - r0), vectors) };
    }
}

/// One register tile's operands: `rows` input rows from `x` (stride `k`), the panel's `kc` weight rows
/// from `w` (stride `w_stride`: `n` read in place, the block's width copied), and the `rows` ×
/// `WIDTH · vectors` outputs at `out` (stride `n`), the last vector of each masked by `mask` where `partial`.
struct Tile<L: Lanes> {
    x: *const f32,
    k: usize,
    w: *const f32,
    w_stride: usize,
    n: usize,
    kc: usize,
    out: *mut f32,
    mask: L::Mask,
    partial: bool,
}

impl<L: Lanes> Tile<L> {
    /// Dispatches to the register tile for `rows` (1..=MR) and `vectors` (1..=NV) (tiles of other
    /// sizes, which would not fit the registers, are never asked for).
    ///
    /// # Safety
    /// `L`'s instructions; `rows` rows of `kc` values at `x`, `kc` rows at `w` and `rows` rows at
    /// `out`, each of `WIDTH · (vectors - 1)` values plus the masked lanes, are in bounds.
    #[inline(always)]
    unsafe fn run(&self, rows: usize, vectors: usize) {
        // A block's last vector is masked only where it is partial: the mask takes a register.
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (rows, vectors, self.partial) {
                    $(
                        ($r, 1, false) => unsafe { self.fma::<$r, 1, false>() },
                        ($r, 2, false) => unsafe { self.fma::<$r, 2, false>() },
                        ($r, 3, false) if L::NV >= 3 => unsafe { self.fma::<$r, 3, false>() },
                        ($r, 4, false) if L::NV >= 4 => unsafe { self.fma::<$r, 4, false>() },
                        ($r, 5, false) if L::NV >= 5 => unsafe { self.fma::<$r, 5, false>() },
                        ($r, 6, false) if L::NV >= 6 => unsafe { self.fma::<$r, 6, false>() },
                        ($r, 1, true) => unsafe { self.fma::<$r, 1, true>() },
                        ($r, 2, true) => unsafe { self.fma::<$r, 2, true>() },
                        ($r, 3, true) if L::NV >= 3 => unsafe { self.fma::<$r, 3, true>() },
                        ($r, 4, true) if L::NV >= 4 => unsafe { self.fma::<$r, 4, true>() },
                        ($r, 5, true) if L::NV >= 5 => unsafe { self.fma::<$r, 5, true>() },
                        ($r, 6, true) if L::NV >= 6 => unsafe { self.fma::<$r, 6, true>() },
                    )*
                    _ => unreachable!("tile of {rows} rows × {vectors} vectors"),
                }
            };
        }
        debug_assert!(rows <= L::MR && vectors <= L::NV);
        dispatch!(1 2 3 4 5 6);
    }

    /// `R` × `V` vectors of sums over the panel, then added into the outputs; the last vector masked
    /// where `MASKED`.
    ///
    /// # Safety
    /// As [`Tile::run`] with `rows = R`, `vectors = V`, and `MASKED` where the last vector is partial.
    #[inline(always)]
    unsafe fn fma<const R: usize, const V: usize, const MASKED: bool>(&self) {
        // SAFETY (the whole body): `L`'s instructions, and the operands in bounds, per the caller.
        unsafe {
            let mut acc = [[L::zero(); V]; R];
            for i in 0..self.kc {
                // Row `i` of the panel, its last vector masked to the block's columns.
                let weights: [L::V; V] = std::array::from_fn(|v| {
                    let p = self.w.add(i * self.w_stride + L::WIDTH * v);
                    if MASKED && v + 1 == V {
                        L::load_masked(self.mask, p)
                    } else {
                        L::load(p)
                    }
                });
                for (r, sums) in acc.iter_mut().enumerate() {
                    // Value `i` of input row `r`.
                    let xr = L::splat(*self.x.add(r * self.k + i));
                    for (s, wv) in sums.iter_mut().zip(&weights) {
                        *s = L::fmadd(xr, *wv, *s);
                    }
                }
            }
            for (r, sums) in acc.iter().enumerate() {
                for (v, s) in sums.iter().enumerate() {
                    // Output row `r`'s vector `v` of this block (the last one masked).
                    let p = self.out.add(r * self.n + L::WIDTH * v);
                    if MASKED && v + 1 == V {
                        let sum = L::add(L::load_masked(self.mask, p), *s);
                        L::store_masked(self.mask, p, sum);
                    } else {
                        L::store(p, L::add(L::load(p), *s));
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
        if !available() {
            eprintln!("skipped: this CPU has neither AVX-512F nor AVX2 with FMA");
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
            (9, 70, 25),
            (130, 600, 200),
        ] {
            let (x, w) = (unit_values(m * k, 1), unit_values(k * n, 2));
            let want = reference_product(&x, m, k, n, |i, c| w[i * n + c]);
            // Both widths where the CPU has them (AVX-512 CPUs have AVX2 too).
            if has_avx512f() {
                let got = matmul_with::<Avx512>(&x, Weight::Columns(&w), m, k, n);
                assert_relative(&format!("AVX-512 ({m}, {k}, {n})"), &got, &want, 1e-4);
            }
            if has_avx2_fma() {
                let got = matmul_with::<Avx2>(&x, Weight::Columns(&w), m, k, n);
                assert_relative(&format!("AVX2 ({m}, {k}, {n})"), &got, &want, 1e-4);
            }
        }
    }

    /// The product over AVX2 panels at one row to past a register tile, inputs short of and past a
    /// panel's rows, one block to many, on one thread and on all.
    #[test]
    fn products_over_panels_match_the_reference() {
        if !has_avx2_fma() {
            eprintln!("skipped: this CPU lacks AVX2 with FMA");
            return;
        }
        for (m, k, n) in [
            (1, 1, 16),
            (1, 800, 32),
            (2, 5, 48),
            (7, 800, 64),
            (9, 130, 16),
            (45, 768, 784),
            (130, 600, 208),
            (200, 390, 32),
        ] {
            let (x, w) = (unit_values(m * k, 5), unit_values(k * n, 6));
            let want = reference_product(&x, m, k, n, |i, c| w[i * n + c]);
            let panels = crate::fused::panel_matmul::from_columns(&w, k, n);
            let got = matmul_panels(&x, &panels, m, k, n);
            assert_relative(&format!("panels ({m}, {k}, {n})"), &got, &want, 1e-4);
        }
    }
}
