//! Writing quantised-weights cache entries ([`super::cache`]) on a thread of their own, so a first load
//! goes on reading and quantising the next matrix while the last one's entry goes to disk: a 7B model's
//! first load at 4 bits writes 4.3 GB, which written in line cost ~25–40 s of a ~110 s load on a 2-core
//! laptop-class VM. At most one encoded entry waits in the queue, so the memory held for writing stays
//! about two matrices' packed size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::cache::{EncodedEntry, QuantCache};
use super::pack::Packed;

/// What the writing thread did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Entries written.
    pub written: usize,
    /// The first write that failed (file and reason); nothing is written after it.
    pub error: Option<String>,
}

/// A thread writing entries in the order they are submitted.
pub struct EntryWriter {
    queue: Option<SyncSender<(QuantCache, EncodedEntry)>>,
    thread: Option<JoinHandle<WriteOutcome>>,
    failed: Arc<AtomicBool>,
}

impl EntryWriter {
    /// Starts the writing thread.
    pub fn start() -> Self {
        let (queue, entries) = sync_channel::<(QuantCache, EncodedEntry)>(1);
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("quant-cache-writer".into())
            .spawn(move || {
                let mut outcome = WriteOutcome::default();
                for (cache, encoded) in entries {
                    if outcome.error.is_some() {
                        continue;
                    }
                    match cache.write_encoded(&encoded) {
                        Ok(()) => outcome.written += 1,
                        Err(e) => {
                            // Once: a full disk or a read-only folder fails every entry the same way.
                            let file = encoded.entry().file().display();
                            tracing::warn!(
                                "{file}: cannot write the quantised-weights cache ({e}); this load goes on without it"
                            );
                            outcome.error = Some(format!("{file}: {e}"));
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
                outcome
            });
        match thread {
            Ok(thread) => Self {
                queue: Some(queue),
                thread: Some(thread),
                failed,
            },
            // No thread to be had: the load goes on without the cache, saying why at the end.
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                tracing::warn!("cannot start the quantised-weights cache's writer ({e})");
                Self {
                    queue: None,
                    thread: None,
                    failed,
                }
            }
        }
    }

    /// Whether a write failed (later submissions are dropped, so the caller can skip encoding them).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Queues `packed` to be written as `entry` of `cache`, waiting while the queue is full.
    pub fn submit(&self, cache: &QuantCache, entry: &super::cache::Entry, packed: &Packed) {
        if self.failed() {
            return;
        }
        if let Some(queue) = &self.queue {
            // A send fails only if the thread is gone; `finish` reports why.
            let _ = queue.send((cache.clone(), EncodedEntry::new(entry, packed)));
        }
    }

    /// Waits for every queued entry to be written.
    pub fn finish(mut self) -> WriteOutcome {
        self.join()
    }

    fn join(&mut self) -> WriteOutcome {
        self.queue = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => WriteOutcome {
                written: 0,
                error: Some("the cache's writing thread failed".into()),
            },
            None => WriteOutcome {
                written: 0,
                error: Some("the cache's writing thread could not be started".into()),
            },
        }
    }
}

impl Drop for EntryWriter {
    /// A load that fails half-way still finishes the entries it queued (each whole or absent).
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::DType;

    use super::*;
    use crate::quant::cache::Lookup;
    use crate::quant::pack;
    use crate::weights::random_values;

    #[test]
    fn entries_are_written_in_the_background_and_read_back() {
        let root = std::env::temp_dir().join(format!("llava-med-qwriter-{}", std::process::id()));
        let cache = QuantCache::for_model(&root, std::path::Path::new("/models/m"));
        let writer = EntryWriter::start();
        let mut written = Vec::new();
        for i in 0..5 {
            let (rows, cols) = (3 + i, 64);
            let packed = pack::quantize(
                &random_values(i as u64, rows * cols),
                rows,
                cols,
                4,
                DType::F32,
            );
            let entry = cache.entry(&format!("w{i}"), 1, [rows, cols], 4, DType::F32, "src");
            writer.submit(&cache, &entry, &packed);
            written.push((entry, packed));
        }
        assert_eq!(
            writer.finish(),
            WriteOutcome {
                written: 5,
                error: None
            }
        );
        for (entry, packed) in &written {
            let Lookup::Hit(back) = cache.read(entry) else {
                panic!("{} not written", entry.file().display())
            };
            assert_eq!((&back.codes, &back.supers), (&packed.codes, &packed.supers));
        }
        // A root that cannot be a folder: the first failure is kept and later entries are dropped.
        let blocked = root.join("file");
        std::fs::write(&blocked, "").unwrap();
        let cache = QuantCache::for_model(&blocked, std::path::Path::new("/models/m"));
        let writer = EntryWriter::start();
        for (i, (_, packed)) in written.iter().enumerate() {
            let shape = [packed.rows, packed.cols];
            let entry = cache.entry(&format!("w{i}"), 1, shape, 4, DType::F32, "src");
            writer.submit(&cache, &entry, packed);
        }
        let outcome = writer.finish();
        assert_eq!(outcome.written, 0);
        assert!(outcome.error.is_some_and(|e| e.contains("file")));
        let _ = std::fs::remove_dir_all(&root);
    }
}
