//! Tokenisation against Python `tokenizers` with LLaVA's chunking (real Mistral tokenizer) and llama.cpp's
//! test strings (real LLaMA SentencePiece vocabulary, through our `tokenizer.model` reader).

use llava_med::prompt::sentencepiece::tokenizer_from_sentencepiece;
use llava_med::prompt::{PromptTokenizer, Template};

use crate::common::{fixture, required_test_data};

#[test]
fn mistral_templated_prompts_match_reference_ids() {
    let Some(dir) = required_test_data("mistral-tokenizer") else {
        return;
    };
    let tok = PromptTokenizer::from_dir(&dir).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer/mistral_reference.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap().clone();
    assert!(cases.len() >= 8);
    for case in cases {
        let template: Template = case["template"].as_str().unwrap().parse().unwrap();
        let turns: Vec<(String, Option<String>)> =
            serde_json::from_value(case["turns"].clone()).unwrap();
        let rendered = template.render(None, &turns);
        assert_eq!(
            rendered,
            case["prompt"].as_str().unwrap(),
            "rendering of {turns:?}"
        );
        let want: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode_prompt(&rendered).unwrap(),
            want,
            "ids of {rendered:?}"
        );
    }
}

#[test]
fn llama_vocab_passes_llama_cpp_strings() {
    let Some(dir) = required_test_data("llama-spm") else {
        return;
    };
    let tok = tokenizer_from_sentencepiece(&dir.join("tokenizer.model")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer/llama_spm_reference.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap().clone();
    assert!(cases.len() >= 46);
    let mut failures = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["llama_cpp_ids"].clone()).unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
    }
    eprintln!(
        "llama.cpp strings: {} of {} match",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
