//! The load's progress bar: one line on stderr, redrawn at most ten times a second
//! (`loading llava-med-7b [====>               ] 2.62 GB/15.13 GB, 2m left`).

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the line is redrawn at most.
const EVERY: Duration = Duration::from_millis(100);
/// Width of the bar in characters.
const WIDTH: usize = 20;

/// A progress line for one load.
pub struct ProgressLine {
    label: String,
    start: Instant,
    /// When the line was last drawn.
    drawn: Mutex<Option<Instant>>,
}

impl ProgressLine {
    /// A line starting with `label`.
    pub fn new(label: String) -> Self {
        Self {
            label,
            start: Instant::now(),
            drawn: Mutex::new(None),
        }
    }

    /// Shows `done` of `total` bytes (skipped if the line was drawn less than [`EVERY`] ago).
    pub fn show(&self, done: u64, total: u64) {
        let Ok(mut drawn) = self.drawn.lock() else {
            return;
        };
        let now = Instant::now();
        if drawn.is_some_and(|t| now - t < EVERY) && done < total {
            return;
        }
        *drawn = Some(now);
        let line = render(&self.label, done, total, now - self.start);
        let mut err = std::io::stderr().lock();
        // Carriage return, the line, then erase what a longer line left.
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }

    /// Erases the line.
    pub fn finish_and_clear(&self) {
        if self.drawn.lock().is_ok_and(|d| d.is_some()) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// The line's text for `done` of `total` bytes after `elapsed`.
fn render(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let fraction = if total > 0 {
        (done as f64 / total as f64).min(1.0)
    } else {
        0.0
    };
    let filled = (fraction * WIDTH as f64) as usize;
    let bar: String = (0..WIDTH)
        .map(|i| match i.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let left = if done > 0 && done < total {
        let secs = elapsed.as_secs_f64() * (total - done) as f64 / done as f64;
        match secs as u64 {
            s if s >= 120 => format!(", {}m left", s / 60),
            s => format!(", {s}s left"),
        }
    } else {
        String::new()
    };
    format!(
        "{label} [{bar}] {:.2} GB/{:.2} GB{left}",
        done as f64 / 1e9,
        total as f64 / 1e9
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_the_share_done_and_the_time_left() {
        let line = render(
            "loading m",
            2_620_000_000,
            15_130_000_000,
            Duration::from_secs(29),
        );
        assert_eq!(
            line,
            "loading m [===>                ] 2.62 GB/15.13 GB, 2m left"
        );
        let line = render("loading m", 10, 10, Duration::from_secs(3));
        assert_eq!(line, "loading m [====================] 0.00 GB/0.00 GB");
        let line = render("loading m", 0, 0, Duration::ZERO);
        assert!(line.starts_with("loading m [>   "), "{line}");
        let line = render("loading m", 1, 2, Duration::from_secs(30));
        assert!(line.ends_with(", 30s left"), "{line}");
    }
}
