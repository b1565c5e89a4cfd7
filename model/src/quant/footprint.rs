//! Weight memory of a model shape under each quantisation, from the config alone: what
//! [`crate::LlavaModel::weight_bytes`] reports once loaded (a test holds the two equal), so the 7B figures
//! need no 15 GB allocation.

use super::Quantization;
use super::pack::{packable, packed_bytes};
use crate::config::{ModelConfig, ProjectorKind};

/// Bytes of (decoder, vision tower, projector) weights with floats of `float_bytes` each.
pub fn weight_bytes(
    config: &ModelConfig,
    float_bytes: usize,
    quant: Quantization,
) -> (usize, usize, usize) {
    let matrix = |rows: usize, cols: usize, bits: Option<usize>| match bits {
        Some(bits) if packable(cols) => packed_bytes(rows, cols, bits, float_bytes),
        _ => rows * cols * float_bytes,
    };
    let linear = |rows: usize, cols: usize| matrix(rows, cols, quant.linear_bits());
    let t = &config.text;
    let (d, q, kv) = (
        t.hidden_size,
        t.num_heads * t.head_dim,
        t.num_kv_heads * t.head_dim,
    );
    let layer = linear(q + 2 * kv, d)
        + linear(d, q)
        + linear(2 * t.intermediate_size, d)
        + linear(d, t.intermediate_size)
        + 2 * d * float_bytes;
    let head = if t.tie_word_embeddings {
        0
    } else {
        matrix(t.vocab_size, d, quant.head_bits())
    };
    let decoder = t.num_layers * layer
        + matrix(t.vocab_size, d, quant.embedding_bits(t.tie_word_embeddings))
        + head
        + d * float_bytes;
    let Some(mm) = &config.multimodal else {
        return (decoder, 0, 0);
    };
    let v = &mm.vision;
    let vd = v.hidden_size;
    let with_bias = |rows: usize, cols: usize| linear(rows, cols) + rows * float_bytes;
    let vision_layer = 4 * with_bias(vd, vd)
        + with_bias(v.intermediate_size, vd)
        + with_bias(vd, v.intermediate_size)
        + 4 * vd * float_bytes;
    let patch = vd * v.num_channels * v.patch_size * v.patch_size;
    let tower = mm.vision_layers_used() * vision_layer
        + (patch + vd + (v.num_patches() + 1) * vd + 2 * vd) * float_bytes;
    let depth = match mm.projector {
        ProjectorKind::Linear => 1,
        ProjectorKind::MlpGelu { depth } => depth,
    };
    let projector = with_bias(d, vd) + (depth - 1) * with_bias(d, d);
    (decoder, tower, projector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_b_fits_the_goals() {
        let config = crate::bench::shape_config("7b").unwrap();
        let total = |q| {
            let (a, b, c) = weight_bytes(&config, 2, q);
            (a + b + c) as f64
        };
        let f16 = total(Quantization::None);
        for q in [Quantization::Int8, Quantization::Int4] {
            eprintln!(
                "7b weights, {q}: {:.2} GB of {:.2} GB in f16 ({:.1} %)",
                total(q) / 1e9,
                f16 / 1e9,
                100.0 * total(q) / f16
            );
        }
        // LLaVA-Med v1.5: Mistral 7B (7.24 B) + CLIP ViT-L/14-336 (0.30 B, last layer unused) + projector.
        assert!((15.0e9..15.3e9).contains(&f16), "{f16}");
        assert!(total(Quantization::Int8) / f16 <= 0.55);
        assert!(total(Quantization::Int4) / f16 <= 0.30);
    }
}
