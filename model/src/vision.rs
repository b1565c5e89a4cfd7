//! CLIP ViT vision tower: patch embedding (a convolution without bias, computed as a matmul over
//! unfolded patches), class token, learned positions, `pre_layrnorm`, pre-LN encoder layers with
//! `quick_gelu`. Returns the hidden state LLaVA selects (`mm_vision_select_layer`).

use burn::module::{Module, Param};
use burn::tensor::{Tensor, activation};

use crate::config::{VisionActivation, VisionConfig};
use crate::error::Result;
use crate::fused::prompt_attention::prompt_attention;
use crate::linear::Linear;
use crate::norm::LayerNorm;
use crate::weights::WeightLoader;

/// Self-attention of one encoder layer.
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// `q_proj`, `k_proj` and `v_proj` side by side: one matrix product instead of three.
    qkv_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl ClipAttention {
    /// `x`: [batch, tokens, hidden] → same shape.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let qkv = self.qkv_proj.forward(x);
        // Each third's heads, read where they lie by the attention kernel (a view on the CPU backend).
        let heads = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([b, n, self.num_heads, d / self.num_heads])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let scale = ((d / self.num_heads) as f32).powf(-0.5);
        self.out_proj
            .forward(prompt_attention(q, k, v, false, scale))
    }
}

/// One pre-LN transformer layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    quick_gelu: bool,
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = self.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = if self.quick_gelu {
            crate::fused::activation::quick_gelu(h)
        } else {
            activation::gelu(h)
        };
        x + self.fc2.forward(h)
    }
}

/// The vision tower, truncated to the layers LLaVA uses.
#[derive(Module, Debug)]
pub struct ClipVisionTower {
    patch_embedding: Linear,
    class_embedding: Param<Tensor<1>>,
    position_embedding: Param<Tensor<2>>,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    patch_size: usize,
    image_size: usize,
}

impl ClipVisionTower {
    /// Loads the first `layers_used` encoder layers from tensors under `prefix` (CLIP's own names, e.g.
    /// `vision_tower.vision_model`).
    pub fn load(
        w: &mut WeightLoader,
        prefix: &str,
        cfg: &VisionConfig,
        layers_used: usize,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let c = cfg.num_channels;
        // Conv weight [d, c, p, p] is, row-major, a [d, c·p·p] matrix over (channel, y, x) patches.
        let conv = w.tensor::<4>(
            &format!("{prefix}.embeddings.patch_embedding.weight"),
            [d, c, p, p],
        )?;
        let patch_embedding = Linear::float(conv.reshape([d, c * p * p]).transpose(), None);
        let positions = cfg.num_patches() + 1;
        let mut layers = Vec::with_capacity(layers_used);
        for i in 0..layers_used {
            let lp = format!("{prefix}.encoder.layers.{i}");
            let lin = |w: &mut WeightLoader, name: &str, i: usize, o: usize| {
                w.linear(&format!("{lp}.{name}"), i, o, true)
            };
            layers.push(ClipEncoderLayer {
                layer_norm1: LayerNorm::load(
                    w,
                    &format!("{lp}.layer_norm1"),
                    d,
                    cfg.layer_norm_eps,
                )?,
                self_attn: ClipAttention {
                    qkv_proj: w.fused_linear(
                        &["q_proj", "k_proj", "v_proj"].map(|p| format!("{lp}.self_attn.{p}")),
                        d,
                        &[d, d, d],
                        true,
                    )?,
                    out_proj: lin(w, "self_attn.out_proj", d, d)?,
                    num_heads: cfg.num_heads,
                },
                layer_norm2: LayerNorm::load(
                    w,
                    &format!("{lp}.layer_norm2"),
                    d,
                    cfg.layer_norm_eps,
                )?,
                fc1: lin(w, "mlp.fc1", d, cfg.intermediate_size)?,
                fc2: lin(w, "mlp.fc2", cfg.intermediate_size, d)?,
                quick_gelu: cfg.activation == VisionActivation::QuickGelu,
            });
        }
        Ok(Self {
            patch_embedding,
            class_embedding: Param::from_tensor(
                w.tensor(&format!("{prefix}.embeddings.class_embedding"), [d])?,
            ),
            position_embedding: Param::from_tensor(w.tensor(
                &format!("{prefix}.embeddings.position_embedding.weight"),
                [positions, d],
            )?),
            pre_layrnorm: LayerNorm::load(
                w,
                &format!("{prefix}.pre_layrnorm"),
                d,
                cfg.layer_norm_eps,
            )?,
            layers,
            patch_size: p,
            image_size: cfg.image_size,
        })
    }

    /// Input side in pixels.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Embeddings (class token + patches + positions) after `pre_layrnorm`.
    ///
    /// # Shapes
    /// - pixels: `[batch, channels, size, size]`
    /// - output: `[batch, 1 + patches, hidden]`
    pub fn embed(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [b, c, h, w] = pixels.dims();
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let x = self.patch_embedding.forward(patches);
        let d = x.dims()[2];
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1) + self.position_embedding.val().unsqueeze::<3>();
        self.pre_layrnorm.forward(x)
    }

    /// The output of the last loaded layer (LLaVA's selected hidden state), class token included.
    ///
    /// # Shapes
    /// - pixels: `[batch, channels, size, size]`
    /// - output: `[batch, 1 + patches, hidden]`
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        self.layers
            .iter()
            .fold(self.embed(pixels), |x, layer| layer.forward(x))
    }
}
