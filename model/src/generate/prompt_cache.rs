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
    /// The slot they come from.
    slot: Option<usize>,
}

impl Reuse {
    /// Nothing reused.
    pub const NONE: Reuse = Reuse {
        id: 0,
        positions: 0,
        images: 0,
        slot: None,
    };
}

/// One conversation's KV cache and the key of every position it holds.
#[derive(Debug)]
struct Slot {
    kv: KvCache,
    keys: Vec<PositionKey>,
    /// When it was last stored (larger is more recent).
    used: u64,
}

/// KV caches kept between generations, one per recent conversation, each with the key of every position
/// it holds; the least recently used is replaced when all slots are taken.
#[derive(Debug, Default)]
pub struct PromptCache {
    slots: Vec<Slot>,
    capacity: usize,
    clock: u64,
}

impl PromptCache {
    /// A cache that keeps the last conversation's positions (and their memory) between requests.
    pub fn new() -> Self {
        Self::with_slots(1)
    }

    /// A cache that keeps the last `slots` conversations (each holding a context's KV memory); 0 reuses
    /// nothing and frees the memory after each generation.
    pub fn with_slots(slots: usize) -> Self {
        Self {
            capacity: slots,
            ..Self::default()
        }
    }

    /// A cache that reuses nothing and frees its memory after each generation.
    pub fn disabled() -> Self {
        Self::with_slots(0)
    }

    /// Conversations held.
    pub fn slots_in_use(&self) -> usize {
        self.slots.len()
    }

    /// How much of `layout` the cache holds: the longest common prefix with any slot, short of the whole
    /// prompt (the last position is computed for its logits), moved back to the start of an id and of an
    /// image. A slot that shares less than half of what it holds (another conversation that only begins
    /// the same way) is left for its own conversation, unless it is the one to be replaced anyway.
    pub fn reuse(&self, layout: Option<&PromptLayout>) -> Reuse {
        let Some(layout) = layout.filter(|l| !l.is_empty()) else {
            return Reuse::NONE;
        };
        let Some((best, held)) = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| (reuse_of(&slot.keys, layout, i), slot))
            .max_by_key(|(r, slot)| (r.positions, slot.used))
            .map(|(r, slot)| (r, slot.keys.len()))
        else {
            return Reuse::NONE;
        };
        let continues = best.positions * 2 >= held;
        let replaced_anyway = self.slots.len() >= self.capacity && self.oldest() == best.slot;
        if best.positions > 0 && (continues || replaced_anyway) {
            best
        } else {
            Reuse::NONE
        }
    }

    /// Takes a KV cache out for a generation planned by [`PromptCache::reuse`]: the planned slot holding
    /// its first `positions`, else an empty one (the least recently used slot's memory when all are taken,
    /// else one made by `fresh`). It is out of the cache until [`PromptCache::store`] puts it back, so a
    /// failed generation leaves nothing half-written behind.
    pub fn take(&mut self, reuse: &Reuse, fresh: impl FnOnce() -> KvCache) -> KvCache {
        if let Some(i) = reuse.slot.filter(|&i| i < self.slots.len()) {
            let mut kv = self.slots.swap_remove(i).kv;
            // `store` keeps no more keys than the cache holds positions, so `reuse` never plans more.
            debug_assert!(kv.len() >= reuse.positions);
            kv.truncate(reuse.positions);
            return kv;
        }
        if self.capacity > 0
            && self.slots.len() >= self.capacity
            && let Some(mut kv) = self.evict()
        {
            kv.reset();
            return kv;
        }
        fresh()
    }

    /// Puts `kv` back after a generation over `layout` followed by `generated` tokens: every position it
    /// now holds, keyed (a generated token that was sampled but not run through the model is not held).
    pub fn store(&mut self, kv: KvCache, layout: PromptLayout, generated: &[u32]) {
        if self.capacity == 0 {
            return;
        }
        let mut keys = layout.keys;
        keys.extend(generated.iter().map(|&t| PositionKey::Text(i64::from(t))));
        keys.truncate(kv.len());
        while self.slots.len() >= self.capacity {
            self.evict();
        }
        self.clock += 1;
        self.slots.push(Slot {
            kv,
            keys,
            used: self.clock,
        });
    }

    /// The least recently used slot.
    fn oldest(&self) -> Option<usize> {
        (0..self.slots.len()).min_by_key(|&i| self.slots[i].used)
    }

    /// Removes the least recently used slot, returning its KV cache.
    fn evict(&mut self) -> Option<KvCache> {
        let oldest = self.oldest()?;
        Some(self.slots.swap_remove(oldest).kv)
    }
}

/// How much of `layout` a slot holding `keys` can give (see [`PromptCache::reuse`]).
fn reuse_of(keys: &[PositionKey], layout: &PromptLayout, slot: usize) -> Reuse {
    let common = keys
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
        slot: Some(slot),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device};
    use image::{Rgb, RgbImage};

    use super::*;

    fn fingerprint(shade: u8) -> ImageFingerprint {
        ImageFingerprint::of(&DynamicImage::ImageRgb8(RgbImage::from_pixel(
            4,
            4,
            Rgb([shade, 0, 0]),
        )))
    }

    /// A KV cache of `len` filled positions (one layer, one head of width 1: `reuse` and the slots never
    /// look at the values).
    fn kv(len: usize) -> KvCache {
        let mut kv = KvCache::new(1, 1, 1, 1, 64, &Device::default(), DType::F32);
        kv.advance(len);
        kv
    }

    /// A one-slot cache holding `keys` as if they had been computed.
    fn holding(keys: &[PositionKey]) -> PromptCache {
        let mut cache = PromptCache::new();
        cache.slots.push(Slot {
            kv: kv(keys.len()),
            keys: keys.to_vec(),
            used: 1,
        });
        cache
    }

    fn reuse(id: usize, positions: usize, images: usize) -> Reuse {
        Reuse {
            id,
            positions,
            images,
            slot: Some(0),
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
        // The answer 20, 21 was generated and both run through the model.
        let mut keys = first.keys.clone();
        keys.extend([PositionKey::Text(20), PositionKey::Text(21)]);
        let cache = holding(&keys);
        let next =
            PromptLayout::new(&[1, IMAGE_SLOT, 10, 11, 20, 21, 30, 31], &img, 3, None).unwrap();
        assert_eq!(cache.reuse(Some(&next)), reuse(6, 8, 1));
        // The same prompt again: all but its last position.
        assert_eq!(holding(&next.keys).reuse(Some(&next)), reuse(7, 9, 1));
        // A different image: only the text before it.
        let other =
            PromptLayout::new(&[1, IMAGE_SLOT, 10, 11], &[fingerprint(2)], 3, None).unwrap();
        assert_eq!(cache.reuse(Some(&other)), reuse(1, 1, 0));
        // Nothing in common, disabled, or a prompt whose images do not fill it: nothing.
        let unrelated = PromptLayout::new(&[2, 10], &[], 3, None).unwrap();
        assert_eq!(cache.reuse(Some(&unrelated)), Reuse::NONE);
        assert_eq!(PromptCache::disabled().reuse(Some(&next)), Reuse::NONE);
        assert!(PromptLayout::new(&[1, IMAGE_SLOT], &[], 3, None).is_none());
        assert!(PromptLayout::new(&[1, IMAGE_SLOT], &[fingerprint(1); 2], 3, None).is_none());
    }

    #[test]
    fn image_token_runs_are_never_split() {
        // llava-hf prompts: each image token is one embedding; two images of 2 embeddings each.
        let (t, a, b) = (99, fingerprint(1), fingerprint(2));
        let cached = PromptLayout::new(&[1, t, t, t, t, 5], &[a, a], 2, Some(t)).unwrap();
        let cache = holding(&cached.keys);
        // The second image differs: reuse stops at its first embedding, inside the run of image tokens.
        let changed = PromptLayout::new(&[1, t, t, t, t, 5], &[a, b], 2, Some(t)).unwrap();
        assert_eq!(cache.reuse(Some(&changed)), reuse(3, 3, 1));
        // A cache that ends inside an image (a stored prompt cut short) backs up to the image's start.
        let short = holding(&cached.keys[..4]);
        assert_eq!(short.reuse(Some(&cached)), reuse(3, 3, 1));
        let shorter = holding(&cached.keys[..2]);
        assert_eq!(shorter.reuse(Some(&cached)), reuse(1, 1, 0));
    }

    /// Runs one generation through the cache: the planned reuse, then the prompt and `answer` stored.
    fn generate(cache: &mut PromptCache, layout: &PromptLayout, answer: &[u32]) -> usize {
        let planned = cache.reuse(Some(layout));
        let mut kv = cache.take(&planned, || kv(0));
        assert_eq!(kv.len(), planned.positions);
        kv.advance(layout.len() - planned.positions + answer.len());
        cache.store(kv, layout.clone(), answer);
        planned.positions
    }

    #[test]
    fn slots_keep_the_most_recent_conversations() {
        // Two images asked about in turn (a radiologist comparing two slices).
        let (a, b) = ([fingerprint(1)], [fingerprint(2)]);
        let ask = |img: &[ImageFingerprint], question: i64| {
            PromptLayout::new(&[1, IMAGE_SLOT, question], img, 3, None).unwrap()
        };
        let mut two = PromptCache::with_slots(2);
        assert_eq!(generate(&mut two, &ask(&a, 10), &[50]), 0);
        // A free slot: the first conversation's is left alone, BOS and all.
        assert_eq!(generate(&mut two, &ask(&b, 10), &[51]), 0);
        assert_eq!(two.slots_in_use(), 2);
        // Back to the first image: its slot still holds it (BOS + 3 image positions).
        assert_eq!(generate(&mut two, &ask(&a, 11), &[52]), 4);
        assert_eq!(generate(&mut two, &ask(&b, 11), &[53]), 4);
        assert_eq!(two.slots_in_use(), 2);
        // A third image replaces the least recently used (the first), whose memory it takes over, and
        // leaves the second's slot alone though both begin with the same BOS.
        let c = [fingerprint(3)];
        assert_eq!(generate(&mut two, &ask(&c, 10), &[54]), 0);
        assert_eq!(two.slots_in_use(), 2);
        assert_eq!(generate(&mut two, &ask(&b, 12), &[55]), 4);
        assert_eq!(generate(&mut two, &ask(&a, 12), &[56]), 0);
        // An edited question about the same image keeps the image (more than half the slot).
        assert_eq!(generate(&mut two, &ask(&a, 13), &[57]), 4);
        assert_eq!(two.slots_in_use(), 2);
        // One slot: each image replaces the other, keeping the BOS they share.
        let mut one = PromptCache::new();
        generate(&mut one, &ask(&a, 10), &[50]);
        assert_eq!(generate(&mut one, &ask(&b, 10), &[51]), 1);
        assert_eq!(generate(&mut one, &ask(&a, 11), &[52]), 1);
        assert_eq!(one.slots_in_use(), 1);
        // None: nothing is kept.
        let mut none = PromptCache::disabled();
        generate(&mut none, &ask(&a, 10), &[50]);
        assert_eq!(generate(&mut none, &ask(&a, 10), &[50]), 0);
        assert_eq!(none.slots_in_use(), 0);
    }
}
