//! Weight-only quantisation (`--quant int8|int4`) against full precision: greedy-token agreement
//! (teacher-forced: the quantised model predicts each next token of the full-precision answer), the logit
//! error on those positions, and the weight memory saved.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::{DType, Device};
use llava_med::device::{DeviceChoice, SelectedDevice};
use llava_med::engine::Engine;
use llava_med::generate::{SamplingParams, argmax};
use llava_med::imaging::load_image;
use llava_med::quant::Quantization;

use crate::common::{fixture, required_test_data, to_vec};

fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::flex(),
        dtype: DType::F32,
        kind: DeviceChoice::Cpu,
    }
}

/// One prompt: (question, with the fixture's image).
type Prompt = (&'static str, bool);

struct Agreement {
    agreed: usize,
    total: usize,
    /// Largest |quantised − full| logit on the compared positions, relative to the largest |full| logit.
    max_rel_logit_error: f32,
}

/// Teacher-forced agreement of `quant` with full precision over `n` greedy tokens per prompt.
fn agreement(dir: &Path, prompts: &[Prompt], n: usize, quant: Quantization) -> Agreement {
    let full = Engine::load(dir, cpu(), Some(512)).unwrap();
    let q = Engine::load_quantized(dir, cpu(), Some(512), quant).unwrap();
    let mut out = Agreement {
        agreed: 0,
        total: 0,
        max_rel_logit_error: 0.0,
    };
    for &(question, with_image) in prompts {
        let images: Vec<_> = if with_image {
            vec![load_image(&dir.join("image.png")).unwrap()]
        } else {
            Vec::new()
        };
        let turns = [(question.to_string(), None)];
        let answer = full
            .answer(
                full.template,
                None,
                &turns,
                &images,
                SamplingParams::default(),
                n,
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
        let mut ids = full
            .conversation_ids(full.template, None, &turns, with_image)
            .unwrap();
        ids.extend(answer.tokens.iter().map(|&t| i64::from(t)));
        let logits = |e: &Engine| {
            let features = e.encode_images(&images).unwrap();
            let mut cache = e.model.new_cache();
            let embeds = e.model.embed_sequence(&ids, features.as_ref()).unwrap();
            let l = e.model.forward(embeds, &mut cache).unwrap();
            let [_, s, v] = l.dims();
            (to_vec(l), s, v)
        };
        let (lf, s, v) = logits(&full);
        let (lq, _, _) = logits(&q);
        // Position s - 1 - k predicts answer token len - k (the last answer token is not predicted from).
        let k = answer.tokens.len();
        for (i, &token) in answer.tokens.iter().enumerate() {
            let p = s - 1 - k + i;
            let (rf, rq) = (&lf[p * v..(p + 1) * v], &lq[p * v..(p + 1) * v]);
            assert_eq!(
                argmax(rf),
                token,
                "full precision reproduces its own answer"
            );
            out.agreed += usize::from(argmax(rq) == token);
            out.total += 1;
            let scale = rf.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            let err = rf
                .iter()
                .zip(rq)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            out.max_rel_logit_error = out.max_rel_logit_error.max(err / scale);
        }
    }
    out
}

fn report(name: &str, quant: Quantization, a: &Agreement) -> f64 {
    let rate = a.agreed as f64 / a.total as f64;
    eprintln!(
        "quantisation {name} {quant}: greedy-token agreement {}/{} = {:.1} %, max relative logit error {:.4}",
        a.agreed,
        a.total,
        rate * 100.0,
        a.max_rel_logit_error
    );
    rate
}

#[test]
fn smollm2_quantised_keeps_its_greedy_tokens() {
    let Some(dir) = required_test_data("smollm2-135m-instruct") else {
        return;
    };
    let prompts: [Prompt; 4] = [
        ("What is the capital of France?", false),
        ("Name three organs of the human body.", false),
        ("Explain what an X-ray is in one sentence.", false),
        ("Write a haiku about the sea.", false),
    ];
    let int8 = report(
        "SmolLM2",
        Quantization::Int8,
        &agreement(&dir, &prompts, 32, Quantization::Int8),
    );
    let int4 = report(
        "SmolLM2",
        Quantization::Int4,
        &agreement(&dir, &prompts, 32, Quantization::Int4),
    );
    // Measured: int8 98.8 %, int4 69 % (the goals are 99 % and 95 %; see BENCHMARKS.md). These
    // bounds catch a broken quantiser (a wrong block layout or scale gives well under half).
    assert!(int8 >= 0.97, "int8 agreement {int8}");
    assert!(int4 >= 0.6, "int4 agreement {int4}");
}

#[test]
fn fixture_models_quantised_keep_their_greedy_tokens() {
    let mut rates = Vec::new();
    for name in ["tiny-llava-med-mistral", "tiny-llava-hf-llama"] {
        let dir = fixture(name);
        let prompts: [Prompt; 3] = [
            ("What is shown in this image?", true),
            ("Is there an abnormality?", true),
            ("Describe the findings.", true),
        ];
        let int8 = report(
            name,
            Quantization::Int8,
            &agreement(&dir, &prompts, 24, Quantization::Int8),
        );
        let int4 = report(
            name,
            Quantization::Int4,
            &agreement(&dir, &prompts, 24, Quantization::Int4),
        );
        rates.push((name, int8, int4));
    }
    // Random tiny models have nearly tied logits, the hardest case for rounding; measured bounds as above.
    for (name, int8, int4) in rates {
        assert!(int8 >= 0.95, "{name}: int8 agreement {int8}");
        assert!(int4 >= 0.4, "{name}: int4 agreement {int4}");
    }
}

/// Bytes a model of `config` takes with the decoder's linear layers at `bits` per weight and everything
/// else in f16: what `weight_bytes` must report.
fn expected_bytes(
    lm: usize,
    vision: usize,
    projector: usize,
    hidden: usize,
    vocab: usize,
    layers: usize,
    bits: f64,
) -> f64 {
    let floats = vocab * hidden + (2 * layers + 1) * hidden;
    (lm - floats) as f64 * bits / 8.0 + (floats + vision + projector) as f64 * 2.0
}

#[test]
fn quantisation_cuts_the_weight_memory() {
    // The `base` shape in f16 with random weights, measured; the fractions for 7B follow from the same
    // accounting (BENCHMARKS.md).
    let config = llava_med::bench::shape_config("base").unwrap();
    let t = &config.text;
    let device = Device::flex();
    for (q, bits) in [
        (Quantization::None, 16.0),
        (Quantization::Int8, 8.0 + 32.0 / 128.0),
        (Quantization::Int4, 4.0 + 32.0 / 32.0),
    ] {
        let m = llava_med::LlavaModel::random(config.clone(), &device, DType::F16, Some(64), q)
            .unwrap();
        let (lm, vision, projector) = m.num_params();
        let (a, b, c) = m.weight_bytes();
        let got = (a + b + c) as f64;
        let want = expected_bytes(
            lm,
            vision,
            projector,
            t.hidden_size,
            t.vocab_size,
            t.num_layers,
            bits,
        );
        eprintln!(
            "weight memory, base shape, {q}: {:.1} MB (expected {:.1} MB)",
            got / 1e6,
            want / 1e6
        );
        assert!(
            (got - want).abs() / want < 0.005,
            "{q}: {got} bytes, expected {want}"
        );
    }
}
