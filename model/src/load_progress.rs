//! How far a model load has got, for a progress bar: bytes of checkpoint tensors taken so far (read and
//! converted, or found quantised in the cache) out of the bytes of every tensor in the checkpoint's files.
//! A few stored tensors are never used (the vision tower's layers after the one LLaVA selects, buffers
//! some exporters add), so a load can end a little short of the total.

use std::sync::atomic::{AtomicU64, Ordering};

/// Progress shared by the loaders of one model (a LLaVA checkpoint and a separate CLIP folder add their
/// files' bytes to one total).
pub struct LoadProgress {
    done: AtomicU64,
    total: AtomicU64,
    report: Box<dyn Fn(u64, u64) + Send + Sync>,
}

impl LoadProgress {
    /// Progress reported to `report(done, total)` in bytes each time a tensor is taken.
    pub fn new(report: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        Self {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            report: Box::new(report),
        }
    }

    /// Adds a checkpoint folder's bytes to the total (when its files are opened).
    pub fn add_total(&self, bytes: u64) {
        let total = self.total.fetch_add(bytes, Ordering::Relaxed) + bytes;
        (self.report)(self.done(), total);
    }

    /// Counts `bytes` more as taken.
    pub fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        (self.report)(done, self.total());
    }

    /// Bytes taken so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes of every tensor in the files opened so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}
