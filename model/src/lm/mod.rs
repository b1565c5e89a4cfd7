//! LLaMA/Mistral decoder: token embedding, pre-norm layers (RMSNorm, attention, SwiGLU), final norm and
//! output head (tied or untied). Exposes [`Decoder::embed`] and [`Decoder::forward_embeds`] so LLaVA can
//! splice image features between the token embeddings.

pub mod attention;
pub mod kv_cache;
pub mod mlp;
pub mod rope;

use burn::module::Module;
use burn::tensor::{DType, Int, Tensor};

use crate::config::TextConfig;
use crate::embedding::TokenEmbedding;
use crate::error::Result;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::weights::WeightLoader;
use attention::SelfAttention;
pub use kv_cache::KvCache;
use mlp::SwiGlu;
use rope::Rope;

/// One decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGlu,
}

impl DecoderLayer {
    /// The layer over the residual stream `x`, given `h`, its input normalisation; returns the new stream
    /// and its normalisation by `next` (the next layer's input norm, or the final one), so each residual
    /// sum and the norm after it are one pass. With `last_only` (the last layer of a pass whose last
    /// position alone is read) every position's key and value go to the cache, but attention, the output
    /// projection and the MLP run for the last position only, whose `[batch, 1, hidden]` come back: the
    /// other rows would feed no later layer.
    fn forward(
        &self,
        (x, h): (Tensor<3>, Tensor<3>),
        next: &RmsNorm,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        last_only: bool,
    ) -> (Tensor<3>, Tensor<3>) {
        let seq = x.dims()[1];
        let attended = self.self_attn.forward(h, rope, cache, layer, last_only);
        let x = if last_only {
            x.narrow(1, seq - 1, 1)
        } else {
            x
        };
        let (x, h) = self.post_attention_layernorm.forward_residual(x, attended);
        next.forward_residual(x, self.mlp.forward(h))
    }

    /// The layer over the residual stream `x` alone, each sublayer normalising it on the way in and adding
    /// its output back inside the projections' one-row kernel launches: decoding on a GPU, where the
    /// number of launches bounds the speed (5 a layer this way, against 7 with the sums and norms in
    /// passes of their own).
    fn forward_in_products(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let x = self
            .self_attn
            .forward_residual(x, &self.input_layernorm, rope, cache, layer);
        self.mlp.forward_residual(x, &self.post_attention_layernorm)
    }
}

/// The language model.
#[derive(Module, Debug)]
pub struct Decoder {
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when tied to the embedding.
    lm_head: Option<Linear>,
    rope: Rope,
    num_kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
}

impl Decoder {
    /// Loads a decoder whose layers live under `prefix` (e.g. `model` or `language_model.model`) and whose
    /// untied head is `head` (e.g. `lm_head`); `max_positions` sizes the RoPE tables.
    pub fn load(
        w: &mut WeightLoader,
        prefix: &str,
        head: &str,
        c: &TextConfig,
        max_positions: usize,
    ) -> Result<Self> {
        let d = c.hidden_size;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let lp = format!("{prefix}.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    w,
                    &format!("{lp}.input_layernorm"),
                    d,
                    c.rms_norm_eps,
                )?,
                self_attn: SelfAttention::load(w, &format!("{lp}.self_attn"), c)?,
                post_attention_layernorm: RmsNorm::load(
                    w,
                    &format!("{lp}.post_attention_layernorm"),
                    d,
                    c.rms_norm_eps,
                )?,
                mlp: SwiGlu::load(w, &format!("{lp}.mlp"), d, c.intermediate_size)?,
            });
        }
        // Some "tied" checkpoints still carry a copy of the head; use it only when the config says untied.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w.output_head(head, d, c.vocab_size)?)
        };
        Ok(Self {
            embed_tokens: w.embedding(
                &format!("{prefix}.embed_tokens.weight"),
                c.vocab_size,
                d,
                c.tie_word_embeddings,
            )?,
            layers,
            norm: RmsNorm::load(w, &format!("{prefix}.norm"), d, c.rms_norm_eps)?,
            lm_head,
            rope: Rope::new(
                c.head_dim,
                c.rope_theta,
                max_positions,
                w.device(),
                w.dtype(),
            ),
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Float type of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Longest sequence the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// An empty KV cache for `capacity` positions (at most [`Decoder::max_positions`]).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let device = self.embed_tokens.device();
        KvCache::new(
            self.layers.len(),
            batch,
            self.num_kv_heads,
            self.head_dim,
            capacity.min(self.max_positions()),
            &device,
            self.dtype(),
        )
    }

    /// Bytes a KV cache of one sequence of `capacity` positions takes ([`Decoder::new_cache`]).
    pub fn kv_cache_bytes(&self, capacity: usize) -> usize {
        let positions = capacity.min(self.max_positions());
        self.layers.len() * 2 * self.num_kv_heads * self.head_dim * positions * self.dtype().size()
    }

    /// Token embeddings: `[batch, seq]` ids → `[batch, seq, hidden]`.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.embed_tokens.forward(ids)
    }

    /// Runs the layers over new positions given as embeddings, appending them to `cache`; returns the final
    /// normalised hidden states `[batch, seq, hidden]`.
    pub fn forward_embeds(&self, x: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        self.run(x, cache, false)
    }

    /// [`Self::forward_embeds`] returning the last position's hidden state alone, `[batch, 1, hidden]`
    /// (what the next token's logits need): the last layer attends and projects only that position
    /// ([`DecoderLayer::forward`]'s `last_only`), ~1/layers of a prompt's work saved. The cache is the same.
    pub fn forward_embeds_last(&self, x: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        self.run(x, cache, true)
    }

    /// The layers over `x`; with `last_only` only the last position's hidden state comes back.
    fn run(&self, x: Tensor<3>, cache: &mut KvCache, last_only: bool) -> Result<Tensor<3>> {
        let [_, seq, _] = x.dims();
        cache.reserve(seq)?;
        let in_products = self
            .layers
            .first()
            .is_some_and(|l| l.self_attn.takes_row_kernel(&x));
        let h = if in_products {
            // A few positions (decoding on a GPU): all of them, then the last.
            let x = self.layers.iter().enumerate().fold(x, |x, (i, layer)| {
                layer.forward_in_products(x, &self.rope, cache, i)
            });
            self.norm.forward(x)
        } else {
            let h = self.norm_before(0).forward(x.clone());
            let state = (x, h);
            let last = self.layers.len().saturating_sub(1);
            let (_, h) = self
                .layers
                .iter()
                .enumerate()
                .fold(state, |state, (i, layer)| {
                    let last_only = last_only && seq > 1 && i == last;
                    layer.forward(
                        state,
                        self.norm_before(i + 1),
                        &self.rope,
                        cache,
                        i,
                        last_only,
                    )
                });
            h
        };
        cache.advance(seq);
        let [b, rows, d] = h.dims();
        Ok(if last_only && rows > 1 {
            h.slice([0..b, rows - 1..rows, 0..d])
        } else {
            h
        })
    }

    /// The norm applied to layer `i`'s input: its own, or the final one past the last layer.
    fn norm_before(&self, i: usize) -> &RmsNorm {
        self.layers
            .get(i)
            .map_or(&self.norm, |l| &l.input_layernorm)
    }

    /// Output logits `[batch, seq, vocab]` for hidden states `[batch, seq, hidden]`.
    pub fn logits(&self, h: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed_tokens.project(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Tensor};

    use crate::LlavaModel;
    use crate::bench::shape_config;
    use crate::quant::Quantization;

    fn host(t: Tensor<1>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec().unwrap()
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}");
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{what}: largest difference {worst}");
    }

    /// A prompt run for its last position alone (the last layer attending and projecting only that
    /// one) gives the logits of the full pass's last row and leaves the same cache behind: the next
    /// step's logits agree too. With and without a sliding window shorter than the prompt, from an
    /// empty cache and after earlier positions.
    #[test]
    fn the_last_position_alone_matches_the_full_pass() {
        let device = Device::default();
        for window in [None, Some(5)] {
            let mut config = shape_config("tiny").unwrap();
            config.text.sliding_window = window;
            let model =
                LlavaModel::random(config, &device, DType::F32, Some(64), Quantization::None)
                    .unwrap();
            let vocab = model.lm.vocab_size();
            let (mut full, mut last) = (model.new_cache(), model.new_cache());
            for (turn, ids) in [
                [1i64, 7, 9, 11, 13, 2, 4, 8, 16, 32, 3, 5],
                [6, 10, 14, 18, 22, 26, 30, 12, 15, 17, 19, 21],
            ]
            .iter()
            .enumerate()
            {
                let what = format!("window {window:?}, turn {turn}");
                let embeds = model.embed_sequence(ids, None).unwrap();
                let all = model.forward(embeds.clone(), &mut full).unwrap();
                let [_, seq, _] = all.dims();
                let want = host(all.slice([0..1, seq - 1..seq, 0..vocab]).flatten::<1>(0, 2));
                let got = host(model.forward_last(embeds, &mut last).unwrap());
                assert_close(&what, &got, &want);
                assert_eq!(full.len(), last.len(), "{what}");
            }
            let step = model.embed_generated(&[42]).unwrap();
            let want = host(model.forward_last(step.clone(), &mut full).unwrap());
            let got = host(model.forward_last(step, &mut last).unwrap());
            assert_close(&format!("window {window:?}, next step"), &got, &want);
        }
    }
}
