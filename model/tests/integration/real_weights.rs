//! Real trained weights: SmolLM2-135M-Instruct (LLaMA architecture, tied embeddings, byte-level BPE),
//! converted from its GGUF release by `scripts/fetch-test-data.sh`, against transformers.

use std::ops::ControlFlow;

use burn::tensor::{DType, Device};
use llava_med::device::{DeviceChoice, SelectedDevice};
use llava_med::engine::Engine;
use llava_med::generate::{PromptCache, SamplingParams};
use llava_med::prompt::Template;

use crate::common::{Reference, assert_close, fixture, llava_med, required_test_data, to_vec};

fn engine() -> Option<Engine> {
    let dir = required_test_data("smollm2-135m-instruct")?;
    let device = SelectedDevice {
        device: Device::flex(),
        dtype: DType::F32,
        kind: DeviceChoice::Cpu,
    };
    Some(Engine::load(&dir, device, Some(256)).unwrap())
}

#[test]
fn smollm2_logits_match_transformers() {
    let Some(engine) = engine() else { return };
    let reference = Reference::open(&fixture("smollm2/reference.safetensors"));
    let ids = reference.i64("input_ids");
    let mut cache = engine.model.new_cache();
    let logits = engine
        .model
        .forward(engine.model.embed_sequence(&ids, None).unwrap(), &mut cache)
        .unwrap();
    assert_close(
        "SmolLM2 logits",
        &to_vec(logits),
        &reference.f32("logits").0,
        1e-3,
    );
}

#[test]
fn smollm2_answers_the_capital_of_france() {
    let Some(engine) = engine() else { return };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/reference.json")).unwrap())
            .unwrap();
    let chat = &meta["chat"];
    let system = chat["system_prompt_inserted"].as_str();
    let turns = vec![("What is the capital of France?".to_string(), None)];
    let rendered = Template::ChatMl.render(system, &turns);
    assert_eq!(
        rendered,
        chat["prompt"].as_str().unwrap(),
        "ChatML rendering"
    );
    let want_ids: Vec<i64> = serde_json::from_value(chat["input_ids"].clone()).unwrap();
    assert_eq!(
        engine.tokenizer.encode_prompt(&rendered).unwrap(),
        want_ids,
        "ChatML prompt ids"
    );
    let mut streamed = String::new();
    let g = engine
        .answer(
            &mut PromptCache::disabled(),
            Template::ChatMl,
            system,
            &turns,
            &[],
            SamplingParams::default(),
            32,
            |p| {
                streamed.push_str(p);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(g.text.trim(), "The capital of France is Paris.");
    let want: Vec<u32> = serde_json::from_value(chat["generated_ids"].clone()).unwrap();
    assert_eq!(
        g.tokens,
        want[..want.len() - 1],
        "greedy ids (reference ends with <|im_end|>)"
    );
    assert_eq!(streamed, g.text);
}

/// Loading converts tensor by tensor and releases the mapped file pages: the peak resident memory of a
/// process that loads the model stays near the model's size, not twice it.
#[cfg(target_os = "linux")]
#[test]
fn loading_peak_memory_stays_near_model_size() {
    let Some(dir) = required_test_data("smollm2-135m-instruct") else {
        return;
    };
    let model_bytes = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len() as f64;
    let out = llava_med()
        .args(["inspect", "--device", "cpu", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    // The child's own high-water mark (`VmHWM`), which `inspect` prints. Not the parent's rusage of its
    // children: a child spawned while this test process is large starts out sharing its pages, and that
    // pre-exec size counts in the child's rusage (1.5 and 1.7 GB were seen that way while another test ran).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mb: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak memory:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory line in: {stdout}"));
    let peak = mb * 1e6;
    eprintln!(
        "peak RSS while loading SmolLM2: {:.0} MB for {:.0} MB of f32 weights ({:.2}x)",
        peak / 1e6,
        model_bytes / 1e6,
        peak / model_bytes
    );
    assert!(
        peak < 1.5 * model_bytes,
        "peak {peak} bytes for a {model_bytes}-byte model"
    );
}
