//! Key/value cache for KV-cached decoding: preallocated per layer, written in place, so a decode step
//! does not copy the whole cache.

use burn::tensor::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// One layer's keys and values.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor<4>,
    v: Tensor<4>,
}

/// The cache of all layers plus the number of positions filled.
///
/// # Shapes
/// each layer holds k and v of `[batch, kv_heads, capacity, head_dim]`
#[derive(Debug, Clone)]
pub struct KvCache {
    /// `None` only while [`KvCache::write_with`] holds a layer's buffers.
    layers: Vec<Option<LayerCache>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `capacity` positions.
    pub fn new(
        num_layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        device: &Device,
        dtype: DType,
    ) -> Self {
        let zeros = || Tensor::<4>::zeros([batch, kv_heads, capacity, head_dim], (device, dtype));
        let layers = (0..num_layers)
            .map(|_| {
                Some(LayerCache {
                    k: zeros(),
                    v: zeros(),
                })
            })
            .collect();
        Self {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Positions already filled (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes its buffers take (all positions, filled or not).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flat_map(|l| [&l.k, &l.v])
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum()
    }

    /// Forgets everything (keeps the memory).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops positions after `len` (e.g. to regenerate an answer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Fails if `extra` more positions do not fit.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        if self.len + extra > self.capacity {
            return Err(Error::Input(format!(
                "context overflow: {} cached + {extra} new positions exceed the context of {} tokens",
                self.len, self.capacity
            )));
        }
        Ok(())
    }

    /// Writes layer `layer`'s new keys/values at the current end and returns all cached ones (new included).
    /// The caller advances the length with [`KvCache::advance`] once every layer is written.
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, h, seq, d] = k.dims();
        let (start, end) = (self.len, self.len + seq);
        self.write_with(layer, |kc, vc| {
            // `slice_assign` on a uniquely owned tensor updates it in place on Burn's backends.
            let at = [0..b, 0..h, start..end, 0..d];
            let (kc, vc) = (kc.slice_assign(at.clone(), k), vc.slice_assign(at, v));
            let filled = (kc.clone().narrow(2, 0, end), vc.clone().narrow(2, 0, end));
            (kc, vc, filled)
        })
    }

    /// Hands layer `layer`'s whole `[batch, kv_heads, capacity, head_dim]` buffers to `write`, which returns
    /// them with new positions written, and keeps those. The cache holds no other reference meanwhile,
    /// so a write through Burn's in-place ops does not copy them.
    pub fn write_with<R>(
        &mut self,
        layer: usize,
        write: impl FnOnce(Tensor<4>, Tensor<4>) -> (Tensor<4>, Tensor<4>, R),
    ) -> R {
        let LayerCache { k, v } = self.layers[layer]
            .take()
            .expect("a layer's cache is back after each write");
        let (k, v, r) = write(k, v);
        self.layers[layer] = Some(LayerCache { k, v });
        r
    }

    /// Marks `seq` more positions as filled.
    pub fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::DType;

    use crate::LlavaModel;
    use crate::bench::shape_config;
    use crate::quant::Quantization;

    /// What the server reports per prompt-cache slot is what a cache allocates.
    #[test]
    fn the_decoder_knows_its_cache_size() {
        let device = burn::tensor::Device::default();
        for dtype in [DType::F32, DType::F16] {
            let config = shape_config("tiny").unwrap();
            let model =
                LlavaModel::random(config, &device, dtype, Some(96), Quantization::None).unwrap();
            let cache = model.new_cache();
            assert!(cache.bytes() > 0);
            assert_eq!(model.lm.kv_cache_bytes(96), cache.bytes());
            assert_eq!(
                model.lm.kv_cache_bytes(10_000),
                cache.bytes(),
                "capped at the context"
            );
        }
    }
}
