//! [`PromptAttentionOps`] on the CPU backend: for each head and block of query rows, the scores of the keys
//! the block can see in one matrix product, a softmax per row in vector lanes, and the product with the
//! values written straight into the output's columns for that head.

use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;
use burn::tensor::TensorData;
use rayon::prelude::*;

use super::exp;
use crate::fused::prompt_attention::PromptAttentionOps;
use crate::kernels::has_avx2;
use crate::kernels::host::SharedOut;

/// Query rows per task: few enough that a causal prompt's blocks skip most masked keys, enough that each
/// product is worth gemm's packing.
const ROWS: usize = 64;

impl PromptAttentionOps for Flex {
    fn prompt_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (q, k, v) = (readable(q), readable(k), readable(v));
        let (q, k, v) = (Heads::of(&q), Heads::of(&k), Heads::of(&v));
        let [b, heads, seq, d] = q.shape;
        let (kv_heads, keys) = (k.shape[1], k.shape[2]);
        let width = heads * d;
        let mut out = vec![0.0f32; b * seq * width];
        if keys > 0 && !out.is_empty() {
            let blocks = seq.div_ceil(ROWS);
            let attention = Attention {
                q: &q,
                k: &k,
                v: &v,
                group: heads / kv_heads,
                causal,
                scale,
                wide: has_avx2(),
            };
            let dst = SharedOut(out.as_mut_ptr());
            (0..b * heads * blocks)
                .into_par_iter()
                .for_each_init(Vec::new, |scores, task| {
                    let (bh, block) = (task / blocks, task % blocks);
                    let rows = block * ROWS..((block + 1) * ROWS).min(seq);
                    // SAFETY: the task writes rows `rows` of batch `bh / heads`, columns of head
                    // `bh % heads` only, which no other task writes; `out` outlives the loop.
                    unsafe { attention.block(bh / heads, bh % heads, rows, scores, &dst) };
                });
        }
        FloatTensor::<Self>::from_data(TensorData::new(out, [b, seq, width]))
    }
}

/// `t` itself when its values can be read in place (no negative strides, the last dimension contiguous),
/// else a contiguous copy.
fn readable(t: FloatTensor<Flex>) -> FloatTensor<Flex> {
    let layout = t.layout();
    if layout.has_positive_strides() && layout.has_contiguous_inner() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A `[batch, heads, rows, d]` f32 tensor read in place: its storage and the strides of the first three
/// dimensions (the last is contiguous).
struct Heads<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
    shape: [usize; 4],
}

impl<'a> Heads<'a> {
    fn of(t: &'a FloatTensor<Flex>) -> Self {
        let layout = t.layout();
        let (dims, strides) = (layout.shape(), layout.strides());
        Self {
            data: t.storage::<f32>(),
            start: layout.start_offset(),
            strides: [0, 1, 2].map(|i| strides[i] as usize),
            shape: [dims[0], dims[1], dims[2], dims[3]],
        }
    }

    /// Row `r` of head `h` of batch `bi` and its row stride, for gemm.
    fn rows(&self, bi: usize, h: usize, r: usize) -> (*const f32, isize) {
        let at = self.start + bi * self.strides[0] + h * self.strides[1] + r * self.strides[2];
        debug_assert!(at < self.data.len());
        (self.data[at..].as_ptr(), self.strides[2] as isize)
    }
}

/// One call's inputs.
struct Attention<'a> {
    q: &'a Heads<'a>,
    k: &'a Heads<'a>,
    v: &'a Heads<'a>,
    group: usize,
    causal: bool,
    scale: f32,
    wide: bool,
}

impl Attention<'_> {
    /// Query rows `rows` of head `h` of batch `bi` into `out` `[batch, seq, heads · d]`.
    ///
    /// # Safety
    /// No other thread may write those rows' columns of head `h` meanwhile.
    unsafe fn block(
        &self,
        bi: usize,
        h: usize,
        rows: std::ops::Range<usize>,
        scores: &mut Vec<f32>,
        out: &SharedOut,
    ) {
        let [_, heads, seq, d] = self.q.shape;
        let keys = self.k.shape[2];
        let kv = h / self.group;
        // Query row r sees keys 0..=r + shift when causal.
        let shift = keys - seq;
        let seen = |r: usize| {
            if self.causal {
                (r + shift + 1).min(keys)
            } else {
                keys
            }
        };
        let (n, cols) = (rows.len(), seen(rows.end - 1));
        scores.resize(n * cols, 0.0);
        let (q, q_rs) = self.q.rows(bi, h, rows.start);
        let (k, k_rs) = self.k.rows(bi, kv, 0);
        let (v, v_rs) = self.v.rows(bi, kv, 0);
        // SAFETY: q holds n rows from `rows.start`, k and v `keys` ≥ `cols` rows, each of d values at the
        // strides given; `scores` n · cols values.
        unsafe {
            // scores [n, cols] = scale · q [n, d] · kᵀ [d, cols] (k's rows are kᵀ's columns).
            gemm::gemm(
                n,
                cols,
                d,
                scores.as_mut_ptr(),
                1,
                cols as isize,
                false,
                q,
                1,
                q_rs,
                k,
                k_rs,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, row) in scores.chunks_mut(cols).enumerate() {
            let (visible, hidden) = row.split_at_mut(seen(rows.start + i));
            hidden.fill(0.0);
            #[cfg(target_arch = "x86_64")]
            if self.wide {
                // SAFETY: `has_avx2` found AVX2 on this CPU.
                unsafe { softmax_avx2(visible) };
                continue;
            }
            softmax(visible);
        }
        let dst = out
            .0
            .wrapping_add(((bi * seq + rows.start) * heads + h) * d);
        // SAFETY: `dst` is row `rows.start`, column h · d of the output, whose rows are heads · d apart, n of
        // them, d columns written (the caller's contract); v holds `cols` rows.
        unsafe {
            // out rows [n, d] = scores [n, cols] · v [cols, d].
            gemm::gemm(
                n,
                d,
                cols,
                dst,
                1,
                (heads * d) as isize,
                false,
                scores.as_ptr(),
                1,
                cols as isize,
                v,
                1,
                v_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// `row` ← softmax(`row`), in eight lanes so that the loops vectorise.
#[inline(always)]
fn softmax(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let max = chunks.remainder().iter().fold(
        lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)),
        |m, &x| m.max(x),
    );
    let mut sums = [0.0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp(c[l] - max);
            sums[l] += c[l];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// [`softmax`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row: Vec<f32> = crate::fused::test_support::values(37);
        let want: Vec<f64> = {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let mut wide = row.clone();
        softmax(&mut row);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked).
            unsafe { softmax_avx2(&mut wide) };
            for (a, b) in row.iter().zip(&wide) {
                assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
            }
        }
        for (got, want) in row.iter().zip(&want) {
            assert!(
                (*got as f64 - want).abs() <= 1e-6 * want.max(1e-3),
                "{got} vs {want}"
            );
        }
    }
}
