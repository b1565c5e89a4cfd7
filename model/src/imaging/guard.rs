//! Containing panics of the C-backed and third-party decoders (dicom-rs, mozjpeg): [`contain`] runs a closure behind `catch_unwind` and turns a panic into
//! its message, without the default panic hook printing it on stderr.
//!
//! A process-wide hook is installed once (on first use) that stays silent for panics raised inside
//! [`contain`] on the current thread (their message is returned instead, and logged at `debug` level) and
//! hands every other panic to the hook that was installed before, so the application's own panics still
//! print as usual. An application that installs its own hook afterwards replaces this one; then contained
//! panics are printed again, but still contained.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, PanicHookInfo, catch_unwind};
use std::sync::Once;

thread_local! {
    /// Nesting depth of [`contain`] on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The message of the last contained panic on this thread.
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL: Once = Once::new();

/// Runs `f`; a panic inside it comes back as `Err(message)` and is not printed.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
            if DEPTH.with(Cell::get) > 0 {
                let message = describe(info);
                tracing::debug!("contained panic: {message}");
                MESSAGE.with(|m| *m.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
    DEPTH.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    result.map_err(|payload| {
        MESSAGE
            .with(|m| m.borrow_mut().take())
            .or_else(|| payload_text(payload.as_ref()))
            .unwrap_or_else(|| "panic".to_string())
    })
}

/// The panic's message and where it was raised.
fn describe(info: &PanicHookInfo<'_>) -> String {
    let text = payload_text(info.payload()).unwrap_or_else(|| "panic".to_string());
    match info.location() {
        Some(l) => {
            // `…/registry/src/index.crates.io-…/CRATE-VERSION/src/x.rs` → `CRATE-VERSION/src/x.rs`.
            let file = l.file();
            let file = match file.find("/registry/src/") {
                Some(i) => file[i + 14..]
                    .split_once('/')
                    .map_or(file, |(_, rest)| rest),
                None => file,
            };
            format!("{text} (at {file}:{})", l.line())
        }
        None => text,
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_message_of_a_contained_panic() {
        let e = contain(|| -> u8 { panic!("bad length {}", 7) }).unwrap_err();
        assert!(e.starts_with("bad length 7 (at "), "{e}");
        assert_eq!(contain(|| 3), Ok(3));
    }
}
