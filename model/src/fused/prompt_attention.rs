//! Attention of many positions at once: a prompt over itself and whatever the KV cache holds before it
//! (causal), or an image's patches over each other (the vision tower). On the CPU backend this is our own
//! kernel (`fused/cpu/prompt_attention.rs`): Burn's CPU attention computes every score of a causal prompt,
//! masked or not, and takes `exp` one library call at a time, which made attention a fifth of a 512-token
//! prefill (BENCHMARKS.md); the kernel skips the masked blocks, takes `exp` in vector lanes and writes the
//! heads side by side as the output projection reads them. Everywhere else (GPU, autodiff, 16-bit CPU
//! tensors) it is Burn's attention.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor};

use crate::kernels;

/// The CPU kernel as a Burn backend extension (the CPU backend only: other backends never reach it).
#[cfg(feature = "cpu")]
#[burn::backend::backend_extension(Flex: cfg(feature = "cpu"))]
pub trait PromptAttentionOps: burn::backend::Backend {
    /// [`prompt_attention`] on the backend's tensors.
    fn prompt_attention(
        q: burn::backend::tensor::FloatTensor<Self>,
        k: burn::backend::tensor::FloatTensor<Self>,
        v: burn::backend::tensor::FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> burn::backend::tensor::FloatTensor<Self>;
}

/// `softmax(q · kᵀ · scale) · v` for `q` `[batch, heads, seq, head_dim]` over `k`, `v` `[batch, kv_heads,
/// keys, head_dim]` (grouped-query: each kv head serves `heads / kv_heads` query heads). With `causal`,
/// query `i` sees keys `0..=i + keys - seq` (the new positions are the last `seq` of the keys, after a
/// cached prefix). Returns `[batch, seq, heads · head_dim]`, the heads side by side.
pub fn prompt_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    causal: bool,
    scale: f32,
) -> Tensor<3> {
    let ([b, heads, seq, d], [kb, kv_heads, keys, kd]) = (q.dims(), k.dims());
    assert!(
        kb == b
            && kd == d
            && v.dims() == k.dims()
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && (!causal || keys >= seq),
        "prompt attention: q {:?}, k {:?}, v {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let device = q.device();
    let on_cpu_kernel = kernels::applies(&device, DType::F32)
        && !kernels::on_cube(&device)
        && [q.dtype(), k.dtype(), v.dtype()]
            .iter()
            .all(|t| *t == DType::F32);
    #[cfg(feature = "cpu")]
    if on_cpu_kernel {
        use burn::backend::Dispatch;
        return Tensor::from_dispatch(<Dispatch as PromptAttentionOps>::prompt_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            causal,
            scale,
        ));
    }
    let _ = on_cpu_kernel;
    burn_attention(q, k, v, None, causal, scale)
}

/// [`prompt_attention`] with `mask` `[batch, heads, seq, keys]` (`true`: hidden) instead of a causal
/// order (Mistral's sliding window), through Burn's attention on every backend.
pub fn masked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4, Bool>,
    scale: f32,
) -> Tensor<3> {
    burn_attention(q, k, v, Some(mask), false, scale)
}

/// [`prompt_attention`] (or [`masked_attention`]) through Burn's attention, each kv head repeated for its
/// query heads.
fn burn_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    scale: f32,
) -> Tensor<3> {
    let [b, heads, seq, d] = q.dims();
    let repeat = |t: Tensor<4>| {
        let [b, kv_heads, keys, d] = t.dims();
        let groups = heads / kv_heads;
        if groups == 1 {
            return t;
        }
        t.unsqueeze_dim::<5>(2)
            .expand([b, kv_heads, groups, keys, d])
            .reshape([b, heads, keys, d])
    };
    attention(
        q,
        repeat(k),
        repeat(v),
        mask,
        None,
        options(d, causal, scale),
    )
    .swap_dims(1, 2)
    .reshape([b, seq, heads * d])
}

/// Burn's attention options for heads of `d` values. Burn's GPU attention kernel takes only its default
/// scale, 1/√d (any other falls back to a composition of generic ops, a launch each), so that one is passed
/// as the default.
fn options(d: usize, causal: bool, scale: f32) -> AttentionModuleOptions {
    let default = (d as f64).sqrt().recip();
    AttentionModuleOptions {
        scale: ((scale as f64 - default).abs() > 1e-6 * default).then_some(scale as f64),
        // Causal with the diagonal aligned bottom-right, which is right for a cached prefix too.
        is_causal: causal,
        ..Default::default()
    }
}

#[cfg(test)]
mod option_tests {
    use super::options;

    #[test]
    fn the_default_scale_is_left_to_burn() {
        assert_eq!(options(64, true, 0.125).scale, None);
        assert_eq!(options(128, false, 128f32.powf(-0.5)).scale, None);
        assert_eq!(options(64, false, 0.2).scale, Some(0.2f32 as f64));
        assert!(options(64, true, 0.125).is_causal);
    }
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;
    use crate::fused::test_support::assert_close;

    fn random(shape: [usize; 4]) -> Tensor<4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex())
    }

    /// The kernel against Burn's attention: prompts longer than one block of rows, a cached prefix,
    /// grouped-query heads, the vision tower's full attention, and inputs read in place (a cache's first
    /// positions, heads split out of a projection by swapping dimensions).
    #[test]
    fn cpu_kernel_matches_burn_attention() {
        let scale = 0.125;
        // (heads, kv_heads, seq, keys, causal, head_dim): 7B's heads of 128 span two of the CPU
        // tiles' column blocks, and 72 ends inside a vector.
        for (heads, kv_heads, seq, keys, causal, d) in [
            (4, 2, 150, 150, true, 64),
            (4, 4, 37, 190, true, 64),
            (6, 2, 1, 9, true, 64),
            (3, 3, 70, 70, false, 64),
            (2, 1, 65, 130, false, 64),
            (2, 2, 70, 100, true, 128),
            (2, 1, 9, 9, false, 72),
        ] {
            let q = random([2, heads, seq, d]);
            let cache = || random([2, kv_heads, keys + 11, d]).narrow(2, 0, keys);
            let (k, v) = (cache(), cache());
            let got = prompt_attention(q.clone(), k.clone(), v.clone(), causal, scale);
            let want = burn_attention(q, k, v, None, causal, scale);
            assert_close(
                &format!("{heads}/{kv_heads} heads of {d}, {seq} over {keys}, causal {causal}"),
                got,
                want,
                1e-5,
            );
        }
        // Heads as a projection's output split by a swap of dimensions (not contiguous).
        let split = |t: Tensor<3>| t.reshape([1, 50, 4, 32]).swap_dims(1, 2);
        let x = || Tensor::<3>::random([1, 50, 128], Distribution::Default, &Device::flex());
        let (q, k, v) = (split(x()), split(x()), split(x()));
        assert_close(
            "split heads",
            prompt_attention(q.clone(), k.clone(), v.clone(), false, 0.2),
            burn_attention(q, k, v, None, false, 0.2),
            1e-5,
        );
    }
}
