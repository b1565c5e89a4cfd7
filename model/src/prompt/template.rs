//! Conversation templates: how turns become the prompt text the model was trained on.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The placeholder standing for the image in prompt text.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// A prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `[INST] q [/INST] a </s>[INST] q2 [/INST]` (LLaVA-Med v1.5).
    MistralInstruct,
    /// Vicuna v1 with the "curious user" system prompt and `USER:`/`ASSISTANT:` roles.
    VicunaV1,
    /// LLaVA v1: as Vicuna v1 with the "curious human" system prompt.
    LlavaV1,
    /// No roles: the user text, then the answer followed by a newline (LLaVA's stage-1 format).
    Plain,
    /// `<|im_start|>role\n…<|im_end|>\n` (SmolLM, Qwen and others).
    ChatMl,
}

const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";
const LLAVA_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

impl Template {
    /// All templates with their names.
    pub const ALL: [(Template, &'static str); 5] = [
        (Template::MistralInstruct, "mistral_instruct"),
        (Template::VicunaV1, "vicuna_v1"),
        (Template::LlavaV1, "llava_v1"),
        (Template::Plain, "plain"),
        (Template::ChatMl, "chatml"),
    ];

    /// The template a checkpoint was trained with, guessed from its config.
    pub fn default_for(model_type: &str, decoder_is_mistral: bool) -> Self {
        match model_type {
            "llava_mistral" => Template::MistralInstruct,
            "llava_llama" | "llava" if !decoder_is_mistral => Template::LlavaV1,
            "llava" => Template::MistralInstruct,
            _ => Template::ChatMl,
        }
    }

    /// The default system prompt, if the template has one.
    pub fn default_system(self) -> Option<&'static str> {
        match self {
            Template::VicunaV1 => Some(VICUNA_SYSTEM),
            Template::LlavaV1 => Some(LLAVA_SYSTEM),
            _ => None,
        }
    }

    /// Renders `turns` (user text, assistant answer or `None` for the turn being generated) with an optional
    /// system prompt overriding the template's own.
    pub fn render(self, system: Option<&str>, turns: &[(String, Option<String>)]) -> String {
        let system = system.or(self.default_system());
        let mut out = String::new();
        match self {
            Template::MistralInstruct => {
                for (i, (user, answer)) in turns.iter().enumerate() {
                    let user = match (i, system) {
                        (0, Some(s)) if !s.is_empty() => {
                            format!("<<SYS>>\n{s}\n<</SYS>>\n\n{user}")
                        }
                        _ => user.clone(),
                    };
                    out.push_str(&format!("[INST] {user} [/INST]"));
                    if let Some(a) = answer {
                        out.push_str(&format!(" {a} </s>"));
                    }
                }
            }
            Template::VicunaV1 | Template::LlavaV1 => {
                out.push_str(system.unwrap_or(""));
                out.push(' ');
                for (user, answer) in turns {
                    out.push_str(&format!("USER: {user} "));
                    match answer {
                        Some(a) => out.push_str(&format!("ASSISTANT: {a}</s>")),
                        None => out.push_str("ASSISTANT:"),
                    }
                }
            }
            Template::Plain => {
                out.push_str(system.unwrap_or(""));
                for (user, answer) in turns {
                    out.push_str(user);
                    if let Some(a) = answer {
                        out.push_str(a);
                        out.push('\n');
                    }
                }
            }
            Template::ChatMl => {
                if let Some(s) = system {
                    out.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
                }
                for (user, answer) in turns {
                    out.push_str(&format!(
                        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
                    ));
                    if let Some(a) = answer {
                        out.push_str(&format!("{a}<|im_end|>\n"));
                    }
                }
            }
        }
        out
    }

    /// Text that ends an answer besides the EOS token (ChatML's `<|im_end|>`).
    pub fn stop_strings(self) -> &'static [&'static str] {
        match self {
            Template::ChatMl => &["<|im_end|>"],
            _ => &[],
        }
    }
}

impl FromStr for Template {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Template::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(t, _)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = Template::ALL.iter().map(|(_, n)| *n).collect();
                Error::Input(format!(
                    "unknown template `{s}` (known: {})",
                    names.join(", ")
                ))
            })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Template::ALL
            .iter()
            .find(|(t, _)| t == self)
            .map(|(_, n)| *n)
            .unwrap_or("?");
        f.write_str(name)
    }
}

/// Puts the image placeholder at the front of a question, as LLaVA-Med expects, unless it is already there.
pub fn with_image(question: &str) -> String {
    if question.contains(IMAGE_PLACEHOLDER) {
        question.to_string()
    } else {
        format!("{IMAGE_PLACEHOLDER}\n{question}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(t: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        t.iter()
            .map(|(u, a)| (u.to_string(), a.map(str::to_string)))
            .collect()
    }

    #[test]
    fn mistral_multi_turn() {
        let p = Template::MistralInstruct
            .render(None, &turns(&[("<image>\nQ1", Some("A1")), ("Q2", None)]));
        assert_eq!(p, "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]");
    }

    #[test]
    fn vicuna_multi_turn() {
        let p = Template::VicunaV1.render(None, &turns(&[("<image>\nQ", Some("A")), ("Q2", None)]));
        assert_eq!(
            p,
            format!("{VICUNA_SYSTEM} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:")
        );
    }

    #[test]
    fn chatml_with_system() {
        let p = Template::ChatMl.render(Some("S"), &turns(&[("Hi", None)]));
        assert_eq!(
            p,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn names_round_trip() {
        for (t, n) in Template::ALL {
            assert_eq!(n.parse::<Template>().unwrap(), t);
            assert_eq!(t.to_string(), n);
        }
        assert!("alpaca".parse::<Template>().is_err());
    }
}
