//! Grouped-query self-attention with RoPE, the KV cache and an optional sliding window.

use burn::module::Module;
use burn::tensor::{Bool, Int, Tensor};

use super::kv_cache::KvCache;
use super::rope::Rope;
use crate::config::TextConfig;
use crate::error::Result;
use crate::fused::attention::decode_step;
use crate::fused::prompt_attention::{masked_attention, prompt_attention};
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::weights::WeightLoader;

/// LLaMA/Mistral attention (no biases).
#[derive(Module, Debug)]
pub struct SelfAttention {
    /// `q_proj`, `k_proj` and `v_proj` side by side: one matrix product per step instead of three.
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl SelfAttention {
    /// Loads `{prefix}.{q,k,v,o}_proj`.
    pub fn load(w: &mut WeightLoader, prefix: &str, c: &TextConfig) -> Result<Self> {
        let (d, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{prefix}.{n}"));
        Ok(Self {
            qkv_proj: w.fused_linear(&names, d, &[q, kv, kv], false)?,
            o_proj: w.linear(&format!("{prefix}.o_proj"), q, d, false)?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            sliding_window: c.sliding_window,
        })
    }

    /// Attends the new positions, given as normalised hidden states `h`, to themselves and everything
    /// cached before them: the output projection's result. With `last_only`, every new position's key and
    /// value still go to the cache but only the last position is attended and projected (what the last
    /// layer of a prompt needs when only the next token's logits are read).
    ///
    /// # Shapes
    /// - h: `[batch, seq, hidden]` (positions `cache.len()..cache.len() + seq`)
    /// - output: `[batch, seq, hidden]`, or `[batch, 1, hidden]` with `last_only`
    pub fn forward(
        &self,
        h: Tensor<3>,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        last_only: bool,
    ) -> Tensor<3> {
        let out = self.attend(self.qkv_proj.forward(h), rope, cache, layer, last_only);
        self.o_proj.forward(out)
    }

    /// [`Self::forward`] of `norm(x)` added to the residual stream `x`. Where the projections take the
    /// one-row kernel (decoding on a GPU), the norm and the sum are taken in their launches.
    pub fn forward_residual(
        &self,
        x: Tensor<3>,
        norm: &RmsNorm,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let qkv = self.qkv_proj.forward_normed(x.clone(), norm);
        let out = self.attend(qkv, rope, cache, layer, false);
        self.o_proj.forward_residual(x, out)
    }

    /// Whether the projections of `x` take the one-row kernel ([`Self::forward_residual`]'s fused path).
    pub fn takes_row_kernel(&self, x: &Tensor<3>) -> bool {
        self.qkv_proj.takes_row_kernel(x)
    }

    /// The attention of the new positions' q/k/v projections `[batch, seq, q + 2 · kv]`, the heads side
    /// by side as the output projection takes them: `[batch, seq, q]`, or with `last_only` the last
    /// position's alone, `[batch, 1, q]` (every position's key and value are cached either way).
    fn attend(
        &self,
        qkv: Tensor<3>,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        last_only: bool,
    ) -> Tensor<3> {
        let [b, seq, _] = qkv.dims();
        let offset = cache.len();
        let split =
            |t: Tensor<3>, heads: usize| t.reshape([b, seq, heads, self.head_dim]).swap_dims(1, 2);
        let (q_dim, kv_dim) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let total = offset + seq;
        let windowed = self.sliding_window.is_some_and(|w| total > w);
        let scale = (self.head_dim as f32).powf(-0.5);
        if seq == 1 && !windowed {
            // One new position sees every cached key: q and k rotated, the new key and value written into
            // the cache, and softmax(q·kᵀ/√d)·v in one pass over the cache where it lies, the heads side by
            // side as the output projection takes them (`fused::attention`; one launch on a GPU).
            let (cos, sin) = rope.tables();
            let heads = self.num_heads;
            return cache.write_with(layer, |k, v| {
                let (out, k, v) = decode_step(qkv, cos, sin, k, v, heads, offset, scale);
                (k, v, out)
            });
        }
        let queries = if last_only { 1 } else { seq };
        let q = rope.heads(
            qkv.clone().narrow(1, seq - queries, queries),
            0,
            self.num_heads,
            total - queries,
        );
        let k = rope.heads(qkv.clone(), q_dim, self.num_kv_heads, offset);
        let v = split(qkv.narrow(2, q_dim + kv_dim, kv_dim), self.num_kv_heads);
        let (k, v) = cache.append(layer, k, v);
        if windowed {
            let mask = window_mask(
                queries,
                total,
                self.sliding_window.unwrap_or(total),
                &q.device(),
            )
            .unsqueeze::<4>()
            .expand([b, self.num_heads, queries, total]);
            masked_attention(q, k, v, mask, scale)
        } else {
            // Causal: query row r sees the keys up to its own position (the last sees them all).
            prompt_attention(q, k, v, queries > 1, scale)
        }
    }
}

/// `true` where query `i` (absolute position `total - seq + i`) must not see key `j`: the future, and keys
/// `window` or more positions back (Mistral's sliding window).
fn window_mask(
    seq: usize,
    total: usize,
    window: usize,
    device: &burn::tensor::Device,
) -> Tensor<2, Bool> {
    let offset = (total - seq) as i64;
    let rows = Tensor::<1, Int>::arange(offset..offset + seq as i64, device).reshape([seq, 1]);
    let cols = Tensor::<1, Int>::arange(0..total as i64, device).reshape([1, total]);
    let rows = rows.expand([seq, total]);
    let cols = cols.expand([seq, total]);
    let future = cols.clone().greater(rows.clone());
    let too_old = cols.lower_equal(rows - window as i64);
    future.bool_or(too_old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_mask_hides_future_and_old_keys() {
        let device = burn::tensor::Device::default();
        // Bools are stored differently per backend; read them as floats.
        let m: Vec<f32> = window_mask(2, 5, 2, &device)
            .float()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        // query positions 3 and 4; keys 0..5; a window of 2 sees itself and one back.
        assert_eq!(m, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }
}
