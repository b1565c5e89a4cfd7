//! LLaVA-Med in Burn: configs and weights of both checkpoint layouts, the CLIP vision tower, the projector,
//! the LLaMA/Mistral decoder with its KV cache, prompts and tokenizers, image preprocessing, generation and
//! the OpenAI-compatible server.

#![warn(missing_docs)]

pub mod bench;
pub mod config;
pub mod device;
pub mod embedding;
pub mod engine;
pub mod error;
pub mod fused;
pub mod generate;
pub mod host_memory;
pub mod imaging;
pub mod kernels;
pub mod linear;
pub mod llava;
pub mod lm;
pub mod load_progress;
pub mod memory_check;
pub mod norm;
pub mod projector;
pub mod prompt;
pub mod quant;
pub mod serve;
pub mod vision;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use llava::{IMAGE_SLOT, LlavaModel, LoadOptions};
