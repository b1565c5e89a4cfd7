//! The `llava-med` command: bad input gives one line naming the file and the problem, exit code 1, no panic;
//! and the commands work on the fixture models.

use std::path::Path;

use llava_med::quant::Quantization;

use crate::common::{Scratch, copy_dir, fixture, llava_med, llava_med_ok, llava_med_run_ok};

/// A scratch copy of a fixture model that a test may break.
fn copy_of(name: &str, tag: &str) -> Scratch {
    let s = Scratch::new(&format!("bad-{tag}"));
    copy_dir(&fixture(name), &s.0);
    s
}

/// Runs `llava-med inspect` (or `generate` with an image) and returns stderr, asserting exit code 1.
fn fails(args: &[&str]) -> String {
    let out = llava_med()
        .args(args)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    lines[0].to_string()
}

fn inspect(dir: &Path) -> String {
    fails(&["inspect", "--model", dir.to_str().unwrap()])
}

#[test]
fn truncated_safetensors() {
    let s = copy_of("tiny-llava-hf-llama", "trunc");
    let f = s.0.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    let e = inspect(&s.0);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn missing_shard() {
    let s = copy_of("tiny-llava-med-mistral", "shard");
    std::fs::remove_file(s.0.join("model-00002-of-00002.safetensors")).unwrap();
    let e = inspect(&s.0);
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape() {
    let s = copy_of("tiny-llava-hf-llama", "shape");
    let cfg = s.0.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    let e = inspect(&s.0);
    assert!(
        e.contains("model.safetensors") && e.contains("has shape") && e.contains("mlp"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let s = copy_of("tiny-llava-hf-llama", "missing");
    let cfg = s.0.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(&cfg, text).unwrap();
    let e = inspect(&s.0);
    assert!(
        e.contains("missing tensor `language_model.model.layers.2"),
        "{e}"
    );
}

#[test]
fn unknown_model_type() {
    let s = copy_of("tiny-llava-med-mistral", "type");
    let cfg = s.0.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("llava_mistral", "llava_qwen");
    std::fs::write(&cfg, text).unwrap();
    let e = inspect(&s.0);
    assert!(e.contains("config.json") && e.contains("llava_qwen"), "{e}");
}

#[test]
fn missing_tokenizer() {
    let s = copy_of("tiny-llava-med-mistral", "tok");
    std::fs::remove_file(s.0.join("tokenizer.model")).unwrap();
    let e = inspect(&s.0);
    assert!(e.contains("no tokenizer.json or tokenizer.model"), "{e}");
}

#[test]
fn bench_rejects_a_context_too_short_before_loading() {
    // 1 + 576 image positions + 45 question tokens: refused at once, not after minutes of quantising 7B.
    let err = fails(&[
        "bench",
        "--shape",
        "7b",
        "--quant",
        "int4",
        "--context",
        "300",
        "--prompt-tokens",
        "16",
    ]);
    assert!(
        err.contains("--context 300 is too short for bench: it needs 667 positions"),
        "{err}"
    );
}

/// A `bench` run as short as it goes, on the CPU, reporting JSON.
const SMALL_BENCH: &[&str] = &[
    "--device",
    "cpu",
    "--runs",
    "1",
    "--prompt-tokens",
    "8",
    "--new-tokens",
    "2",
    "--json",
];

#[test]
fn bench_times_decoding_at_the_contexts_asked_for() {
    let args = ["bench", "--shape", "tiny", "--contexts", "16,40"];
    let out = llava_med_ok(args.iter().chain(SMALL_BENCH));
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let contexts: Vec<u64> = report["decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["context"].as_u64().unwrap())
        .collect();
    assert_eq!(contexts, [16, 40], "{report}");
}

/// `--quant-cache`: the first load quantises and writes every matrix, the second reads them all, and
/// `bench` says which it measured.
#[test]
fn bench_reports_the_quantised_weights_cache() {
    let scratch = Scratch::new("bench-qcache");
    let root = scratch.0.join("cache");
    let model = fixture("tiny-llava-hf-llama");
    let run = || {
        let args = [
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--quant",
            "int4",
            "--quant-cache",
            root.to_str().unwrap(),
            "--contexts",
            "16",
        ];
        let out = llava_med_run_ok(args.iter().chain(SMALL_BENCH));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            report["quant_cache"].clone(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (first, note) = run();
    assert!(
        note.contains("note: first load of") && note.contains("quantising"),
        "{note}"
    );
    let n = first["quantized"].as_u64().unwrap();
    assert!(
        n > 0 && first["written"] == n && first["read"] == 0,
        "{first}"
    );
    let (second, note) = run();
    assert!(second["read"] == n && second["quantized"] == 0, "{second}");
    assert!(!note.contains("first load"), "{note}");
}

#[test]
fn unreadable_image() {
    let s = copy_of("tiny-llava-hf-llama", "img");
    let bad = s.0.join("scan.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    let e = fails(&[
        "generate",
        "--model",
        s.0.to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("scan.png") && e.contains("decode"), "{e}");
    let e = fails(&[
        "generate",
        "--model",
        s.0.to_str().unwrap(),
        "--image",
        "/nonexistent/ct.png",
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("/nonexistent/ct.png"), "{e}");
}

#[test]
fn cli_generate_tokenize_and_logits_work_on_the_fixture() {
    let dir = fixture("tiny-llava-med-mistral");
    let run = |args: &[&str]| String::from_utf8(llava_med_ok(args)).unwrap();
    let d = dir.to_str().unwrap();
    let ids = run(&[
        "tokenize",
        "--model",
        d,
        "--prompt",
        "Is there evidence of fracture?",
        "--template",
        "mistral_instruct",
    ]);
    let ids: Vec<i64> = serde_json::from_str(ids.trim()).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let want: Vec<i64> = serde_json::from_value(meta["input_ids"].clone()).unwrap();
    // Without an image the template renders no `<image>`: the ids are the reference minus the slot and "\n".
    assert_eq!(ids[0], 1);
    assert!(!ids.contains(&-200) && ids.len() < want.len());
    let image = dir.join("image.png");
    let text = run(&[
        "generate",
        "--model",
        d,
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "Is there evidence of fracture?",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    ]);
    assert!(!text.trim().is_empty());
    let out = std::env::temp_dir().join(format!(
        "llava-med-logits-{}.safetensors",
        std::process::id()
    ));
    run(&[
        "logits",
        "--model",
        d,
        "--image",
        image.to_str().unwrap(),
        "--input-ids",
        &want
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let r = crate::common::Reference::open(&out);
    let reference = crate::common::Reference::open(&dir.join("reference.safetensors"));
    crate::common::assert_close(
        "CLI logits",
        &r.f32("logits").0,
        &reference.f32("logits").0,
        1e-4,
    );
    assert_eq!(r.f32("image_features").1, vec![16, 64]);
    assert_eq!(r.f32("pixel_values").1, vec![3, 56, 56]);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn quantised_cpu_models_compute_in_f32() {
    // bf16 asked for: the CPU's packed-weight kernels are f32 only (bf16 decoded ~90× slower), so f32 is
    // used and the user told why.
    let out = llava_med()
        .args([
            "inspect", "--device", "cpu", "--dtype", "bf16", "--quant", "int4", "--model",
        ])
        .arg(fixture("tiny-llava-med-mistral"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("loaded as:        F32 on cpu"), "{stdout}");
    assert!(
        stderr.contains("--quant int4 on the CPU computes in f32"),
        "{stderr}"
    );
}

#[test]
fn inspect_reports_layout_sizes_and_sources() {
    let out = llava_med()
        .args(["inspect", "--device", "cpu", "--model"])
        .arg(fixture("tiny-llava-med-mistral"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "LlavaOriginal (model_type llava_mistral)",
        "Mistral, 2 layers, hidden 64, 4 heads / 2 kv heads",
        "2 of 3 layers used (select layer -2), 16 image tokens",
        "ClipFolder(",
        "vision weights:   Checkpoint",
        "stored dtype:     F32",
        "template:         mistral_instruct",
        "tokenizer.model",
        "not loaded:       18 tensors",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}

#[test]
fn a_model_too_big_for_the_memory_is_refused_before_loading() {
    let model = fixture("tiny-llava-med-mistral");
    let model = model.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "1",
    ];
    let run = |limit: &str, extra: &[&str]| {
        llava_med()
            .env(llava_med::memory_check::LIMIT_ENV, limit)
            .args(args)
            .args(extra)
            .args(["--device", "cpu"])
            .output()
            .unwrap()
    };
    // 500 MB is less than the headroom any load is given: refused, naming the model and the way out.
    let out = run("500MB", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(
        line.contains(model) && line.contains("0.5 GB is available"),
        "{line}"
    );
    assert!(line.contains("--ignore-memory-check"), "{line}");
    // The same load with the check off, and with room enough.
    for (limit, extra) in [("500MB", &["--ignore-memory-check"][..]), ("64GB", &[])] {
        let out = run(limit, extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Room for int8 weights but not f32 ones: the default (`--quant auto`) loads int8 and says so; `--quant
    // none` insists and is refused.
    let config = llava_med::ModelConfig::from_dir(Path::new(model)).unwrap();
    let need = |q| llava_med::memory_check::needed(&config, burn::tensor::DType::F32, q);
    let (none, int8) = (need(Quantization::None), need(Quantization::Int8));
    assert!(int8 < none);
    let between = ((none + int8) / 2).to_string();
    let out = run(&between, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("loading it with int8 weights"), "{err}");
    let out = run(&between, &["--quant", "none"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // A limit that is not a size.
    let out = run("lots", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("LLAVA_MED_MEMORY_LIMIT=lots: not a size"),
        "{err}"
    );
}
