//! Long float products (a prompt with an image, a long text prompt, the vision tower) on Intel's AMX
//! matrix units, at f32 accuracy: `x` `[m, k]` times a weight stored `[k, n]` (the CPU backend's layout).
//!
//! AMX multiplies tiles of bf16 (8 significant bits) into f32 sums, 16 times as many multiply-adds a
//! cycle as AVX-512's f32 FMAs. Each f32 value is split exactly into three bf16 parts, `v = v₀ + v₁ + v₂`
//! (each a nearest bf16 to what the parts before it left), and `x·w` is summed from the six part
//! products `xᵢ·wⱼ` with `i + j ≤ 2`: the three left out are below 2⁻²⁵ of `|x·w|`, under the rounding
//! of one f32 product, and each part product is exact in f32, so the result is as accurate as an f32
//! loop (the tests hold it to that against an f64 reference). Six products a value still leave the
//! units 2.7 times AVX-512's f32 peak; what is left of that here is set by memory: each product reads its
//! weight from memory once, ~8.5 GB/s a core on the Intel CI machine (BENCHMARKS.md).
//!
//! The input is split and packed once into 16 × 32 tiles (three planes); threads take ranges of column
//! blocks, and for each [`TASK_BLOCKS`] blocks and up to [`MAX_PANEL_TILES`] tiles of inputs split and
//! pack that panel of the weight, then run every block of 32 input rows × 32 columns over it with the
//! sums in four tile registers (long runs: storing the sums stalls the tile unit for ~1,500 cycles).

use std::arch::asm;
use std::arch::x86_64::{
    __m512, __m512i, __mmask16, _MM_HINT_T0, _mm_prefetch, _mm512_add_epi32, _mm512_and_si512,
    _mm512_castps_si512, _mm512_castsi512_ps, _mm512_maskz_loadu_ps, _mm512_or_si512,
    _mm512_set1_epi32, _mm512_setzero_si512, _mm512_srli_epi32, _mm512_store_si512, _mm512_sub_ps,
};

use crate::kernels::host::{AlignedScratch, SharedOut};
use crate::kernels::team;

/// Input rows (and weight columns) per tile.
const TILE: usize = 16;
/// Inputs per tile: 16 pairs of bf16 in a 64-byte tile row.
const TK: usize = 32;
/// Values (u32 pairs) in one tile.
const TILE_VALUES: usize = TILE * TILE;
/// bf16 parts each value is split into.
const PLANES: usize = 3;
/// Most input tiles per weight panel (1,024 inputs): a block's sums stay in tile registers that long.
const MAX_PANEL_TILES: usize = 32;
/// Column blocks (of 32) per panel: 4 × 1,024 inputs is 768 KiB packed, in L2 with the input's tiles.
const TASK_BLOCKS: usize = 4;
/// How many pair rows (two weight rows across a panel's columns) ahead the packing prefetches the weight.
const PREFETCH_STEPS: usize = 8;

/// `x` `[m, k]` times `w` `[k, n]`: `[m, n]`. Only where [`crate::kernels::has_amx_bf16`].
pub(super) fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        crate::kernels::has_amx_bf16(),
        "the AMX product needs AMX-BF16"
    );
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), k * n);
    let k_tiles = k.div_ceil(TK);
    if m == 0 || n == 0 || k_tiles == 0 {
        return vec![0.0; m * n];
    }
    // Rows padded to tiles and columns to pairs of tiles; padded rows are dropped from the end for free,
    // padded columns by a copy (none of this model's products have them).
    let (m_pad, n_pad) = (m.next_multiple_of(TILE), n.next_multiple_of(2 * TILE));
    let a = pack_input(x, m, k, m_pad);
    let blocks = n_pad / (2 * TILE);
    let threads = rayon::current_num_threads().max(1);
    // Tasks of near-equal size, a multiple of the threads where the blocks allow.
    let tasks = (threads * blocks.div_ceil(threads * TASK_BLOCKS)).min(blocks);
    let mut out: Vec<f32> = Vec::with_capacity(m_pad * n_pad);
    let shared = SharedOut(out.as_mut_ptr());
    let product = Product {
        a: &a,
        w,
        k,
        n,
        n_pad,
        row_tiles: m_pad / TILE,
        k_tiles,
    };
    team::for_each(tasks, |t| {
        let blocks = t * blocks / tasks..(t + 1) * blocks / tasks;
        // SAFETY: `has_amx_bf16` (asserted above) found AMX-BF16 and AVX-512F and got the OS's
        // permission; task `t` writes only the columns of its blocks, inside the buffer's capacity.
        unsafe { product.task(blocks, &shared) };
    });
    // SAFETY: the tasks' blocks cover all `n_pad` columns, and each stored every row tile of them (the
    // first panel's runs store all the sums of their block).
    unsafe { out.set_len(m_pad * n_pad) };
    out.truncate(m * n_pad);
    if n_pad != n {
        out = out
            .chunks_exact(n_pad)
            .flat_map(|row| &row[..n])
            .copied()
            .collect();
    }
    out
}

/// The operands of one product, shared by its tasks.
struct Product<'a> {
    /// The packed input ([`pack_input`]).
    a: &'a AlignedU32,
    w: &'a [f32],
    k: usize,
    n: usize,
    /// Columns of the output buffer.
    n_pad: usize,
    /// 16-row tiles in the packed input.
    row_tiles: usize,
    k_tiles: usize,
}

impl Product<'_> {
    /// The output columns of column blocks `blocks` (32 each): for each [`TASK_BLOCKS`] of them and each
    /// panel of inputs, their weight panel is packed, then every 32-row block of the input runs over it.
    ///
    /// # Safety
    /// AMX-BF16 and AVX-512F, usable by this process; no other task writes these columns of `out`.
    #[target_feature(enable = "avx512f")]
    unsafe fn task(&self, blocks: std::ops::Range<usize>, out: &SharedOut) {
        let panel_tiles = MAX_PANEL_TILES.min(self.k_tiles);
        let len = 2 * TASK_BLOCKS * panel_tiles * PLANES * TILE_VALUES;
        // (The thread's panel is only taken if no task of another product, run by this thread while
        // it waits inside this one, holds it.)
        PANEL.with(|slot| match slot.try_borrow_mut() {
            // SAFETY: as the caller vouches.
            Ok(mut panel) => unsafe {
                self.task_with(blocks, out, panel_tiles, panel.at_least(len))
            },
            // SAFETY: as the caller vouches.
            Err(_) => unsafe {
                self.task_with(blocks, out, panel_tiles, &mut AlignedU32::zeroed(len))
            },
        })
    }

    /// [`Self::task`] with `panel` to pack the weight's panels into.
    ///
    /// # Safety
    /// As [`Self::task`].
    #[target_feature(enable = "avx512f")]
    unsafe fn task_with(
        &self,
        blocks: std::ops::Range<usize>,
        out: &SharedOut,
        panel_tiles: usize,
        panel: &mut AlignedU32,
    ) {
        // SAFETY: AMX usable (the caller); every tile is 16 rows of 64 bytes.
        unsafe { Tiles::configure() };
        for group in blocks.clone().step_by(TASK_BLOCKS) {
            let group = group..(group + TASK_BLOCKS).min(blocks.end);
            let c0 = group.start * 2 * TILE;
            for kt0 in (0..self.k_tiles).step_by(panel_tiles) {
                let kts = panel_tiles.min(self.k_tiles - kt0);
                let weights = Panel {
                    w: self.w,
                    k: self.k,
                    n: self.n,
                    kt0,
                    kts,
                    c0,
                    col_tiles: 2 * group.len(),
                    panel_tiles,
                };
                // SAFETY: AVX-512F (the caller); the panel is sized for `TASK_BLOCKS` blocks.
                unsafe { weights.pack(panel.as_mut_slice()) };
                // Each row pair's tiles (48 KiB for 8 input tiles) are reused across the group's blocks.
                for pair in 0..self.row_tiles.div_ceil(2) {
                    for block in 0..group.len() {
                        let run = BlockRun {
                            a: self.a.at(tile_index(2 * pair, kt0, self.k_tiles)),
                            a_next_rows: self.k_tiles * PLANES * TILE_VALUES,
                            b: panel.at(2 * block * panel_tiles * PLANES * TILE_VALUES),
                            b_next_cols: panel_tiles * PLANES * TILE_VALUES,
                            k_tiles: kts,
                            out: out.at(2 * pair * TILE * self.n_pad + c0 + 2 * block * TILE),
                            out_stride: self.n_pad * 4,
                            accumulate: kt0 > 0,
                            two_rows: 2 * pair + 1 < self.row_tiles,
                        };
                        // SAFETY: the block's tiles lie inside the packed input and panel, and its
                        // 32 × 32 outputs inside `out`, in this task's columns.
                        unsafe { run.run() };
                    }
                }
            }
        }
        // SAFETY: AMX usable; leaves the tile state for the OS to skip saving.
        unsafe { Tiles::release() };
    }
}

/// Index of the first value of the tile of row tile `row_tile`, input tile `kt`, plane 0, in the packed
/// input: `[row tile][input tile][plane][16 rows][16 pairs]`.
fn tile_index(row_tile: usize, kt: usize, k_tiles: usize) -> usize {
    (row_tile * k_tiles + kt) * PLANES * TILE_VALUES
}

/// One 32 × 32 block of outputs (16 × 32 for an odd last row tile) over `k_tiles` input tiles.
struct BlockRun {
    /// The packed input's tiles for the block's first 16 rows at the first input tile (the next 16
    /// rows' are `a_next_rows` values on; the planes follow each tile, the next input tile after them).
    a: *const u32,
    a_next_rows: usize,
    /// The panel's tiles for the block's first 16 columns (the next 16 columns' `b_next_cols` on).
    b: *const u32,
    b_next_cols: usize,
    k_tiles: usize,
    out: *mut f32,
    /// Bytes between output rows.
    out_stride: usize,
    /// Whether to add to the outputs (a later panel) rather than overwrite them.
    accumulate: bool,
    /// Whether the block has its second 16 rows (all but an odd last row tile).
    two_rows: bool,
}

impl BlockRun {
    /// Sums in tiles 0–3 (rows 0–15 × columns 0–15, 0–15 × 16–31, 16–31 × 0–15, 16–31 × 16–31), input
    /// parts in tiles 4 and 5 (the two row tiles), weight parts in 6 and 7 (the two column tiles). Per
    /// input tile: 6 part products × 4 tiles from 14 tile loads, ordered so each weight part loaded
    /// serves as many input parts as it can before the next.
    ///
    /// # Safety
    /// AMX configured ([`Tiles::configure`]); the tiles and outputs named in the fields are in bounds.
    unsafe fn run(&self) {
        if !self.two_rows {
            // SAFETY: as the caller vouches.
            return unsafe { self.run_one_row_tile() };
        }
        let stride = self.out_stride;
        let out = self.out as *mut u8;
        let (o1, o2) = (64, 16 * stride);
        // SAFETY (every block below): the addresses are inside the tiles and outputs the caller vouches
        // for; tile registers are not used by compiled Rust code.
        unsafe {
            if self.accumulate {
                asm!(
                    "tileloadd tmm0, [{o} + {s}*1]",
                    "tileloadd tmm1, [{o1} + {s}*1]",
                    "tileloadd tmm2, [{o2} + {s}*1]",
                    "tileloadd tmm3, [{o3} + {s}*1]",
                    o = in(reg) out,
                    o1 = in(reg) out.add(o1),
                    o2 = in(reg) out.add(o2),
                    o3 = in(reg) out.add(o1 + o2),
                    s = in(reg) stride,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            let plane = TILE_VALUES;
            for kt in 0..self.k_tiles {
                let a0 = self.a.add(kt * PLANES * plane);
                let a1 = a0.add(self.a_next_rows);
                let b0 = self.b.add(kt * PLANES * plane);
                let b1 = b0.add(self.b_next_cols);
                asm!(
                    // x₀ with w₁, w₂, w₀; then w₀ with x₂, x₁; then x₁ with w₁.
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1 + 1024]",
                    "tileloadd tmm7, [{b1} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm6, [{b0} + {s}*1 + 2048]",
                    "tileloadd tmm7, [{b1} + {s}*1 + 2048]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm4, [{a0} + {s}*1 + 2048]",
                    "tileloadd tmm5, [{a1} + {s}*1 + 2048]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm4, [{a0} + {s}*1 + 1024]",
                    "tileloadd tmm5, [{a1} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm6, [{b0} + {s}*1 + 1024]",
                    "tileloadd tmm7, [{b1} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    s = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{o} + {s}*1], tmm0",
                "tilestored [{o1} + {s}*1], tmm1",
                "tilestored [{o2} + {s}*1], tmm2",
                "tilestored [{o3} + {s}*1], tmm3",
                o = in(reg) out,
                o1 = in(reg) out.add(o1),
                o2 = in(reg) out.add(o2),
                o3 = in(reg) out.add(o1 + o2),
                s = in(reg) stride,
                options(nostack),
            );
        }
    }

    /// [`Self::run`] for a block of one row tile: sums in tiles 0 and 1, input parts in 4, weight parts
    /// in 6 and 7 (11 tile loads for 12 part products per input tile).
    ///
    /// # Safety
    /// As [`Self::run`].
    unsafe fn run_one_row_tile(&self) {
        let stride = self.out_stride;
        let out = self.out as *mut u8;
        // SAFETY (every block below): as in `run`.
        unsafe {
            if self.accumulate {
                asm!(
                    "tileloadd tmm0, [{o} + {s}*1]",
                    "tileloadd tmm1, [{o1} + {s}*1]",
                    o = in(reg) out,
                    o1 = in(reg) out.add(64),
                    s = in(reg) stride,
                    options(nostack, readonly),
                );
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            }
            for kt in 0..self.k_tiles {
                let a0 = self.a.add(kt * PLANES * TILE_VALUES);
                let b0 = self.b.add(kt * PLANES * TILE_VALUES);
                let b1 = b0.add(self.b_next_cols);
                asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1 + 1024]",
                    "tileloadd tmm7, [{b1} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm6, [{b0} + {s}*1 + 2048]",
                    "tileloadd tmm7, [{b1} + {s}*1 + 2048]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm4, [{a0} + {s}*1 + 2048]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm4, [{a0} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm6, [{b0} + {s}*1 + 1024]",
                    "tileloadd tmm7, [{b1} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    s = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{o} + {s}*1], tmm0",
                "tilestored [{o1} + {s}*1], tmm1",
                o = in(reg) out,
                o1 = in(reg) out.add(64),
                s = in(reg) stride,
                options(nostack),
            );
        }
    }
}

/// The AMX tile configuration: eight tiles of 16 rows × 64 bytes (palette 1).
#[repr(C, align(64))]
struct Tiles {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl Tiles {
    /// Loads the configuration on this thread.
    ///
    /// # Safety
    /// AMX usable by this process.
    unsafe fn configure() {
        let mut config = Tiles {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        config.bytes_per_row[..8].fill(64);
        config.rows[..8].fill(TILE as u8);
        // SAFETY: a valid palette-1 configuration (the caller vouches AMX is usable).
        unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    }

    /// Returns the tiles to their initial state.
    ///
    /// # Safety
    /// AMX usable by this process.
    unsafe fn release() {
        // SAFETY: as the caller vouches.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Splits and packs `x` `[m, k]` into tiles (`[row tile][input tile][plane][16 rows][16 pairs]`, rows up
/// to `m_pad` and inputs past `k` zero), row tiles in parallel.
fn pack_input(x: &[f32], m: usize, k: usize, m_pad: usize) -> AlignedU32 {
    let k_tiles = k.div_ceil(TK);
    let per_row_tile = k_tiles * PLANES * TILE_VALUES;
    let mut a = AlignedU32::zeroed(m_pad / TILE * per_row_tile);
    team::for_each_row_mut(a.as_mut_slice(), per_row_tile, 1, |rt, tiles| {
        for r in 0..TILE.min(m.saturating_sub(rt * TILE)) {
            let row = &x[(rt * TILE + r) * k..][..k];
            for kt in 0..k_tiles {
                let (k0, at) = (kt * TK, kt * PLANES * TILE_VALUES + r * TILE);
                // SAFETY: `has_amx_bf16` (checked by `matmul`) implies AVX-512F; the three planes'
                // slots of row `r` are inside this row tile's tiles and on 64-byte lines (the
                // buffer and each row tile's tiles start on one).
                unsafe { store_parts(load16(row, k0), load16(row, k0 + TILE), tiles, at) };
            }
        }
    });
    a
}

/// A panel of the weight: `kts` input tiles from `kt0` by columns `c0..c0 + 16 · col_tiles` (zero past
/// `k` and `n`), packed as `[column tile][input tile][plane][16 pairs][16 columns]` with `panel_tiles`
/// input tiles' room per column tile.
struct Panel<'a> {
    w: &'a [f32],
    k: usize,
    n: usize,
    kt0: usize,
    kts: usize,
    c0: usize,
    col_tiles: usize,
    panel_tiles: usize,
}

impl Panel<'_> {
    /// Weight row `i` (empty past `k`).
    fn row(&self, i: usize) -> &[f32] {
        if i < self.k {
            &self.w[i * self.n..(i + 1) * self.n]
        } else {
            &[]
        }
    }

    /// The two weight rows of pair row `j` of input tile `kt`: `k0 + j` and `k0 + 16 + j`.
    fn rows(&self, kt: usize, j: usize) -> [usize; 2] {
        let k0 = (self.kt0 + kt) * TK;
        [k0 + j, k0 + TILE + j]
    }

    /// Splits and packs the panel into `panel` a pair row at a time along the weight's rows, prefetching
    /// the rows [`PREFETCH_STEPS`] pair rows ahead (the weight comes from memory).
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack(&self, panel: &mut [u32]) {
        assert!(panel.len() >= self.col_tiles * self.panel_tiles * PLANES * TILE_VALUES);
        assert!(self.kts <= self.panel_tiles);
        // Pair rows in the order they are packed: (input tile, pair row j) reads weight rows k0 + j and
        // k0 + 16 + j across the panel's columns.
        let steps = self.kts * TILE;
        for step in 0..steps {
            if step + PREFETCH_STEPS < steps {
                let ahead = step + PREFETCH_STEPS;
                for r in self.rows(ahead / TILE, ahead % TILE) {
                    if r < self.k {
                        for ct in 0..self.col_tiles {
                            let at = r * self.n + self.c0 + ct * TILE;
                            // SAFETY: a hint; `at` is inside the weight (row `r` < k, column < n).
                            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.w.as_ptr().add(at).cast()) };
                        }
                    }
                }
            }
            let (kt, j) = (step / TILE, step % TILE);
            let [lo_row, hi_row] = self.rows(kt, j).map(|r| self.row(r));
            for ct in 0..self.col_tiles {
                let c = self.c0 + ct * TILE;
                let at = ((ct * self.panel_tiles + kt) * PLANES * TILE + j) * TILE;
                // SAFETY: `at + 2 · 256 + 16` is inside the panel (asserted above), `at` on a
                // 64-byte line.
                unsafe { store_parts(load16(lo_row, c), load16(hi_row, c), panel, at) };
            }
        }
    }
}

/// Splits `lo` and `hi` into their bf16 parts and stores part `p`'s pairs (`lo`'s in the low halves) at
/// `out[at + p · 256..][..16]`: one row of each plane's tile.
///
/// # Safety
/// AVX-512F; `at + 2 · 256 + 16 ≤ out.len()` and `out[at]` on a 64-byte boundary.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_parts(lo: __m512, hi: __m512, out: &mut [u32], at: usize) {
    let (lo, hi) = (split(lo), split(hi));
    for p in 0..PLANES {
        // SAFETY: as the caller vouches.
        unsafe { store16(out, at + p * TILE_VALUES, pair(lo[p], hi[p])) };
    }
}

/// `row[at..at + 16]`, zero past the row's end.
#[target_feature(enable = "avx512f")]
#[inline]
fn load16(row: &[f32], at: usize) -> __m512 {
    let left = row.len().saturating_sub(at).min(16);
    if left == 0 {
        return _mm512_castsi512_ps(_mm512_setzero_si512());
    }
    let mask: __mmask16 = if left == 16 { !0 } else { (1u16 << left) - 1 };
    // SAFETY: the mask reads only lanes inside `row`.
    unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(at)) }
}

/// Stores 16 pairs at `out[at..at + 16]`, a 64-byte-aligned slot.
///
/// # Safety
/// AVX-512F; `at + 16 ≤ out.len()` and `out[at]` on a 64-byte boundary.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store16(out: &mut [u32], at: usize, v: __m512i) {
    debug_assert!(at + TILE <= out.len());
    // SAFETY: as the caller vouches.
    unsafe { _mm512_store_si512(out.as_mut_ptr().add(at).cast(), v) };
}

/// The nearest bf16 (ties away from zero) to each lane's f32, as f32 bits with the low 16 zero. (Ties to
/// even would take three more instructions and change nothing that matters here: the split is exact
/// either way.)
#[target_feature(enable = "avx512f")]
#[inline]
fn round_bf16(bits: __m512i) -> __m512i {
    let up = _mm512_add_epi32(bits, _mm512_set1_epi32(0x8000));
    _mm512_and_si512(up, _mm512_set1_epi32(0xffff_0000u32 as i32))
}

/// The three bf16 parts of each lane (f32 bits, low 16 zero): `v = p₀ + p₁ + p₂`, each a nearest bf16
/// to what the parts before it leave (both differences are exact in f32).
#[target_feature(enable = "avx512f")]
#[inline]
fn split(v: __m512) -> [__m512i; PLANES] {
    let p0 = round_bf16(_mm512_castps_si512(v));
    let r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(p0));
    let p1 = round_bf16(_mm512_castps_si512(r1));
    let r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(p1));
    [p0, p1, round_bf16(_mm512_castps_si512(r2))]
}

/// One u32 per lane: the bf16 of `lo` in the low half, of `hi` in the high half (both given as f32 bits
/// with the low 16 zero), as AMX reads a pair.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair(lo: __m512i, hi: __m512i) -> __m512i {
    _mm512_or_si512(hi, _mm512_srli_epi32::<16>(lo))
}

thread_local! {
    /// Each thread's weight panel, kept across tasks and products: a task packs every value it then
    /// reads, so the buffer is zeroed only when it grows (zeroing a fresh one per task cost ~28 MiB of
    /// writes for a 768 × 6,144 product's 48 tasks).
    static PANEL: std::cell::RefCell<AlignedU32> = std::cell::RefCell::new(AlignedU32::zeroed(0));
}

/// A zeroed buffer of u32 starting on a 64-byte line (tile rows are whole lines).
struct AlignedU32(AlignedScratch);

impl AlignedU32 {
    fn zeroed(len: usize) -> Self {
        Self(AlignedScratch::zeroed(len))
    }

    /// This buffer, replaced by a zeroed one of `len` values if it is shorter.
    fn at_least(&mut self, len: usize) -> &mut Self {
        if self.as_mut_slice().len() < len {
            *self = Self::zeroed(len);
        }
        self
    }

    fn as_mut_slice(&mut self) -> &mut [u32] {
        bytemuck::cast_slice_mut(self.0.as_mut_slice())
    }

    /// The address of value `i`.
    fn at(&self, i: usize) -> *const u32 {
        self.0.as_ptr().cast::<u32>().wrapping_add(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::unit_values;

    /// The three parts of a value add up to it exactly (down to 2⁻¹⁰⁰, where the last parts become
    /// subnormal), and each is a bf16 (low 16 bits zero).
    #[test]
    fn values_split_exactly_into_three_bf16_parts() {
        if !crate::kernels::has_amx_bf16() {
            eprintln!("skipped: no usable AMX-BF16 here");
            return;
        }
        let mut values = unit_values(4096, 7);
        values.extend([
            1.0,
            -1.0,
            std::f32::consts::PI,
            1e-30,
            -7.5e20,
            f32::MIN_POSITIVE,
            0.0,
            -0.0,
        ]);
        values.extend(values.clone().iter().map(|v| v * 1234.567));
        for chunk in values.chunks(16) {
            let mut lanes = [0.0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: AMX-BF16 implies AVX-512F.
            let parts = unsafe { split_lanes(&lanes) };
            for (i, &v) in lanes.iter().enumerate() {
                let p = parts.map(|p| f32::from_bits(p[i]));
                assert!(parts.iter().all(|p| p[i] & 0xffff == 0), "{v}: {p:?}");
                let sum = p[0] as f64 + p[1] as f64 + p[2] as f64;
                if v.abs() >= 2f32.powi(-100) {
                    assert_eq!(sum, v as f64, "{v} split into {p:?}");
                } else {
                    // Parts in the subnormal range (which AMX reads as zero anyway) lose their low bits.
                    assert!((sum - v as f64).abs() < 1e-38, "{v} split into {p:?}");
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    fn split_lanes(lanes: &[f32; 16]) -> [[u32; 16]; PLANES] {
        let parts = split(load16(lanes, 0));
        // SAFETY: 16 lanes to 16 values.
        parts.map(|p| unsafe { std::mem::transmute::<__m512i, [u32; 16]>(p) })
    }

    /// Against an f64 reference, the product is as accurate as an f32 loop: its largest error relative to
    /// the sum of |x·w| is at most twice that loop's (whose error is f32 rounding alone), at every edge:
    /// rows, columns and inputs short of a tile, of a pair of tiles and of a panel, and several panels.
    /// (Leaving out the third parts, or summing bf16 alone, is 10–1,000 times off.)
    #[test]
    fn products_are_as_accurate_as_f32_at_every_edge() {
        if !crate::kernels::has_amx_bf16() {
            eprintln!("skipped: no usable AMX-BF16 here");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (2, 0, 3),
            (3, 5, 0),
            (17, 33, 15),
            (32, 32, 32),
            (33, 300, 49),
            (45, 768, 784),
            (242, 600, 96),
            (16, 1000, 64),
        ] {
            // Values with all 24 bits used (not multiples of 1/1001 alone, which bf16 parts split evenly).
            let scramble = |v: Vec<f32>| -> Vec<f32> {
                v.iter()
                    .enumerate()
                    .map(|(i, x)| x * (1.0 + (i % 97) as f32 * 0.013_579))
                    .collect()
            };
            let (x, w) = (
                scramble(unit_values(m * k, 1)),
                scramble(unit_values(k * n, 2)),
            );
            let got = matmul(&x, &w, m, k, n);
            assert_eq!(got.len(), m * n, "({m}, {k}, {n})");
            let (mut worst, mut worst_f32) = (0.0f64, 0.0f64);
            for r in 0..m {
                for c in 0..n {
                    let (mut exact, mut magnitude, mut f32_sum) = (0.0f64, 0.0f64, 0.0f32);
                    for i in 0..k {
                        let (a, b) = (x[r * k + i], w[i * n + c]);
                        exact += a as f64 * b as f64;
                        magnitude += (a as f64 * b as f64).abs();
                        f32_sum = a.mul_add(b, f32_sum);
                    }
                    let relative =
                        |v: f32| (v as f64 - exact).abs() / magnitude.max(f64::MIN_POSITIVE);
                    worst = worst.max(relative(got[r * n + c]));
                    worst_f32 = worst_f32.max(relative(f32_sum));
                }
            }
            // Where the f32 loop is exact (one product), one f32 rounding is allowed.
            let bound = 2.0 * worst_f32 + f32::EPSILON as f64 / 2.0;
            assert!(
                worst <= bound,
                "({m}, {k}, {n}): worst relative error {worst:e}, the f32 loop's {worst_f32:e}"
            );
        }
    }
}
