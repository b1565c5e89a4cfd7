//! `config.json` of both LLaVA checkpoint layouts (original LLaVA / LLaVA-Med and llava-hf) and of plain
//! LLaMA/Mistral checkpoints, read into one typed [`ModelConfig`].
//!
//! Hugging Face configs often omit fields equal to the library default (llava-hf `text_config` lists only a
//! handful), so each architecture's defaults are filled in here, once.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How the tensors of a checkpoint are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Original LLaVA / LLaVA-Med: `model.*`, `model.mm_projector.*`, `model.vision_tower.vision_tower.*`.
    LlavaOriginal,
    /// Hugging Face llava: `language_model.*`, `multi_modal_projector.*`, `vision_tower.*`.
    LlavaHf,
    /// A text-only LLaMA/Mistral checkpoint (`model.*`, `lm_head`).
    TextOnly,
}

/// The decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderKind {
    /// LLaMA (also Vicuna, SmolLM).
    Llama,
    /// Mistral.
    Mistral,
}

/// Decoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// LLaMA or Mistral.
    pub kind: DecoderKind,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size of the embedding and the output head.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window, when enabled.
    pub sliding_window: Option<usize>,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id, when the model has one.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
}

/// Activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionActivation {
    /// x·σ(1.702x), OpenAI CLIP.
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
}

/// CLIP vision tower hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers in the checkpoint.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP activation.
    pub activation: VisionActivation,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Number of patch positions (without the class token).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    /// OpenAI CLIP ViT-L/14 at 336 px, the tower of LLaVA-1.5 and LLaVA-Med v1.5.
    pub fn clip_vit_large_patch14_336() -> Self {
        Self {
            image_size: 336,
            ..Self::clip_vit_large_patch14()
        }
    }
    /// OpenAI CLIP ViT-L/14 at 224 px (LLaVA v1.0).
    pub fn clip_vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_layers: 24,
            num_heads: 16,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            activation: VisionActivation::QuickGelu,
        }
    }
}

/// The projector between the vision tower and the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorKind {
    /// One linear layer.
    Linear,
    /// `mlp{depth}x_gelu`: `depth` linear layers with exact GELU between them.
    MlpGelu {
        /// Number of linear layers (2 for LLaVA-1.5).
        depth: usize,
    },
}

impl ProjectorKind {
    /// Parses LLaVA's `mm_projector_type` (`linear`, `mlp2x_gelu`, …).
    pub fn parse(s: &str) -> Option<Self> {
        if s == "linear" {
            return Some(Self::Linear);
        }
        let depth = s
            .strip_prefix("mlp")?
            .strip_suffix("x_gelu")?
            .parse()
            .ok()?;
        (depth >= 1).then_some(Self::MlpGelu { depth })
    }
}

/// Which vision features feed the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectFeature {
    /// Patch tokens only (class token dropped): LLaVA's `patch`, llava-hf's `default`.
    Patch,
    /// Class token and patches: `cls_patch` / `full`.
    ClsPatch,
}

/// Where the vision tower's description comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionConfigSource {
    /// The checkpoint's own config (llava-hf `vision_config`).
    Checkpoint,
    /// A CLIP folder with its own `config.json` (and maybe its weights).
    ClipFolder(PathBuf),
    /// A built-in description of a well-known tower, by its hub name.
    Preset(String),
}

/// Multimodal part of a LLaVA config.
#[derive(Debug, Clone, PartialEq)]
pub struct MultimodalConfig {
    /// The vision tower.
    pub vision: VisionConfig,
    /// Where `vision` came from.
    pub vision_source: VisionConfigSource,
    /// The projector.
    pub projector: ProjectorKind,
    /// Hidden state fed to the projector: negative counts from the end of the tower's hidden states
    /// (embeddings output included, as in transformers), so -2 is the output of the second-to-last layer.
    pub select_layer: i64,
    /// Patch features only, or class token too.
    pub select_feature: SelectFeature,
    /// llava-hf: the token id standing for one image patch in `input_ids`.
    pub image_token_index: Option<u32>,
    /// The name in `mm_vision_tower`, if any.
    pub vision_tower_name: Option<String>,
}

impl MultimodalConfig {
    /// Number of encoder layers that must run to produce the selected hidden state.
    pub fn vision_layers_used(&self) -> usize {
        let n = self.vision.num_layers as i64;
        // hidden_states has n + 1 entries: the embeddings, then one per layer.
        let idx = if self.select_layer < 0 {
            n + 1 + self.select_layer
        } else {
            self.select_layer
        };
        idx.clamp(0, n) as usize
    }
    /// Image embeddings produced per image.
    pub fn tokens_per_image(&self) -> usize {
        self.vision.num_patches() + usize::from(self.select_feature == SelectFeature::ClsPatch)
    }
}

/// Everything needed to build and run a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Tensor naming.
    pub layout: Layout,
    /// `model_type` as written.
    pub model_type: String,
    /// The decoder.
    pub text: TextConfig,
    /// Vision tower and projector, absent for text-only checkpoints.
    pub multimodal: Option<MultimodalConfig>,
    /// Context length used for prompts (LLaVA's `tokenizer_model_max_length`, else the decoder's).
    pub max_context: usize,
    /// The dtype the checkpoint was saved in, when stated.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Reads `config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        Self::from_value(&value, dir, &path)
    }

    /// Builds the config from parsed JSON; `dir` resolves relative vision tower paths, `path` names errors.
    pub fn from_value(value: &Value, dir: &Path, path: &Path) -> Result<Self> {
        let root = value
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object"))?;
        let cfg = Fields { map: root, path };
        let model_type = cfg
            .str("model_type")?
            .ok_or_else(|| cfg.err("missing `model_type`"))?;
        let torch_dtype = cfg.str("torch_dtype")?.or(cfg.str("dtype")?);
        match model_type.as_str() {
            "llava" => {
                let text_map = cfg.object("text_config")?.ok_or_else(|| cfg.err("missing `text_config`"))?;
                let text_fields = Fields { map: text_map, path };
                let text_type = text_fields.str("model_type")?.unwrap_or_else(|| "llama".into());
                let text = text_config(&text_fields, decoder_kind(&text_type, path)?)?;
                let vision_map = cfg.object("vision_config")?.ok_or_else(|| cfg.err("missing `vision_config`"))?;
                let vision = vision_config(&Fields { map: vision_map, path })?;
                let act = cfg.str("projector_hidden_act")?.unwrap_or_else(|| "gelu".into());
                if act != "gelu" {
                    return Err(cfg.err(format!("projector_hidden_act `{act}` is not supported (only gelu)")));
                }
                let strategy = cfg.str("vision_feature_select_strategy")?.unwrap_or_else(|| "default".into());
                let select_feature = match strategy.as_str() {
                    "default" => SelectFeature::Patch,
                    "full" => SelectFeature::ClsPatch,
                    other => return Err(cfg.err(format!("unknown vision_feature_select_strategy `{other}`"))),
                };
                let select_layer = match root.get("vision_feature_layer") {
                    None => -2,
                    Some(Value::Number(n)) => n.as_i64().ok_or_else(|| cfg.err("bad vision_feature_layer"))?,
                    Some(_) => return Err(cfg.err("vision_feature_layer lists several layers; only one is supported")),
                };
                let image_token_index = cfg
                    .u64("image_token_index")?
                    .or(cfg.u64("image_token_id")?)
                    .ok_or_else(|| cfg.err("missing `image_token_index`"))?;
                let max_context = text.max_position_embeddings;
                Ok(Self {
                    layout: Layout::LlavaHf,
                    model_type,
                    multimodal: Some(MultimodalConfig {
                        vision,
                        vision_source: VisionConfigSource::Checkpoint,
                        projector: ProjectorKind::MlpGelu { depth: 2 },
                        select_layer,
                        select_feature,
                        image_token_index: Some(image_token_index as u32),
                        vision_tower_name: None,
                    }),
                    text,
                    max_context,
                    torch_dtype,
                })
            }
            "llava_llama" | "llava_mistral" | "llama" | "mistral" => {
                let kind = decoder_kind(model_type.trim_start_matches("llava_"), path)?;
                let text = text_config(&cfg, kind)?;
                let multimodal = if model_type.starts_with("llava_") {
                    Some(original_multimodal(&cfg, dir)?)
                } else {
                    None
                };
                let max_context = cfg.usize("tokenizer_model_max_length")?.unwrap_or(text.max_position_embeddings);
                Ok(Self {
                    layout: if multimodal.is_some() { Layout::LlavaOriginal } else { Layout::TextOnly },
                    model_type,
                    text,
                    multimodal,
                    max_context,
                    torch_dtype,
                })
            }
            other => Err(cfg.err(format!(
                "unknown model_type `{other}` (supported: llava_mistral, llava_llama, llava, llama, mistral)"
            ))),
        }
    }
}

fn decoder_kind(model_type: &str, path: &Path) -> Result<DecoderKind> {
    match model_type {
        "llama" => Ok(DecoderKind::Llama),
        "mistral" => Ok(DecoderKind::Mistral),
        other => Err(Error::config(
            path,
            format!("unsupported language model type `{other}` (supported: llama, mistral)"),
        )),
    }
}

/// Decoder config with the transformers defaults of its architecture.
fn text_config(cfg: &Fields, kind: DecoderKind) -> Result<TextConfig> {
    let (d_inter, d_kv, d_rope, d_window, d_eps) = match kind {
        DecoderKind::Llama => (11008, None, 10_000.0, None, 1e-6),
        DecoderKind::Mistral => (14336, Some(8), 10_000.0, Some(4096), 1e-6),
    };
    let hidden_size = cfg.usize("hidden_size")?.unwrap_or(4096);
    let num_heads = cfg.usize("num_attention_heads")?.unwrap_or(32);
    let num_kv_heads = cfg
        .usize("num_key_value_heads")?
        .or(d_kv)
        .unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(cfg.err(format!(
            "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
        )));
    }
    let head_dim = cfg.usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    let rope_theta = match cfg.f64("rope_theta")? {
        Some(t) => t,
        None => match cfg.object("rope_parameters")? {
            Some(p) => Fields {
                map: p,
                path: cfg.path,
            }
            .f64("rope_theta")?
            .unwrap_or(d_rope),
            None => d_rope,
        },
    };
    if let Some(scaling) = cfg.map.get("rope_scaling").filter(|v| !v.is_null()) {
        return Err(cfg.err(format!("rope_scaling {scaling} is not supported")));
    }
    let sliding_window = match cfg.map.get("sliding_window") {
        None => d_window,
        Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| cfg.err("`sliding_window` must be an integer"))?
                as usize,
        ),
    };
    let eos_token_ids = match cfg.map.get("eos_token_id") {
        None | Some(Value::Null) => vec![2],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|x| x as u32))
            .collect(),
        Some(v) => vec![v.as_u64().ok_or_else(|| cfg.err("bad eos_token_id"))? as u32],
    };
    let act = cfg.str("hidden_act")?.unwrap_or_else(|| "silu".into());
    if act != "silu" {
        return Err(cfg.err(format!("hidden_act `{act}` is not supported (only silu)")));
    }
    Ok(TextConfig {
        kind,
        hidden_size,
        intermediate_size: cfg.usize("intermediate_size")?.unwrap_or(d_inter),
        num_layers: cfg.usize("num_hidden_layers")?.unwrap_or(32),
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: cfg.usize("vocab_size")?.unwrap_or(32000),
        rms_norm_eps: cfg.f64("rms_norm_eps")?.unwrap_or(d_eps),
        rope_theta,
        max_position_embeddings: cfg.usize("max_position_embeddings")?.unwrap_or(match kind {
            DecoderKind::Llama => 2048,
            DecoderKind::Mistral => 32768,
        }),
        sliding_window,
        tie_word_embeddings: cfg.bool("tie_word_embeddings")?.unwrap_or(false),
        bos_token_id: match cfg.map.get("bos_token_id") {
            Some(Value::Null) => None,
            _ => Some(cfg.u64("bos_token_id")?.unwrap_or(1) as u32),
        },
        eos_token_ids,
    })
}

/// CLIP vision config with transformers' `CLIPVisionConfig` defaults.
fn vision_config(cfg: &Fields) -> Result<VisionConfig> {
    let activation = match cfg.str("hidden_act")?.as_deref().unwrap_or("quick_gelu") {
        "quick_gelu" => VisionActivation::QuickGelu,
        "gelu" => VisionActivation::Gelu,
        other => return Err(cfg.err(format!("vision hidden_act `{other}` is not supported"))),
    };
    let v = VisionConfig {
        hidden_size: cfg.usize("hidden_size")?.unwrap_or(768),
        intermediate_size: cfg.usize("intermediate_size")?.unwrap_or(3072),
        num_layers: cfg.usize("num_hidden_layers")?.unwrap_or(12),
        num_heads: cfg.usize("num_attention_heads")?.unwrap_or(12),
        image_size: cfg.usize("image_size")?.unwrap_or(224),
        patch_size: cfg.usize("patch_size")?.unwrap_or(32),
        num_channels: cfg.usize("num_channels")?.unwrap_or(3),
        layer_norm_eps: cfg.f64("layer_norm_eps")?.unwrap_or(1e-5),
        activation,
    };
    if v.patch_size == 0
        || !v.image_size.is_multiple_of(v.patch_size)
        || v.num_heads == 0
        || !v.hidden_size.is_multiple_of(v.num_heads)
    {
        return Err(
            cfg.err("inconsistent vision config (image_size/patch_size or hidden_size/heads)")
        );
    }
    Ok(v)
}

/// The original LLaVA layout names its tower (`mm_vision_tower`) instead of describing it: find a CLIP
/// folder (the named local path, or `vision_tower/` inside the model folder, or a folder of the same name
/// next to the model folder), else fall back to a built-in description of the well-known OpenAI towers.
fn original_multimodal(cfg: &Fields, dir: &Path) -> Result<MultimodalConfig> {
    if cfg.bool("mm_use_im_start_end")?.unwrap_or(false) {
        return Err(cfg.err(
            "mm_use_im_start_end = true (LLaVA-Med v1.0 style <im_start>/<im_patch> tokens) is not supported yet",
        ));
    }
    let name = cfg.str("mm_vision_tower")?.or(cfg.str("vision_tower")?);
    let projector_name = cfg
        .str("mm_projector_type")?
        .unwrap_or_else(|| "linear".into());
    let projector = ProjectorKind::parse(&projector_name)
        .ok_or_else(|| cfg.err(format!("unknown mm_projector_type `{projector_name}`")))?;
    let select_feature = match cfg
        .str("mm_vision_select_feature")?
        .as_deref()
        .unwrap_or("patch")
    {
        "patch" => SelectFeature::Patch,
        "cls_patch" => SelectFeature::ClsPatch,
        other => return Err(cfg.err(format!("unknown mm_vision_select_feature `{other}`"))),
    };
    let select_layer = cfg.i64("mm_vision_select_layer")?.unwrap_or(-2);
    if let Some(aspect) = cfg.str("image_aspect_ratio")?
        && aspect != "pad"
        && aspect != "square"
    {
        return Err(cfg.err(format!(
            "image_aspect_ratio `{aspect}` is not supported (pad, square)"
        )));
    }
    let (vision, vision_source) = match find_clip_folder(name.as_deref(), dir) {
        Some(folder) => (
            read_clip_config(&folder)?,
            VisionConfigSource::ClipFolder(folder),
        ),
        None => match name.as_deref().map(|n| n.trim_end_matches('/')) {
            Some(n) if n.ends_with("clip-vit-large-patch14-336") => (
                VisionConfig::clip_vit_large_patch14_336(),
                VisionConfigSource::Preset(n.to_string()),
            ),
            Some(n) if n.ends_with("clip-vit-large-patch14") => (
                VisionConfig::clip_vit_large_patch14(),
                VisionConfigSource::Preset(n.to_string()),
            ),
            other => {
                return Err(cfg.err(format!(
                    "cannot find the vision tower `{}`: put its CLIP folder (with config.json) at that path, \
                     in `vision_tower/` inside the model folder, or next to the model folder",
                    other.unwrap_or("(mm_vision_tower not set)")
                )));
            }
        },
    };
    if let Some(h) = cfg.usize("mm_hidden_size")?
        && h != vision.hidden_size
    {
        return Err(cfg.err(format!(
            "mm_hidden_size {h} differs from the vision tower width {}",
            vision.hidden_size
        )));
    }
    Ok(MultimodalConfig {
        vision,
        vision_source,
        projector,
        select_layer,
        select_feature,
        image_token_index: None,
        vision_tower_name: name,
    })
}

/// Candidate CLIP folders for `mm_vision_tower`, first one holding a `config.json` wins.
pub fn find_clip_folder(name: Option<&str>, dir: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(n) = name {
        let p = Path::new(n);
        candidates.push(if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        });
        if let (Some(parent), Some(base)) = (dir.parent(), p.file_name()) {
            candidates.push(parent.join(base));
        }
    }
    candidates.push(dir.join("vision_tower"));
    candidates
        .into_iter()
        .find(|c| c.join("config.json").is_file())
}

/// Reads a CLIP folder's config: a `CLIPVisionModel` config or a full `CLIPModel` one (its `vision_config`).
pub fn read_clip_config(folder: &Path) -> Result<VisionConfig> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
    let map = value
        .as_object()
        .ok_or_else(|| Error::config(&path, "expected a JSON object"))?;
    let map = match map.get("vision_config").and_then(Value::as_object) {
        Some(v) => v,
        None => map,
    };
    vision_config(&Fields { map, path: &path })
}

/// Typed access to a JSON object with errors naming the file.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::config(self.path, message)
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn str(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(format!("`{key}` must be a string")))
            })
            .transpose()
    }
    fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.err(format!("`{key}` must be a non-negative integer")))
            })
            .transpose()
    }
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.u64(key)?.map(|v| v as usize))
    }
    fn i64(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| self.err(format!("`{key}` must be an integer")))
            })
            .transpose()
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.err(format!("`{key}` must be a number")))
            })
            .transpose()
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(format!("`{key}` must be true or false")))
            })
            .transpose()
    }
    fn object(&self, key: &str) -> Result<Option<&Map<String, Value>>> {
        self.get(key)
            .map(|v| {
                v.as_object()
                    .ok_or_else(|| self.err(format!("`{key}` must be an object")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn reads_llava_hf_config() {
        let c = ModelConfig::from_dir(&fixture("tiny-llava-hf-llama")).unwrap();
        assert_eq!(c.layout, Layout::LlavaHf);
        assert_eq!(c.text.kind, DecoderKind::Llama);
        assert_eq!(
            (c.text.num_heads, c.text.num_kv_heads, c.text.head_dim),
            (4, 2, 16)
        );
        assert_eq!(c.text.rope_theta, 10_000.0);
        let mm = c.multimodal.unwrap();
        assert_eq!(mm.image_token_index, Some(420));
        assert_eq!(mm.vision.num_patches(), 16);
        assert_eq!(mm.vision_layers_used(), 2);
    }

    #[test]
    fn reads_original_config_with_clip_folder() {
        let dir = fixture("tiny-llava-med-mistral");
        let c = ModelConfig::from_dir(&dir).unwrap();
        assert_eq!(c.layout, Layout::LlavaOriginal);
        assert_eq!(c.text.kind, DecoderKind::Mistral);
        assert_eq!(c.text.rope_theta, 1e6);
        assert_eq!(c.text.sliding_window, None);
        assert_eq!(c.max_context, 2048);
        let mm = c.multimodal.unwrap();
        assert_eq!(
            mm.vision_source,
            VisionConfigSource::ClipFolder(dir.join("clip-vision"))
        );
        assert_eq!(mm.projector, ProjectorKind::MlpGelu { depth: 2 });
    }

    #[test]
    fn real_v15_config_uses_preset_tower() {
        let v: Value = serde_json::json!({
            "model_type": "llava_mistral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "rope_theta": 1e6,
            "sliding_window": null, "vocab_size": 32000, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": false,
            "tokenizer_model_max_length": 2048
        });
        let c = ModelConfig::from_value(&v, Path::new("/nonexistent"), Path::new("config.json"))
            .unwrap();
        let mm = c.multimodal.unwrap();
        assert_eq!(mm.vision, VisionConfig::clip_vit_large_patch14_336());
        assert_eq!(mm.vision.num_patches(), 576);
        assert_eq!(mm.vision_layers_used(), 23);
        assert_eq!(c.text.head_dim, 128);
    }

    #[test]
    fn rejects_unknown_model_type_and_bad_fields() {
        let p = Path::new("x/config.json");
        let e = ModelConfig::from_value(
            &serde_json::json!({"model_type": "gpt2"}),
            Path::new("x"),
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown model_type `gpt2`"), "{e}");
        let e = ModelConfig::from_value(
            &serde_json::json!({"model_type": "llama", "hidden_size": "big"}),
            Path::new("x"),
            p,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("x/config.json: `hidden_size`"),
            "{e}"
        );
        let e = ModelConfig::from_value(
            &serde_json::json!({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}),
            Path::new("x"),
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }

    #[test]
    fn parses_projector_names() {
        assert_eq!(ProjectorKind::parse("linear"), Some(ProjectorKind::Linear));
        assert_eq!(
            ProjectorKind::parse("mlp3x_gelu"),
            Some(ProjectorKind::MlpGelu { depth: 3 })
        );
        assert_eq!(ProjectorKind::parse("mlp2x_relu"), None);
    }
}
