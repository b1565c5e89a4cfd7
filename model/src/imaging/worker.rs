//! Decoding with a time limit: [`with_time_limit`] runs a job (open + decode + render) on a worker thread
//! and gives up waiting when the limit passes, so a pathological file (an image codec grinding through a
//! huge or hostile codestream) cannot hang the caller.
//!
//! This is a soft limit. Rust cannot stop a thread, so an abandoned worker is detached: it keeps running
//! (one core busy, and the memory it holds) until the decoder returns on its own, and its result is then
//! dropped. The structural checks and the frame-size cap bound what a decoder can be asked to do, so that
//! ends eventually, but for a hard limit the application should decode in a child process (`llava-med
//! render --image FILE --out OUT.png`) and kill it on timeout: only a process boundary gets the core and the
//! memory back at once.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use image::DynamicImage;

use super::dicom::{DicomFile, DicomOptions, Rendered, WindowChoice};
use super::open::open_any_with;
use crate::error::{Error, Result};

/// The CLI's default limit for decoding one image, in seconds.
pub const DEFAULT_DECODE_TIMEOUT_S: f64 = 60.0;

/// Runs `job` on a worker thread and waits at most `limit` for it. Past the limit it returns
/// `Error::Image` naming `path` ("took longer than … s; abandoned"); the worker is detached and its result
/// dropped when it ends (see the module documentation). A panic escaping `job` is returned as an error too.
pub fn with_time_limit<T: Send + 'static>(
    path: &Path,
    limit: Duration,
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("llava-med-decode".to_string())
        .spawn(move || {
            // The receiver is gone when the caller gave up: the result is dropped.
            let _ = tx.send(job());
        })
        .map_err(|e| Error::image(path, format!("cannot start a decoding thread: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::image(
            path,
            format!(
                "decoding took longer than {} s; abandoned",
                limit.as_secs_f64()
            ),
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(Error::image(path, "the decoding thread crashed"))
        }
    }
}

/// [`DicomFile::open`] + [`DicomFile::render`] of frame `frame` with `window`, within `limit`.
pub fn render_with_time_limit(
    path: &Path,
    frame: usize,
    window: WindowChoice,
    options: DicomOptions,
    limit: Duration,
) -> Result<Rendered> {
    let owned: PathBuf = path.to_path_buf();
    with_time_limit(path, limit, move || {
        DicomFile::open(&owned, options)?.render(frame, window)
    })
}

/// [`open_any_with`] (any supported image, DICOM or not) within `limit`.
pub fn open_any_with_time_limit(
    path: &Path,
    frame: Option<usize>,
    window: Option<WindowChoice>,
    options: DicomOptions,
    limit: Duration,
) -> Result<DynamicImage> {
    let owned: PathBuf = path.to_path_buf();
    with_time_limit(path, limit, move || {
        open_any_with(&owned, frame, window, options)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_on_a_slow_job_and_passes_results_and_errors_through() {
        let path = Path::new("slow.dcm");
        let start = std::time::Instant::now();
        let e = with_time_limit(path, Duration::from_millis(1), || {
            std::thread::sleep(Duration::from_secs(2));
            Ok(1)
        })
        .unwrap_err()
        .to_string();
        assert!(start.elapsed() < Duration::from_millis(500));
        assert!(
            e.contains("slow.dcm") && e.contains("0.001 s; abandoned"),
            "{e}"
        );
        assert_eq!(with_time_limit(path, Duration::MAX, || Ok(2)).unwrap(), 2);
        let e = with_time_limit::<u8>(path, Duration::from_secs(5), || {
            Err(Error::image("x.dcm", "bad"))
        });
        assert!(e.unwrap_err().to_string().contains("bad"));
    }
}
