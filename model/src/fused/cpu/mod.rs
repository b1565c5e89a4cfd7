//! The fused kernels on Burn's CPU backend (Flex) ([`super::extension`]): rows in parallel, loops the compiler
//! vectorises, and an `exp` written for that (the standard library's is a scalar call per value).

use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;
use burn::tensor::TensorData;

use super::extension::FusedOps;
use crate::kernels::has_avx2;
use crate::kernels::host::values;
use crate::kernels::team;

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
mod amx_matmul;
mod few_rows;
mod prompt_attention;
#[cfg(target_arch = "x86_64")]
mod tiled_matmul;

/// Most input rows [`few_rows`] takes without AVX-512 (at 8 it was level with gemm on the Intel CI
/// machine; with AVX-512 it takes one row and the register tiles the rest; with AVX2 the tiles take
/// the rows past it).
const FEW_ROWS_MAX: usize = 8;
/// Most input rows the register tiles take ([`tiled_matmul`]; from there gemm was level).
const TILED_MAX_ROWS: usize = crate::fused::row_matmul::CPU_MAX_ROWS;
/// Fewest input rows AMX takes where the CPU has it ([`amx_matmul`]). With the weights coming from
/// memory, as in a model (the `base` decoder's 453 MB cycled), AMX and the register tiles were level at
/// 56 rows on the Intel CI machine, AMX 6–9 % faster at 64, 10 % at 80, 17 % at 96 and 25 % at 128, the
/// tiles 4–14 % faster at 24–48 (BENCHMARKS.md); with one weight kept in cache the tiles had won to 128.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
const AMX_MIN_ROWS: usize = 64;

/// Values per parallel task (below it, thread hand-offs cost more than they save).
const CHUNK: usize = 16 * 1024;
/// Below this many weights a product streaming its weight (`few_rows.rs`, the tiles over panels) runs
/// on the calling thread: waking the others costs more.
const MIN_PARALLEL_WEIGHTS: usize = 64 * 1024;

impl FusedOps for Flex {
    /// The CPU's float weights are stored `[in, out]`; a weight stored a row per output here is a tied
    /// output head (the embedding table), which `few_rows` multiplies on every thread for up to 8 rows
    /// (Burn's product over the transposed table ran on one: 10.5 ms for SmolLM2's 49,152 × 576).
    fn row_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::ops::FloatTensorOps;
        let (m, k) = (x.layout().shape()[0], x.layout().shape()[1]);
        let n = w.layout().shape()[0];
        if m > FEW_ROWS_MAX {
            return Self::float_matmul(x, Self::float_transpose(w));
        }
        let out = few_rows::matmul_t(&values::<f32>(&x), &values::<f32>(&w), m, k, n);
        FloatTensor::<Self>::from_data(TensorData::new(out, [m, n]))
    }

    fn few_rows_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::ops::FloatTensorOps;
        let (m, k) = (x.layout().shape()[0], x.layout().shape()[1]);
        let n = w.layout().shape()[1];
        // From `AMX_MIN_ROWS`, AMX's tiles where the CPU has them (1.2–1.5× gemm at 197–512 rows on the
        // Intel CI machine).
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        if m >= AMX_MIN_ROWS && crate::kernels::has_amx_bf16() {
            let out = amx_matmul::matmul(&values::<f32>(&x), &values::<f32>(&w), m, k, n);
            return FloatTensor::<Self>::from_data(TensorData::new(out, [m, n]));
        }
        // Register tiles of input rows where the CPU has AVX-512 or AVX2 (`tiled_matmul::takes`), one
        // row (up to `FEW_ROWS_MAX` without AVX-512) streaming the weight once across the threads
        // (`few_rows`), and gemm past what either was measured to win at.
        if m > TILED_MAX_ROWS {
            return Self::float_matmul(x, w);
        }
        #[cfg(target_arch = "x86_64")]
        if tiled_matmul::takes(m) {
            let out = tiled_matmul::matmul(&values::<f32>(&x), &values::<f32>(&w), m, k, n);
            return FloatTensor::<Self>::from_data(TensorData::new(out, [m, n]));
        }
        if m > FEW_ROWS_MAX {
            return Self::float_matmul(x, w);
        }
        let (xs, ws) = (values::<f32>(&x), values::<f32>(&w));
        let out = few_rows::matmul(&xs, &ws, m, k, n);
        FloatTensor::<Self>::from_data(TensorData::new(out, [m, n]))
    }

    fn panel_matmul(x: FloatTensor<Self>, panels: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::ops::FloatTensorOps;
        use burn::tensor::DType;
        let (m, k) = (x.layout().shape()[0], x.layout().shape()[1]);
        let shape = panels.layout().shape().to_vec();
        let n = shape[0] * shape[2];
        // Panels are made only for AVX2 CPUs in f32 (`panel_matmul::wanted`); anything else is laid back
        // out for Burn's product.
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::has_avx2_fma()
            && shape[1] == k
            && shape[2] == crate::fused::panel_matmul::PANEL_WIDTH
            && x.dtype() == DType::F32
            && panels.dtype() == DType::F32
        {
            let out =
                tiled_matmul::matmul_panels(&values::<f32>(&x), &values::<f32>(&panels), m, k, n);
            return FloatTensor::<Self>::from_data(TensorData::new(out, [m, n]));
        }
        let _ = (m, n);
        Self::float_matmul(x, super::extension::panel_columns::<Self>(panels))
    }

    fn silu_mul(gate_up: FloatTensor<Self>) -> FloatTensor<Self> {
        let mut shape = gate_up.layout().shape().to_vec();
        let width = shape.last().copied().unwrap_or(0);
        let inner = width / 2;
        let h = values::<f32>(&gate_up);
        let mut out = vec![0.0f32; h.len() / 2];
        let rows_per_task = (CHUNK / width.max(1)).max(1);
        let wide = has_avx2();
        team::for_each_row_mut(&mut out, inner, rows_per_task, |r, o| {
            let (gate, up) = h[r * width..][..width].split_at(inner);
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: `has_avx2` found AVX2 on this CPU.
                unsafe { silu_mul_avx2(gate, up, o) };
                return;
            }
            let _ = wide;
            silu_mul_row(gate, up, o);
        });
        if let Some(last) = shape.last_mut() {
            *last = inner;
        }
        FloatTensor::<Self>::from_data(TensorData::new(out, shape))
    }

    fn quick_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = x.layout().shape().to_vec();
        let x = values::<f32>(&x);
        let mut out = vec![0.0f32; x.len()];
        let wide = has_avx2();
        team::for_each_row_mut(&mut out, CHUNK, 1, |c, o| {
            let x = &x[c * CHUNK..][..o.len()];
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: `has_avx2` found AVX2 on this CPU.
                unsafe { quick_gelu_avx2(x, o) };
                return;
            }
            let _ = wide;
            quick_gelu_row(x, o);
        });
        FloatTensor::<Self>::from_data(TensorData::new(out, shape))
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let shape = x.layout().shape().to_vec();
        let out = normalise(&values::<f32>(&x), &values::<f32>(&weight), eps);
        FloatTensor::<Self>::from_data(TensorData::new(out, shape))
    }

    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = x.layout().shape().to_vec();
        let (x, delta) = (values::<f32>(&x), values::<f32>(&delta));
        let sum: Vec<f32> = x.iter().zip(delta.iter()).map(|(a, b)| a + b).collect();
        let normed = normalise(&sum, &values::<f32>(&weight), eps);
        let sum = FloatTensor::<Self>::from_data(TensorData::new(sum, shape.clone()));
        (
            sum,
            FloatTensor::<Self>::from_data(TensorData::new(normed, shape)),
        )
    }

    fn rope_heads(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        start: usize,
        heads: usize,
        offset: usize,
    ) -> FloatTensor<Self> {
        let dims = qkv.layout().shape().to_vec();
        let (b, seq, width) = (dims[0], dims[1], dims[2]);
        let d = cos.layout().shape()[1];
        let rope = Rotation {
            qkv: &values::<f32>(&qkv),
            cos: &values::<f32>(&cos),
            sin: &values::<f32>(&sin),
            seq,
            width,
            d,
            start,
            offset,
        };
        let mut out = vec![0.0f32; b * heads * seq * d];
        // Tasks of whole (batch, head) pairs, each `seq` rows of `head_dim` contiguous in the output; a
        // decoding step is one task, run on this thread (waking another for a few hundred values cost more
        // than the work).
        let per_head = (seq * d).max(1);
        let heads_per_task = (CHUNK / per_head).max(1);
        team::for_each_row_mut(&mut out, per_head, heads_per_task, |bh, out| {
            rope.head(bh / heads, bh % heads, out)
        });
        FloatTensor::<Self>::from_data(TensorData::new(out, [b, heads, seq, d]))
    }

    fn decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        len: usize,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (qd, kd) = (q.layout().shape().to_vec(), k.layout().shape().to_vec());
        let (b, heads, d) = (qd[0], qd[1], qd[3]);
        let attention = DecodeAttention {
            q: &values::<f32>(&q),
            k: &values::<f32>(&k),
            v: &values::<f32>(&v),
            heads,
            kv_heads: kd[1],
            capacity: kd[2],
            d,
            len,
            scale,
        };
        let mut out = vec![0.0f32; b * heads * d];
        // Heads in parallel only when there is enough to share: tasks of at least 64 Ki cached values (a
        // short cache is one task on this thread; waking the other threads costs more than it saves).
        let heads_per_task = ((4 * CHUNK) / (len * d).max(1)).max(1);
        team::for_each_row_mut(&mut out, d, heads_per_task, |head, out| {
            attention.head(head, out)
        });
        FloatTensor::<Self>::from_data(TensorData::new(out, [b, 1, heads * d]))
    }
}

/// The inputs of [`FusedOps::decode_attention`] on the host.
struct DecodeAttention<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    d: usize,
    len: usize,
    scale: f32,
}

impl DecodeAttention<'_> {
    /// Query head `bh` (batch-major): `out` `[d]`.
    fn head(&self, bh: usize, out: &mut [f32]) {
        let d = self.d;
        let (bi, h) = (bh / self.heads, bh % self.heads);
        let kv = h / (self.heads / self.kv_heads);
        let base = (bi * self.kv_heads + kv) * self.capacity * d;
        let q = &self.q[bh * d..][..d];
        let mut scores: Vec<f32> = (0..self.len)
            .map(|j| dot(q, &self.k[base + j * d..][..d]) * self.scale)
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let row = &self.v[base + j * d..][..d];
            for (o, &x) in out.iter_mut().zip(row) {
                *o += p * x;
            }
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
}

/// Σ a·b in 8 independent lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<8, false>(a, b)
}

/// Σ a·b in `LANES` independent lanes (a single running sum would pin the additions in order and keep
/// the compiler from vectorising), fused multiply-adds with `FMA`.
#[inline(always)]
fn dot_lanes<const LANES: usize, const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            lanes[l] = mad::<FMA>(x[l], y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `a · b + c`, fused where the build for this CPU has the instruction (elsewhere `mul_add` is a
/// library call per value).
#[inline(always)]
fn mad<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// The inputs of [`FusedOps::rope_heads`] on the host.
struct Rotation<'a> {
    qkv: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
    seq: usize,
    width: usize,
    d: usize,
    start: usize,
    offset: usize,
}

impl Rotation<'_> {
    /// Head `h` of batch `bi`: `out` `[seq, d]`.
    fn head(&self, bi: usize, h: usize, out: &mut [f32]) {
        let (d, half) = (self.d, self.d / 2);
        for (s, o) in out.chunks_mut(d).enumerate() {
            let x = &self.qkv[(bi * self.seq + s) * self.width + self.start + h * d..][..d];
            let p = (self.offset + s) * d;
            let (c, sn) = (&self.cos[p..p + d], &self.sin[p..p + d]);
            for i in 0..half {
                o[i] = x[i] * c[i] - x[i + half] * sn[i];
                o[i + half] = x[i + half] * c[i + half] + x[i] * sn[i + half];
            }
        }
    }
}

/// RMSNorm of the rows of `x`, each as wide as `weight`, rows in parallel.
fn normalise(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len().max(1);
    let mut out = vec![0.0f32; x.len()];
    let rows_per_task = (CHUNK / d).max(1);
    team::for_each_row_mut(&mut out, d, rows_per_task, |r, o| {
        let row = &x[r * d..][..o.len()];
        let inv = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    });
    out
}

#[inline(always)]
fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[inline(always)]
fn quick_gelu_row(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v / (1.0 + exp(-1.702 * v));
    }
}

/// [`silu_mul_row`] compiled for AVX2 (8 lanes instead of baseline x86-64's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_row(gate, up, out)
}

/// [`quick_gelu_row`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quick_gelu_avx2(x: &[f32], out: &mut [f32]) {
    quick_gelu_row(x, out)
}

/// `eˣ` to about 2 ulp, without branches or library calls so that loops over it vectorise: `x = n·ln 2 + r`
/// with `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `eʳ` (Cephes' `expf` coefficients), and `2ⁿ` built in
/// the exponent bits. Inputs are clamped to where the result is a normal float, so the sigmoid of a large
/// value comes out as 0 or 1 rather than infinity or NaN; NaN stays NaN through the callers' products.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2²³ rounds to the nearest integer (no SSE2 instruction does; `round` is a call).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // `rounded`'s low mantissa bits hold n (|n| ≤ 127, far inside its 22 bits): the integer without a
    // float→int conversion, which Rust's saturating `as` does one lane at a time (it left the loops
    // scalar: quick GELU ran at ~1 ns a value).
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.000_37;
        }
        // f32's machine epsilon is 1.2e-7.
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn the_portable_and_avx2_builds_agree() {
        let x = super::super::test_support::values(1000);
        let (mut a, mut b) = (vec![0.0; 500], vec![0.0; 500]);
        silu_mul_row(&x[..500], &x[500..], &mut a);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked).
            unsafe { silu_mul_avx2(&x[..500], &x[500..], &mut b) };
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{p} vs {q}");
            }
        }
        let (mut c, mut d) = (vec![0.0; 1000], vec![0.0; 1000]);
        quick_gelu_row(&x, &mut c);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked).
            unsafe { quick_gelu_avx2(&x, &mut d) };
            for (p, q) in c.iter().zip(&d) {
                assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{p} vs {q}");
            }
        }
    }
}
