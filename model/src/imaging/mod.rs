//! Images for the model: decoding files, then CLIP preprocessing exactly as LLaVA does it.

pub mod preprocess;
pub mod resize;

pub use preprocess::{ClipPreprocess, load_image, load_image_bytes};
