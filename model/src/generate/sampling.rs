//! Choosing the next token from logits: greedy, or temperature + top-p with a seeded RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept (1 keeps all).
    pub top_p: f32,
    /// RNG seed for reproducible sampling.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Draws tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Whether decoding is greedy.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Picks the next token from host logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = 0;
        for (_, p) in &probs {
            keep += 1;
            mass += p;
            if mass >= self.params.top_p {
                break;
            }
        }
        let kept = &probs[..keep];
        let r: f32 = self.rng.random::<f32>() * mass;
        let mut acc = 0.0;
        for (id, p) in kept {
            acc += p;
            if r < acc {
                return *id;
            }
        }
        kept[keep - 1].0
    }
}

/// Index of the largest value (first on ties, like PyTorch).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(
            Sampler::new(SamplingParams::default()).sample(&[0.0, 1.0]),
            1
        );
    }

    #[test]
    fn top_p_restricts_to_the_nucleus_and_seed_repeats() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 3,
        };
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params);
        let draws: Vec<u32> = (0..200).map(|_| a.sample(&logits)).collect();
        assert!(draws.iter().all(|&d| d < 2));
        assert!(draws.contains(&0) && draws.contains(&1));
        assert_eq!(
            draws,
            (0..200).map(|_| b.sample(&logits)).collect::<Vec<_>>()
        );
    }
}
