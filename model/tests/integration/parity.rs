//! Numerical parity with transformers on the tiny random LLaVA fixtures (both layouts, LLaMA and Mistral
//! decoders, GQA, non-square image), on the CPU backend and, when built with `wgpu`, on wgpu.

use burn::tensor::{DType, Device};
use llava_med::LlavaModel;
use llava_med::generate::{GenerateParams, SamplingParams, generate, greedy_without_cache};
use llava_med::imaging::{ClipPreprocess, load_image};
use llava_med::prompt::PromptTokenizer;

use std::path::Path;

use safetensors::SafeTensors;

use crate::common::{Reference, Scratch, assert_close, copy_dir, fixture, to_vec};

fn check_fixture(name: &str, device: &Device, tol: f32) {
    check_dir(&fixture(name), device, tol);
}

fn check_dir(dir: &Path, device: &Device, tol: f32) {
    let name = &dir.display().to_string();
    let reference = Reference::open(&dir.join("reference.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let model = LlavaModel::load(dir, device, DType::F32, None).unwrap();
    let tok = PromptTokenizer::from_dir(dir).unwrap();

    // Preprocessing of the non-square image.
    let pre = ClipPreprocess::openai(model.image_size().unwrap());
    let img = load_image(&dir.join("image.png")).unwrap();
    let (want_px, _) = reference.f32("pixel_values");
    assert_close(
        &format!("{name} pixel values"),
        &pre.pixel_values(&img),
        &want_px,
        1e-5,
    );
    let pixels = pre.batch(std::slice::from_ref(&img), device);

    // Vision state of layer -2 and projected features.
    let (want_hidden, _) = reference.f32("vision_hidden_m2");
    assert_close(
        &format!("{name} vision layer -2"),
        &to_vec(model.vision_hidden(pixels.clone()).unwrap()),
        &want_hidden,
        tol,
    );
    let feats = model.encode_images(pixels).unwrap();
    let (want_feats, _) = reference.f32("image_features");
    assert_close(
        &format!("{name} image features"),
        &to_vec(feats.clone()),
        &want_feats,
        tol,
    );

    // Tokenisation with LLaVA's chunking, then logits over the expanded sequence.
    let ids = tok.encode_prompt(meta["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(ids, reference.i64("input_ids"), "{name}: prompt ids");
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            model.embed_sequence(&ids, Some(&feats)).unwrap(),
            &mut cache,
        )
        .unwrap();
    let (want_logits, shape) = reference.f32("logits");
    assert_eq!(logits.dims()[1..], shape[..], "{name}: logits shape");
    assert_close(
        &format!("{name} logits"),
        &to_vec(logits),
        &want_logits,
        tol,
    );
    let embeds = model.embed_sequence(&ids, Some(&feats)).unwrap();
    check_in_two_parts(name, &model, embeds, &want_logits, tol);

    // Greedy decoding: KV cache = full recomputation = transformers.
    check_greedy(name, &model, &tok, &ids, Some(&feats), &reference);
}

/// A prompt run as a prefix and then the rest on top of its KV cache (what the prompt cache does for a
/// follow-up turn) gives the rest's reference logits: the causal mask of a multi-position step that starts
/// after cached positions, on every backend's attention.
fn check_in_two_parts(
    name: &str,
    model: &LlavaModel,
    embeds: burn::tensor::Tensor<3>,
    want_logits: &[f32],
    tol: f32,
) {
    let [_, seq, _] = embeds.dims();
    let vocab = want_logits.len() / seq;
    for split in [1, seq / 2, seq - 2] {
        let mut cache = model.new_cache();
        model
            .forward(embeds.clone().narrow(1, 0, split), &mut cache)
            .unwrap();
        let rest = model
            .forward(embeds.clone().narrow(1, split, seq - split), &mut cache)
            .unwrap();
        assert_close(
            &format!("{name} logits after {split} cached positions"),
            &to_vec(rest),
            &want_logits[split * vocab..],
            tol,
        );
    }
}

/// KV-cached greedy decoding and greedy by recomputing the whole sequence both give the reference tokens.
fn check_greedy(
    name: &str,
    model: &LlavaModel,
    tok: &PromptTokenizer,
    ids: &[i64],
    feats: Option<&burn::tensor::Tensor<3>>,
    reference: &Reference,
) {
    let want: Vec<u32> = reference
        .i64("greedy_tokens")
        .iter()
        .map(|&t| t as u32)
        .collect();
    let params = GenerateParams {
        sampling: SamplingParams::default(),
        max_new_tokens: want.len(),
        stop_ids: vec![],
        stop_strings: vec![],
    };
    let cached = generate(model, tok, ids, feats, &params, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        cached.tokens, want,
        "{name}: KV-cached greedy tokens vs transformers"
    );
    let uncached = greedy_without_cache(model, ids, feats, want.len()).unwrap();
    assert_eq!(
        uncached, want,
        "{name}: recomputed greedy tokens vs transformers"
    );
}

#[test]
fn llava_hf_llama_matches_transformers_on_cpu() {
    check_fixture("tiny-llava-hf-llama", &Device::flex(), 1e-4);
}

/// transformers 5 saves a llava-hf model's CLIP tower as `vision_tower.*`, without the
/// `vision_tower.vision_model.*` level older versions (and the Hub's llava-hf checkpoints) have.
#[test]
fn llava_hf_saved_by_transformers_5_loads() {
    let scratch = Scratch::new("tf5-names");
    let dir = scratch.0.join("model");
    copy_dir(&fixture("tiny-llava-hf-llama"), &dir);
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            (
                name.replace("vision_tower.vision_model.", "vision_tower."),
                t,
            )
        })
        .collect();
    assert!(
        renamed
            .iter()
            .any(|(n, _)| n == "vision_tower.embeddings.class_embedding")
    );
    safetensors::serialize_to_file(renamed, None, &file).unwrap();
    check_dir(&dir, &Device::flex(), 1e-4);
}

#[test]
fn llava_original_mistral_matches_transformers_on_cpu() {
    check_fixture("tiny-llava-med-mistral", &Device::flex(), 1e-4);
}

/// llava-hf checkpoints also accept prompts where `image_token_index` is repeated once per patch.
#[test]
fn llava_hf_repeated_image_tokens_equal_image_slot() {
    let dir = fixture("tiny-llava-hf-llama");
    let reference = Reference::open(&dir.join("reference.safetensors"));
    let device = Device::flex();
    let model = LlavaModel::load(&dir, &device, DType::F32, None).unwrap();
    let img = load_image(&dir.join("image.png")).unwrap();
    let feats = model
        .encode_images(ClipPreprocess::openai(56).batch(&[img], &device))
        .unwrap();
    let expanded = reference.i64("expanded_input_ids");
    let mut cache = model.new_cache();
    let logits = model
        .forward(
            model.embed_sequence(&expanded, Some(&feats)).unwrap(),
            &mut cache,
        )
        .unwrap();
    assert_close(
        "hf expanded ids logits",
        &to_vec(logits),
        &reference.f32("logits").0,
        1e-4,
    );
    // A count that does not match the patches is an error, not a silent truncation.
    let short: Vec<i64> = expanded
        .iter()
        .copied()
        .filter(|&t| t != 420)
        .chain([420; 15])
        .collect();
    let err = model
        .embed_sequence(&short, Some(&feats))
        .unwrap_err()
        .to_string();
    assert!(err.contains("image"), "{err}");
}

#[cfg(feature = "wgpu")]
#[test]
fn parity_on_wgpu() {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    check_fixture("tiny-llava-hf-llama", &device, 1e-3);
    check_fixture("tiny-llava-med-mistral", &device, 1e-3);
    check_sliding_window(&device, 1e-3);
}

/// Mistral's sliding window (8 positions, a 28-token prompt) and multi-query attention (1 KV head), text
/// only: logits and greedy decoding through the KV cache against transformers.
fn check_sliding_window(device: &Device, tol: f32) {
    let dir = fixture("tiny-mistral-sliding");
    let reference = Reference::open(&dir.join("reference.safetensors"));
    let model = LlavaModel::load(&dir, device, DType::F32, None).unwrap();
    assert_eq!(model.config.text.sliding_window, Some(8));
    let ids = reference.i64("input_ids");
    let mut cache = model.new_cache();
    let logits = model
        .forward(model.embed_sequence(&ids, None).unwrap(), &mut cache)
        .unwrap();
    assert_close(
        "sliding-window Mistral logits",
        &to_vec(logits),
        &reference.f32("logits").0,
        tol,
    );
    let embeds = model.embed_sequence(&ids, None).unwrap();
    check_in_two_parts(
        "sliding-window Mistral",
        &model,
        embeds,
        &reference.f32("logits").0,
        tol,
    );
    let tok = PromptTokenizer::from_dir(&dir).unwrap();
    check_greedy(
        "sliding-window Mistral",
        &model,
        &tok,
        &ids,
        None,
        &reference,
    );
}

#[test]
fn sliding_window_mistral_matches_transformers_on_cpu() {
    check_sliding_window(&Device::flex(), 1e-4);
}
