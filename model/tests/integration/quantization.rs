//! Weight-only quantisation (`--quant int8|int4`) against full precision: greedy-token agreement
//! (teacher-forced: the quantised model predicts each next token of the full-precision answer), the logit
//! error on those positions, and the weight memory saved.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::{DType, Device};
use llava_med::device::{DeviceChoice, SelectedDevice};
use llava_med::engine::Engine;
use llava_med::generate::{PromptCache, SamplingParams, argmax};
use llava_med::imaging::load_image;
use llava_med::quant::{Quantization, footprint};

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
    /// Where the quantised model picked another token: the full model's lead of its token over that one.
    miss_margins: Vec<f32>,
}

/// Teacher-forced agreement of `quant` with full precision over `n` greedy tokens per prompt.
fn agreement(dir: &Path, prompts: &[Prompt], n: usize, quant: Quantization) -> Agreement {
    let full = Engine::load(dir, cpu(), Some(512)).unwrap();
    let q = Engine::load_quantized(dir, cpu(), Some(512), quant, None).unwrap();
    let mut out = Agreement {
        agreed: 0,
        total: 0,
        max_rel_logit_error: 0.0,
        miss_margins: Vec::new(),
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
                &mut PromptCache::disabled(),
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
            let picked = argmax(rq);
            out.agreed += usize::from(picked == token);
            if picked != token {
                out.miss_margins
                    .push(rf[token as usize] - rf[picked as usize]);
            }
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
        "quantisation {name} {quant}: greedy-token agreement {}/{} = {:.1} %, max relative logit error {:.4}, \
         full-precision lead at the misses {:?}",
        a.agreed,
        a.total,
        rate * 100.0,
        a.max_rel_logit_error,
        a.miss_margins
    );
    rate
}

#[test]
fn smollm2_quantised_keeps_its_greedy_tokens() {
    let Some(dir) = required_test_data("smollm2-135m-instruct") else {
        return;
    };
    // Eight prompts (about 170 teacher-forced tokens): with four, a single near-tie decided the rate.
    let prompts: [Prompt; 8] = [
        ("What is the capital of France?", false),
        ("Name three organs of the human body.", false),
        ("Explain what an X-ray is in one sentence.", false),
        ("Write a haiku about the sea.", false),
        ("What does a radiologist do?", false),
        ("List two symptoms of pneumonia.", false),
        ("Why do bones show up white on an X-ray?", false),
        ("Give me a tip for a healthy breakfast.", false),
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
    // Measured 99.5 % (int8) and 99.0 % (int4), the misses all where the full model's lead is under 0.1
    // logit. With the tied head at 8 bits under int8 too it was 98.1 %: the head's rounding reaches every
    // logit, hence it is kept one step finer (`Quantization::head_bits`).
    assert!(int8 >= 0.99, "int8 agreement {int8}");
    assert!(int4 >= 0.95, "int4 agreement {int4}");
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
    // Random tiny models have nearly tied logits, the hardest case for rounding, and here every matrix,
    // vision tower included, is quantised. Measured: int8 98.6 % / 98.6 %, int4 55.6 % / 73.6 %.
    for (name, int8, int4) in rates {
        assert!(int8 >= 0.95, "{name}: int8 agreement {int8}");
        assert!(int4 >= 0.4, "{name}: int4 agreement {int4}");
    }
}

#[test]
fn quantisation_cuts_the_weight_memory() {
    // The `base` shape in f16 with random weights, measured, must match the accounting from the shape
    // alone (`quant::footprint`), which then gives the 7B figures without allocating 15 GB.
    let config = llava_med::bench::shape_config("base").unwrap();
    let device = Device::flex();
    let mut full = 0.0;
    for q in [Quantization::None, Quantization::Int8, Quantization::Int4] {
        let m = llava_med::LlavaModel::random(config.clone(), &device, DType::F16, Some(64), q)
            .unwrap();
        let got = m.weight_bytes();
        assert_eq!(got, footprint::weight_bytes(&config, 2, q), "{q}");
        if q == Quantization::None {
            let (a, b, c) = m.num_params();
            assert_eq!(got, (2 * a, 2 * b, 2 * c));
        } else {
            // The values a quantised model stands for are the same parameters.
            let none = llava_med::LlavaModel::random(
                config.clone(),
                &device,
                DType::F16,
                Some(64),
                Quantization::None,
            )
            .unwrap();
            assert_eq!(m.num_params(), none.num_params(), "{q}");
        }
        let total = (got.0 + got.1 + got.2) as f64;
        if q == Quantization::None {
            full = total;
        }
        eprintln!(
            "weight memory, base shape, {q}: {:.1} MB ({:.1} %)",
            total / 1e6,
            100.0 * total / full
        );
        // The goals (≤ 55 % and ≤ 30 %) are for 7B, asserted from the footprint in
        // `quant::footprint::tests::seven_b_fits_the_goals`. Here the output head, kept one step finer, is
        // 10 % of the weights (1.7 % in 7B): measured 58.7 % and 31.7 %.
        let goal = match q {
            Quantization::None => 1.0,
            Quantization::Int8 => 0.59,
            Quantization::Int4 => 0.32,
        };
        assert!(total / full <= goal, "{q}: {:.3} of f16", total / full);
    }
}

/// The same quantised fixture on wgpu (lavapipe here) and on the CPU, over a prompt and three decoding
/// steps: the shifts and masks that unpack the codes must mean the same on both (WGSL has no 8-bit
/// integers, hence the 32-bit words), and the steps decoding takes in the packed product's launch the
/// same as the CPU's separate ones.
#[cfg(feature = "wgpu")]
#[test]
fn quantised_model_runs_the_same_on_wgpu() {
    let dir = fixture("tiny-llava-hf-llama");
    let ids: Vec<i64> = vec![1, llava_med::IMAGE_SLOT, 22, 57, 301, 9, 144];
    let logits = |device: &Device, quant: Quantization| {
        let m =
            llava_med::LlavaModel::load_quantized(&dir, device, DType::F32, Some(64), quant, None)
                .unwrap();
        let pixels = burn::tensor::Tensor::<4>::ones([1, 3, 56, 56], device) * 0.25;
        let feats = m.encode_images(pixels).unwrap();
        let mut cache = m.new_cache();
        let embeds = m.embed_sequence(&ids, Some(&feats)).unwrap();
        let mut all = to_vec(m.forward(embeds, &mut cache).unwrap());
        // Then one position at a time, as decoding goes (on a GPU the packed product's launch takes the
        // norm, SwiGLU's activation and the residual sums).
        for id in [17, 230, 5] {
            let embeds = m.embed_sequence(&[id], None).unwrap();
            all.extend(to_vec(m.forward(embeds, &mut cache).unwrap()));
        }
        all
    };
    let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    for quant in [Quantization::Int8, Quantization::Int4] {
        let (a, b) = (logits(&Device::flex(), quant), logits(&gpu, quant));
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= 1e-3 * scale,
            "{quant}: wgpu vs CPU max error {err} (scale {scale})"
        );
    }
}
