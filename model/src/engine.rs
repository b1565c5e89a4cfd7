//! A loaded model with its tokenizer, template and preprocessing: what the CLI, the server and the app
//! share to turn (images, conversation) into generated text.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::Tensor;
use image::DynamicImage;

use crate::config::DecoderKind;
use crate::device::SelectedDevice;
use crate::error::{Error, Result};
use crate::generate::{
    self, GenerateParams, Generation, ImageFingerprint, PromptCache, PromptLayout, SamplingParams,
};
use crate::imaging::ClipPreprocess;
use crate::llava::{LlavaModel, LoadOptions};
use crate::prompt::{IMAGE_PLACEHOLDER, PromptTokenizer, Template, with_image};
use crate::quant::Quantization;

/// Model + tokenizer + template.
pub struct Engine {
    /// The model.
    pub model: LlavaModel,
    /// Its tokenizer.
    pub tokenizer: PromptTokenizer,
    /// The conversation template used unless a request names another.
    pub template: Template,
    /// Where it runs.
    pub device: SelectedDevice,
}

impl Engine {
    /// Loads the model folder `dir` on `device`; `context` overrides the context length.
    pub fn load(dir: &Path, device: SelectedDevice, context: Option<usize>) -> Result<Self> {
        Self::load_quantized(dir, device, context, Quantization::None, None)
    }

    /// [`Engine::load`] with the weight matrices quantised, kept between loads under `quant_cache` when
    /// given (see [`LlavaModel::load_quantized`]).
    pub fn load_quantized(
        dir: &Path,
        device: SelectedDevice,
        context: Option<usize>,
        quantization: Quantization,
        quant_cache: Option<&Path>,
    ) -> Result<Self> {
        let options = LoadOptions {
            max_context: context,
            quantization,
            quant_cache: quant_cache.map(Path::to_path_buf),
            ..LoadOptions::default()
        };
        Self::load_with(dir, device, &options)
    }

    /// Loads the model folder `dir` on `device` as `options` say ([`LlavaModel::load_with`]).
    pub fn load_with(dir: &Path, device: SelectedDevice, options: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::config(dir, "model folder not found"));
        }
        let tokenizer = PromptTokenizer::from_dir(dir)?;
        let model = LlavaModel::load_with(dir, &device.device, device.dtype, options)?;
        let template = Template::default_for(
            &model.config.model_type,
            model.config.text.kind == DecoderKind::Mistral,
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            device,
        })
    }

    /// The preprocessing of this model's vision tower.
    pub fn preprocess(&self) -> Option<ClipPreprocess> {
        self.model.image_size().map(ClipPreprocess::openai)
    }

    /// Projected features `[images, tokens, hidden]` for decoded images (`None` for no images).
    pub fn encode_images(&self, images: &[DynamicImage]) -> Result<Option<Tensor<3>>> {
        if images.is_empty() {
            return Ok(None);
        }
        let pre = self
            .preprocess()
            .ok_or_else(|| Error::Input("this model takes no images (text-only)".into()))?;
        let pixels = pre.batch(images, &self.device.device);
        Ok(Some(self.model.encode_images(pixels)?))
    }

    /// Ids that end an answer: the config's EOS ids plus the template's end-of-turn token.
    pub fn stop_ids(&self, template: Template) -> Vec<u32> {
        let mut ids = self.model.config.text.eos_token_ids.clone();
        for s in template.stop_strings() {
            if let Some(id) = self.tokenizer.token_id(s) {
                ids.push(id);
            }
        }
        ids
    }

    /// Prompt ids for a conversation; with images, `<image>` goes at the front of the first user turn unless
    /// some turn already places it.
    pub fn conversation_ids(
        &self,
        template: Template,
        system: Option<&str>,
        turns: &[(String, Option<String>)],
        with_images: bool,
    ) -> Result<Vec<i64>> {
        let mut turns = turns.to_vec();
        let placed = turns.iter().any(|(u, _)| u.contains(IMAGE_PLACEHOLDER));
        if with_images
            && !placed
            && let Some(first) = turns.first_mut()
        {
            first.0 = with_image(&first.0);
        }
        let text = template.render(system, &turns);
        let ids = self.tokenizer.encode_prompt(&text)?;
        let positions = self.prompt_positions(&ids);
        if positions >= self.model.lm.max_positions() {
            return Err(Error::ContextOverflow {
                needed: positions,
                capacity: self.model.lm.max_positions(),
            });
        }
        Ok(ids)
    }

    /// Positions prompt ids take in the context: each image slot stands for all of an image's embeddings.
    pub fn prompt_positions(&self, ids: &[i64]) -> usize {
        let slots = ids.iter().filter(|&&i| i == crate::IMAGE_SLOT).count();
        ids.len() + slots * self.model.tokens_per_image().saturating_sub(1)
    }

    /// Answers the last turn of a conversation, streaming text to `on_text`; `cache` holds what an earlier
    /// request computed (see [`PromptCache`]).
    #[allow(clippy::too_many_arguments)]
    pub fn answer(
        &self,
        cache: &mut PromptCache,
        template: Template,
        system: Option<&str>,
        turns: &[(String, Option<String>)],
        images: &[DynamicImage],
        sampling: SamplingParams,
        max_new_tokens: usize,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let ids = self.conversation_ids(template, system, turns, !images.is_empty())?;
        self.generate_ids(
            cache,
            template,
            &ids,
            images,
            sampling,
            max_new_tokens,
            &[],
            on_text,
        )
    }

    /// Generates from prompt ids (see [`Engine::conversation_ids`]) and the images that fill their slots,
    /// stopping at the model's end ids, the template's stop strings and `extra_stops`. Positions `cache`
    /// already holds for the same ids and images are not computed again, nor the images whose positions
    /// all lie among them.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_ids(
        &self,
        cache: &mut PromptCache,
        template: Template,
        ids: &[i64],
        images: &[DynamicImage],
        sampling: SamplingParams,
        max_new_tokens: usize,
        extra_stops: &[String],
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut stop_strings: Vec<String> = template
            .stop_strings()
            .iter()
            .map(|s| s.to_string())
            .collect();
        stop_strings.extend(extra_stops.iter().cloned());
        let params = GenerateParams {
            sampling,
            max_new_tokens,
            stop_ids: self.stop_ids(template),
            stop_strings,
        };
        let fingerprints: Vec<ImageFingerprint> = images.iter().map(ImageFingerprint::of).collect();
        let layout = PromptLayout::new(
            ids,
            &fingerprints,
            self.model.tokens_per_image(),
            self.model.image_token(),
        );
        let reuse = cache.reuse(layout.as_ref());
        let features = self.encode_images(&images[reuse.images..])?;
        let embeds = self
            .model
            .embed_sequence(&ids[reuse.id..], features.as_ref())?;
        // Taken only now: a request that fails on its images or ids leaves every slot as it was.
        let mut kv = cache.take(&reuse, || self.model.new_cache());
        let generation = generate::generate_after(
            &self.model,
            &self.tokenizer,
            &mut kv,
            embeds,
            &params,
            on_text,
        )?;
        if let Some(layout) = layout {
            cache.store(kv, layout, &generation.tokens);
        }
        Ok(generation)
    }
}
