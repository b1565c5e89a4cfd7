//! The packed-matrix operations on Burn's CPU backend (Flex) ([`super::extension`]): decoding multiplies one
//! row by each weight matrix, and unpacking the whole matrix with generic tensor ops first (a dozen passes
//! over it) made that 50× slower than f32. Here each group's codes are unpacked into registers and used at
//! once (in AVX-512 or AVX2 where the CPU has them: `x86.rs`, else the portable loop below); longer inputs
//! (prefill, the vision tower) are rounded to 16-bit integers and multiplied by the codes in integer dot
//! products on x86 CPUs with AVX2 or AVX-512 VNNI (`vnni.rs`, `int16_avx2.rs`), elsewhere (or with
//! `LLAVA_MED_CPU_INT16_INPUTS=0`) dequantised a cache-sized tile of output channels at a time and
//! multiplied by gemm there.

use std::borrow::Cow;

use burn::backend::Flex;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::TensorData;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod int16_avx2;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::extension::{FUSED_MAX_ROWS, PackedOps};
use super::pack::GROUP;
use crate::kernels::has_avx2;
use crate::kernels::host::{SharedOut, values};
use crate::kernels::team::{self, TASKS_PER_THREAD};

impl PackedOps for Flex {
    fn packed_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let xd = x.layout().shape().to_vec();
        let (m, k, n) = (xd[0], xd[1], codes.layout().shape()[0]);
        let w = Packing::new(&codes, &group_params, &supers, bits, groups_per_super);
        let x = values::<f32>(&x);
        debug_assert_eq!(x.len(), m * k);
        let out = w.matmul_t(&x, m, n);
        FloatTensor::<Self>::from_data(TensorData::new(out, [m, n]))
    }

    fn packed_dequantize(
        codes: IntTensor<Self>,
        group_params: IntTensor<Self>,
        supers: FloatTensor<Self>,
        bits: usize,
        groups_per_super: usize,
    ) -> FloatTensor<Self> {
        let (n, k) = (codes.layout().shape()[0], codes.layout().shape()[1] * GROUP);
        let w = Packing::new(&codes, &group_params, &supers, bits, groups_per_super);
        FloatTensor::<Self>::from_data(TensorData::new(w.dequantize(n), [n, k]))
    }
}

/// A packed `[n, k]` matrix's host slices (layout in [`super::pack`]).
struct Packing<'a> {
    codes: Cow<'a, [i32]>,
    params: Cow<'a, [i32]>,
    supers: Cow<'a, [f32]>,
    k: usize,
    bits: usize,
    groups_per_super: usize,
}

impl<'a> Packing<'a> {
    /// The parts of a packed matrix on the CPU backend (f32 maxima).
    fn new(
        codes: &'a IntTensor<Flex>,
        group_params: &'a IntTensor<Flex>,
        supers: &'a FloatTensor<Flex>,
        bits: usize,
        groups_per_super: usize,
    ) -> Self {
        Self {
            codes: values::<i32>(codes),
            params: values::<i32>(group_params),
            supers: values::<f32>(supers),
            k: codes.layout().shape()[1] * GROUP,
            bits,
            groups_per_super,
        }
    }

    /// Row `o`'s group `g`: its scale and minimum.
    #[inline(always)]
    fn scale_min(&self, o: usize, g: usize) -> (f32, f32) {
        let groups = self.k / GROUP;
        let pw = groups.div_ceil(2);
        let sb = o * (groups / self.groups_per_super) + g / self.groups_per_super;
        let (big_s, big_m) = (self.supers[2 * sb], self.supers[2 * sb + 1]);
        let p = (self.params[o * pw + g / 2] as u32 >> (16 * (g % 2))) & 0xffff;
        let scale = (p & 0xff) as f32 * (big_s / 255.0);
        let min = ((p >> 8) as f32 - 128.0) * (big_m / 127.0);
        (scale, min)
    }

    /// Row `o`'s group `g`: its scale and minimum, and its 32 codes into `q`. `BITS` is a constant so
    /// the unpacking unrolls into vector shifts.
    #[inline(always)]
    fn group<const BITS: usize>(&self, o: usize, g: usize, q: &mut [f32; GROUP]) -> (f32, f32) {
        let (scale, min) = self.scale_min(o, g);
        let words = &self.codes[(o * (self.k / GROUP) + g) * BITS..][..BITS];
        let per_word = 32 / BITS;
        let mask = (1u32 << BITS) - 1;
        for (w, &word) in words.iter().enumerate() {
            for i in 0..per_word {
                q[w * per_word + i] = ((word as u32 >> (i * BITS)) & mask) as f32;
            }
        }
        (scale, min)
    }

    /// `x` `[m, k]` · `Wᵀ` → `[m, n]`: inputs of up to [`FUSED_MAX_ROWS`] rows straight from the codes,
    /// longer ones through dequantised tiles.
    fn matmul_t(&self, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        match (self.bits, m <= FUSED_MAX_ROWS) {
            (4, true) => self.matmul_t_fused::<4>(x, m, n),
            (_, true) => self.matmul_t_fused::<8>(x, m, n),
            (4, false) => self.matmul_t_long::<4>(x, m, n),
            (_, false) => self.matmul_t_long::<8>(x, m, n),
        }
    }

    /// Per group, Σ w·x = scale · Σ q·x + min · Σ x, with each group's codes unpacked in registers.
    fn matmul_t_fused<const BITS: usize>(&self, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        let x_sums: Vec<f32> = x.chunks(GROUP).map(|c| c.iter().sum()).collect();
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = x86::Isa::detect() {
            return self.matmul_t_x86::<BITS>(isa, x, &x_sums, m, n);
        }
        // Output channels in parallel, each row of the result `[n, m]` for one channel.
        let mut out_t = vec![0.0f32; n * m];
        team::for_each_row_mut(&mut out_t, m, channels_per_task(n), |o, acc| {
            self.channel::<BITS>(o, acc, x, &x_sums)
        });
        transposed(out_t, m, n)
    }

    /// Output channel `o` for every input row: `acc[r] = Σ_k x[r, k] · W[o, k]`.
    #[inline(always)]
    fn channel<const BITS: usize>(&self, o: usize, acc: &mut [f32], x: &[f32], x_sums: &[f32]) {
        let groups = self.k / GROUP;
        let mut q = [0.0f32; GROUP];
        for g in 0..groups {
            let (scale, min) = self.group::<BITS>(o, g, &mut q);
            for (r, a) in acc.iter_mut().enumerate() {
                let xs = &x[r * self.k + g * GROUP..][..GROUP];
                *a += scale * dot32(&q, xs) + min * x_sums[r * groups + g];
            }
        }
    }

    /// Longer inputs (prefill, the vision tower): in integer dot products where the CPU has AVX-512 VNNI
    /// or AVX2 ([`vnni`]), else in f32 ([`Packing::matmul_t_float`]).
    fn matmul_t_long<const BITS: usize>(&self, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = vnni::enabled() {
            return self.matmul_t_int16::<BITS>(isa, x, m, n);
        }
        self.matmul_t_float::<BITS>(x, m, n)
    }

    /// Tiles or blocks of the matrix dequantised into a per-thread buffer and multiplied there by gemm, in
    /// parallel ([`Packing::matmul_t_tiles`]). Dequantising the whole matrix first wrote and re-read 4
    /// bytes per weight (870 MB per 7B layer, freshly allocated) and took 10× the f32 product's time for
    /// 16 rows.
    fn matmul_t_float<const BITS: usize>(&self, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = x86::Isa::detect() {
            return self.matmul_t_tiles(x, m, n, |o, g, row| {
                self.dequantize_vector::<BITS>(isa, o, g, row)
            });
        }
        let wide = has_avx2();
        self.matmul_t_tiles(x, m, n, |o, g, row| {
            self.dequantize_row_any::<BITS>(wide, o, g, row)
        })
    }

    /// `x` `[m, k]` · `Wᵀ` with W dequantised a block at a time by `dequantize(o, first, row)`: groups
    /// `first..` of row `o`, as many as `row` holds.
    fn matmul_t_tiles(
        &self,
        x: &[f32],
        m: usize,
        n: usize,
        dequantize: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        // Short inputs go faster with the weights as gemm's left operand, longer ones in blocks with the
        // input there (one 7B layer: 32 rows 62 against 95 ms, 48 rows level, 64 rows 157 against 118).
        if m >= BLOCKS_FROM_ROWS {
            return self.matmul_t_blocks(x, m, n, dequantize);
        }
        let k = self.k;
        let tile = tile_rows(k);
        let mut out = vec![0.0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        (0..n.div_ceil(tile)).into_par_iter().for_each_init(
            || (vec![0.0f32; tile * k], vec![0.0f32; tile * m]),
            |(buf, part), i| {
                let rows = tile.min(n - i * tile);
                for (r, row) in buf.chunks_mut(k).take(rows).enumerate() {
                    dequantize(i * tile + r, 0, row);
                }
                // part [rows, m] = buf [rows, k] · xᵀ, then into columns i·tile.. of every row of `out`.
                // SAFETY: `buf` holds rows · k values, `x` m · k and `part` rows · m.
                unsafe { gemm_f32(rows, m, k, (part.as_mut_ptr(), m), (buf, k), (x, k), false) };
                for r in 0..m {
                    for (c, v) in part.chunks(m).take(rows).map(|p| p[r]).enumerate() {
                        // SAFETY: row r, column i·tile + c < n of `out`, which no other tile writes and
                        // which outlives the loop.
                        unsafe { *dst.at(r * n + i * tile + c) = v };
                    }
                }
            },
        );
        out
    }

    /// [`Packing::matmul_t_tiles`] for longer inputs: blocks of up to 1,024 output channels ×
    /// [`BLOCK_DEPTH`] inputs, each dequantised and at once multiplied into its output columns, adding to
    /// what the earlier blocks of the same columns left there.
    fn matmul_t_blocks(
        &self,
        x: &[f32],
        m: usize,
        n: usize,
        dequantize: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let k = self.k;
        let depth = k.min(BLOCK_DEPTH);
        let width = block_width(n, rayon::current_num_threads());
        let mut out = vec![0.0f32; m * n];
        let dst = SharedOut(out.as_mut_ptr());
        (0..n.div_ceil(width)).into_par_iter().for_each_init(
            || vec![0.0f32; width * depth],
            |buf, i| {
                let rows = width.min(n - i * width);
                for (c, start) in (0..k).step_by(depth).enumerate() {
                    let cols = depth.min(k - start);
                    for (r, row) in buf.chunks_mut(cols).take(rows).enumerate() {
                        dequantize(i * width + r, start / GROUP, row);
                    }
                    // out[:, i·width..][m, rows] (+)= x[:, start..][m, cols] · bufᵀ, bufᵀ read in place.
                    // SAFETY: `buf` holds rows · cols values and `x` m · k from column `start`; the
                    // destination is columns i·width..i·width + rows of every row of `out` [m, n], which no
                    // other block writes, and `out` outlives the loop.
                    unsafe {
                        gemm_f32(
                            m,
                            rows,
                            cols,
                            (dst.at(i * width), n),
                            (&x[start..], k),
                            (buf, cols),
                            c > 0,
                        )
                    };
                }
            },
        );
        out
    }

    /// The whole matrix, `[n, k]` row-major.
    fn dequantize(&self, n: usize) -> Vec<f32> {
        match self.bits {
            4 => self.dequantize_bits::<4>(n),
            _ => self.dequantize_bits::<8>(n),
        }
    }

    fn dequantize_bits<const BITS: usize>(&self, n: usize) -> Vec<f32> {
        let wide = has_avx2();
        let mut out = vec![0.0f32; n * self.k];
        out.par_chunks_mut(self.k)
            .enumerate()
            .for_each(|(o, row)| self.dequantize_row_any::<BITS>(wide, o, 0, row));
        out
    }

    /// Groups `first..` of row `o` into `row` (as many as it holds) in natural order, with the AVX2 build
    /// when `wide` (from [`has_avx2`]).
    #[inline(always)]
    fn dequantize_row_any<const BITS: usize>(
        &self,
        wide: bool,
        o: usize,
        first: usize,
        row: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `has_avx2` found AVX2 on this CPU.
            unsafe { self.dequantize_row_avx2::<BITS>(o, first, row) };
            return;
        }
        let _ = wide;
        self.dequantize_row::<BITS>(o, first, row);
    }

    #[inline(always)]
    fn dequantize_row<const BITS: usize>(&self, o: usize, first: usize, row: &mut [f32]) {
        let mut q = [0.0f32; GROUP];
        for (g, dst) in row.chunks_mut(GROUP).enumerate() {
            let (scale, min) = self.group::<BITS>(o, first + g, &mut q);
            for (d, &c) in dst.iter_mut().zip(&q) {
                *d = c * scale + min;
            }
        }
    }

    /// [`Packing::dequantize_row`] compiled for AVX2: the build targets baseline x86-64 (SSE2, 4 lanes),
    /// and the unpacking vectorises twice as wide here.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn dequantize_row_avx2<const BITS: usize>(
        &self,
        o: usize,
        first: usize,
        row: &mut [f32],
    ) {
        self.dequantize_row::<BITS>(o, first, row)
    }
}

/// Output channels per task of the few-row products ([`Packing::matmul_t_fused`]):
/// [`TASKS_PER_THREAD`] tasks a thread.
fn channels_per_task(n: usize) -> usize {
    n.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads())
        .max(1)
}

/// Output channels per tile of [`Packing::matmul_t_tiles`]: about 4 MB of f32 weights, 16 to 256 rows.
fn tile_rows(k: usize) -> usize {
    ((1 << 20) / k / 16).clamp(1, 16) * 16
}

/// Input rows from which [`Packing::matmul_t_tiles`] multiplies in blocks.
const BLOCKS_FROM_ROWS: usize = 48;

/// Inputs per block of [`Packing::matmul_t_blocks`]: a multiple of every super-block's span (8 groups of
/// 32), so each block starts a super-block. With 1,024 output channels a block is 1 MB of f32, which stays
/// in a core's cache while gemm reads it (one 7B layer, 622 rows: 727 ms with 256 inputs per block, 750
/// with 512, 850 with 1,024, 930 with whole rows).
const BLOCK_DEPTH: usize = 256;

/// Output channels per block of [`Packing::matmul_t_blocks`]: up to 1,024, fewer when that would leave
/// some of `threads` without at least two blocks' columns.
fn block_width(n: usize, threads: usize) -> usize {
    n.div_ceil(2 * threads.max(1))
        .next_multiple_of(16)
        .clamp(16, 1024)
}

/// `dst` [rows, cols] (row stride `dst.1`) = `a` [rows, k] · `b`ᵀ with `b` [cols, k] (row strides `a.1`,
/// `b.1`), on the calling thread.
///
/// # Safety
/// Every row and column addressed must lie inside the buffers behind the pointers.
unsafe fn gemm_f32(
    rows: usize,
    cols: usize,
    k: usize,
    dst: (*mut f32, usize),
    a: (&[f32], usize),
    b: (&[f32], usize),
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.0,
            1,
            dst.1 as isize,
            accumulate,
            a.0.as_ptr(),
            1,
            a.1 as isize,
            b.0.as_ptr(),
            b.1 as isize,
            1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `[m, n]` from its transpose `[n, m]` (the kernels write one output channel's rows together).
fn transposed(out_t: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0.0f32; m * n];
    for (o, row) in out_t.chunks(m).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            out[r * n + o] = v;
        }
    }
    out
}

/// Σ a·b over 32 values in 8 independent lanes (a single running sum would pin the additions in order
/// and keep the compiler from vectorising).
#[inline(always)]
fn dot32(a: &[f32; GROUP], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    lanes.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::super::QuantizedMatrix;
    use super::super::pack::{Packed, quantize};
    use crate::kernels::applies;
    use burn::tensor::{DType, Device, Distribution, Tensor};

    use super::*;

    /// A host-side packed matrix's slices as the kernels take them (also for [`super::vnni`]'s tests).
    pub(super) fn packing(p: &Packed) -> Packing<'_> {
        Packing {
            codes: Cow::Borrowed(&p.codes),
            params: Cow::Borrowed(&p.group_params),
            supers: Cow::Borrowed(&p.supers),
            k: p.cols,
            bits: p.bits,
            groups_per_super: p.groups_per_super,
        }
    }

    /// Deterministic values spread over (−b/2, b/2) / c.
    pub(super) fn pattern(n: usize, a: usize, b: usize, c: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * a % b) as f32 - (b / 2) as f32) / c)
            .collect()
    }

    #[test]
    fn the_portable_and_avx2_dequantising_builds_agree() {
        let (n, k) = (5, 64);
        let w = pattern(n * k, 37, 101, 700.0);
        for bits in [4, 8] {
            let p = quantize(&w, n, k, bits, DType::F32);
            let packing = packing(&p);
            let reference = p.dequantize();
            for o in 0..n {
                let mut row = vec![0.0f32; k];
                match bits {
                    4 => packing.dequantize_row::<4>(o, 0, &mut row),
                    _ => packing.dequantize_row::<8>(o, 0, &mut row),
                }
                assert!(
                    row.iter()
                        .zip(&reference[o * k..])
                        .all(|(a, b)| (a - b).abs() < 1e-6)
                );
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    let mut wide_row = vec![0.0f32; k];
                    // SAFETY: the CPU has AVX2 (checked).
                    unsafe {
                        match bits {
                            4 => packing.dequantize_row_avx2::<4>(o, 0, &mut wide_row),
                            _ => packing.dequantize_row_avx2::<8>(o, 0, &mut wide_row),
                        }
                    }
                    assert_eq!(wide_row, row);
                }
            }
        }
    }

    /// The vector instruction sets this CPU can run, each tested separately.
    #[cfg(target_arch = "x86_64")]
    fn vector_isas() -> Vec<x86::Isa> {
        [
            (x86::Isa::Avx512, is_x86_feature_detected!("avx512f")),
            (
                x86::Isa::Avx2,
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            ),
        ]
        .into_iter()
        .filter_map(|(isa, has)| has.then_some(isa))
        .collect()
    }

    /// The AVX-512 and AVX2 products (whichever this CPU has) against the portable loop, for every row
    /// count they take and for super-blocks of 1, 2, 4 and 8 groups.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_kernels_match_the_portable_loop() {
        let isas = vector_isas();
        eprintln!("vector kernels tested here: {isas:?}");
        let n = 7;
        // Groups per row: 3, 2, 12, 24, 17 and 38 (runs of 16 and what is left; super-blocks of 1, 2, 4, 8).
        for k in [96, 64, 384, 768, 544, 1216] {
            let w = pattern(n * k, 37, 101, 700.0);
            for bits in [4, 8] {
                let p = quantize(&w, n, k, bits, DType::F32);
                let packing = packing(&p);
                for m in 1..=FUSED_MAX_ROWS {
                    let x = pattern(m * k, 13, 29, 9.0);
                    let sums: Vec<f32> = x.chunks(GROUP).map(|c| c.iter().sum()).collect();
                    let mut want = vec![0.0f32; m * n];
                    for o in 0..n {
                        let mut acc = vec![0.0f32; m];
                        match bits {
                            4 => packing.channel::<4>(o, &mut acc, &x, &sums),
                            _ => packing.channel::<8>(o, &mut acc, &x, &sums),
                        }
                        for (r, v) in acc.into_iter().enumerate() {
                            want[r * n + o] = v;
                        }
                    }
                    for &isa in &isas {
                        let got = match bits {
                            4 => packing.matmul_t_x86::<4>(isa, &x, &sums, m, n),
                            _ => packing.matmul_t_x86::<8>(isa, &x, &sums, m, n),
                        };
                        for (a, b) in got.iter().zip(&want) {
                            assert!(
                                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "{isa:?}, k {k}, {bits} bits, {m} rows: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vector dequantisation for longer inputs, whole rows and from a later super-block on, against
    /// the reference dequantisation.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_dequantisation_matches_the_reference() {
        let (n, k) = (3, 768);
        let w = pattern(n * k, 37, 101, 700.0);
        for bits in [4, 8] {
            let p = quantize(&w, n, k, bits, DType::F32);
            let want = p.dequantize();
            let gps = packing(&p).groups_per_super;
            for isa in vector_isas() {
                for o in 0..n {
                    // Whole rows, and the groups of the second super-block on.
                    for first in [0, gps] {
                        let mut row = vec![0.0f32; k - first * GROUP];
                        match bits {
                            4 => packing(&p).dequantize_vector::<4>(isa, o, first, &mut row),
                            _ => packing(&p).dequantize_vector::<8>(isa, o, first, &mut row),
                        }
                        let want = &want[o * k + first * GROUP..][..row.len()];
                        for (a, b) in row.iter().zip(want) {
                            assert!((a - b).abs() <= 1e-6, "{isa:?}, {bits} bits: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_and_dequantising_paths_match_unpacking_then_multiplying() {
        let device = Device::flex();
        // (150, 4096): for 20 rows three tiles of 64 output channels, the last one partial, for 130 rows
        // blocks of 256 inputs; (40, 320): a last block of 64 inputs, starting in the fifth super-block
        // (of 2 groups).
        for ((n, k), bits) in [(48, 96), (150, 4096), (40, 320)]
            .into_iter()
            .flat_map(|s| [(s, 4), (s, 8)])
        {
            let w = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.02), &device);
            let w: Vec<f32> = w.into_data().try_to_vec().unwrap();
            let p = quantize(&w, n, k, bits, DType::F32);
            let m = QuantizedMatrix::upload(p.clone(), &device, DType::F32);
            // 1 and 3 rows take the fused path, 20 the tiles (the weights as gemm's left operand) and 130
            // the blocks (the input there).
            for rows in [1, 3, 20, 130] {
                let x = Tensor::<2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
                assert!(applies(&x.device(), x.dtype()));
                let want: Vec<f32> = x
                    .clone()
                    .matmul(m.dequantize().transpose())
                    .into_data()
                    .try_to_vec()
                    .unwrap();
                let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let check = |got: &[f32], tolerance: f32, path: &str| {
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= tolerance * scale,
                            "{n}×{k}, {bits} bits, {rows} rows, {path}: {a} vs {b}"
                        );
                    }
                };
                let x_host: Vec<f32> = x.clone().into_data().try_to_vec().unwrap();
                let got = m.matmul_t(x);
                assert_eq!(got.dims(), [rows, n]);
                let got: Vec<f32> = got.into_data().try_to_vec().unwrap();
                // Longer inputs are rounded to 16 bits where the integer product runs: ≤ 1/65,534 of
                // their group's largest value each.
                #[cfg(target_arch = "x86_64")]
                let integer = rows > FUSED_MAX_ROWS && vnni::enabled().is_some();
                #[cfg(not(target_arch = "x86_64"))]
                let integer = false;
                check(&got, if integer { 1e-4 } else { 1e-5 }, "chosen");
                if rows > FUSED_MAX_ROWS {
                    // The f32 path, also where it is not the one chosen.
                    let got = match bits {
                        4 => packing(&p).matmul_t_float::<4>(&x_host, rows, n),
                        _ => packing(&p).matmul_t_float::<8>(&x_host, rows, n),
                    };
                    check(&got, 1e-5, "f32");
                }
            }
        }
    }
}
