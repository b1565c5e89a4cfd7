//! A team of threads for the short parallel loops of decoding on the CPU. A decoding step of the `base`
//! shape is ~50 matrix products of 0.1–3 ms each, with a few microseconds of serial work between them.
//! Through rayon each product costs three thread wake-ups (the calling thread hands the job to the pool,
//! sleeps, and is woken when the pool's two workers finish), each a futex call and, in a VM, an
//! inter-processor interrupt of tens of microseconds. The team's helpers instead spin for a while after
//! each loop, so the next one starts at once, and the calling thread takes tasks itself.
//!
//! One loop runs on the team at a time: a loop started while it is busy (a second conversation on the
//! server, tests in parallel, a loop inside a task) runs on rayon instead, as before.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper spins, waiting for the next loop, before it sleeps: longer than almost every
/// gap between a decoding step's loops (the serial work between products; `base` on the Intel CI
/// machine: 75 % under 50 µs, 20 % 50–500 µs).
const SPIN: Duration = Duration::from_micros(500);
/// How long of that it spins without yielding its core; after it, it yields at each check, so that a
/// thread with work (rayon's workers in one of Burn's own parallel ops) gets the core.
const SPIN_ALONE: Duration = Duration::from_micros(50);

/// Tasks the CPU kernels cut a loop into per thread where the work allows: a thread that starts late or
/// reads memory more slowly than the others then holds the loop up by a smaller task (decoding the
/// `base` shape on the Intel CI machine: 29.5 → 27 ms per token going from one to four in the one-row
/// products).
pub const TASKS_PER_THREAD: usize = 4;

/// The loop being run, its lifetime erased: it is valid until every one of its tasks has finished, which
/// [`for_each`] waits for before it returns.
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn(usize) + Sync));

// SAFETY: the closure behind it is `Sync`, and only called while the loop that published it waits.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

/// A task's panic payload, as `catch_unwind` returns it.
type Panic = Box<dyn Any + Send>;

/// Locks `m`, also after a panic poisoned it (nothing the team guards is left half-written by one).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The team's shared state.
struct Team {
    /// Whether a loop is running on the team.
    busy: AtomicBool,
    /// The current loop in one word ([`Claim`]): claiming a task is one compare-and-swap, which fails
    /// once the loop has been replaced.
    claim: AtomicU64,
    /// Tasks finished in this loop.
    done: AtomicUsize,
    /// The first panic of a task of this loop, taken by the loop's caller (so empty between loops).
    panic: Mutex<Option<Panic>>,
    /// The loop's closure; written before `claim` publishes the loop, read after each successful claim.
    job: Mutex<Option<Job>>,
    /// Helpers asleep, and what wakes them.
    sleepers: AtomicUsize,
    wake: (Mutex<()>, Condvar),
}

/// The fields of [`Team::claim`]: the loop's number, its task count and its next unclaimed task.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Claim {
    epoch: u64,
    tasks: u64,
    next: u64,
}

/// Bits of a claim's task count and next task (most tasks a loop can have on the team: 2²⁰ − 1).
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Bits of a claim's loop number (it wraps; only equality with the loop a helper saw matters).
const EPOCH_MASK: u64 = (1 << (64 - 2 * COUNT_BITS)) - 1;

impl Claim {
    fn pack(self) -> u64 {
        (self.epoch & EPOCH_MASK) << (2 * COUNT_BITS)
            | (self.tasks & COUNT_MASK) << COUNT_BITS
            | (self.next & COUNT_MASK)
    }

    fn unpack(word: u64) -> Self {
        Self {
            epoch: word >> (2 * COUNT_BITS),
            tasks: (word >> COUNT_BITS) & COUNT_MASK,
            next: word & COUNT_MASK,
        }
    }
}

impl Team {
    /// The current loop's number.
    fn epoch(&self, order: Ordering) -> u64 {
        Claim::unpack(self.claim.load(order)).epoch
    }

    /// Claims the next task of loop `epoch`, if it is still the current loop and has tasks left; with
    /// the loop's closure, which stays valid until that task is counted done.
    fn claim(&self, epoch: u64) -> Option<(Job, usize)> {
        let mut word = self.claim.load(Ordering::Acquire);
        loop {
            let current = Claim::unpack(word);
            if current.epoch != epoch || current.next >= current.tasks {
                return None;
            }
            let next = Claim {
                next: current.next + 1,
                ..current
            }
            .pack();
            match self
                .claim
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(seen) => word = seen,
            }
        }
        // The claimed task is unfinished, so the loop it belongs to is still the one whose closure was
        // published before its claim word.
        let job = (*lock(&self.job))?;
        Some((job, Claim::unpack(word).next as usize))
    }

    /// Runs task `index` of the current loop, recording a panic instead of unwinding.
    fn run(&self, job: Job, index: usize) {
        // SAFETY: the loop's caller keeps the closure alive until `done` counts this task.
        let f = unsafe { &*job.0 };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(index))) {
            lock(&self.panic).get_or_insert(panic);
        }
        self.done.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes tasks of loop `epoch` until none is left.
    fn work(&self, epoch: u64) {
        while let Some((job, index)) = self.claim(epoch) {
            self.run(job, index);
        }
    }

    /// A helper's life: wait for a new loop (spinning, then asleep), work on it, repeat.
    fn helper(&self) {
        let mut seen = self.epoch(Ordering::Acquire);
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            let epoch = loop {
                let epoch = self.epoch(Ordering::Acquire);
                if epoch != seen {
                    break epoch;
                }
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(64) {
                    std::hint::spin_loop();
                    continue;
                }
                let waited = start.elapsed();
                if waited > SPIN {
                    self.sleep_until_after(seen);
                } else if waited > SPIN_ALONE {
                    // Past the gaps of a decoding step: let a thread that has work (rayon's workers in
                    // a long product) have this core, coming back at once if none has.
                    std::thread::yield_now();
                }
            };
            seen = epoch;
            self.work(epoch);
        }
    }

    /// Sleeps until a loop after `seen` is published.
    fn sleep_until_after(&self, seen: u64) {
        let (mutex, wake) = &self.wake;
        let mut guard = lock(mutex);
        // Counted before the check, so a loop published after the check sees a sleeper and wakes it
        // (both sides use sequentially consistent operations).
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        while self.epoch(Ordering::SeqCst) == seen {
            guard = wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Runs `tasks` tasks of `f` on the team and the calling thread, the team held (`busy`); the first
    /// panic of a task, if one did.
    fn run_loop(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Option<Panic> {
        // SAFETY: only the lifetime is erased; this function returns only after `done` reaches `tasks`,
        // that is after every call of `f`, and no helper can claim a task of this loop after that.
        let job = Job(unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
                f,
            )
        });
        *lock(&self.job) = Some(job);
        self.done.store(0, Ordering::Release);
        let epoch = (self.epoch(Ordering::Acquire) + 1) & EPOCH_MASK;
        let claim = Claim {
            epoch,
            tasks: tasks as u64,
            next: 0,
        };
        self.claim.store(claim.pack(), Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.wake.0);
            self.wake.1.notify_all();
        }
        self.work(epoch);
        // Tasks the helpers claimed may still be running.
        while self.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        lock(&self.panic).take()
    }
}

/// The team, started on first use with one helper fewer than rayon's threads (the caller is the other).
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            busy: AtomicBool::new(false),
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            job: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            wake: (Mutex::new(()), Condvar::new()),
        }));
        for i in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("llava-med-team-{i}"))
                .spawn(move || team.helper());
            if spawned.is_err() {
                // Without its helpers the team would run loops on the caller alone.
                return None;
            }
        }
        Some(team)
    })
}

/// Runs `f(0)`, …, `f(tasks - 1)` in parallel, in any order, and returns when all have; a panic in a
/// task panics here once all the others have run. On the team when it is free, else on rayon's pool.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync + Send) {
    if tasks <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    let free_team = team().filter(|team| {
        tasks as u64 <= COUNT_MASK
            && team
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    });
    if let Some(team) = free_team {
        let panic = team.run_loop(tasks, &f);
        team.busy.store(false, Ordering::Release);
        if let Some(panic) = panic {
            resume_unwind(panic);
        }
        return;
    }
    // Elsewhere each task's panic is caught as well, so that every path runs all the tasks.
    let first_panic = Mutex::new(None);
    let task = |i: usize| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            lock(&first_panic).get_or_insert(panic);
        }
    };
    if team().is_none() && rayon::current_num_threads() == 1 {
        // One thread in all: handing the loop to rayon's one worker would only add a wake-up.
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    if let Some(panic) = first_panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(panic);
    }
}

/// Runs `f(r, row)` for every row of `out` cut into rows of `row_len` values (the last may be shorter),
/// `rows_per_task` rows to a task, as [`for_each`].
pub fn for_each_row_mut<T: Send>(
    out: &mut [T],
    row_len: usize,
    rows_per_task: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let row_len = row_len.max(1);
    let rows_per_task = rows_per_task.max(1);
    let (len, rows) = (out.len(), out.len().div_ceil(row_len));
    let base = SharedSlice(out.as_mut_ptr());
    for_each(rows.div_ceil(rows_per_task), |task| {
        for r in task * rows_per_task..((task + 1) * rows_per_task).min(rows) {
            let start = r * row_len;
            // SAFETY: row `r` is `start..start + row_len` (or to the end), inside `out` and disjoint from
            // every other row; each row belongs to one task, and `out` stays borrowed until all are done.
            let row =
                unsafe { std::slice::from_raw_parts_mut(base.at(start), row_len.min(len - start)) };
            f(r, row);
        }
    });
}

/// A mutable slice's start, shared by tasks that each take their own part of it.
struct SharedSlice<T>(*mut T);

// SAFETY: tasks reach only disjoint parts through it (see its use), and `T: Send` lets those parts be
// written from other threads.
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    /// The address of value `i` (a method, so that closures capture the whole wrapper, not its pointer).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn claim_words_keep_their_fields() {
        let c = Claim {
            epoch: EPOCH_MASK,
            tasks: COUNT_MASK,
            next: 7,
        };
        assert_eq!(Claim::unpack(c.pack()), c);
        let c = Claim {
            epoch: 3,
            tasks: 1,
            next: 0,
        };
        assert_eq!(Claim::unpack(c.pack()), c);
    }

    #[test]
    fn every_task_runs_exactly_once() {
        for tasks in [0, 1, 2, 3, 17, 1000, (1 << COUNT_BITS) + 5] {
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            for_each(tasks, |i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn rows_are_cut_and_numbered_as_chunks_mut_does() {
        for (len, row_len, per_task) in [(0, 3, 1), (10, 3, 1), (10, 3, 2), (12, 4, 5), (7, 10, 1)]
        {
            let mut out = vec![usize::MAX; len];
            for_each_row_mut(&mut out, row_len, per_task, |r, row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = r * 1000 + j;
                }
            });
            let expected: Vec<usize> = (0..len)
                .map(|i| (i / row_len) * 1000 + i % row_len)
                .collect();
            assert_eq!(
                out, expected,
                "{len} values, rows of {row_len}, {per_task} a task"
            );
        }
    }

    #[test]
    fn loops_from_many_threads_and_inside_tasks_all_finish() {
        // Concurrent callers find the team busy and take rayon; a loop inside a task does too.
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 8 * 3);
    }

    /// The message a loop's caller received from a task's panic (the task's own, on every path).
    fn message(outcome: std::thread::Result<()>) -> String {
        let panic = outcome.expect_err("the loop should have panicked");
        panic
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(not a message)".to_string())
    }

    /// A loop of 64 tasks whose task 5 panics, counting the others that finished into `finished`.
    fn loop_failing_at_task_5(finished: &AtomicUsize) {
        for_each(64, |i| {
            if i == 5 {
                panic!("task 5 fails");
            }
            finished.fetch_add(1, Ordering::Relaxed);
        })
    }

    #[test]
    fn a_panicking_task_panics_the_caller_after_the_others_finish() {
        let finished = AtomicUsize::new(0);
        let outcome = catch_unwind(AssertUnwindSafe(|| loop_failing_at_task_5(&finished)));
        assert_eq!(message(outcome), "task 5 fails");
        assert_eq!(finished.load(Ordering::Relaxed), 63);
        // The same inside a task, where the team is busy and the inner loop takes rayon (or the caller
        // alone, with one thread).
        let inner_finished = AtomicUsize::new(0);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            for_each(2, |outer| {
                if outer == 0 {
                    loop_failing_at_task_5(&inner_finished);
                }
            })
        }));
        assert_eq!(message(outcome), "task 5 fails");
        assert_eq!(inner_finished.load(Ordering::Relaxed), 63);
        // The team is free again.
        let ran = AtomicUsize::new(0);
        for_each(10, |_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn tasks_of_one_loop_run_at_the_same_time_on_different_threads() {
        if rayon::current_num_threads() < 2 {
            eprintln!("skipped: rayon has one thread here");
            return;
        }
        // Two tasks that each wait for the other to start can only both see it if they run at once.
        // Another test holding the team sends this loop to rayon, whose workers may be busy with that
        // test's work, so a try that times out is retried.
        let met = (0..5).any(|_| {
            let started = [AtomicBool::new(false), AtomicBool::new(false)];
            let saw_other = [AtomicBool::new(false), AtomicBool::new(false)];
            for_each(2, |i| {
                started[i].store(true, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline {
                    if started[1 - i].load(Ordering::SeqCst) {
                        saw_other[i].store(true, Ordering::SeqCst);
                        break;
                    }
                    std::hint::spin_loop();
                }
            });
            saw_other.iter().all(|s| s.load(Ordering::SeqCst))
        });
        assert!(met, "the two tasks never ran at the same time");
    }

    #[test]
    fn helpers_that_fell_asleep_wake_for_the_next_loop() {
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4);
            let ran = AtomicUsize::new(0);
            for_each(100, |_| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(ran.load(Ordering::Relaxed), 100);
        }
    }
}
