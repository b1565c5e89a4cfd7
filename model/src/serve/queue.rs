//! One model, one generation at a time: requests are admitted up to `max_queue` waiting behind the running
//! one (beyond that: 429), and a worker thread that owns the compute runs them in arrival order. A request
//! whose client went away is cancelled (before it starts, or at its next token) and frees its slot.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use image::DynamicImage;
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use crate::engine::Engine;
use crate::generate::{FinishReason, Generation, PromptCache, SamplingParams};
use crate::prompt::Template;

/// What a job needs to run.
pub struct Work {
    /// Template (for stop ids and strings).
    pub template: Template,
    /// Prompt ids with image slots.
    pub ids: Vec<i64>,
    /// Decoded images, one per slot.
    pub images: Vec<DynamicImage>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Request stop strings.
    pub stop: Vec<String>,
}

/// What the worker reports about a job, in order: `Started`, any number of `Text`, then `Done` or
/// `Failed` (a job cancelled before it started gets only `Failed`).
#[derive(Debug)]
pub enum JobEvent {
    /// The job left the queue and runs.
    Started,
    /// New answer text.
    Text(String),
    /// The answer is complete.
    Done(Generation),
    /// The job failed or was cancelled.
    Failed(ApiError),
}

/// Counters and depth for `/health`.
#[derive(Default)]
struct Stats {
    completed: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
struct Depth {
    /// Admitted and not yet finished (waiting + running).
    admitted: usize,
    running: usize,
}

/// The admission queue and its worker.
pub struct Queue {
    max_queue: usize,
    depth: Mutex<Depth>,
    stats: Stats,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    shutting_down: AtomicBool,
    stop_running: AtomicBool,
}

/// A place in the queue; dropping it frees the place.
pub struct Slot {
    queue: Arc<Queue>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut d = self.queue.depth.lock().expect("queue lock");
        d.admitted -= 1;
    }
}

/// Sets a job's cancel flag when dropped: held by whatever waits for the job's answer, so a client that
/// goes away (its response future or stream dropped) cancels the job.
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Job {
    _slot: Slot,
    work: Work,
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<JobEvent>,
}

impl Queue {
    /// Starts the worker thread that owns the model's compute (and the KV caches of up to
    /// `prompt_cache_slots` recent conversations, kept from one request to the next).
    pub fn start(
        engine: Arc<Engine>,
        max_queue: usize,
        prompt_cache_slots: usize,
    ) -> (Arc<Self>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let queue = Arc::new(Self {
            max_queue,
            depth: Mutex::new(Depth::default()),
            stats: Stats::default(),
            jobs: Mutex::new(Some(tx)),
            shutting_down: AtomicBool::new(false),
            stop_running: AtomicBool::new(false),
        });
        let q = queue.clone();
        let worker = std::thread::Builder::new()
            .name("llava-med-generate".into())
            .spawn(move || {
                let mut cache = PromptCache::with_slots(prompt_cache_slots);
                for job in rx {
                    q.run(&engine, &mut cache, job);
                }
            })
            .expect("cannot start the generation thread");
        (queue, worker)
    }

    /// Takes a place in the queue, or answers 429 (full) / 503 (shutting down).
    pub fn admit(self: &Arc<Self>) -> Result<Slot, ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::shutting_down());
        }
        let mut d = self.depth.lock().expect("queue lock");
        // The running request plus `max_queue` waiting ones.
        if d.admitted > self.max_queue {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::queue_full(self.max_queue));
        }
        d.admitted += 1;
        Ok(Slot {
            queue: self.clone(),
        })
    }

    /// Queues work in a taken place; returns the flag that cancels it.
    pub fn submit(
        &self,
        slot: Slot,
        work: Work,
        events: UnboundedSender<JobEvent>,
    ) -> Result<Arc<AtomicBool>, ApiError> {
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            _slot: slot,
            work,
            cancel: cancel.clone(),
            events,
        };
        let jobs = self.jobs.lock().expect("queue lock");
        let sent = jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if sent {
            Ok(cancel)
        } else {
            Err(ApiError::shutting_down())
        }
    }

    /// Stops admitting; queued jobs are cancelled as they come up; the worker ends once the queue drains.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.jobs.lock().expect("queue lock").take();
    }

    /// Cancels the running job at its next token (the end of the shutdown grace period).
    pub fn cancel_running(&self) {
        self.stop_running.store(true, Ordering::Relaxed);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Queue depth and counters, for `/health`.
    pub fn health(&self) -> serde_json::Value {
        let (admitted, running) = {
            let d = self.depth.lock().expect("queue lock");
            (d.admitted, d.running)
        };
        let s = &self.stats;
        json!({
            "running": running,
            "waiting": admitted.saturating_sub(running),
            "max_queue": self.max_queue,
            "completed": s.completed.load(Ordering::Relaxed),
            "cancelled": s.cancelled.load(Ordering::Relaxed),
            "rejected": s.rejected.load(Ordering::Relaxed),
            "failed": s.failed.load(Ordering::Relaxed),
        })
    }

    fn set_running(&self, running: bool) {
        self.depth.lock().expect("queue lock").running = usize::from(running);
    }

    fn run(&self, engine: &Engine, cache: &mut PromptCache, job: Job) {
        let Job {
            _slot: slot,
            work: w,
            cancel,
            events,
        } = job;
        // The slot is freed before the last event goes out: a client that sends its next request as soon as
        // it has an answer must find the place free.
        let finish = |event: JobEvent| {
            drop(slot);
            let _ = events.send(event);
        };
        let cancelled = || {
            cancel.load(Ordering::Relaxed)
                || self.stop_running.load(Ordering::Relaxed)
                || events.is_closed()
        };
        if self.shutting_down.load(Ordering::Relaxed) {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return finish(JobEvent::Failed(ApiError::shutting_down()));
        }
        if cancelled() {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return finish(JobEvent::Failed(ApiError::internal("cancelled")));
        }
        self.set_running(true);
        let _ = events.send(JobEvent::Started);
        // A panic inside the engine fails this request, not the server.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            engine.generate_ids(
                cache,
                w.template,
                &w.ids,
                &w.images,
                w.sampling.clone(),
                w.max_new_tokens,
                &w.stop,
                |piece| {
                    if cancelled() {
                        return ControlFlow::Break(());
                    }
                    if !piece.is_empty() && events.send(JobEvent::Text(piece.into())).is_err() {
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                },
            )
        }));
        self.set_running(false);
        let event = match result {
            Ok(Ok(g)) if g.finish == FinishReason::Cancelled => {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                let shutdown = self.stop_running.load(Ordering::Relaxed);
                JobEvent::Failed(if shutdown {
                    ApiError::shutting_down()
                } else {
                    ApiError::internal("cancelled")
                })
            }
            Ok(Ok(g)) => {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                JobEvent::Done(g)
            }
            Ok(Err(e)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                JobEvent::Failed(e.into())
            }
            Err(panic) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tracing::error!(panic = %what, "generation panicked");
                JobEvent::Failed(ApiError::internal(format!(
                    "the model failed on this request: {what}"
                )))
            }
        };
        finish(event);
    }
}
