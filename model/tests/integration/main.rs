//! Integration tests of the `llava-med` crate, in one binary (one link of Burn instead of many).

mod cli;
mod common;
mod dicom;
mod generation;
mod parity;
mod preprocess;
mod real_weights;
mod tokenizer;
