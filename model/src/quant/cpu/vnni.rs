//! The packed product for longer inputs (prefill, the vision tower) in integer dot products, where the
//! CPU has AVX-512 VNNI. Dequantising to f32 left the first question about an image on the 7B model bound
//! by the cores' f32 arithmetic (16 multiply-adds per instruction, one instruction per cycle); `vpdpwssd`
//! does 32 products of 16-bit integers per instruction and, on Zen 4, two instructions per cycle (measured:
//! 202 G products/s on one core against 59 G for f32). So here the codes stay integers and the input is
//! quantised too, per group of 32 values to 16 bits with its own scale. Per group and output channel,
//! `Σ w·x ≈ scale · d · Σ q·a + min · d · Σ a`, with `a` the input's 16-bit values and `d` their scale:
//! the product with the rounded input, whose rounding (half a step of its group's largest value / 32,767)
//! is far below the weights' own. 8-bit inputs (`vpdpbusd`, as llama.cpp does) ran at about the same speed
//! here but cost SmolLM2 2–3 points of greedy-token agreement (int8 99.5 → 97.1 %). (The minimum's term
//! with the exact sum `Σ x` instead of `d · Σ a` left the codes `q`, all ≥ 0, to meet the input's rounding
//! alone: twice the error.)
//!
//! The weights are rearranged block by block (1,024 output channels × 256 inputs, as in
//! [`Packing::matmul_t_blocks`]) into the instruction's layout: for 16 output channels and 2 consecutive
//! inputs, one vector; a tile of 6 input rows × 32 output channels then keeps its sums in registers.
//!
//! CPUs with AVX2 but not AVX-512 VNNI run the same arithmetic on the same layout in `vpmaddwd` and
//! `vpaddd` ([`super::int16_avx2`]); [`Isa`] says which.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::super::pack::GROUP;
use super::x86::scale_min;
use super::{BLOCK_DEPTH, Packing, block_width};
use crate::kernels::host::SharedOut;

/// Output channels per panel (one AVX-512 vector, two AVX2 vectors).
pub(super) const LANES: usize = 16;
/// Input rows per tile.
pub(super) const TILE_ROWS: usize = 6;
/// Inputs per instruction and lane.
const PAIR: usize = 2;
/// Vectors of weights per group of 32 inputs and 16 channels.
pub(super) const PAIRS: usize = GROUP / PAIR;

/// The instructions the integer product runs in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Isa {
    /// AVX-512 F, BW and VNNI (`vpdpwssd`).
    Vnni,
    /// AVX2 and FMA (`vpmaddwd` + `vpaddd`: [`super::int16_avx2`]).
    Avx2,
}

/// The instructions this CPU has for the integer product, unless it is switched off with
/// `LLAVA_MED_CPU_INT16_INPUTS=0` (checked once).
pub(super) fn enabled() -> Option<Isa> {
    static ON: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        available()
            .filter(|_| std::env::var("LLAVA_MED_CPU_INT16_INPUTS").map_or(true, |v| v != "0"))
    })
}

/// The widest instructions this CPU has for the integer product.
pub(super) fn available() -> Option<Isa> {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
    {
        Some(Isa::Vnni)
    } else if crate::kernels::has_avx2_fma() {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// Input rows quantised per group of 32: 16-bit values, and per group the scale and the rounded sum.
pub(super) struct QuantizedInput {
    /// `[m, k]` values in −32,767..=32,767.
    pub(super) values: Vec<i16>,
    /// `[m, k / 32]` scales: a group's largest |x| / 32,767.
    pub(super) scales: Vec<f32>,
    /// `[m, k / 32]` sums of the rounded values, `d · Σ a` (for the weights' minimums).
    pub(super) sums: Vec<f32>,
}

/// `x` `[m, k]` quantised per group of 32, rows in parallel, in `isa`'s instructions (the same values
/// either way).
///
/// # Panics
/// When the CPU lacks `isa` ([`available`] is checked first) or `k` is not a multiple of 32.
pub(super) fn quantize_input(x: &[f32], k: usize, isa: Isa) -> QuantizedInput {
    assert!(
        available().is_some_and(|best| best == Isa::Vnni || best == isa) && k.is_multiple_of(GROUP)
    );
    let groups = x.len() / GROUP;
    let mut out = QuantizedInput {
        values: vec![0; x.len()],
        scales: vec![0.0; groups],
        sums: vec![0.0; groups],
    };
    let row_groups = k / GROUP;
    x.par_chunks(k)
        .zip(out.values.par_chunks_mut(k))
        .zip(out.scales.par_chunks_mut(row_groups))
        .zip(out.sums.par_chunks_mut(row_groups))
        .for_each(|(((x, q), d), s)| match isa {
            // SAFETY: `available` found AVX-512 F and BW.
            Isa::Vnni => unsafe { quantize_row(x, q, d, s) },
            // SAFETY: `available` found AVX2 (every CPU with AVX-512 VNNI has it).
            Isa::Avx2 => unsafe { super::int16_avx2::quantize_row(x, q, d, s) },
        });
    out
}

#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_row(x: &[f32], q: &mut [i16], scales: &mut [f32], sums: &mut [f32]) {
    let groups = x.chunks_exact(GROUP).zip(q.chunks_exact_mut(GROUP));
    for ((x, q), (d, s)) in groups.zip(scales.iter_mut().zip(sums.iter_mut())) {
        // SAFETY: `x` holds 32 values.
        let (a, b) = unsafe {
            (
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_loadu_ps(x.as_ptr().add(16)),
            )
        };
        let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        *d = max / 32767.0;
        let inv = _mm512_set1_ps(if max > 0.0 { 32767.0 / max } else { 0.0 });
        // Round to nearest (the default rounding mode); |x| · 32,767 / max ≤ 32,767 fits 16 bits.
        let (ca, cb) = (
            _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)),
            _mm512_cvtps_epi32(_mm512_mul_ps(b, inv)),
        );
        *s = _mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb)) as f32 * *d;
        for (half, codes) in [ca, cb].into_iter().enumerate() {
            let d = &mut q[16 * half..][..16];
            // SAFETY: `d` holds the 16 values written.
            unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), _mm512_cvtsepi32_epi16(codes)) };
        }
    }
}

/// One block of weights in the instructions' layout, for one thread.
pub(super) struct Block {
    /// `[panel][group][pair][lane]`: the codes of inputs `2·pair` and `2·pair + 1` of channel
    /// `16·panel + lane`, as the low and high 16 bits of a word.
    pub(super) codes: Vec<u32>,
    /// `[panel][group][lane]` scales.
    pub(super) scales: Vec<f32>,
    /// `[panel][group][lane]` minimums.
    pub(super) mins: Vec<f32>,
    /// Groups in this block (≤ `BLOCK_DEPTH / 32`).
    pub(super) groups: usize,
}

impl Block {
    fn new(width: usize) -> Self {
        let panels = width.div_ceil(LANES);
        let groups = BLOCK_DEPTH / GROUP;
        Self {
            codes: vec![0; panels * groups * PAIRS * LANES],
            scales: vec![0.0; panels * groups * LANES],
            mins: vec![0.0; panels * groups * LANES],
            groups,
        }
    }
}

impl Packing<'_> {
    /// `x` `[m, k]` · `Wᵀ` → `[m, n]` with integer dot products in `isa`'s instructions (the CPU must
    /// have them: [`available`]).
    pub(super) fn matmul_t_int16<const BITS: usize>(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        n: usize,
    ) -> Vec<f32> {
        let k = self.k;
        let input = quantize_input(x, k, isa);
        let width = block_width(n, rayon::current_num_threads());
        let mut out = vec![0.0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        (0..n.div_ceil(width)).into_par_iter().for_each_init(
            || Block::new(width),
            |block, i| {
                let (first, channels) = (i * width, width.min(n - i * width));
                for start in (0..k).step_by(BLOCK_DEPTH) {
                    let (g0, groups) = (start / GROUP, BLOCK_DEPTH.min(k - start) / GROUP);
                    self.fill_block::<BITS>(isa, block, first, channels, g0, groups);
                    // SAFETY: `quantize_input` checked that the CPU has `isa`; the block holds
                    // `channels` channels and `groups` groups from group `g0`; the output columns
                    // `first..first + channels` of every row are this block's alone, and `out` outlives
                    // the loop.
                    unsafe {
                        match isa {
                            Isa::Vnni => {
                                multiply_block(block, channels, &input, k, g0, m, n, &dst, first)
                            }
                            Isa::Avx2 => super::int16_avx2::multiply_block(
                                block, channels, &input, k, g0, m, n, &dst, first,
                            ),
                        }
                    };
                }
            },
        );
        out
    }

    /// Channels `first..first + channels`, groups `g0..g0 + groups` into `block`'s layout; lanes past the
    /// last channel get zero codes, scales and minimums.
    fn fill_block<const BITS: usize>(
        &self,
        isa: Isa,
        block: &mut Block,
        first: usize,
        channels: usize,
        g0: usize,
        groups: usize,
    ) {
        debug_assert_eq!(g0 % self.groups_per_super, 0);
        block.groups = groups;
        let panels = channels.div_ceil(LANES);
        for p in 0..panels {
            for lane in 0..LANES {
                let c = p * LANES + lane;
                let at = |g: usize| (p * groups + g) * LANES + lane;
                if c >= channels {
                    for g in 0..groups {
                        block.scales[at(g)] = 0.0;
                        block.mins[at(g)] = 0.0;
                    }
                    continue;
                }
                let (_, params, supers) = self.row(first + c);
                let supers = &supers[2 * (g0 / self.groups_per_super)..];
                let units = self.group_units(supers);
                for (g, units) in (0..groups).zip(units) {
                    let (scale, min) = scale_min(params, g0 + g, units);
                    block.scales[at(g)] = scale;
                    block.mins[at(g)] = min;
                }
            }
        }
        match isa {
            // SAFETY: the caller checked that the CPU has `isa` ([`available`]).
            Isa::Vnni => unsafe { self.fill_codes::<BITS>(block, first, channels, g0, groups) },
            // SAFETY: as above.
            Isa::Avx2 => unsafe {
                super::int16_avx2::fill_codes::<BITS>(
                    &self.codes,
                    self.k / GROUP * BITS,
                    block,
                    first,
                    channels,
                    g0,
                    groups,
                )
            },
        }
    }

    /// [`Packing::fill_block`]'s codes: per panel and group, each of its (4 or 8) words gathered from the 16
    /// channels' rows at once and spread into 16-bit halves. (One word at a time, this took
    /// as long as the products for 16 input rows.)
    #[target_feature(enable = "avx512f")]
    fn fill_codes<const BITS: usize>(
        &self,
        block: &mut Block,
        first: usize,
        channels: usize,
        g0: usize,
        groups: usize,
    ) {
        // Word offsets are gathered as i32.
        assert!(self.codes.len() <= i32::MAX as usize);
        let row_words = (self.k / GROUP * BITS) as i32;
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // Codes 2i and 2i + 1 of a word (of `BITS`-bit codes) into the low and high 16 bits of a lane.
        let pair = |w: __m512i, i: usize| {
            let mask = _mm512_set1_epi32((1 << BITS) - 1);
            let even = _mm512_srl_epi32(w, _mm_cvtsi32_si128((2 * i * BITS) as i32));
            let odd = _mm512_srl_epi32(w, _mm_cvtsi32_si128(((2 * i + 1) * BITS) as i32));
            _mm512_or_si512(
                _mm512_and_si512(even, mask),
                _mm512_slli_epi32::<16>(_mm512_and_si512(odd, mask)),
            )
        };
        for p in 0..channels.div_ceil(LANES) {
            let real = (channels - p * LANES).min(LANES);
            let mask: __mmask16 = if real == LANES { !0 } else { (1 << real) - 1 };
            let rows = _mm512_add_epi32(_mm512_set1_epi32((first + p * LANES) as i32), lanes);
            let rows = _mm512_maskz_mov_epi32(mask, rows);
            let starts = _mm512_add_epi32(
                _mm512_mullo_epi32(rows, _mm512_set1_epi32(row_words)),
                _mm512_set1_epi32((g0 * BITS) as i32),
            );
            for g in 0..groups {
                let dst = &mut block.codes[(p * groups + g) * PAIRS * LANES..][..PAIRS * LANES];
                let word = |h: usize| {
                    let at = _mm512_add_epi32(starts, _mm512_set1_epi32((g * BITS + h) as i32));
                    // SAFETY: every unmasked lane's offset is a word of row `first + c` (< the rows of
                    // `codes`), group g0 + g (< its groups), word h < BITS.
                    unsafe {
                        _mm512_mask_i32gather_epi32::<4>(
                            _mm512_setzero_si512(),
                            mask,
                            at,
                            self.codes.as_ptr(),
                        )
                    }
                };
                let mut put = |q: usize, v: __m512i| {
                    let d = &mut dst[q * LANES..][..LANES];
                    // SAFETY: `d` holds the 16 words written.
                    unsafe { _mm512_storeu_si512(d.as_mut_ptr().cast(), v) };
                };
                // Word h holds 32 / BITS codes: 16 / BITS pairs.
                let per_word = 16 / BITS;
                for h in 0..BITS {
                    let w = word(h);
                    for i in 0..per_word {
                        put(per_word * h + i, pair(w, i));
                    }
                }
            }
        }
    }
}

/// Adds `x[:, g0·32..] · blockᵀ` into columns `first..first + channels` of `out` `[m, n]`, in tiles of up
/// to 6 rows × 32 channels, rows outermost: a tile's 6 output rows stay in cache while the block's panels
/// pass. (Panels outermost revisited the whole output column for every block, from memory: 1.4× slower;
/// passing 24 rows' tiles over each pair of panels, so that its weights stay in the first-level cache,
/// measured slower too.)
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `block` holds `channels` channels and `input` `m` rows of `k` values;
/// `dst` points at `m · n` values of which this call alone writes the columns named.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn multiply_block(
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
        for p in (0..panels).step_by(2) {
            let vectors = (panels - p).min(2);
            // Lanes of the last vector that are channels.
            let last = channels - (p + vectors - 1) * LANES;
            let tile = Tile {
                block,
                panel: p,
                input,
                row: r0,
                k,
                g0,
                out: dst.at(r0 * n + first + p * LANES),
                n,
                mask: if last >= LANES {
                    !0
                } else {
                    (1u16 << last) - 1
                },
            };
            macro_rules! dispatch {
            ($(($r:literal, $v:literal))*) => {
                match (rows, vectors) {
                    // SAFETY: the caller's contract; the tile's rows, panels and groups exist
                    // (checked above and by the loops' bounds).
                    $(($r, $v) => unsafe { tile.run::<$r, $v>() },)*
                    _ => unreachable!("tiles have 1 to 6 rows and 1 or 2 vectors"),
                }
            };
        }
            dispatch!((1, 1)(2, 1)(3, 1)(4, 1)(5, 1)(6, 1)(1, 2)(2, 2)(3, 2)(4, 2)(5, 2)(6, 2));
        }
    }
}

/// Where one tile of [`multiply_block`] reads and writes.
struct Tile<'a> {
    block: &'a Block,
    /// Its first panel of 16 channels in the block.
    panel: usize,
    input: &'a QuantizedInput,
    /// Its first input row.
    row: usize,
    k: usize,
    /// The block's first group in the input rows.
    g0: usize,
    /// Its first output value (row `row`, the tile's first channel).
    out: *mut f32,
    n: usize,
    /// Lanes of the last vector that are channels.
    mask: __mmask16,
}

impl Tile<'_> {
    /// `R` rows × `V` vectors of 16 channels; sums in registers, integer per group, then scaled into
    /// float sums, then added to the output. Raw pointers: bounds checks in the inner loop cost a fifth
    /// of its time.
    ///
    /// # Safety
    /// As [`multiply_block`]: rows `row..row + R`, panels `panel..panel + V` of the block and its groups
    /// exist.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run<const R: usize, const V: usize>(&self) {
        let b = self.block;
        let groups = b.groups;
        let row_groups = self.k / GROUP;
        // SAFETY (all pointer arithmetic below): the caller's contract; rows r < R of the input from
        // group g0, panels v < V of the block, groups g < groups, pairs q < 16, 16 lanes each.
        let xs: [*const i16; R] = std::array::from_fn(|r| unsafe {
            self.input
                .values
                .as_ptr()
                .add((self.row + r) * self.k + self.g0 * GROUP)
        });
        let (ds, ss): ([*const f32; R], [*const f32; R]) = (
            std::array::from_fn(|r| unsafe {
                self.input
                    .scales
                    .as_ptr()
                    .add((self.row + r) * row_groups + self.g0)
            }),
            std::array::from_fn(|r| unsafe {
                self.input
                    .sums
                    .as_ptr()
                    .add((self.row + r) * row_groups + self.g0)
            }),
        );
        let codes: [*const u32; V] = std::array::from_fn(|v| unsafe {
            b.codes
                .as_ptr()
                .add((self.panel + v) * groups * PAIRS * LANES)
        });
        let (scales, mins): ([*const f32; V], [*const f32; V]) = (
            std::array::from_fn(|v| unsafe {
                b.scales.as_ptr().add((self.panel + v) * groups * LANES)
            }),
            std::array::from_fn(|v| unsafe {
                b.mins.as_ptr().add((self.panel + v) * groups * LANES)
            }),
        );
        let mut sums = [[_mm512_setzero_ps(); V]; R];
        for g in 0..groups {
            let mut dots = [[_mm512_setzero_si512(); V]; R];
            for q in 0..PAIRS {
                let w: [__m512i; V] = std::array::from_fn(|v| unsafe {
                    _mm512_loadu_si512(codes[v].add((g * PAIRS + q) * LANES).cast())
                });
                for r in 0..R {
                    let a = unsafe {
                        xs[r]
                            .add(g * GROUP + PAIR * q)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    let a = _mm512_set1_epi32(a);
                    for v in 0..V {
                        dots[r][v] = dpwssd(dots[r][v], w[v], a);
                    }
                }
            }
            let s: [__m512; V] =
                std::array::from_fn(|v| unsafe { _mm512_loadu_ps(scales[v].add(g * LANES)) });
            let mn: [__m512; V] =
                std::array::from_fn(|v| unsafe { _mm512_loadu_ps(mins[v].add(g * LANES)) });
            for r in 0..R {
                let (d, x_sum) =
                    unsafe { (_mm512_set1_ps(*ds[r].add(g)), _mm512_set1_ps(*ss[r].add(g))) };
                for v in 0..V {
                    let scaled = _mm512_mul_ps(s[v], d);
                    sums[r][v] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r][v]), scaled, sums[r][v]);
                    sums[r][v] = _mm512_fmadd_ps(mn[v], x_sum, sums[r][v]);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            for (v, &sum) in row.iter().enumerate() {
                let mask = if v + 1 == V { self.mask } else { !0 };
                let at = self.out.wrapping_add(r * self.n + v * LANES);
                // SAFETY: the masked lanes are this tile's output values (the caller's contract).
                unsafe {
                    let old = _mm512_maskz_loadu_ps(mask, at);
                    _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(old, sum));
                }
            }
        }
    }
}

/// `acc + Σ pairs of 16-bit products` (`vpdpwssd`). Written out because LLVM, tuning for a generic x86-64,
/// splits `_mm512_dpwssd_epi32` into `vpmaddwd` + `vpaddd`: two instructions, and on this Zen 4 the
/// split product ran at half the speed.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: the instruction reads and writes only these registers; the CPU has AVX-512 VNNI (this
    // function's target features).
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    acc
}

#[cfg(test)]
mod tests {
    use burn::tensor::DType;

    use super::super::super::pack::{Packed, quantize};
    use super::super::tests::{packing, pattern};
    use super::*;

    /// The instruction sets this CPU can run the integer product in.
    fn isas() -> Vec<Isa> {
        match available() {
            Some(Isa::Vnni) => vec![Isa::Vnni, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    /// The same arithmetic one value at a time: integer dot products per group, then scaled.
    fn reference<const BITS: usize>(p: &Packed, input: &QuantizedInput, m: usize) -> Vec<f32> {
        let (n, k) = (p.rows, p.cols);
        let packing = packing(p);
        let mut out = vec![0.0f32; m * n];
        let mut q = [0.0f32; GROUP];
        for r in 0..m {
            for o in 0..n {
                let mut acc = 0.0f64;
                for g in 0..k / GROUP {
                    let (scale, min) = packing.group::<BITS>(o, g, &mut q);
                    let a = &input.values[r * k + g * GROUP..][..GROUP];
                    let dot: i64 = q
                        .iter()
                        .zip(a)
                        .map(|(&q, &a)| q as i64 * i64::from(a))
                        .sum();
                    let gi = r * k / GROUP + g;
                    acc += f64::from(scale) * f64::from(input.scales[gi]) * dot as f64
                        + f64::from(min) * f64::from(input.sums[gi]);
                }
                out[r * n + o] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn the_integer_product_matches_its_arithmetic_one_value_at_a_time() {
        if isas().is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
        }
        // n = 40: a second panel of 8 lanes; 50 = 3 + 16 channels past a block of 16 in a 2-thread
        // split; k = 320 and 96: a last block of 64 inputs, and super-blocks of 2 and 1 groups.
        for (isa, (n, k)) in isas()
            .into_iter()
            .flat_map(|isa| [(40, 320), (50, 96), (16, 768), (8, 64)].map(|s| (isa, s)))
        {
            let w = pattern(n * k, 37, 101, 700.0);
            for bits in [4, 8] {
                let p = quantize(&w, n, k, bits, DType::F32);
                for m in [1, 5, 6, 7, 13] {
                    let x = pattern(m * k, 13, 29, 9.0);
                    let input = quantize_input(&x, k, isa);
                    let (want, got) = match bits {
                        4 => (
                            reference::<4>(&p, &input, m),
                            packing(&p).matmul_t_int16::<4>(isa, &x, m, n),
                        ),
                        _ => (
                            reference::<8>(&p, &input, m),
                            packing(&p).matmul_t_int16::<8>(isa, &x, m, n),
                        ),
                    };
                    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{isa:?}: {n}×{k}, {bits} bits, {m} rows, value {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_input_is_rounded_to_half_a_step_of_its_groups_largest_value_over_32767() {
        let k = 64;
        let mut x = pattern(2 * k, 7, 23, 3.0);
        x[40] = 50.0; // one large value in the second group of the first row
        x[k..k + GROUP].fill(0.0); // an all-zero group
        let mut quantized = Vec::new();
        for isa in isas() {
            let input = quantize_input(&x, k, isa);
            for (g, (xs, qs)) in x.chunks(GROUP).zip(input.values.chunks(GROUP)).enumerate() {
                let max = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                assert_eq!(input.scales[g], max / 32767.0);
                let codes: i32 = qs.iter().map(|&q| i32::from(q)).sum();
                assert_eq!(input.sums[g], codes as f32 * input.scales[g]);
                for (&v, &q) in xs.iter().zip(qs) {
                    let back = f32::from(q) * input.scales[g];
                    assert!(
                        (v - back).abs() <= input.scales[g] / 2.0 + 1e-6,
                        "{v} vs {back}"
                    );
                }
            }
            quantized.push(input.values);
        }
        // Both builds round alike.
        assert!(quantized.windows(2).all(|w| w[0] == w[1]));
    }
}
