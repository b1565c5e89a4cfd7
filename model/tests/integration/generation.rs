//! Generation behaviour beyond greedy parity: seeded sampling, cancellation, streaming of multi-byte
//! characters, the vision tower loaded from a separate CLIP folder, and the interactive chat.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::Stdio;

use burn::tensor::{DType, Device};
use image::DynamicImage;
use llava_med::device::{DeviceChoice, SelectedDevice};
use llava_med::engine::Engine;
use llava_med::generate::{FinishReason, Generation, PromptCache, SamplingParams};
use llava_med::imaging::load_image;
use llava_med::llava::VisionWeightsSource;
use llava_med::prompt::{PromptTokenizer, StreamDecoder};

use crate::common::{fixture, llava_med};

fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::flex(),
        dtype: DType::F32,
        kind: DeviceChoice::Cpu,
    }
}

fn ask(
    engine: &Engine,
    sampling: SamplingParams,
    stop_after: Option<usize>,
) -> (Vec<u32>, FinishReason) {
    let img = load_image(&fixture("tiny-llava-med-mistral/image.png")).unwrap();
    let mut pieces = 0;
    let g = engine
        .answer(
            &mut PromptCache::disabled(),
            engine.template,
            None,
            &[("What is shown?".into(), None)],
            &[img],
            sampling,
            16,
            |_| {
                pieces += 1;
                if stop_after.is_some_and(|n| pieces >= n) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
    (g.tokens, g.finish)
}

#[test]
fn seeded_sampling_repeats_and_cancellation_stops() {
    let engine = Engine::load(&fixture("tiny-llava-med-mistral"), cpu(), None).unwrap();
    let hot = |seed| SamplingParams {
        temperature: 1.5,
        top_p: 0.95,
        seed,
    };
    let (a, _) = ask(&engine, hot(5), None);
    let (b, _) = ask(&engine, hot(5), None);
    assert_eq!(a, b, "same seed, same tokens");
    let others: Vec<Vec<u32>> = (6..10).map(|s| ask(&engine, hot(s), None).0).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds should sample differently"
    );
    let (greedy, finish) = ask(&engine, SamplingParams::default(), None);
    assert_eq!(finish, FinishReason::Length);
    assert_eq!(greedy.len(), 16);
    let (cut, finish) = ask(&engine, SamplingParams::default(), Some(2));
    assert_eq!(finish, FinishReason::Cancelled);
    assert!(cut.len() < greedy.len() && greedy.starts_with(&cut));
}

/// One greedy answer of up to 10 tokens.
fn reply(
    engine: &Engine,
    cache: &mut PromptCache,
    turns: &[(String, Option<String>)],
    images: &[DynamicImage],
) -> Generation {
    engine
        .answer(
            cache,
            engine.template,
            None,
            turns,
            images,
            SamplingParams::default(),
            10,
            |_| ControlFlow::Continue(()),
        )
        .unwrap()
}

#[test]
fn follow_up_turns_reuse_the_prompt_cache_and_answer_the_same() {
    check_prompt_cache(cpu);
}

#[cfg(feature = "wgpu")]
#[test]
fn follow_up_turns_reuse_the_prompt_cache_on_wgpu() {
    check_prompt_cache(|| SelectedDevice {
        device: Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        dtype: DType::F32,
        kind: DeviceChoice::Wgpu,
    });
}

fn check_prompt_cache(device: impl Fn() -> SelectedDevice) {
    // An <image> slot (LLaVA-Med) and runs of image tokens (llava-hf).
    for name in ["tiny-llava-med-mistral", "tiny-llava-hf-llama"] {
        let engine = Engine::load(&fixture(name), device(), None).unwrap();
        let image = load_image(&fixture("tiny-llava-med-mistral/image.png")).unwrap();
        let mut darker = image.to_rgb8();
        darker.get_pixel_mut(0, 0).0[0] ^= 1;
        let darker = [DynamicImage::ImageRgb8(darker)];
        let image = [image];
        let per_image = engine.model.tokens_per_image();
        let mut cache = PromptCache::new();
        let mut turns = vec![("What is shown?".to_string(), None)];
        let first = reply(&engine, &mut cache, &turns, &image);
        assert_eq!(first.cached_positions, 0);
        turns[0].1 = Some(first.text.trim().to_string());
        turns.push(("Is it normal?".to_string(), None));
        let second = reply(&engine, &mut cache, &turns, &image);
        // A request that fails (an image slot with no image) leaves the cached conversation alone: the
        // same prompt again reuses all of it but its last position.
        let err = engine
            .generate_ids(
                &mut cache,
                engine.template,
                &[1, llava_med::IMAGE_SLOT, 5],
                &[],
                SamplingParams::default(),
                4,
                &[],
                |_| ControlFlow::Continue(()),
            )
            .unwrap_err();
        assert!(err.to_string().contains("image"), "{err}");
        let again = reply(&engine, &mut cache, &turns, &image);
        assert_eq!(
            again.cached_positions,
            second.prompt_positions - 1,
            "{name}"
        );
        assert_eq!(again.tokens, second.tokens);
        let fresh = reply(&engine, &mut PromptCache::disabled(), &turns, &image);
        assert_eq!(fresh.cached_positions, 0);
        assert_eq!(second.tokens, fresh.tokens, "{name}");
        assert_eq!(second.prompt_positions, fresh.prompt_positions);
        assert!(
            second.cached_positions >= first.prompt_positions
                && second.cached_positions < second.prompt_positions,
            "{name}: {} of {} positions cached (first prompt {})",
            second.cached_positions,
            second.prompt_positions,
            first.prompt_positions
        );
        // One pixel changed: nothing from the image on is reused, and the answer is the uncached one.
        let other = reply(&engine, &mut cache, &turns, &darker);
        assert!(other.cached_positions < second.prompt_positions - per_image - 2);
        let other_fresh = reply(&engine, &mut PromptCache::disabled(), &turns, &darker);
        assert_eq!(other.tokens, other_fresh.tokens, "{name}");
        // Text only after an image conversation: the cache holds nothing it can use past the template.
        let text = reply(&engine, &mut cache, &turns[1..], &[]);
        let text_fresh = reply(&engine, &mut PromptCache::disabled(), &turns[1..], &[]);
        assert_eq!(text.tokens, text_fresh.tokens, "{name}");
    }
}

#[test]
fn streaming_keeps_multibyte_characters_whole() {
    let tok = PromptTokenizer::from_dir(&fixture("tiny-tokenizer")).unwrap();
    let text = "é 中文 ünïcödé x-ray 3.5mm";
    let ids: Vec<u32> = tok.encode_text(text).unwrap().into_iter().skip(1).collect();
    let mut stream = StreamDecoder::default();
    let mut out = String::new();
    for id in ids {
        if let Some(piece) = stream.push(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
            out.push_str(&piece);
        }
    }
    assert_eq!(out, text);
}

#[test]
fn vision_tower_from_a_separate_clip_folder() {
    // Move the tower's tensors out of the checkpoint into clip-vision/ under CLIP's own names.
    let src = fixture("tiny-llava-med-mistral");
    let dir = std::env::temp_dir().join(format!("llava-med-clipfolder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("clip-vision")).unwrap();
    for f in [
        "config.json",
        "tokenizer.model",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        src.join("clip-vision/config.json"),
        dir.join("clip-vision/config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("model-00002-of-00002.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prefix = "model.vision_tower.vision_tower.";
    let (vision, rest): (Vec<_>, Vec<_>) = st
        .tensors()
        .into_iter()
        .partition(|(n, _)| n.starts_with(prefix));
    let vision: Vec<_> = vision
        .into_iter()
        .map(|(n, t)| (n[prefix.len()..].to_string(), t))
        .collect();
    std::fs::write(
        dir.join("clip-vision/model.safetensors"),
        safetensors::serialize(vision, None).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("model-00002-of-00002.safetensors"),
        safetensors::serialize(rest, None).unwrap(),
    )
    .unwrap();

    let moved = Engine::load(&dir, cpu(), None).unwrap();
    assert_eq!(
        moved.model.vision_weights,
        Some(VisionWeightsSource::ClipFolder(dir.join("clip-vision")))
    );
    let original = Engine::load(&src, cpu(), None).unwrap();
    assert_eq!(
        original.model.vision_weights,
        Some(VisionWeightsSource::Checkpoint)
    );
    assert_eq!(
        ask(&moved, SamplingParams::default(), None),
        ask(&original, SamplingParams::default(), None)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_answers_turns_and_attaches_images() {
    let dir = fixture("tiny-llava-med-mistral");
    let mut child = llava_med()
        .args([
            "chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--model",
        ])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "Is there a fracture?\n/image {}\nWhat is shown?\nAnd the size?\n/image /nonexistent.png\n/quit\n",
        dir.join("image.png").display()
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        3,
        "one answer line per question"
    );
    assert!(
        stderr.contains("image attached") && stderr.contains("/nonexistent.png"),
        "{stderr}"
    );
}
