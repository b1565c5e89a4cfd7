//! `llava-med bench`: load time, vision-tower time, prefill and decode throughput at several contexts, time
//! to first token and peak memory, as one JSON object with the schema `bench/torch_reference.py` prints, so
//! `bench/compare` can put the two side by side. Every figure is the median (with min and max) of timed
//! runs after one untimed warm-up.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::{Sampler, SamplingParams, next_token, step};
use crate::llava::{IMAGE_SLOT, LlavaModel};
use crate::lm::KvCache;

/// The named shapes (llava-hf configs): `tiny`, `base`, `7b`.
pub const SHAPES_JSON: &str = include_str!("../../bench/shapes.json");

/// Contexts at which decoding is timed by default.
pub const DECODE_CONTEXTS: [usize; 3] = [128, 512, 2048];

/// Text tokens of "one image + a 30-word question" after the image (a 30-word question is ~45 tokens).
const QUESTION_TOKENS: usize = 45;

/// The config of a named shape.
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let origin = Path::new("bench/shapes.json");
    let shapes: Value = serde_json::from_str(SHAPES_JSON)
        .map_err(|e| Error::config(origin, format!("not JSON: {e}")))?;
    let known: Vec<&str> = shapes
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !k.starts_with('_'))
                .map(String::as_str)
                .collect()
        })
        .unwrap_or_default();
    let value = shapes
        .get(name)
        .filter(|_| !name.starts_with('_'))
        .ok_or_else(|| {
            Error::Input(format!(
                "unknown shape `{name}` (known: {})",
                known.join(", ")
            ))
        })?;
    ModelConfig::from_value(value, Path::new("."), origin)
}

/// The fewest positions `bench` needs for `config`: the prefill prompt (and its next token) and, when the
/// model takes images, the time-to-first-token conversation (one image and a 45-token question, then a
/// 45-token follow-up question after them).
pub fn min_context(config: &ModelConfig, options: &BenchOptions) -> usize {
    let ttft = config
        .multimodal
        .as_ref()
        .map_or(0, |mm| 1 + mm.tokens_per_image() + 2 * QUESTION_TOKENS);
    (options.prompt_tokens + 1).max(ttft)
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt length for the prefill figure.
    pub prompt_tokens: usize,
    /// Tokens decoded per decode run.
    pub new_tokens: usize,
    /// Timed runs of each measurement.
    pub runs: usize,
    /// Contexts at which decoding is timed (those that do not fit the model's context are skipped).
    pub contexts: Vec<usize>,
}

impl BenchOptions {
    /// The longest decode context asked for, with its new tokens.
    pub fn longest_decode(&self) -> usize {
        self.contexts.iter().max().copied().unwrap_or(0) + self.new_tokens
    }
}

/// Median, min and max of timings (at least one), as `bench` reports each figure.
pub fn stats(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    json!({"median": median, "min": xs[0], "max": xs[n - 1]})
}

/// Runs `f` once untimed, then `runs` times, returning what it reports per run.
fn timed(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    f()?;
    (0..runs.max(1)).map(|_| f()).collect()
}

/// Random text ids, avoiding the lowest ids (special tokens) and the top of the vocabulary.
fn random_ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<i64> {
    (0..n)
        .map(|_| rng.random_range(3..vocab.saturating_sub(2).max(4)) as i64)
        .collect()
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
pub fn peak_host_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// Measures `model` (loaded in `load_s` seconds). The vision and TTFT figures need a vision tower.
pub fn run(model: &LlavaModel, load_s: f64, options: &BenchOptions) -> Result<Value> {
    let device = model.lm_device();
    let vocab = model.config.text.vocab_size;
    let capacity = model.lm.max_positions();
    let mut rng = StdRng::seed_from_u64(0);
    let greedy = SamplingParams::default();
    // What the device's allocator holds, sampled after each measurement (pools only grow, so the last
    // samples are the peak); `None` on backends that do not report it (the CPU).
    let device_peak = std::cell::Cell::new(None::<u64>);
    let sample = || {
        if let Some(u) = device.memory_pool_usage() {
            device_peak.set(Some(device_peak.get().unwrap_or(0).max(u.bytes_reserved)));
        }
    };
    sample();

    let image = model.image_size().map(|size| {
        Tensor::<4>::random([1, 3, size, size], Distribution::Normal(0.0, 1.0), &device)
    });
    let vision_ms = match &image {
        Some(pixels) => Some(stats(timed(options.runs, || {
            let start = Instant::now();
            let features = model.encode_images(pixels.clone())?;
            // Reading one value back waits for the device.
            let _ = features.sum().into_data();
            let ms = start.elapsed().as_secs_f64() * 1e3;
            sample();
            Ok(ms)
        })?)),
        None => None,
    };
    // Progress on stderr (`LLAVA_MED_LOG=llava_med=info`): a run stopped by an outer time limit still
    // shows what it had measured.
    tracing::info!(vision_ms = ?vision_ms, "bench: vision tower measured");

    let n = options.prompt_tokens.min(capacity.saturating_sub(1)).max(1);
    let prompt = random_ids(&mut rng, n, vocab);
    let prefill = stats(timed(options.runs, || {
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.forward_last(model.embed_sequence(&prompt, None)?, &mut cache)?;
        next_token(logits, &mut Sampler::new(greedy.clone()));
        let rate = n as f64 / start.elapsed().as_secs_f64();
        sample();
        Ok(rate)
    })?);
    tracing::info!(tokens = n, tokens_per_s = %prefill, "bench: prefill measured");

    let mut decode = Vec::new();
    for &context in &options.contexts {
        if context + options.new_tokens > capacity {
            continue;
        }
        let ids = random_ids(&mut rng, context, vocab);
        let mut ms_per_token = Vec::new();
        let tokens_per_s = timed(options.runs, || {
            let mut cache = model.new_cache();
            let mut sampler = Sampler::new(greedy.clone());
            let mut logits = model.forward_last(model.embed_sequence(&ids, None)?, &mut cache)?;
            let mut token = next_token(logits, &mut sampler);
            let start = Instant::now();
            for _ in 0..options.new_tokens {
                logits = step(model, &mut cache, token)?;
                token = next_token(logits, &mut sampler);
            }
            let s = start.elapsed().as_secs_f64();
            sample();
            ms_per_token.push(s * 1e3 / options.new_tokens as f64);
            Ok(options.new_tokens as f64 / s)
        })?;
        // The warm-up run's figure is not reported.
        ms_per_token.remove(0);
        tracing::info!(context, ms_per_token = ?ms_per_token, "bench: decode measured");
        decode.push(
            json!({"context": context, "tokens_per_s": stats(tokens_per_s),
                           "ms_per_token": stats(ms_per_token)}),
        );
    }

    // Time to first token for one image + a question, and for a follow-up question in the same
    // conversation: the image and first question already in the KV cache (what `PromptCache` keeps
    // between requests), so only the new question is computed.
    let (ttft_ms, ttft_follow_up_ms) = match &image {
        Some(pixels) => {
            let mut ids = vec![1, IMAGE_SLOT];
            ids.extend(random_ids(&mut rng, QUESTION_TOKENS, vocab));
            let follow_up = random_ids(&mut rng, QUESTION_TOKENS, vocab);
            // Runs `embeds` on `cache` to the first token's id; milliseconds since `start`.
            let first_token = |embeds, cache: &mut KvCache, start: Instant| -> Result<f64> {
                let logits = model.forward_last(embeds, cache)?;
                next_token(logits, &mut Sampler::new(greedy.clone()));
                let ms = start.elapsed().as_secs_f64() * 1e3;
                sample();
                Ok(ms)
            };
            let ttft = stats(timed(options.runs, || {
                let start = Instant::now();
                let features = model.encode_images(pixels.clone())?;
                let embeds = model.embed_sequence(&ids, Some(&features))?;
                first_token(embeds, &mut model.new_cache(), start)
            })?);
            let mut cache = model.new_cache();
            let features = model.encode_images(pixels.clone())?;
            model.forward_last(model.embed_sequence(&ids, Some(&features))?, &mut cache)?;
            let first_turn = cache.len();
            let follow = stats(timed(options.runs, || {
                cache.truncate(first_turn);
                let start = Instant::now();
                first_token(model.embed_sequence(&follow_up, None)?, &mut cache, start)
            })?);
            tracing::info!(ttft_ms = %ttft, follow_up_ms = %follow, "bench: time to first token measured");
            (Some(ttft), Some(follow))
        }
        None => (None, None),
    };

    let (lm, tower, projector) = model.num_params();
    let (lm_b, tower_b, projector_b) = model.weight_bytes();
    let mb = |b: usize| b as f64 / 1e6;
    Ok(json!({
        "implementation": "llava-med",
        "params": {"language_model": lm, "vision_tower": tower, "projector": projector},
        "weight_mb": {"language_model": mb(lm_b), "vision_tower": mb(tower_b), "projector": mb(projector_b)},
        "runs": options.runs,
        "new_tokens": options.new_tokens,
        "prompt_tokens": n,
        "load_s": load_s,
        "vision_ms": vision_ms,
        "prefill_tokens_per_s": prefill,
        "decode": decode,
        "ttft_ms": ttft_ms,
        "ttft_follow_up_ms": ttft_follow_up_ms,
        "peak_host_mb": peak_host_mb(),
        "peak_device_mb": device_peak.get().map(|b| b as f64 / 1e6),
        "cpu_paths": crate::kernels::cpu_paths(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_parse_to_the_intended_models() {
        let c = shape_config("7b").unwrap();
        assert_eq!(
            (
                c.text.hidden_size,
                c.text.num_layers,
                c.text.num_kv_heads,
                c.text.intermediate_size
            ),
            (4096, 32, 8, 14336)
        );
        let mm = c.multimodal.as_ref().unwrap();
        assert_eq!((mm.vision.image_size, mm.vision.patch_size), (336, 14));
        assert_eq!(mm.tokens_per_image(), 576);
        let options = BenchOptions {
            prompt_tokens: 16,
            new_tokens: 8,
            runs: 1,
            contexts: DECODE_CONTEXTS.to_vec(),
        };
        // <s>, 576 image positions and the question: what the 7B time to first token prefills; then the
        // follow-up question.
        assert_eq!(min_context(&c, &options), 622 + 45);
        let b = shape_config("base").unwrap();
        assert_eq!(min_context(&b, &options), 242 + 45);
        assert_eq!(b.multimodal.unwrap().tokens_per_image(), 196);
        assert!(
            shape_config("huge")
                .unwrap_err()
                .to_string()
                .contains("tiny")
        );
        assert!(shape_config("_comment").is_err());
    }

    #[test]
    fn the_tiny_shape_runs_every_measurement() {
        let device = burn::tensor::Device::default();
        let model = LlavaModel::random(
            shape_config("tiny").unwrap(),
            &device,
            burn::tensor::DType::F32,
            Some(600),
            crate::quant::Quantization::None,
        )
        .unwrap();
        let opts = BenchOptions {
            prompt_tokens: 64,
            new_tokens: 4,
            runs: 2,
            contexts: DECODE_CONTEXTS.to_vec(),
        };
        let r = run(&model, 0.0, &opts).unwrap();
        // 2048 does not fit a 600-position context: skipped, not faked.
        let contexts: Vec<u64> = r["decode"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["context"].as_u64().unwrap())
            .collect();
        assert_eq!(contexts, [128, 512]);
        for key in [
            "vision_ms",
            "prefill_tokens_per_s",
            "ttft_ms",
            "ttft_follow_up_ms",
        ] {
            let s = &r[key];
            assert!(s["min"].as_f64().unwrap() > 0.0, "{key}: {s}");
            assert!(s["min"].as_f64() <= s["median"].as_f64(), "{key}");
            assert!(s["median"].as_f64() <= s["max"].as_f64(), "{key}");
        }
        assert_eq!(r["prompt_tokens"], 64);
        // The CPU kernels' instruction sets are named, as found on this machine.
        let paths: Vec<&str> = r["cpu_paths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(paths, crate::kernels::cpu_paths());
        assert_eq!(paths.contains(&"avx512f"), crate::kernels::has_avx512f());
        // GPU backends report their allocator's memory (wgpu here when built with it); the CPU does not.
        match device.memory_pool_usage() {
            Some(_) => assert!(r["peak_device_mb"].as_f64().unwrap() > 0.0, "{r}"),
            None => assert!(r["peak_device_mb"].is_null(), "{r}"),
        }
    }
}
