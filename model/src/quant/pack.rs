//! The packed weight format and its host-side quantiser, in the style of llama.cpp's K-quants.
//!
//! Each row of a `[rows, cols]` matrix (PyTorch's `[out, in]`, so a group serves one output channel) is cut
//! into groups of [`GROUP`] values, each stored as `bits`-bit codes `q` with its own scale and minimum:
//! `w = q · scale + min` (asymmetric, so a group whose values are not centred on zero keeps all its levels).
//! The group scales and minimums are themselves stored as 8-bit codes relative to the largest of a
//! super-block of up to [`GROUPS_PER_SUPER`] groups, whose two maxima are stored in the model's float type.
//! That costs 16 bits per group plus 32 per super-block of 256 values in 16-bit models: 4.625 bits per
//! weight for 4-bit codes, 8.625 for 8-bit, against 5 and 9 with a 16-bit scale and minimum per group.
//!
//! Layout, all little-endian within 32-bit words (so every backend, WGSL included, can unpack them with
//! shifts and masks on `i32`):
//! - `codes` `[rows, cols · bits / 32]`: code `j` of a word at bits `j · bits`.
//! - `group_params` `[rows, ⌈groups / 2⌉]`: per group 16 bits, the scale code `s` (1..=255) in the low byte
//!   and the minimum code `m + 128` (m in −127..=127) in the high byte; group `2k + 1` in the high half.
//! - `supers` `[rows, supers, 2]`: the super-block's largest group scale `S` and largest |minimum| `M`,
//!   so that `scale = s · S / 255` and `min = m · M / 127`.

use burn::tensor::DType;

use crate::host_memory::zeroed_on_huge_pages;

/// Values per group (one scale and one minimum).
pub const GROUP: usize = 32;
/// Most groups sharing one pair of super-block maxima.
pub const GROUPS_PER_SUPER: usize = 8;
/// Version of [`quantize`]'s output: the quantised-weights cache ([`super::cache`]) reads only entries
/// made by this version. Raise it whenever the codes for the same input change (the
/// `quantiser_output_is_pinned_to_its_version` test fails then).
pub const QUANTIZER_VERSION: u32 = 1;

/// A matrix in the packed format, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// Rows of the matrix.
    pub rows: usize,
    /// Values per row (a multiple of [`GROUP`]).
    pub cols: usize,
    /// Bits per code: 4 or 8.
    pub bits: usize,
    /// Groups per super-block (divides `cols / GROUP`).
    pub groups_per_super: usize,
    /// Packed codes, `rows · cols · bits / 32` words.
    pub codes: Vec<i32>,
    /// Packed group scale and minimum codes, `rows · ⌈groups / 2⌉` words.
    pub group_params: Vec<i32>,
    /// Super-block maxima (S, M) per super-block, already rounded to the float type they are stored in.
    pub supers: Vec<f32>,
}

/// Whether a row of `cols` values can be packed.
pub fn packable(cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(GROUP)
}

/// Groups per super-block for rows of `groups` groups: the largest of 8, 4, 2, 1 that divides it.
pub fn groups_per_super(groups: usize) -> usize {
    [GROUPS_PER_SUPER, 4, 2, 1]
        .into_iter()
        .find(|&g| groups.is_multiple_of(g))
        .unwrap_or(1)
}

/// Bytes the packed form of a `[rows, cols]` matrix takes, with super-block maxima of `float_bytes` each.
pub fn packed_bytes(rows: usize, cols: usize, bits: usize, float_bytes: usize) -> usize {
    let groups = cols / GROUP;
    let supers = groups / groups_per_super(groups);
    rows * (cols * bits / 8 + groups.div_ceil(2) * 4 + supers * 2 * float_bytes)
}

/// Quantises a row-major `[rows, cols]` matrix to `bits` (4 or 8) with maxima representable in `dtype`.
/// Each group's scale and minimum minimise its squared error over a small set of clipped ranges (clipping a
/// few outliers often buys finer steps for all the others); rows are spread over the available cores.
///
/// # Panics
/// When `cols` is not [`packable`], `bits` is not 4 or 8, or `values.len() != rows · cols` (callers check).
pub fn quantize(values: &[f32], rows: usize, cols: usize, bits: usize, dtype: DType) -> Packed {
    assert!(packable(cols) && (bits == 4 || bits == 8) && values.len() == rows * cols);
    let groups = cols / GROUP;
    let gps = groups_per_super(groups);
    let (code_words, param_words, super_vals) =
        (cols * bits / 32, groups.div_ceil(2), 2 * groups / gps);
    let mut out = Packed {
        rows,
        cols,
        bits,
        groups_per_super: gps,
        codes: zeroed_on_huge_pages(rows * code_words),
        group_params: vec![0; rows * param_words],
        supers: vec![0.0; rows * super_vals],
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = rows.div_ceil(threads).max(1);
    #[cfg(target_arch = "x86_64")]
    let wide = crate::kernels::has_avx2();
    std::thread::scope(|scope| {
        let parts = values
            .chunks(chunk * cols)
            .zip(out.codes.chunks_mut(chunk * code_words))
            .zip(out.group_params.chunks_mut(chunk * param_words))
            .zip(out.supers.chunks_mut(chunk * super_vals));
        for (((v, c), p), s) in parts {
            scope.spawn(move || {
                for (((row, c), p), s) in v
                    .chunks(cols)
                    .zip(c.chunks_mut(code_words))
                    .zip(p.chunks_mut(param_words))
                    .zip(s.chunks_mut(super_vals))
                {
                    #[cfg(target_arch = "x86_64")]
                    if wide {
                        // SAFETY: `wide` says this CPU has AVX2.
                        unsafe { quantize_row_avx2(row, bits, gps, dtype, c, p, s) };
                        continue;
                    }
                    quantize_row::<false>(row, bits, gps, dtype, c, p, s);
                }
            });
        }
    });
    out
}

/// [`quantize_row`] compiled for AVX2: the build targets baseline x86-64 (SSE2, 4 lanes), and the error
/// sums of the range search vectorise twice as wide here. The same operations in the same order: the
/// codes are identical either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    row: &[f32],
    bits: usize,
    gps: usize,
    dtype: DType,
    codes: &mut [i32],
    params: &mut [i32],
    supers: &mut [f32],
) {
    quantize_row::<true>(row, bits, gps, dtype, codes, params, supers)
}

/// One row's codes, group parameters and super-block maxima; `WIDE` only inside
/// [`quantize_row_avx2`] (its error sums then run in AVX2, [`Candidates::errors`]).
#[inline(always)]
fn quantize_row<const WIDE: bool>(
    row: &[f32],
    bits: usize,
    gps: usize,
    dtype: DType,
    codes: &mut [i32],
    params: &mut [i32],
    supers: &mut [f32],
) {
    let levels = ((1u32 << bits) - 1) as f32;
    // A plain loop rather than an iterator's `map`: the adapter's `fold` was compiled apart from this
    // function, without AVX2, and took most of the quantiser's time.
    let mut fitted = Vec::with_capacity(row.len() / GROUP);
    for group in row.chunks(GROUP) {
        fitted.push(fit_group::<WIDE>(group, levels));
    }
    let per_word = 32 / bits;
    for (sb, (block, values)) in fitted.chunks(gps).zip(row.chunks(gps * GROUP)).enumerate() {
        let max_scale = block.iter().map(|&(s, _)| s).fold(0.0, f32::max);
        let max_min = block.iter().map(|&(_, m)| m.abs()).fold(0.0, f32::max);
        let (big_s, big_m) = (round_up(max_scale, dtype), round_up(max_min, dtype));
        supers[2 * sb] = big_s;
        supers[2 * sb + 1] = big_m;
        let (step_s, step_m) = (big_s / 255.0, big_m / 127.0);
        for (k, (&(s, m), values)) in block.iter().zip(values.chunks(GROUP)).enumerate() {
            let g = sb * gps + k;
            // The nearest 8-bit codes of the fitted scale and minimum, then the best of their neighbours
            // for the group's squared error once its values are rounded with them.
            let near_s = if step_s > 0.0 {
                (s / step_s).round() as i32
            } else {
                0
            };
            let near_m = if step_m > 0.0 {
                (m / step_m).round() as i32
            } else {
                0
            };
            // The 3 × 3 neighbours one at a time (side by side, as the range search's candidates, was
            // slower for 9: two vectors' work for 9 lanes).
            let mut best = (f32::INFINITY, 0, 0);
            for sc in (near_s - 1).max(1)..=(near_s + 1).min(255) {
                for mc in (near_m - 1).max(-127)..=(near_m + 1).min(127) {
                    let (scale, min) = (sc as f32 * step_s, mc as f32 * step_m);
                    let inv = 1.0 / scale;
                    let err = squared_error(values, scale, inv, min, levels);
                    if err < best.0 {
                        best = (err, sc, mc);
                    }
                }
            }
            let (_, s_code, m_code) = best;
            let (scale, min) = (s_code as f32 * step_s, m_code as f32 * step_m);
            let inv = 1.0 / scale;
            for (j, &x) in values.iter().enumerate() {
                let q = round_code(x, scale, inv, min, levels) as u32;
                let idx = g * GROUP + j;
                codes[idx / per_word] |= (q << ((idx % per_word) * bits)) as i32;
            }
            let packed = ((s_code as u32) | (((m_code + 128) as u32) << 8)) << (16 * (g % 2));
            params[g / 2] |= packed as i32;
        }
    }
}

/// Σ (x − dequantised x)² over a group of 32 with `scale` (> 0; `inv` = 1 / scale) and `min`, summed in 8
/// lanes: a single running sum fixes the order of the additions and keeps the loop from vectorising.
#[inline(always)]
fn squared_error(values: &[f32], scale: f32, inv: f32, min: f32, levels: f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    for chunk in values.chunks_exact(8) {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            let y = round_code(x, scale, inv, min, levels) * scale + min;
            *l += (y - x) * (y - x);
        }
    }
    lanes.iter().sum()
}

/// The range search's 16 candidate (scale, minimum) pairs for one group, whose squared errors are
/// summed side by side: each candidate's sum runs over the values in order, so in AVX2 8 candidates share
/// a vector and no sum needs adding across lanes. One candidate at a time, in 8 lanes of values then
/// across them ([`squared_error`]), the horizontal sums held the search up: 4-bit quantising took 9.3–10.1
/// ns per weight on two Zen 3 cores, 7.0 this way.
struct Candidates {
    scale: [f32; 16],
    /// 1 / scale.
    inv: [f32; 16],
    min: [f32; 16],
}

impl Candidates {
    /// Candidate `j` is `pair(j)`, (scale, minimum).
    #[inline(always)]
    fn new(pair: impl Fn(usize) -> (f32, f32)) -> Self {
        let pairs: [(f32, f32); 16] = std::array::from_fn(pair);
        Self {
            scale: pairs.map(|(s, _)| s),
            inv: pairs.map(|(s, _)| 1.0 / s),
            min: pairs.map(|(_, m)| m),
        }
    }

    /// Σ (x − dequantised x)² over `values` for each candidate, in AVX2
    /// where `WIDE` (only inside [`quantize_row_avx2`]); the same operations in the same order either way.
    #[inline(always)]
    fn errors<const WIDE: bool>(&self, values: &[f32], levels: f32) -> [f32; 16] {
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: `WIDE` only inside `quantize_row_avx2`, whose caller checked AVX2.
            return unsafe { self.errors_avx2(values, levels) };
        }
        let mut err = [0.0f32; 16];
        for (j, e) in err.iter_mut().enumerate() {
            for &x in values {
                let y = round_code(x, self.scale[j], self.inv[j], self.min[j], levels)
                    * self.scale[j]
                    + self.min[j];
                *e += (y - x) * (y - x);
            }
        }
        err
    }

    /// [`Candidates::errors`] in AVX2, 8 candidates a vector: [`round_code`]'s operations lane by lane
    /// (`max`/`min` with zero and `levels` return those for NaN as its comparisons do; a scale ≤ 0 gives
    /// code 0 through a mask), then `y = q · scale + min` and `err += (y − x)²`, unfused as the portable
    /// build computes them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn errors_avx2(&self, values: &[f32], levels: f32) -> [f32; 16] {
        use std::arch::x86_64::*;
        const SHIFT: f32 = 12_582_912.0;
        let (zero, top, shift) = (
            _mm256_setzero_ps(),
            _mm256_set1_ps(levels),
            _mm256_set1_ps(SHIFT),
        );
        let mut out = [0.0f32; 16];
        for half in 0..2 {
            // SAFETY: the arrays hold 16 values; `half` < 2.
            let (scale, inv, min) = unsafe {
                (
                    _mm256_loadu_ps(self.scale.as_ptr().add(8 * half)),
                    _mm256_loadu_ps(self.inv.as_ptr().add(8 * half)),
                    _mm256_loadu_ps(self.min.as_ptr().add(8 * half)),
                )
            };
            let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(scale, zero);
            let mut err = zero;
            for &x in values {
                let x = _mm256_set1_ps(x);
                let v = _mm256_mul_ps(_mm256_sub_ps(x, min), inv);
                // `v > 0 ? v : 0` then `v < levels ? v : levels` (NaN → 0).
                let v = _mm256_min_ps(_mm256_max_ps(v, zero), top);
                let q = _mm256_sub_ps(_mm256_add_ps(v, shift), shift);
                let q = _mm256_and_ps(q, positive);
                let d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(q, scale), min), x);
                err = _mm256_add_ps(err, _mm256_mul_ps(d, d));
            }
            // SAFETY: `out` holds 16 values.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * half), err) };
        }
        out
    }
}

/// The code of `x` for a group with `scale` (`inv` = 1 / scale) and `min`.
#[inline(always)]
fn round_code(x: f32, scale: f32, inv: f32, min: f32, levels: f32) -> f32 {
    if scale > 0.0 {
        nearest((x - min) * inv, levels)
    } else {
        0.0
    }
}

/// `v` clamped to 0..=`levels` (NaN: 0) and rounded to the nearest integer, halves to even: adding and
/// subtracting 1.5 · 2²³ leaves no bits for a fraction. `f32::round` is a library call on baseline x86-64,
/// and a conversion to an integer saturates in Rust, which kept the error sums from vectorising (the
/// quantiser's time per weight: 26.7 → 17.5 ns with lanes, 6.7 ns without the conversion, at 4 bits).
#[inline(always)]
fn nearest(v: f32, levels: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    let v = if v > 0.0 { v } else { 0.0 };
    let v = if v < levels { v } else { levels };
    (v + SHIFT) - SHIFT
}

/// The scale and minimum of one group minimising its squared error over a few clipped ranges. With 255
/// levels clipping never pays (it saves a fraction of a step on every value and costs several steps on the
/// clipped one), so 8-bit groups take their full range without the search, which halves load time.
#[inline(always)]
fn fit_group<const WIDE: bool>(values: &[f32], levels: f32) -> (f32, f32) {
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if hi <= lo {
        return (0.0, lo);
    }
    if levels > 16.0 {
        return ((hi - lo) / levels, lo);
    }
    const TRIMS: [f32; 4] = [0.0, 0.02, 0.05, 0.1];
    // The low trim outer; the first smallest error wins.
    let candidates = Candidates::new(|j| {
        let (a, b) = (TRIMS[j / 4], TRIMS[j % 4]);
        let (l, h) = (lo + (hi - lo) * a, hi - (hi - lo) * b);
        ((h - l) / levels, l)
    });
    let errors = candidates.errors::<WIDE>(values, levels);
    let mut best = (f32::INFINITY, 0.0, lo);
    for (j, &err) in errors.iter().enumerate() {
        if err < best.0 {
            best = (err, candidates.scale[j], candidates.min[j]);
        }
    }
    (best.1, best.2)
}

/// The smallest value representable in `dtype` that is at least `x` (x ≥ 0).
fn round_up(x: f32, dtype: DType) -> f32 {
    // Both 16-bit types: the next value up from a positive one is the next bit pattern.
    type Conversions = (fn(f32) -> u16, fn(u16) -> f32);
    let (to_bits, from_bits): Conversions = match dtype {
        DType::F16 => (
            |v| half::f16::from_f32(v).to_bits(),
            |b| half::f16::from_bits(b).to_f32(),
        ),
        DType::BF16 => (
            |v| half::bf16::from_f32(v).to_bits(),
            |b| half::bf16::from_bits(b).to_f32(),
        ),
        _ => return x,
    };
    let bits = to_bits(x);
    let nearest = from_bits(bits);
    if nearest >= x || !nearest.is_finite() {
        nearest
    } else {
        from_bits(bits + 1)
    }
}

impl Packed {
    /// The values the packed matrix stands for, row-major (the reference the device code is tested against).
    pub fn dequantize(&self) -> Vec<f32> {
        let groups = self.cols / GROUP;
        let (code_words, param_words) = (self.cols * self.bits / 32, groups.div_ceil(2));
        let super_vals = 2 * groups / self.groups_per_super;
        let per_word = 32 / self.bits;
        let mask = (1u32 << self.bits) - 1;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let codes = &self.codes[r * code_words..(r + 1) * code_words];
            let params = &self.group_params[r * param_words..(r + 1) * param_words];
            let supers = &self.supers[r * super_vals..(r + 1) * super_vals];
            for c in 0..self.cols {
                let g = c / GROUP;
                let sb = g / self.groups_per_super;
                let p = (params[g / 2] as u32 >> (16 * (g % 2))) & 0xffff;
                // The same operations, in the same order, as the device code.
                let scale = (p & 0xff) as f32 * (supers[2 * sb] / 255.0);
                let min = ((p >> 8) as f32 - 128.0) * (supers[2 * sb + 1] / 127.0);
                let q = (codes[c / per_word] as u32 >> ((c % per_word) * self.bits)) & mask;
                out.push(q as f32 * scale + min);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn normal_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| {
                // Box–Muller: weights look Gaussian, with the odd outlier.
                let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                0.02 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect()
    }

    fn rms(a: &[f32], b: &[f32]) -> f32 {
        (a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>() / a.len() as f32).sqrt()
    }

    #[test]
    fn round_trip_error_shrinks_with_the_bits() {
        let (rows, cols) = (24, 256);
        let w = normal_matrix(rows, cols, 1);
        let scale = rms(&w, &vec![0.0; w.len()]);
        let e4 = rms(&w, &quantize(&w, rows, cols, 4, DType::F16).dequantize());
        let e8 = rms(&w, &quantize(&w, rows, cols, 8, DType::F16).dequantize());
        // A uniform 16-level grid over a group of 32 Gaussians: about 9 % of the spread; 256 levels: 0.6 %.
        assert!(e4 / scale < 0.1, "4-bit relative rms {}", e4 / scale);
        assert!(e8 / scale < 0.01, "8-bit relative rms {}", e8 / scale);
        assert!(e8 < e4 / 10.0);
    }

    #[test]
    fn values_already_on_a_group_grid_come_back_exactly() {
        // What a checkpoint dequantised from a 4-bit GGUF (Q4_1: groups of 32, w = d·q + m) looks like, with
        // one step per row so the 8-bit scale codes can hold every group's step exactly.
        let (rows, cols) = (3, 64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut w = Vec::new();
        for r in 0..rows {
            let d = 0.003 * (r + 1) as f32;
            for _ in 0..cols / GROUP {
                let mut q: Vec<f32> = (0..GROUP).map(|_| rng.random_range(0..16) as f32).collect();
                (q[0], q[1]) = (0.0, 15.0);
                w.extend(q.iter().map(|q| q * d - 8.0 * d));
            }
        }
        let back = quantize(&w, rows, cols, 4, DType::F32).dequantize();
        for (a, b) in w.iter().zip(&back) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn constant_negative_and_zero_rows_survive() {
        let cols = 96; // three groups: an odd count, so the last parameter word is half used
        let mut w = vec![0.0f32; cols];
        w.extend(vec![-0.5f32; cols]);
        w.extend((0..cols).map(|i| -1.0 - i as f32 / 100.0));
        for bits in [4, 8] {
            let p = quantize(&w, 3, cols, bits, DType::BF16);
            assert_eq!(p.groups_per_super, 1);
            assert_eq!(p.group_params.len(), 3 * 2);
            let back = p.dequantize();
            assert!(back[..cols].iter().all(|&x| x == 0.0));
            for (a, b) in w[cols..].iter().zip(&back[cols..]) {
                assert!((a - b).abs() < 0.05, "{bits} bits: {a} vs {b}");
            }
        }
    }

    /// Packs each row with `row_fn` (the portable or the AVX2 build of [`quantize_row`]).
    #[cfg(target_arch = "x86_64")]
    fn pack_rows(
        w: &[f32],
        cols: usize,
        bits: usize,
        row_fn: impl Fn(&[f32], &mut [i32], &mut [i32], &mut [f32]),
    ) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
        let groups = cols / GROUP;
        let rows = w.len() / cols;
        let (mut c, mut p) = (
            vec![0; rows * cols * bits / 32],
            vec![0; rows * groups.div_ceil(2)],
        );
        let mut s = vec![0.0; rows * 2 * groups / groups_per_super(groups)];
        for (r, row) in w.chunks(cols).enumerate() {
            row_fn(
                row,
                &mut c[r * cols * bits / 32..][..cols * bits / 32],
                &mut p[r * groups.div_ceil(2)..][..groups.div_ceil(2)],
                &mut s[r * 2 * groups / groups_per_super(groups)..]
                    [..2 * groups / groups_per_super(groups)],
            );
        }
        (c, p, s)
    }

    /// The quantiser is compiled twice (baseline x86-64 and AVX2, picked at run time): a model must pack
    /// to the same codes on every machine.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_portable_and_avx2_quantisers_give_the_same_codes() {
        if !crate::kernels::has_avx2() {
            return;
        }
        let (rows, cols) = (16, 768);
        let w = normal_matrix(rows, cols, 5);
        for bits in [4, 8] {
            let gps = groups_per_super(cols / GROUP);
            let portable = pack_rows(&w, cols, bits, |row, c, p, s| {
                quantize_row::<false>(row, bits, gps, DType::F16, c, p, s)
            });
            // SAFETY: the CPU has AVX2 (checked).
            let wide = pack_rows(&w, cols, bits, |row, c, p, s| unsafe {
                quantize_row_avx2(row, bits, gps, DType::F16, c, p, s)
            });
            assert!(portable == wide, "{bits} bits: the two builds differ");
        }
    }

    #[test]
    fn maxima_round_up_to_the_stored_type() {
        // 1 + 2⁻¹² lies between two f16 values (step 2⁻¹⁰) and two bf16 values (step 2⁻⁷).
        let x = 1.0 + 2f32.powi(-12);
        assert_eq!(round_up(x, DType::F16), 1.0 + 2f32.powi(-10));
        assert_eq!(round_up(x, DType::BF16), 1.0 + 2f32.powi(-7));
        assert_eq!(round_up(x, DType::F32), x);
        // Already representable: unchanged.
        assert_eq!(round_up(0.5, DType::F16), 0.5);
        assert_eq!(round_up(0.0, DType::BF16), 0.0);
    }

    #[test]
    fn sizes_follow_the_layout() {
        assert_eq!(groups_per_super(128), 8);
        assert_eq!(groups_per_super(18), 2);
        assert_eq!(groups_per_super(3), 1);
        assert!(packable(576) && !packable(588) && !packable(0));
        // 4096 × 4096 in f16: 4 bits + 16 bits per 32 + 32 bits per 256 = 4.625 bits per weight.
        let bytes = packed_bytes(4096, 4096, 4, 2) as f64;
        assert!((bytes * 8.0 / (4096.0 * 4096.0) - 4.625).abs() < 1e-9);
        let p = quantize(&normal_matrix(5, 576, 3), 5, 576, 8, DType::F16);
        let stored = 4 * (p.codes.len() + p.group_params.len()) + 2 * p.supers.len();
        assert_eq!(stored, packed_bytes(5, 576, 8, 2));
    }

    /// The codes of a fixed input, hashed: a change to the quantiser that changes them must raise
    /// [`QUANTIZER_VERSION`], or caches written by the old one would be read as if they were new.
    #[test]
    fn quantiser_output_is_pinned_to_its_version() {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for bits in [4, 8] {
            let values = crate::weights::random_values(11, 7 * 320);
            let p = quantize(&values, 7, 320, bits, DType::F16);
            for w in p.codes.iter().chain(&p.group_params) {
                hash.update(w.to_le_bytes());
            }
            for v in &p.supers {
                hash.update(v.to_le_bytes());
            }
        }
        let digest: String = hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            (QUANTIZER_VERSION, digest.as_str()),
            (1, "2771dcd497961b02"),
            "the quantiser's output changed: raise QUANTIZER_VERSION and pin the new hash"
        );
    }
}
