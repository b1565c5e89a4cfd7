//! The element-wise and per-row parts of the model as single kernels: SwiGLU's `silu(gate) · up` and CLIP's
//! `quick_gelu` ([`activation`]), RMSNorm ([`rms_norm`]), the rotary embedding taken straight out of the
//! fused q/k/v projection ([`rope`]) and a decoding step's attention over the KV cache ([`attention`]) and its one-row matrix products
//! ([`row_matmul`]). As generic tensor ops each is three to ten passes and launches (slices,
//! casts, reductions, products, a copy to lay heads out), which on a GPU decoding one token at a time is
//! mostly launch overhead, and on the CPU backend the sigmoid is a scalar single-threaded loop. One backend
//! extension ([`extension`]) holds them, with kernels for the CPU backend ([`cpu`]) and for CubeCL runtimes
//! ([`cube`]); other backends, autodiff devices (training) and CPU models in a 16-bit type take the tensor
//! ops written beside each function, which the tests hold the kernels to.

pub mod activation;
pub mod attention;
#[cfg(feature = "cpu")]
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
pub mod cube;
pub mod extension;
pub mod panel_matmul;
pub mod prompt_attention;
pub mod rms_norm;
pub mod rope;
pub mod row_matmul;

#[cfg(test)]
pub(crate) mod test_support {
    use burn::tensor::{DType, Tensor};

    /// Values over the whole useful range and past where a sigmoid saturates.
    pub fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919) % 4001) as f32 / 200.0 - 10.0;
                if i % 53 == 0 { v * 12.0 } else { v }
            })
            .collect()
    }

    // For the CubeCL kernels' tests (wgpu).
    #[cfg(feature = "wgpu")]
    /// Deterministic values in [-1, 1) with some 8× larger ones (so quantisation groups get different
    /// ranges), different for each `seed`.
    pub fn spread_values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0;
                if i % 97 == 0 { v * 8.0 } else { v }
            })
            .collect()
    }

    /// Deterministic values in [-1, 1), different for each `seed` (the CPU products' tests).
    pub fn unit_values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    /// Asserts `got` and `want` have the same length and agree to `tol` relative to each wanted value
    /// plus 1 (`what` names the case).
    pub fn assert_relative(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - e).abs() <= tol * (1.0 + e.abs()),
                "{what} value {i}: {g} vs {e}"
            );
        }
    }

    /// `x` `[m, k]` times a `[k, n]` matrix given by `w(i, j)`, summed in f64 on the host.
    pub fn reference_product(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        (0..m)
            .flat_map(|r| {
                let w = &w;
                (0..n).map(move |j| {
                    (0..k)
                        .map(|i| x[r * k + i] as f64 * w(i, j) as f64)
                        .sum::<f64>() as f32
                })
            })
            .collect()
    }

    /// A tensor's values as f32 on the host.
    pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// Asserts `got` and `want` have the same shape and agree to `tol` relative to each value (at least
    /// 1) and at most to the largest magnitude.
    pub fn assert_close<const D: usize>(name: &str, got: Tensor<D>, want: Tensor<D>, tol: f32) {
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (got, want) = (host(got), host(want));
        let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= tol * scale.min(b.abs().max(1.0)),
                "{name} [{i}]: {a} vs {b}"
            );
        }
    }
}
