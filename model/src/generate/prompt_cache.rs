//! Reusing the KV cache from one request to the next. A conversation's next turn repeats everything before
//! its new question, image included, so only the positions after the longest prefix it shares with what the
//! cache holds are computed: a follow-up question skips the vision tower and the image's prefill.

use image::DynamicImage;
use sha2::{Digest, Sha256};

use crate::IMAGE_SLOT;
use crate::lm::KvCache;

/// SHA-256 of an image's size, pixel layout and pixels: two images share a fingerprint only if the model
/// sees the same pixels (a cryptographic hash, so one request cannot be made to reuse another's image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageFingerprint([u8; 32]);

impl ImageFingerprint {
    /// The fingerprint of a decoded image.
    pub fn of(image: &DynamicImage) -> Self {
        let mut h = Sha256::new();
        h.update(image.width().to_le_bytes());
        h.update(image.height().to_le_bytes());
        h.update(format!("{:?}", image.color()).as_bytes());
        h.update(image.as_bytes());
        Self(h.finalize().into())
    }
}

/// What fills one position of the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKey {
    /// A text token.
    Text(i64),
    /// Embedding `index` of an image.
    Image {
        /// Which image.
        image: ImageFingerprint,
        /// Which of its embeddings.
        index: usize,
    },
}

/// A prompt's positions: what fills each one and where each id starts.
#[derive(Debug, Clone)]
pub struct PromptLayout {
    keys: Vec<PositionKey>,
    /// Position of each id's first embedding.
    starts: Vec<usize>,
}

impl PromptLayout {
    /// The layout of `ids` whose [`IMAGE_SLOT`]s (one whole image each) and `image_token`s (one embedding
    /// each) are filled in order from `images` of `per_image` embeddings; `None` when the images do not fill
    /// them exactly (the embedding step reports that).
    pub fn new(
        ids: &[i64],
        images: &[ImageFingerprint],
        per_image: usize,
        image_token: Option<i64>,
    ) -> Option<Self> {
        let mut keys = Vec::with_capacity(ids.len());
        let mut starts = Vec::with_capacity(ids.len());
        // Image embeddings used so far, across all images.
        let mut used = 0usize;
        let image_key = |used: usize| {
            let image = *images.get(used / per_image.max(1))?;
            Some(PositionKey::Image {
                image,
                index: used % per_image.max(1),
            })
        };
        for &id in ids {
            starts.push(keys.len());
            if id == IMAGE_SLOT {
                for _ in 0..per_image {
                    keys.push(image_key(used)?);
                    used += 1;
                }
            } else if Some(id) == image_token {
                keys.push(image_key(used)?);
                used += 1;
            } else {
                keys.push(PositionKey::Text(id));
            }
        }
        (used == images.len() * per_image).then_some(Self { keys, starts })
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the prompt is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Where a prompt's computation starts given what the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// The first id to compute.
    pub id: usize,
    /// Positions taken from the cache (the position of that id).
    pub positions: usize,
    /// Images wholly before it, whose embeddings are not needed.
    pub images: usize,
}

impl Reuse {
    /// Nothing reused.
    pub const NONE: Reuse = Reuse {
        id: 0,
        positions: 0,
        images: 0,
    };
}

/// A KV cache kept between generations, with the key of every position it holds.
#[derive(Debug, Default)]
pub struct PromptCache {
    kv: Option<KvCache>,
    keys: Vec<PositionKey>,
    disabled: bool,
}

impl PromptCache {
    /// A cache that keeps the last conversation's positions (and their memory) between requests.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache that reuses nothing and frees its memory after each generation.
    pub fn disabled() -> Self {
        Self {
            disabled: true,
            ..Self::default()
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Forgets everything and frees the memory.
    pub fn clear(&mut self) {
        self.kv = None;
        self.keys.clear();
    }

    /// How much of `layout` the cache holds: the longest common prefix, short of the whole prompt (the last
    /// position is computed for its logits), moved back to the start of an id and of an image.
    pub fn reuse(&self, layout: Option<&PromptLayout>) -> Reuse {
        let Some(layout) = layout.filter(|l| !self.disabled && !l.is_empty()) else {
            return Reuse::NONE;
        };
        let common = self
            .keys
            .iter()
            .zip(&layout.keys)
            .take_while(|(a, b)| a == b)
            .count()
            .min(layout.len() - 1);
        // The last id starting within the common prefix, then back while it starts inside an image.
        let mut id = layout.starts.partition_point(|&s| s <= common) - 1;
        while id > 0
            && matches!(layout.keys[layout.starts[id]], PositionKey::Image { index, .. } if index > 0)
        {
            id -= 1;
        }
        let positions = layout.starts[id];
        let images = layout.keys[..positions]
            .iter()
            .filter(|k| matches!(k, PositionKey::Image { index: 0, .. }))
            .count();
        Reuse {
            id,
            positions,
            images,
        }
    }

    /// Takes the KV cache out, holding the first `positions` (made by `fresh` when there is none); the
    /// cache is empty until [`PromptCache::store`] puts it back, so a failed generation leaves nothing
    /// half-written behind.
    pub fn take(&mut self, positions: usize, fresh: impl FnOnce() -> KvCache) -> KvCache {
        let mut kv = self.kv.take().unwrap_or_else(fresh);
        kv.truncate(positions);
        if kv.len() < positions {
            // Held fewer than planned: cannot happen after `reuse`, but never compute on missing positions.
            kv.reset();
        }
        self.keys.clear();
        kv
    }

    /// Puts `kv` back after a generation over `layout` followed by `generated` tokens: every position it
    /// now holds, keyed (a generated token that was sampled but not run through the model is not held).
    pub fn store(&mut self, kv: KvCache, layout: PromptLayout, generated: &[u32]) {
        if self.disabled {
            return;
        }
        let mut keys = layout.keys;
        keys.extend(generated.iter().map(|&t| PositionKey::Text(i64::from(t))));
        keys.truncate(kv.len());
        self.keys = keys;
        self.kv = Some(kv);
    }
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage};

    use super::*;

    fn fingerprint(shade: u8) -> ImageFingerprint {
        ImageFingerprint::of(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
            4,
            4,
            Rgb([shade, 0, 0]),
        )))
    }

    /// A cache holding `layout` as if it had been computed (keys only; `reuse` never looks at the tensors).
    fn holding(layout: &PromptLayout) -> PromptCache {
        PromptCache {
            kv: None,
            keys: layout.keys.clone(),
            disabled: false,
        }
    }

    #[test]
    fn fingerprints_tell_pixels_and_shapes_apart() {
        assert_eq!(fingerprint(1), fingerprint(1));
        assert_ne!(fingerprint(1), fingerprint(2));
        let wide = DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 2, Rgb([1, 0, 0])));
        assert_ne!(ImageFingerprint::of(&wide), fingerprint(1));
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 4, image::Luma([1])));
        let grey_rgb = DynamicImage::ImageRgb8(grey.to_rgb8());
        assert_ne!(ImageFingerprint::of(&grey), ImageFingerprint::of(&grey_rgb));
    }

    #[test]
    fn a_follow_up_reuses_the_previous_turn_up_to_its_new_text() {
        let img = [fingerprint(1)];
        let first = PromptLayout::new(&[1, IMAGE_SLOT, 10, 11], &img, 3, None).unwrap();
        assert_eq!(first.len(), 6);
        let mut cache = holding(&first);
        // The answer 20, 21 was generated and both run through the model.
        cache
            .keys
            .extend([PositionKey::Text(20), PositionKey::Text(21)]);
        let next =
            PromptLayout::new(&[1, IMAGE_SLOT, 10, 11, 20, 21, 30, 31], &img, 3, None).unwrap();
        assert_eq!(
            cache.reuse(Some(&next)),
            Reuse {
                id: 6,
                positions: 8,
                images: 1
            }
        );
        // The same prompt again: all but its last position.
        let again = holding(&next);
        assert_eq!(again.reuse(Some(&next)).positions, 9);
        assert_eq!(again.reuse(Some(&next)).id, 7);
        // A different image: only the text before it.
        let other =
            PromptLayout::new(&[1, IMAGE_SLOT, 10, 11], &[fingerprint(2)], 3, None).unwrap();
        assert_eq!(
            cache.reuse(Some(&other)),
            Reuse {
                id: 1,
                positions: 1,
                images: 0
            }
        );
        // Disabled, or a prompt whose images do not fill it: nothing.
        assert_eq!(PromptCache::disabled().reuse(Some(&next)), Reuse::NONE);
        assert!(PromptLayout::new(&[1, IMAGE_SLOT], &[], 3, None).is_none());
        assert!(PromptLayout::new(&[1, IMAGE_SLOT], &[fingerprint(1); 2], 3, None).is_none());
    }

    #[test]
    fn image_token_runs_are_never_split() {
        // llava-hf prompts: each image token is one embedding; two images of 2 embeddings each.
        let (t, a, b) = (99, fingerprint(1), fingerprint(2));
        let cached = PromptLayout::new(&[1, t, t, t, t, 5], &[a, a], 2, Some(t)).unwrap();
        let cache = holding(&cached);
        // The second image differs: reuse stops at its first embedding, inside the run of image tokens.
        let changed = PromptLayout::new(&[1, t, t, t, t, 5], &[a, b], 2, Some(t)).unwrap();
        assert_eq!(
            cache.reuse(Some(&changed)),
            Reuse {
                id: 3,
                positions: 3,
                images: 1
            }
        );
        // A cache that ends inside an image (a stored prompt cut short) backs up to the image's start.
        let mut short = holding(&cached);
        short.keys.truncate(4);
        assert_eq!(
            short.reuse(Some(&cached)),
            Reuse {
                id: 3,
                positions: 3,
                images: 1
            }
        );
        short.keys.truncate(2);
        assert_eq!(
            short.reuse(Some(&cached)),
            Reuse {
                id: 1,
                positions: 1,
                images: 0
            }
        );
    }
}
