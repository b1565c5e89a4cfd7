//! Prompts: conversation templates, the tokenizer, and splicing image slots into the token stream.

pub mod sentencepiece;
pub mod template;
pub mod tokenizer;

pub use template::{IMAGE_PLACEHOLDER, Template, with_image};
pub use tokenizer::{PromptTokenizer, StreamDecoder};
