//! Images for the model: decoding files (PNG/JPEG and DICOM, [`open_any`]; with a time limit,
//! [`worker`]), then CLIP preprocessing exactly as LLaVA does it.

pub mod dicom;
mod guard;
mod open;
pub mod preprocess;
pub mod resize;
pub mod worker;

pub use dicom::{DicomFile, DicomOptions, Window, WindowChoice};
pub use open::{is_dicom, open_any, open_any_bytes, open_any_with};
pub use preprocess::{ClipPreprocess, load_image, load_image_bytes};
pub use worker::{open_any_with_time_limit, render_with_time_limit, with_time_limit};
