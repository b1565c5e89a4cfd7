//! LLaVA: vision tower → projector → image features spliced into the decoder's token embeddings.
//! Loads both checkpoint layouts (and text-only LLaMA/Mistral checkpoints) from a model folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::config::{
    Layout, ModelConfig, MultimodalConfig, SelectFeature, VisionConfigSource, find_clip_folder,
};
use crate::error::{Error, Result};
use crate::lm::{Decoder, KvCache};
use crate::load_progress::LoadProgress;
use crate::memory_check;
use crate::projector::Projector;
use crate::quant::Quantization;
use crate::quant::cache::CacheTally;
use crate::vision::ClipVisionTower;
use crate::weights::{WeightFiles, WeightLoader};

/// The id LLaVA uses for "one image goes here" in token sequences.
pub const IMAGE_SLOT: i64 = -200;

/// Where the vision tower's weights were loaded from.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionWeightsSource {
    /// The model checkpoint itself.
    Checkpoint,
    /// A separate CLIP folder.
    ClipFolder(PathBuf),
}

/// Vision tower and projector.
#[derive(Module, Debug)]
pub struct VisionPath {
    tower: ClipVisionTower,
    projector: Projector,
    keep_cls: bool,
}

/// A loaded model.
#[derive(Debug)]
pub struct LlavaModel {
    /// The parsed config.
    pub config: ModelConfig,
    /// The decoder.
    pub lm: Decoder,
    /// Absent for text-only checkpoints.
    pub vision: Option<VisionPath>,
    /// Where the vision weights came from.
    pub vision_weights: Option<VisionWeightsSource>,
    /// Tensors in the checkpoint deliberately not loaded (e.g. vision layers after the selected one).
    pub skipped_tensors: Vec<String>,
    /// Folder the model came from.
    pub dir: PathBuf,
    /// Float type of the tensors on disk (e.g. `BF16`).
    pub stored_dtype: Option<String>,
    /// How the weight matrices are stored.
    pub quantization: Quantization,
    /// What loading did with the quantised-weights cache (`None`: not used).
    pub quant_cache: Option<CacheTally>,
}

/// How to load a checkpoint, beyond its folder, device and float type.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Bound of prompts and caches (default: the config's context).
    pub max_context: Option<usize>,
    /// How the weight matrices are stored.
    pub quantization: Quantization,
    /// Root folder of the quantised-weights cache ([`crate::quant::cache`]); `None`: quantise at every
    /// load.
    pub quant_cache: Option<PathBuf>,
    /// Where to report how far the load has got.
    pub progress: Option<Arc<LoadProgress>>,
    /// Load on the CPU even when the model looks too big for the available memory
    /// ([`crate::memory_check`]).
    pub ignore_memory_check: bool,
}

/// Refuses a CPU load that would not fit the available memory ([`memory_check`]); other devices are
/// not checked (their memory is the driver's to report).
fn check_host_memory(
    label: &Path,
    config: &ModelConfig,
    device: &Device,
    dtype: DType,
    quantization: Quantization,
) -> Result<()> {
    if !crate::kernels::on_cpu(device) {
        return Ok(());
    }
    match memory_check::available()? {
        Some(available) => memory_check::check(label, config, dtype, quantization, available),
        None => Ok(()),
    }
}

/// Tensor name prefixes of one layout.
struct Names {
    lm: &'static str,
    head: &'static str,
    vision: &'static str,
    projector: fn(usize) -> String,
}

fn names(layout: Layout, linear_projector: bool) -> Names {
    match layout {
        Layout::LlavaHf => Names {
            lm: "language_model.model",
            head: "language_model.lm_head",
            vision: "vision_tower.vision_model",
            projector: |i| format!("multi_modal_projector.linear_{}", i + 1),
        },
        Layout::LlavaOriginal | Layout::TextOnly => Names {
            lm: "model",
            head: "lm_head",
            vision: "model.vision_tower.vision_tower.vision_model",
            // nn.Sequential(Linear, GELU, Linear, …): linear layers at even indices; a plain Linear otherwise.
            projector: if linear_projector {
                |_| "model.mm_projector".to_string()
            } else {
                |i| format!("model.mm_projector.{}", 2 * i)
            },
        },
    }
}

impl LlavaModel {
    /// Loads the model in `dir` onto `device` with float type `dtype`; `max_context` bounds prompts and
    /// caches (defaults to the config's context).
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        max_context: Option<usize>,
    ) -> Result<Self> {
        Self::load_quantized(dir, device, dtype, max_context, Quantization::None, None)
    }

    /// [`LlavaModel::load`] with the weight matrices quantised; with `quant_cache` (a root folder, see
    /// [`crate::quant::cache`]) the quantised matrices are read from there when an earlier load left them,
    /// and left there otherwise.
    pub fn load_quantized(
        dir: &Path,
        device: &Device,
        dtype: DType,
        max_context: Option<usize>,
        quantization: Quantization,
        quant_cache: Option<&Path>,
    ) -> Result<Self> {
        let options = LoadOptions {
            max_context,
            quantization,
            quant_cache: quant_cache.map(Path::to_path_buf),
            ..LoadOptions::default()
        };
        Self::load_with(dir, device, dtype, &options)
    }

    /// Loads the model in `dir` onto `device` with float type `dtype` as `options` say.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        if !options.ignore_memory_check {
            check_host_memory(dir, &config, device, dtype, options.quantization)?;
        }
        let files = WeightFiles::open_dir(dir)?;
        let stored = files.stored_dtype();
        let mut w = files.loader(device, dtype);
        w.set_quantization(options.quantization);
        if options.quantization != Quantization::None {
            w.set_quant_cache(options.quant_cache.as_deref());
        }
        w.set_progress(options.progress.clone());
        Self::build(config, w, dir, options.max_context, stored)
    }

    /// A model of `config`'s shapes with random weights, made on the device without any file (for
    /// benchmarks of shapes no one has to download). Seed the device for repeatable weights.
    pub fn random(
        config: ModelConfig,
        device: &Device,
        dtype: DType,
        max_context: Option<usize>,
        quantization: Quantization,
    ) -> Result<Self> {
        check_host_memory(
            Path::new("random weights"),
            &config,
            device,
            dtype,
            quantization,
        )?;
        let mut w = WeightLoader::random(device, dtype);
        w.set_quantization(quantization);
        Self::build(config, w, Path::new("."), max_context, None)
    }

    fn build(
        config: ModelConfig,
        mut w: WeightLoader,
        dir: &Path,
        max_context: Option<usize>,
        stored_dtype: Option<String>,
    ) -> Result<Self> {
        let linear = matches!(
            config.multimodal.as_ref().map(|m| m.projector),
            Some(crate::config::ProjectorKind::Linear)
        );
        let mut n = names(config.layout, linear);
        // transformers 5 saves llava-hf's CLIP tower without its `vision_model.` level.
        if config.layout == Layout::LlavaHf
            && !w.contains(&format!("{}.embeddings.class_embedding", n.vision))
            && w.contains("vision_tower.embeddings.class_embedding")
        {
            n.vision = "vision_tower";
        }
        let context = max_context.unwrap_or(config.max_context).max(1);
        let quantization = w.quantization();
        let lm = Decoder::load(&mut w, n.lm, n.head, &config.text, context)?;
        let mut clip_tally = None;
        let (vision, vision_weights, mut skipped) = match &config.multimodal {
            None => (None, None, Vec::new()),
            Some(mm) => {
                let (v, src, skipped) = load_vision(&mut w, &n, mm, &config, dir, &mut clip_tally)?;
                (Some(v), Some(src), skipped)
            }
        };
        let mut quant_cache = w.cache_tally();
        if let (Some(all), Some(clip)) = (quant_cache.as_mut(), clip_tally) {
            all.add(&clip);
        }
        let vision_prefix = format!("{}.", n.vision);
        skipped.extend(w.finish(|name| {
            // Parts of the tower LLaVA never runs, and buffers some exporters add.
            name.starts_with(&vision_prefix)
                || name.ends_with("rotary_emb.inv_freq")
                || (config.text.tie_word_embeddings && name == format!("{}.weight", n.head))
        })?);
        Ok(Self {
            config,
            quantization,
            lm,
            vision,
            vision_weights,
            skipped_tensors: skipped,
            quant_cache,
            dir: dir.to_path_buf(),
            stored_dtype,
        })
    }

    /// The multimodal config, if this is a LLaVA model.
    pub fn multimodal(&self) -> Option<&MultimodalConfig> {
        self.config.multimodal.as_ref()
    }

    /// Side of the square image the vision tower takes, if any.
    pub fn image_size(&self) -> Option<usize> {
        self.vision.as_ref().map(|v| v.tower.image_size())
    }

    /// Image embeddings per image.
    pub fn tokens_per_image(&self) -> usize {
        self.multimodal()
            .map_or(0, MultimodalConfig::tokens_per_image)
    }

    /// Float type of the weights.
    pub fn dtype(&self) -> DType {
        self.lm.dtype()
    }

    /// Number of parameters loaded (decoder, vision tower, projector); a quantised matrix counts its values.
    pub fn num_params(&self) -> (usize, usize, usize) {
        let (lm, tower, projector) = self.tally();
        (lm.params, tower.params, projector.params)
    }

    /// Bytes the weights take where they live (quantised weights at their stored size, scales included):
    /// decoder, vision tower, projector.
    pub fn weight_bytes(&self) -> (usize, usize, usize) {
        let (lm, tower, projector) = self.tally();
        (lm.bytes, tower.bytes, projector.bytes)
    }

    fn tally(&self) -> (WeightTally, WeightTally, WeightTally) {
        let of = |m: &dyn Fn(&mut WeightTally)| {
            let mut t = WeightTally::default();
            m(&mut t);
            t
        };
        let lm = of(&|t| self.lm.visit(t));
        let (tower, projector) = self.vision.as_ref().map_or_else(
            || (WeightTally::default(), WeightTally::default()),
            |v| (of(&|t| v.tower.visit(t)), of(&|t| v.projector.visit(t))),
        );
        (lm, tower, projector)
    }

    /// The selected vision hidden state, class token included: `[images, 1 + patches, vision_hidden]`.
    pub fn vision_hidden(&self, pixels: Tensor<4>) -> Result<Tensor<3>> {
        let v = self
            .vision
            .as_ref()
            .ok_or_else(|| Error::Input("this model has no vision tower".into()))?;
        Ok(v.tower.forward(pixels.cast(self.dtype())))
    }

    /// Projected image features `[images, tokens_per_image, hidden]` for pixels `[images, 3, size, size]`.
    pub fn encode_images(&self, pixels: Tensor<4>) -> Result<Tensor<3>> {
        let hidden = self.vision_hidden(pixels)?;
        let v = self.vision.as_ref().expect("checked by vision_hidden");
        let [n, t, d] = hidden.dims();
        let feats = if v.keep_cls {
            hidden
        } else {
            hidden.slice([0..n, 1..t, 0..d])
        };
        Ok(v.projector.forward(feats))
    }

    /// The id that stands for one image embedding in llava-hf prompts (`image_token_index`), if any.
    pub fn image_token(&self) -> Option<i64> {
        self.multimodal()
            .and_then(|m| m.image_token_index)
            .map(i64::from)
    }

    /// Input embeddings `[1, seq, hidden]` for ids where [`IMAGE_SLOT`] stands for one whole image and, for
    /// llava-hf checkpoints, each `image_token_index` for one image embedding, both filled in order from
    /// `images` (`[images, tokens_per_image, hidden]`). The counts must match exactly.
    pub fn embed_sequence(&self, ids: &[i64], images: Option<&Tensor<3>>) -> Result<Tensor<3>> {
        let vocab = self.lm.vocab_size() as i64;
        let image_token = self.image_token();
        let rows = images.map(|t| {
            let [n, p, d] = t.dims();
            t.clone().reshape([n * p, d])
        });
        let per_image = self.tokens_per_image();
        let available = rows.as_ref().map_or(0, |r| r.dims()[0]);
        let mut parts = Vec::new();
        let mut text: Vec<i64> = Vec::new();
        let mut used = 0usize;
        let flush = |text: &mut Vec<i64>, parts: &mut Vec<Tensor<3>>| {
            if !text.is_empty() {
                parts.push(self.embed_ids(std::mem::take(text)));
            }
        };
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            let run = if id == IMAGE_SLOT {
                per_image
            } else if Some(id) == image_token {
                ids[i..].iter().take_while(|&&x| x == id).count()
            } else {
                if !(0..vocab).contains(&id) {
                    return Err(Error::Input(format!(
                        "token id {id} at position {i} is outside the vocabulary (0..{vocab})"
                    )));
                }
                text.push(id);
                i += 1;
                continue;
            };
            if per_image == 0 {
                return Err(Error::Input(
                    "the prompt has an image slot but this model has no vision tower".into(),
                ));
            }
            if used + run > available {
                return Err(Error::Input(format!(
                    "the prompt asks for {} image embeddings but {} were given ({} per image)",
                    used + run,
                    available,
                    per_image
                )));
            }
            flush(&mut text, &mut parts);
            let r = rows.as_ref().expect("available > 0");
            parts.push(r.clone().narrow(0, used, run).unsqueeze::<3>());
            used += run;
            i += if id == IMAGE_SLOT { 1 } else { run };
        }
        flush(&mut text, &mut parts);
        if used != available {
            return Err(Error::Input(format!(
                "{} image(s) given but the prompt has room for {} image embedding(s) ({} per image)",
                available / per_image.max(1),
                used,
                per_image
            )));
        }
        if parts.is_empty() {
            return Err(Error::Input("empty prompt".into()));
        }
        Ok(Tensor::cat(parts, 1))
    }

    /// Input embeddings `[1, seq, hidden]` for generated ids: all text, even an id that is also the image
    /// token (a model may emit it; only a prompt's image tokens stand for image embeddings).
    pub fn embed_generated(&self, ids: &[u32]) -> Result<Tensor<3>> {
        let vocab = self.lm.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!(
                "generated token id {id} is outside the vocabulary (0..{vocab})"
            )));
        }
        if ids.is_empty() {
            return Err(Error::Input("no generated tokens to embed".into()));
        }
        Ok(self.embed_ids(ids.iter().map(|&id| i64::from(id)).collect()))
    }

    /// The token embeddings `[1, ids, hidden]` of ids already checked against the vocabulary.
    fn embed_ids(&self, ids: Vec<i64>) -> Tensor<3> {
        let n = ids.len();
        let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.lm_device());
        self.lm.embed(t)
    }

    /// Runs new positions through the decoder, returning logits `[1, seq, vocab]` for all of them.
    pub fn forward(&self, embeds: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        let h = self.lm.forward_embeds(embeds, cache)?;
        Ok(self.lm.logits(h))
    }

    /// Runs new positions and returns the logits of the last one only `[vocab]` (what decoding needs).
    pub fn forward_last(&self, embeds: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<1>> {
        let last = self.lm.forward_embeds_last(embeds, cache)?;
        Ok(self.lm.logits(last).flatten::<1>(0, 2))
    }

    /// A fresh KV cache for one sequence of the model's context length.
    pub fn new_cache(&self) -> KvCache {
        self.lm.new_cache(1, self.lm.max_positions())
    }

    /// The device the weights live on.
    pub fn lm_device(&self) -> Device {
        self.lm.devices().first().cloned().unwrap_or_default()
    }
}

/// Counts parameters (a quantised matrix by the values it stands for) and the bytes they are stored in.
#[derive(Default)]
struct WeightTally {
    params: usize,
    bytes: usize,
    /// (field, container type) of the modules entered.
    path: Vec<(String, String)>,
}

impl WeightTally {
    /// The field being visited, when it belongs to a quantised matrix.
    fn quantized_field(&self) -> Option<&str> {
        self.path
            .last()
            .filter(|(_, container)| container == "Struct:QuantizedMatrix")
            .map(|(field, _)| field.as_str())
    }
}

impl ModuleVisitor for WeightTally {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.bytes += n * t.dtype().size();
        if self.quantized_field().is_none() {
            self.params += n;
        }
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        let t = param.val();
        self.bytes += t.shape().num_elements() * t.dtype().size();
        if self.quantized_field() == Some("codes") {
            // `[rows, groups, bits]` codes stand for rows · groups · 32 values.
            let dims = t.dims();
            self.params += dims[0] * dims[1] * crate::quant::pack::GROUP;
        }
    }
}

fn load_vision(
    w: &mut WeightLoader,
    n: &Names,
    mm: &MultimodalConfig,
    config: &ModelConfig,
    dir: &Path,
    clip_tally: &mut Option<CacheTally>,
) -> Result<(VisionPath, VisionWeightsSource, Vec<String>)> {
    let layers = mm.vision_layers_used();
    let probe = format!("{}.embeddings.class_embedding", n.vision);
    let (tower, source, skipped) = if w.contains(&probe) {
        (
            ClipVisionTower::load(w, n.vision, &mm.vision, layers)?,
            VisionWeightsSource::Checkpoint,
            Vec::new(),
        )
    } else {
        // Not in the checkpoint: the CLIP folder named by the config (or found next to the model).
        let folder = match &mm.vision_source {
            VisionConfigSource::ClipFolder(f) => f.clone(),
            _ => find_clip_folder(mm.vision_tower_name.as_deref(), dir).ok_or_else(|| {
                Error::weights(
                    dir,
                    format!(
                        "the checkpoint has no vision tower weights and no CLIP folder was found for `{}`",
                        mm.vision_tower_name.as_deref().unwrap_or("?")
                    ),
                )
            })?,
        };
        let clip = WeightFiles::open_dir(&folder)?;
        let mut cw = clip.loader(w.device(), w.dtype());
        cw.set_quantization(w.quantization());
        cw.set_quant_cache(w.quant_cache_root());
        cw.set_progress(w.progress());
        let tower = ClipVisionTower::load(&mut cw, "vision_model", &mm.vision, layers)?;
        *clip_tally = cw.cache_tally();
        let skipped = cw.finish(|_| true)?;
        (tower, VisionWeightsSource::ClipFolder(folder), skipped)
    };
    let projector_names: Vec<String> = (0..8).map(n.projector).collect();
    let projector = Projector::load(
        w,
        &projector_names,
        mm.projector,
        mm.vision.hidden_size,
        config.text.hidden_size,
    )?;
    Ok((
        VisionPath {
            tower,
            projector,
            keep_cls: mm.select_feature == SelectFeature::ClsPatch,
        },
        source,
        skipped,
    ))
}
