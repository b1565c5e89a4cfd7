//! The packed product for a few input rows (decoding) in x86-64 vector instructions, chosen at run time:
//! AVX-512 where the CPU has it, else AVX2 with FMA. The portable loop in [`super`] left the compiler to
//! vectorise the unpacking and ran at ~5 G weights/s on two cores: a quarter of the memory bandwidth at
//! 8 bits, an eighth at 4 (`examples/packed_gemv.rs`). Here each group's codes are widened to 32-bit lanes in
//! one instruction, converted to floats and multiplied into the inputs, which are rearranged once per call
//! so that the lanes line up: 4-bit codes come out of a byte as (even, odd) pairs. Each group also asks
//! for the codes 2 KiB ahead ([`prefetch`]): on the Intel CI machine the kernels otherwise waited on memory
//! (`perf` put 40–60 % of their samples on the instruction after the codes' load), and asking ahead took
//! a 7B decoder layer from 32 to 15–16 ms at 8 bits and from 24.5 to 15 ms at 4 (`examples/packed_gemv.rs`).
//! Groups go two a step into two sets of sums held in registers (chosen at run time, both sets had lived
//! in memory: 7–10 % of a layer at 8 bits, 5–10 % at 4).

use std::arch::x86_64::*;
use std::borrow::Cow;

use super::super::pack::GROUP;
use super::{Packing, channels_per_task, transposed};
use crate::kernels::team;
use crate::kernels::{has_avx2_fma, has_avx512f};

/// The vector instruction set the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    /// 16 lanes (AVX-512 F).
    Avx512,
    /// 8 lanes (AVX2 and FMA).
    Avx2,
}

impl Isa {
    /// The widest set this CPU has, `None` before AVX2.
    pub(super) fn detect() -> Option<Isa> {
        if has_avx512f() {
            Some(Isa::Avx512)
        } else if has_avx2_fma() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }
}

/// `x` (rows of `k` values) in the order the codes unpack: per group of 32, for 4-bit codes the
/// even-numbered values then the odd ones (a byte holds codes 2i and 2i + 1 in its low and high nibble);
/// 8-bit codes unpack in order.
pub(super) fn arrange<const BITS: usize>(x: &[f32]) -> Cow<'_, [f32]> {
    if BITS == 8 {
        return Cow::Borrowed(x);
    }
    let mut out = vec![0.0f32; x.len()];
    for (s, d) in x.chunks_exact(GROUP).zip(out.chunks_exact_mut(GROUP)) {
        let (even, odd) = d.split_at_mut(GROUP / 2);
        for i in 0..GROUP / 2 {
            even[i] = s[2 * i];
            odd[i] = s[2 * i + 1];
        }
    }
    Cow::Owned(out)
}

impl Packing<'_> {
    /// `x` `[m, k]` · `Wᵀ` → `[m, n]` for `m` ≤ 8 with `isa`'s kernels, output channels in parallel.
    pub(super) fn matmul_t_x86<const BITS: usize>(
        &self,
        isa: Isa,
        x: &[f32],
        x_sums: &[f32],
        m: usize,
        n: usize,
    ) -> Vec<f32> {
        let xa = arrange::<BITS>(x);
        let mut out_t = vec![0.0f32; n * m];
        let per_task = channels_per_task(n);
        // The row count is a constant in the kernels so that each row's sums stay in registers.
        macro_rules! rows {
            ($($r:literal)*) => {
                match m {
                    $($r => team::for_each_row_mut(&mut out_t, $r, per_task, |o, acc| {
                        self.channel_x86::<BITS, $r>(isa, o, &xa, x_sums, acc)
                    }),)*
                    _ => unreachable!("the fused product takes at most 8 rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8);
        transposed(out_t, m, n)
    }

    /// Groups `first..` of row `o` (as many as `row` holds) in natural order, for
    /// [`Packing::matmul_t_tiles`]; `first` starts a super-block. (Natural order, not [`arrange`]'s: a
    /// long input rearranged took longer than interleaving the dequantised values, mostly in page faults
    /// of the fresh copy.)
    pub(super) fn dequantize_vector<const BITS: usize>(
        &self,
        isa: Isa,
        o: usize,
        first: usize,
        row: &mut [f32],
    ) {
        debug_assert_eq!(first % self.groups_per_super, 0);
        match isa {
            // SAFETY: `Isa::detect` found these instruction sets on this CPU.
            Isa::Avx512 => unsafe { self.dequantize_avx512::<BITS>(o, first, row) },
            Isa::Avx2 => unsafe { self.dequantize_avx2::<BITS>(o, first, row) },
        }
    }

    #[target_feature(enable = "avx512f")]
    fn dequantize_avx512<const BITS: usize>(&self, o: usize, first: usize, row: &mut [f32]) {
        let (codes, params, supers) = self.row(o);
        let supers = &supers[2 * (first / self.groups_per_super)..];
        let groups = (first..).zip(row.chunks_exact_mut(GROUP));
        // Lanes of (even, odd) that interleave into values 0–15 and 16–31.
        let first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second_half = _mm512_add_epi32(first_half, _mm512_set1_epi32(8));
        for ((g, out), units) in groups.zip(self.group_units(supers)) {
            let (scale, min) = scale_min(params, g, units);
            let (s, m) = (_mm512_set1_ps(scale), _mm512_set1_ps(min));
            let mut q = unpack16::<BITS>(&codes[g * BITS * 4..][..BITS * 4]);
            if BITS == 4 {
                let [even, odd] = q;
                q = [
                    _mm512_permutex2var_ps(even, first_half, odd),
                    _mm512_permutex2var_ps(even, second_half, odd),
                ];
            }
            for (half, q) in out.chunks_exact_mut(16).zip(q) {
                // SAFETY: `half` holds the 16 values written.
                unsafe { _mm512_storeu_ps(half.as_mut_ptr(), _mm512_fmadd_ps(q, s, m)) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn dequantize_avx2<const BITS: usize>(&self, o: usize, first: usize, row: &mut [f32]) {
        let (codes, params, supers) = self.row(o);
        let supers = &supers[2 * (first / self.groups_per_super)..];
        let groups = (first..).zip(row.chunks_exact_mut(GROUP));
        for ((g, out), units) in groups.zip(self.group_units(supers)) {
            let (scale, min) = scale_min(params, g, units);
            let (s, m) = (_mm256_set1_ps(scale), _mm256_set1_ps(min));
            let mut q = unpack8::<BITS>(&codes[g * BITS * 4..][..BITS * 4]);
            if BITS == 4 {
                // (even 0–7, even 8–15, odd 0–7, odd 8–15) interleaved, 4 values per 128-bit lane.
                let [e0, e1, o0, o1] = q;
                let (lo0, hi0) = (_mm256_unpacklo_ps(e0, o0), _mm256_unpackhi_ps(e0, o0));
                let (lo1, hi1) = (_mm256_unpacklo_ps(e1, o1), _mm256_unpackhi_ps(e1, o1));
                q = [
                    _mm256_permute2f128_ps::<0x20>(lo0, hi0),
                    _mm256_permute2f128_ps::<0x31>(lo0, hi0),
                    _mm256_permute2f128_ps::<0x20>(lo1, hi1),
                    _mm256_permute2f128_ps::<0x31>(lo1, hi1),
                ];
            }
            for (quarter, q) in out.chunks_exact_mut(8).zip(q) {
                // SAFETY: `quarter` holds the 8 values written.
                unsafe { _mm256_storeu_ps(quarter.as_mut_ptr(), _mm256_fmadd_ps(q, s, m)) };
            }
        }
    }

    /// Output channel `o` for each of the `M` rows: `acc[r] = Σ_k x[r, k] · W[o, k]`.
    fn channel_x86<const BITS: usize, const M: usize>(
        &self,
        isa: Isa,
        o: usize,
        xa: &[f32],
        x_sums: &[f32],
        acc: &mut [f32],
    ) {
        match isa {
            // SAFETY: `Isa::detect` found these instruction sets on this CPU.
            Isa::Avx512 => unsafe { self.channel_avx512::<BITS, M>(o, xa, x_sums, acc) },
            Isa::Avx2 => unsafe { self.channel_avx2::<BITS, M>(o, xa, x_sums, acc) },
        }
    }

    /// Row `o`'s codes as bytes and its group parameter words.
    #[inline(always)]
    pub(super) fn row(&self, o: usize) -> (&[u8], &[i32], &[f32]) {
        let groups = self.k / GROUP;
        let (pw, supers) = (groups.div_ceil(2), groups / self.groups_per_super);
        (
            bytemuck::cast_slice(&self.codes[o * groups * self.bits..][..groups * self.bits]),
            &self.params[o * pw..][..pw],
            &self.supers[2 * o * supers..][..2 * supers],
        )
    }

    /// Each group's super-block units (S / 255, M / 127) from a row's super-block maxima, in group order.
    #[inline(always)]
    pub(super) fn group_units<'s>(
        &self,
        supers: &'s [f32],
    ) -> impl Iterator<Item = (f32, f32)> + 's {
        let gps = self.groups_per_super;
        supers
            .chunks_exact(2)
            .flat_map(move |m| std::iter::repeat_n((m[0] / 255.0, m[1] / 127.0), gps))
    }

    #[target_feature(enable = "avx512f")]
    fn channel_avx512<const BITS: usize, const M: usize>(
        &self,
        o: usize,
        xa: &[f32],
        x_sums: &[f32],
        acc: &mut [f32],
    ) {
        let (codes, params, supers) = self.row(o);
        let groups = self.k / GROUP;
        // Two sets of sums, for even and odd groups, so consecutive groups do not wait on each other.
        let (mut even, mut odd) = ([_mm512_setzero_ps(); M], [_mm512_setzero_ps(); M]);
        // Σ min · Σx per row, a lane per group of each run of 16.
        let mut mins = [_mm512_setzero_ps(); M];
        let mut scales = [0.0f32; 16];
        for g0 in (0..groups).step_by(16) {
            let lanes = (groups - g0).min(16);
            prefetch_params(params, supers, g0, self.groups_per_super);
            let (scale, min) = self.params16(params, supers, g0, lanes);
            // SAFETY: `scales` holds 16 values.
            unsafe { _mm512_storeu_ps(scales.as_mut_ptr(), scale) };
            for (r, total) in mins.iter_mut().enumerate() {
                let sums = load_first16(&x_sums[r * groups + g0..][..lanes]);
                *total = _mm512_fmadd_ps(min, sums, *total);
            }
            // Group `g` into `sums`.
            let group = |g: usize, scale: f32, sums: &mut [__m512; M]| {
                prefetch(codes, g * BITS * 4 + PREFETCH_AHEAD);
                let [a, b] = unpack16::<BITS>(&codes[g * BITS * 4..][..BITS * 4]);
                let s = _mm512_set1_ps(scale);
                for (r, sum) in sums.iter_mut().enumerate() {
                    let x = &xa[(r * groups + g) * GROUP..][..GROUP];
                    let dot = _mm512_fmadd_ps(b, load16(&x[16..]), _mm512_mul_ps(a, load16(x)));
                    *sum = _mm512_fmadd_ps(dot, s, *sum);
                }
            };
            in_pairs(g0, &scales[..lanes], &mut even, &mut odd, group);
        }
        for r in 0..M {
            acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]))
                + _mm512_reduce_add_ps(mins[r]);
        }
    }

    /// The scales and minimums of groups `g0..g0 + lanes` (`g0` a multiple of 16, `lanes` ≤ 16) of a row
    /// with parameter words `params` and super-block maxima `supers`, a lane each ([`scale_min`]'s
    /// values; lanes past `lanes` hold nothing useful). Decoding them a group at a time took ~40 % of
    /// the 4-bit product (a 7B layer 13.7 ms against 8.5 with constants in their place).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn params16(
        &self,
        params: &[i32],
        supers: &[f32],
        g0: usize,
        lanes: usize,
    ) -> (__m512, __m512) {
        let gps = self.groups_per_super;
        // Group g's 16 bits are half-word g of the row's words: 8 words hold the 16 groups.
        let words = &params[g0 / 2..][..lanes.div_ceil(2)];
        let word_mask: __mmask16 = (1 << words.len()) - 1;
        // SAFETY: the masked lanes are the words of `words`.
        let words = unsafe { _mm512_maskz_loadu_epi32(word_mask, words.as_ptr()) };
        let p = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(words));
        let code_s = _mm512_cvtepi32_ps(_mm512_and_si512(p, _mm512_set1_epi32(0xff)));
        let code_m = _mm512_sub_ps(
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(p)),
            _mm512_set1_ps(128.0),
        );
        // The (S, M) pairs of the super-blocks these groups fall in, 2 to 32 values, and for each lane
        // the index of its pair's S among them.
        let first = 2 * (g0 / gps);
        let pairs = &supers[first..][..2 * lanes.div_ceil(gps)];
        let (lo, hi) = pairs.split_at(pairs.len().min(16));
        let (lo, hi) = (load_first16(lo), load_first16(hi));
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // gps is 1, 2, 4 or 8 (`pack::groups_per_super`): 2 · (j / gps).
        let at_s = _mm512_slli_epi32::<1>(_mm512_srlv_epi32(
            lane,
            _mm512_set1_epi32(gps.trailing_zeros() as i32),
        ));
        let at_m = _mm512_add_epi32(at_s, _mm512_set1_epi32(1));
        let unit_s = _mm512_div_ps(_mm512_permutex2var_ps(lo, at_s, hi), _mm512_set1_ps(255.0));
        let unit_m = _mm512_div_ps(_mm512_permutex2var_ps(lo, at_m, hi), _mm512_set1_ps(127.0));
        (_mm512_mul_ps(code_s, unit_s), _mm512_mul_ps(code_m, unit_m))
    }

    #[target_feature(enable = "avx2,fma")]
    fn channel_avx2<const BITS: usize, const M: usize>(
        &self,
        o: usize,
        xa: &[f32],
        x_sums: &[f32],
        acc: &mut [f32],
    ) {
        let (codes, params, supers) = self.row(o);
        let groups = self.k / GROUP;
        let (mut even, mut odd) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
        let mut mins = [_mm256_setzero_ps(); M];
        let mut scales = [0.0f32; 8];
        for g0 in (0..groups).step_by(8) {
            let lanes = (groups - g0).min(8);
            prefetch_params(params, supers, g0, self.groups_per_super);
            let (scale, min) = self.params8(params, supers, g0, lanes);
            // SAFETY: `scales` holds 8 values.
            unsafe { _mm256_storeu_ps(scales.as_mut_ptr(), scale) };
            for (r, total) in mins.iter_mut().enumerate() {
                let sums = load_first8(&x_sums[r * groups + g0..][..lanes]);
                *total = _mm256_fmadd_ps(min, sums, *total);
            }
            let group = |g: usize, scale: f32, sums: &mut [__m256; M]| {
                prefetch(codes, g * BITS * 4 + PREFETCH_AHEAD);
                let q = unpack8::<BITS>(&codes[g * BITS * 4..][..BITS * 4]);
                let s = _mm256_set1_ps(scale);
                for (r, sum) in sums.iter_mut().enumerate() {
                    let x = &xa[(r * groups + g) * GROUP..][..GROUP];
                    let mut dot = _mm256_mul_ps(q[0], load8(x));
                    for (i, &qi) in q.iter().enumerate().skip(1) {
                        dot = _mm256_fmadd_ps(qi, load8(&x[8 * i..]), dot);
                    }
                    *sum = _mm256_fmadd_ps(dot, s, *sum);
                }
            };
            in_pairs(g0, &scales[..lanes], &mut even, &mut odd, group);
        }
        for r in 0..M {
            acc[r] = sum8(_mm256_add_ps(even[r], odd[r])) + sum8(mins[r]);
        }
    }

    /// [`Packing::params16`] for 8 groups in AVX2's 8 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn params8(&self, params: &[i32], supers: &[f32], g0: usize, lanes: usize) -> (__m256, __m256) {
        let gps = self.groups_per_super;
        let words = &params[g0 / 2..][..lanes.div_ceil(2)];
        let word_mask = _mm_cmpgt_epi32(
            _mm_set1_epi32(words.len() as i32),
            _mm_setr_epi32(0, 1, 2, 3),
        );
        // SAFETY: the masked lanes are the words of `words`.
        let words = unsafe { _mm_maskload_epi32(words.as_ptr(), word_mask) };
        let p = _mm256_cvtepu16_epi32(words);
        let code_s = _mm256_cvtepi32_ps(_mm256_and_si256(p, _mm256_set1_epi32(0xff)));
        let code_m = _mm256_sub_ps(
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(p)),
            _mm256_set1_ps(128.0),
        );
        let first = 2 * (g0 / gps);
        let pairs = &supers[first..][..2 * lanes.div_ceil(gps)];
        let (lo, hi) = pairs.split_at(pairs.len().min(8));
        let (lo, hi) = (load_first8(lo), load_first8(hi));
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let at_s = _mm256_slli_epi32::<1>(_mm256_srlv_epi32(
            lane,
            _mm256_set1_epi32(gps.trailing_zeros() as i32),
        ));
        let at_m = _mm256_add_epi32(at_s, _mm256_set1_epi32(1));
        // Index i of the 16 values in `lo` and `hi`: each permuted within its 8, then the right one kept.
        let pick = |at: __m256i| {
            let within = _mm256_and_si256(at, _mm256_set1_epi32(7));
            let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(at, _mm256_set1_epi32(7)));
            _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(lo, within),
                _mm256_permutevar8x32_ps(hi, within),
                high,
            )
        };
        let unit_s = _mm256_div_ps(pick(at_s), _mm256_set1_ps(255.0));
        let unit_m = _mm256_div_ps(pick(at_m), _mm256_set1_ps(127.0));
        (_mm256_mul_ps(code_s, unit_s), _mm256_mul_ps(code_m, unit_m))
    }
}

/// Up to 16 values of `x` in the first lanes of a vector, zeros after them.
#[target_feature(enable = "avx512f")]
#[inline]
fn load_first16(x: &[f32]) -> __m512 {
    let n = x.len().min(16);
    let mask: __mmask16 = if n == 16 { !0 } else { (1 << n) - 1 };
    // SAFETY: the masked lanes are values of `x`.
    unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr()) }
}

/// Up to 8 values of `x` in the first lanes of a vector, zeros after them.
#[target_feature(enable = "avx2")]
#[inline]
fn load_first8(x: &[f32]) -> __m256 {
    let n = x.len().min(8) as i32;
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    // SAFETY: the masked lanes are values of `x`.
    unsafe { _mm256_maskload_ps(x.as_ptr(), mask) }
}

/// Runs `group(g, scale, sums)` for groups `g0..g0 + scales.len()`, two a step: even-numbered ones into
/// `even`, odd ones into `odd`, so consecutive groups do not wait on each other. The sets are fixed per
/// call at compile time (after inlining): picking one at run time kept both in memory, each group's sums
/// stored and reloaded (a third of the kernels' samples).
#[inline(always)]
fn in_pairs<S>(
    g0: usize,
    scales: &[f32],
    even: &mut S,
    odd: &mut S,
    mut group: impl FnMut(usize, f32, &mut S),
) {
    let pairs = scales.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    for (j, pair) in pairs.enumerate() {
        group(g0 + 2 * j, pair[0], even);
        group(g0 + 2 * j + 1, pair[1], odd);
    }
    if let Some(scale) = last {
        group(g0 + scales.len() - 1, scale, even);
    }
}

/// Group `g`'s scale and minimum from its parameter word and its super-block's units (S / 255, M / 127).
#[inline(always)]
pub(super) fn scale_min(params: &[i32], g: usize, (s, m): (f32, f32)) -> (f32, f32) {
    let p = (params[g / 2] as u32 >> (16 * (g % 2))) & 0xffff;
    ((p & 0xff) as f32 * s, ((p >> 8) as f32 - 128.0) * m)
}

/// Bytes of codes ahead of the group in use that [`prefetch`] asks for.
const PREFETCH_AHEAD: usize = 2048;
/// Bytes ahead of the groups in use that [`prefetch_params`] asks for in the parameter words and the
/// super-block maxima (a row's worth and more of each for the 7B shapes).
const PARAMS_AHEAD: usize = 512;

/// Asks for the cache line at `codes[at]` (or past the end of the row: the next row's, which the same
/// task usually reads next); a hint, so an address past the codes is harmless.
#[inline(always)]
fn prefetch(codes: &[u8], at: usize) {
    // SAFETY: prefetching reads nothing and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(codes.as_ptr().wrapping_add(at).cast()) };
}

/// Asks for the parameter words and super-block maxima [`PARAMS_AHEAD`] bytes past those of groups
/// from `g0` (`gps` groups a super-block): two streams beside the codes', which `perf` showed the
/// kernels waiting on; asking ahead took a 7B layer's 4-bit products 5–8 % faster.
#[inline(always)]
fn prefetch_params(params: &[i32], supers: &[f32], g0: usize, gps: usize) {
    // Two bytes of parameters a group; two f32 maxima a super-block.
    prefetch(bytemuck::cast_slice(params), 2 * g0 + PARAMS_AHEAD);
    prefetch(bytemuck::cast_slice(supers), 8 * (g0 / gps) + PARAMS_AHEAD);
}

/// A group's 32 codes (16 bytes at 4 bits, 32 at 8) as two 16-lane float vectors, in [`arrange`]'s order.
#[target_feature(enable = "avx512f")]
#[inline]
fn unpack16<const BITS: usize>(bytes: &[u8]) -> [__m512; 2] {
    let half = |i: usize| {
        let b = &bytes[16 * i..][..16];
        // SAFETY: `b` holds the 16 bytes read.
        _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
    };
    if BITS == 4 {
        let v = half(0);
        let low = _mm512_and_si512(v, _mm512_set1_epi32(0xf));
        [
            _mm512_cvtepi32_ps(low),
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)),
        ]
    } else {
        [_mm512_cvtepi32_ps(half(0)), _mm512_cvtepi32_ps(half(1))]
    }
}

/// A group's 32 codes as four 8-lane float vectors, in [`arrange`]'s order.
#[target_feature(enable = "avx2")]
#[inline]
fn unpack8<const BITS: usize>(bytes: &[u8]) -> [__m256; 4] {
    let quarter = |i: usize| {
        let b = &bytes[8 * i..][..8];
        // SAFETY: `b` holds the 8 bytes read.
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(b.as_ptr().cast()) })
    };
    if BITS == 4 {
        let (v0, v1) = (quarter(0), quarter(1));
        let mask = _mm256_set1_epi32(0xf);
        [
            _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)),
            _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v0)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v1)),
        ]
    } else {
        [0, 1, 2, 3].map(|i| _mm256_cvtepi32_ps(quarter(i)))
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn load16(x: &[f32]) -> __m512 {
    let x = &x[..16];
    // SAFETY: `x` holds the 16 values read.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

#[target_feature(enable = "avx2")]
#[inline]
fn load8(x: &[f32]) -> __m256 {
    let x = &x[..8];
    // SAFETY: `x` holds the 8 values read.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

/// The sum of an 8-lane vector's lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}
