//! [`super::vnni`]'s integer product for longer inputs, in AVX2 for CPUs without AVX-512 (AMD before Zen 4,
//! Intel's laptop and desktop cores): there dequantising to f32 and gemm's f32 arithmetic left the first
//! question about an image on a 4-bit 7B model at ~70 s on two Zen 3 cores. `vpmaddwd` multiplies 16 pairs
//! of 16-bit integers and adds each pair per instruction, and with `vpaddd` beside it a Zen 3 core ran a
//! register tile of them at 1.9× the multiply-adds per second of the same tile in f32 FMAs (73 against 39 G
//! per second, one core). Same input rounding, weight layout (`Block`) and per-group arithmetic as the
//! AVX-512 product, so both give the same sums; only the vector width and the tile differ: one panel of 16
//! channels is two 8-lane vectors, and a tile is up to 6 input rows by that panel (12 integer sums in
//! registers, with the two weight vectors and the broadcast input: 15 of the 16).

use std::arch::x86_64::*;

use super::super::pack::GROUP;
use super::vnni::{Block, LANES, PAIRS, QuantizedInput, TILE_ROWS};
use crate::kernels::host::SharedOut;

/// f32 or i32 lanes per vector.
const HALF: usize = 8;

/// One input row's groups of 32 quantised as [`super::vnni::quantize_input`] describes: the same values,
/// scales and sums as the AVX-512 build.
///
/// # Safety
/// The CPU has AVX2; `x` and `q` hold `32 · scales.len()` values and `sums` as many as `scales`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_row(x: &[f32], q: &mut [i16], scales: &mut [f32], sums: &mut [f32]) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let groups = x.chunks_exact(GROUP).zip(q.chunks_exact_mut(GROUP));
    for ((x, q), (d, s)) in groups.zip(scales.iter_mut().zip(sums.iter_mut())) {
        // SAFETY: `x` holds 32 values, `q` 32.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(HALF * i)));
            let top = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let max = horizontal_max(top);
            *d = max / 32767.0;
            let inv = _mm256_set1_ps(if max > 0.0 { 32767.0 / max } else { 0.0 });
            // Round to nearest (the default rounding mode); |x| · 32,767 / max ≤ 32,767 fits 16 bits.
            let c: [__m256i; 4] =
                std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
            let total =
                _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
            *s = horizontal_sum(total) as f32 * *d;
            for (half, pair) in c.chunks_exact(2).enumerate() {
                // `packs` interleaves its operands' 128-bit halves; the permutation puts them back in order.
                let packed =
                    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(pair[0], pair[1]));
                _mm256_storeu_si256(q.as_mut_ptr().add(16 * half).cast(), packed);
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn horizontal_max(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m)))
}

#[inline]
#[target_feature(enable = "avx2")]
fn horizontal_sum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b00_00_00_01>(s)))
}

/// [`super::Packing::fill_block`]'s codes in AVX2: per panel, group and half of the panel's 16 channels,
/// each of the group's (4 or 8) words gathered from the 8 channels' rows at once and spread into 16-bit
/// halves, as the AVX-512 build does for 16. `codes` is the packed matrix's codes in rows of `row_words`
/// words; channels `first..first + channels` and groups `g0..g0 + groups` are laid out into `block`.
#[target_feature(enable = "avx2")]
pub(super) fn fill_codes<const BITS: usize>(
    codes: &[i32],
    row_words: usize,
    block: &mut Block,
    first: usize,
    channels: usize,
    g0: usize,
    groups: usize,
) {
    // Word offsets are gathered as i32.
    assert!(codes.len() <= i32::MAX as usize && (first + channels) * row_words <= codes.len());
    assert!((g0 + groups) * BITS <= row_words);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let code_mask = _mm256_set1_epi32((1 << BITS) - 1);
    // Codes 2i and 2i + 1 of a word into the low and high 16 bits of a lane.
    let pair = |w: __m256i, i: usize| {
        let even = _mm256_srl_epi32(w, _mm_cvtsi32_si128((2 * i * BITS) as i32));
        let odd = _mm256_srl_epi32(w, _mm_cvtsi32_si128(((2 * i + 1) * BITS) as i32));
        _mm256_or_si256(
            _mm256_and_si256(even, code_mask),
            _mm256_slli_epi32::<16>(_mm256_and_si256(odd, code_mask)),
        )
    };
    for p in 0..channels.div_ceil(LANES) {
        for half in 0..LANES / HALF {
            let c0 = p * LANES + half * HALF;
            let real = channels.saturating_sub(c0).min(HALF);
            // Lanes past the last channel gather nothing and hold zero codes.
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(real as i32), lanes);
            let rows = _mm256_and_si256(
                _mm256_add_epi32(_mm256_set1_epi32((first + c0) as i32), lanes),
                mask,
            );
            let starts = _mm256_add_epi32(
                _mm256_mullo_epi32(rows, _mm256_set1_epi32(row_words as i32)),
                _mm256_set1_epi32((g0 * BITS) as i32),
            );
            for g in 0..groups {
                let dst = &mut block.codes[(p * groups + g) * PAIRS * LANES..][..PAIRS * LANES];
                let per_word = 16 / BITS;
                for h in 0..BITS {
                    let at = _mm256_add_epi32(starts, _mm256_set1_epi32((g * BITS + h) as i32));
                    // SAFETY: every unmasked lane's offset is word h < BITS of group g0 + g of row
                    // `first + c`, inside the codes (both checked above).
                    let w = unsafe {
                        _mm256_mask_i32gather_epi32::<4>(
                            _mm256_setzero_si256(),
                            codes.as_ptr(),
                            at,
                            mask,
                        )
                    };
                    for i in 0..per_word {
                        let d = &mut dst[(per_word * h + i) * LANES + half * HALF..][..HALF];
                        // SAFETY: `d` holds the 8 words written.
                        unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), pair(w, i)) };
                    }
                }
            }
        }
    }
}

/// Adds `x[:, g0·32..] · blockᵀ` into columns `first..first + channels` of `out` `[m, n]`, in tiles of up
/// to 6 rows × one panel of 16 channels, rows outermost (as the AVX-512 build).
///
/// # Safety
/// The CPU has AVX2 and FMA; `block` holds `channels` channels and `input` `m` rows of `k` values; `dst`
/// points at `m · n` values of which this call alone writes the columns named.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn multiply_block(
    block: &Block,
    channels: usize,
    input: &QuantizedInput,
    k: usize,
    g0: usize,
    m: usize,
    n: usize,
    dst: &SharedOut,
    first: usize,
) {
    assert!(input.values.len() >= m * k && input.scales.len() >= m * (k / GROUP));
    assert!(g0 + block.groups <= k / GROUP);
    let panels = channels.div_ceil(LANES);
    for r0 in (0..m).step_by(TILE_ROWS) {
        let rows = (m - r0).min(TILE_ROWS);
        for p in 0..panels {
            let tile = Tile {
                block,
                panel: p,
                input,
                row: r0,
                k,
                g0,
                out: dst.at(r0 * n + first + p * LANES),
                n,
                channels: (channels - p * LANES).min(LANES),
            };
            // SAFETY: the caller's contract; the tile's rows, panel and groups exist (checked above and
            // by the loops' bounds).
            unsafe {
                match rows {
                    1 => tile.run::<1>(),
                    2 => tile.run::<2>(),
                    3 => tile.run::<3>(),
                    4 => tile.run::<4>(),
                    5 => tile.run::<5>(),
                    _ => tile.run::<6>(),
                }
            }
        }
    }
}

/// Where one tile of [`multiply_block`] reads and writes.
struct Tile<'a> {
    block: &'a Block,
    /// Its panel of 16 channels in the block.
    panel: usize,
    input: &'a QuantizedInput,
    /// Its first input row.
    row: usize,
    k: usize,
    /// The block's first group in the input rows.
    g0: usize,
    /// Its first output value (row `row`, the panel's first channel).
    out: *mut f32,
    n: usize,
    /// The panel's channels that exist (1..=16).
    channels: usize,
}

impl Tile<'_> {
    /// `R` rows × the panel's two vectors of 8 channels: integer sums per group in registers, then scaled
    /// into float sums, then added to the output.
    ///
    /// # Safety
    /// As [`multiply_block`]: rows `row..row + R`, the panel and the block's groups exist.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const R: usize>(&self) {
        let b = self.block;
        let groups = b.groups;
        let row_groups = self.k / GROUP;
        // SAFETY (all pointer arithmetic below): the caller's contract; rows r < R of the input from
        // group g0, the panel's groups g < groups, pairs q < 16, 16 lanes each.
        let at = |r: usize| (self.row + r) * row_groups + self.g0;
        let xs: [*const i16; R] = std::array::from_fn(|r| unsafe {
            self.input
                .values
                .as_ptr()
                .add((self.row + r) * self.k + self.g0 * GROUP)
        });
        let ds: [*const f32; R] =
            std::array::from_fn(|r| unsafe { self.input.scales.as_ptr().add(at(r)) });
        let ss: [*const f32; R] =
            std::array::from_fn(|r| unsafe { self.input.sums.as_ptr().add(at(r)) });
        let codes = unsafe { b.codes.as_ptr().add(self.panel * groups * PAIRS * LANES) };
        let scales = unsafe { b.scales.as_ptr().add(self.panel * groups * LANES) };
        let mins = unsafe { b.mins.as_ptr().add(self.panel * groups * LANES) };
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        for g in 0..groups {
            let mut dots = [[_mm256_setzero_si256(); 2]; R];
            for q in 0..PAIRS {
                let w = unsafe { codes.add((g * PAIRS + q) * LANES) };
                let w: [__m256i; 2] =
                    std::array::from_fn(|v| unsafe { _mm256_loadu_si256(w.add(HALF * v).cast()) });
                for r in 0..R {
                    let a = unsafe { xs[r].add(g * GROUP + 2 * q).cast::<i32>().read_unaligned() };
                    let a = _mm256_set1_epi32(a);
                    for v in 0..2 {
                        dots[r][v] = _mm256_add_epi32(dots[r][v], _mm256_madd_epi16(w[v], a));
                    }
                }
            }
            let s: [__m256; 2] = std::array::from_fn(|v| unsafe {
                _mm256_loadu_ps(scales.add(g * LANES + HALF * v))
            });
            let mn: [__m256; 2] =
                std::array::from_fn(|v| unsafe { _mm256_loadu_ps(mins.add(g * LANES + HALF * v)) });
            for r in 0..R {
                let (d, x_sum) =
                    unsafe { (_mm256_set1_ps(*ds[r].add(g)), _mm256_set1_ps(*ss[r].add(g))) };
                for v in 0..2 {
                    let scaled = _mm256_mul_ps(s[v], d);
                    sums[r][v] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][v]), scaled, sums[r][v]);
                    sums[r][v] = _mm256_fmadd_ps(mn[v], x_sum, sums[r][v]);
                }
            }
        }
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (r, row) in sums.iter().enumerate() {
            for (v, &sum) in row.iter().enumerate() {
                let real = self.channels.saturating_sub(HALF * v).min(HALF);
                let at = self.out.wrapping_add(r * self.n + HALF * v);
                // SAFETY: the first `real` lanes are this tile's output values (the caller's contract).
                unsafe {
                    if real == HALF {
                        _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), sum));
                    } else if real > 0 {
                        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(real as i32), lanes);
                        let old = _mm256_maskload_ps(at, mask);
                        _mm256_maskstore_ps(at, mask, _mm256_add_ps(old, sum));
                    }
                }
            }
        }
    }
}
