//! Text generation: one prefill over the prompt, then KV-cached decoding one token at a time, with
//! sampling, stop conditions, a streaming callback and cancellation.

pub mod prompt_cache;
pub mod sampling;
pub mod stop;

use std::ops::ControlFlow;

use burn::tensor::{DType, Tensor};

pub use prompt_cache::{ImageFingerprint, PromptCache, PromptLayout};
pub use sampling::{Sampler, SamplingParams, argmax};
pub use stop::StopScanner;

use crate::error::Result;
use crate::llava::LlavaModel;
use crate::lm::KvCache;
use crate::prompt::{PromptTokenizer, StreamDecoder};

/// Limits and stop conditions of one generation.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Sampling.
    pub sampling: SamplingParams,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Token ids that end the answer (not emitted).
    pub stop_ids: Vec<u32>,
    /// Strings that end the answer (cut from the text).
    pub stop_strings: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id or stop string.
    Stop,
    /// `max_new_tokens` or the context was reached.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (the stop id excluded).
    pub tokens: Vec<u32>,
    /// Their text (stop string cut).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt length in positions (image embeddings included).
    pub prompt_positions: usize,
    /// Of those, positions taken from a [`PromptCache`] instead of computed.
    pub cached_positions: usize,
}

/// Generates from ids (with [`crate::llava::IMAGE_SLOT`]s) and projected image features, calling
/// `on_text` after every token with the new text (possibly empty: a partial character, or text that may
/// start a stop string, is held back); returning `ControlFlow::Break` from it cancels. The pieces add up to
/// the returned text.
pub fn generate(
    model: &LlavaModel,
    tokenizer: &PromptTokenizer,
    ids: &[i64],
    images: Option<&Tensor<3>>,
    params: &GenerateParams,
    on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut cache = model.new_cache();
    let embeds = model.embed_sequence(ids, images)?;
    generate_after(model, tokenizer, &mut cache, embeds, params, on_text)
}

/// [`generate`] for a prompt whose first `cache.len()` positions are already in `cache` (see
/// [`PromptCache`]) and whose remaining positions are `embeds` (`[1, seq, hidden]`).
pub fn generate_after(
    model: &LlavaModel,
    tokenizer: &PromptTokenizer,
    cache: &mut KvCache,
    embeds: Tensor<3>,
    params: &GenerateParams,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let cached_positions = cache.len();
    let prompt_positions = cached_positions + embeds.dims()[1];
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut stream = StreamDecoder::default();
    let mut tokens = Vec::new();
    let mut logits = model.forward_last(embeds, cache)?;
    let mut stops = StopScanner::new(&params.stop_strings);
    let finish = loop {
        if tokens.len() >= params.max_new_tokens {
            break FinishReason::Length;
        }
        let next = next_token(logits, &mut sampler);
        if params.stop_ids.contains(&next) {
            break FinishReason::Stop;
        }
        tokens.push(next);
        let safe = match stream.push(tokenizer, next)? {
            Some(piece) => {
                let (safe, stopped) = stops.push(&piece);
                if stopped {
                    if !safe.is_empty() {
                        let _ = on_text(&safe);
                    }
                    break FinishReason::Stop;
                }
                safe
            }
            None => String::new(),
        };
        // Called after every token, even without new text, so cancellation is noticed at once.
        if on_text(&safe).is_break() {
            break FinishReason::Cancelled;
        }
        if cache.len() + 1 > cache.capacity() {
            break FinishReason::Length;
        }
        logits = step(model, cache, next)?;
    };
    // Text held back as a possible stop string's start was not one after all.
    let rest = stops.finish();
    if !rest.is_empty() && finish != FinishReason::Cancelled {
        let _ = on_text(&rest);
    }
    let text = stops.text().to_string();
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_positions,
        cached_positions,
    })
}

/// Greedy ids by recomputing the whole sequence each step, without the KV cache (a reference for tests).
pub fn greedy_without_cache(
    model: &LlavaModel,
    ids: &[i64],
    images: Option<&Tensor<3>>,
    n: usize,
) -> Result<Vec<u32>> {
    let prompt = model.embed_sequence(ids, images)?;
    let mut out = Vec::new();
    for _ in 0..n {
        let mut cache = model.new_cache();
        let embeds = if out.is_empty() {
            prompt.clone()
        } else {
            Tensor::cat(vec![prompt.clone(), model.embed_generated(&out)?], 1)
        };
        let next = argmax(&host_logits(model.forward_last(embeds, &mut cache)?));
        out.push(next);
    }
    Ok(out)
}

/// The next token: greedy picks the argmax on the device and reads back only its id; sampling needs the
/// logits on the host.
pub fn next_token(logits: Tensor<1>, sampler: &mut Sampler) -> u32 {
    if sampler.is_greedy() {
        let id = logits
            .argmax(0)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("one argmax id");
        return u32::try_from(id[0]).expect("a vocabulary id");
    }
    sampler.sample(&host_logits(logits))
}

/// Runs one new token through the model, returning the logits of the next position.
pub fn step(model: &LlavaModel, cache: &mut KvCache, token: u32) -> Result<Tensor<1>> {
    model.forward_last(model.embed_generated(&[token])?, cache)
}

fn host_logits(logits: Tensor<1>) -> Vec<f32> {
    logits
        .cast(DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 logits")
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::bench::shape_config;
    use crate::quant::Quantization;

    /// A model may emit its own image token; decoding embeds it as text (it used to be taken for an image
    /// slot and stop generation with "the prompt asks for 1 image embeddings but 0 were given").
    #[test]
    fn a_generated_image_token_is_decoded_as_text() {
        let device = Device::default();
        let model = LlavaModel::random(
            shape_config("tiny").unwrap(),
            &device,
            DType::F32,
            Some(64),
            Quantization::None,
        )
        .unwrap();
        let image_token = model.multimodal().unwrap().image_token_index.unwrap();
        let vocab = model.lm.vocab_size();
        let mut cache = model.new_cache();
        model
            .forward_last(model.embed_sequence(&[1, 5, 6], None).unwrap(), &mut cache)
            .unwrap();
        let logits = step(&model, &mut cache, image_token).unwrap();
        assert_eq!(logits.dims(), [vocab]);
        let err = step(&model, &mut cache, vocab as u32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
        let ids = greedy_without_cache(&model, &[1, 5, 6], None, 3).unwrap();
        assert_eq!(ids.len(), 3);
    }
}
