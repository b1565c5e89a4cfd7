//! Integration tests of the `llava-med` crate, in one binary (one link of Burn instead of many).

mod cache_command;
mod cli;
mod common;
mod deid;
mod dicom;
mod dicom_fuzz;
mod generation;
mod load_progress;
mod parity;
mod preprocess;
mod quant_cache;
mod quantization;
mod real_weights;
mod series;
mod serve;
mod tokenizer;
