//! `llava-med serve`: the engine as a local OpenAI-compatible HTTP server, for the desktop app (which runs
//! it as a supervised child process) and for any OpenAI client.
//!
//! One model is resident; its compute runs on one thread ([`queue`]) while HTTP, image decoding and
//! tokenising run beside it. The server binds loopback by default and refuses a non-loopback address without
//! an API key. It stops on SIGTERM/SIGINT (and on stdin EOF when asked): new requests get 503, queued ones
//! are cancelled, the running one gets a grace period and is then cancelled, and the process ends within a
//! bounded time.

mod api;
mod conversation;
mod error;
mod images;
mod queue;
mod routes;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::ApiError;

use crate::engine::Engine;
use crate::prompt::Template;

/// Most images in one request (the request body limit allows this many at the image size limit).
pub use conversation::MAX_IMAGES;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind (a host name or IP).
    pub host: String,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// The bearer token every request must carry, if any.
    pub api_key: Option<String>,
    /// Requests that may wait behind the running one before 429.
    pub max_queue: usize,
    /// Largest image file in a request, in bytes.
    pub max_image_bytes: usize,
    /// Whether `file://` image URLs are read.
    pub allow_local_files: bool,
    /// Whether prompts are logged (never by default: they may hold patient information).
    pub log_prompts: bool,
    /// The model id clients name.
    pub model_name: String,
    /// Template instead of the model's.
    pub template: Option<Template>,
    /// Longest time one image may take to decode.
    pub decode_timeout: Duration,
    /// How long a running generation may go on after a shutdown signal before it is cancelled.
    pub shutdown_grace: Duration,
    /// Shut down when stdin reaches end of file (the parent process died or closed it).
    pub exit_on_stdin_eof: bool,
    /// Conversations whose KV caches are kept between requests, so the next turn of each computes only
    /// its new positions ([`crate::generate::PromptCache`]); 0 keeps none.
    pub prompt_cache_slots: usize,
}

impl ServeOptions {
    /// The request body limit: room for [`MAX_IMAGES`] images of the largest size in base64, plus text.
    pub fn max_body_bytes(&self) -> usize {
        self.max_image_bytes
            .saturating_mul(4)
            .div_ceil(3)
            .saturating_mul(MAX_IMAGES)
            .saturating_add(1 << 20)
    }

    /// Refuses unsafe settings: a non-loopback address without an API key.
    pub fn check(&self) -> Result<(), ServeError> {
        if self.api_key.is_none() && !is_loopback(&self.host) {
            return Err(ServeError::Refused(format!(
                "refusing to listen on `{}` without an API key: anyone on the network could use the \
                 model; set one with --api-key-env VAR, or bind 127.0.0.1",
                self.host
            )));
        }
        Ok(())
    }
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The options are unsafe or inconsistent.
    #[error("{0}")]
    Refused(String),
    /// The async runtime failed.
    #[error("server runtime: {0}")]
    Runtime(std::io::Error),
}

/// Whether every address `host` resolves to is a loopback address.
fn is_loopback(host: &str) -> bool {
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// Serves `engine` until a shutdown signal. Prints `{"event":"ready","port":…,"model":…}` on stdout once
/// it accepts requests.
pub fn run(engine: Engine, options: ServeOptions) -> Result<(), ServeError> {
    options.check()?;
    let listener =
        std::net::TcpListener::bind((options.host.as_str(), options.port)).map_err(|e| {
            ServeError::Bind {
                addr: format!("{}:{}", options.host, options.port),
                source: e,
            }
        })?;
    listener
        .set_nonblocking(true)
        .map_err(ServeError::Runtime)?;
    let port = listener.local_addr().map_err(ServeError::Runtime)?.port();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("llava-med-http")
        .build()
        .map_err(ServeError::Runtime)?;
    let lm = &engine.model.lm;
    tracing::info!(
        slots = options.prompt_cache_slots,
        mb_per_slot_at_most = lm.kv_cache_bytes(lm.max_positions()) / 1_000_000,
        "prompt cache: the KV caches of up to this many conversations are kept between requests (each \
         grows with its conversation)"
    );
    let engine = Arc::new(engine);
    let (queue, worker) = queue::Queue::start(
        engine.clone(),
        options.max_queue,
        options.prompt_cache_slots,
    );
    let options = Arc::new(options);
    let state = routes::AppState {
        engine,
        queue: queue.clone(),
        options: options.clone(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(ServeError::Runtime)?;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        spawn_signal_watchers(stop_tx, options.exit_on_stdin_eof)?;
        let ready = serde_json::json!({"event": "ready", "host": options.host, "port": port,
                                       "model": options.model_name});
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{ready}").and_then(|_| out.flush());
        }
        tracing::info!(port, model = options.model_name, "listening");
        let q = queue.clone();
        let grace = options.shutdown_grace;
        let shutdown = async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tracing::info!("shutting down");
            q.begin_shutdown();
            // Bound the whole shutdown: the running generation gets the grace period, then is cancelled
            // at its next token; if even that does not end the process, it ends anyway.
            let q2 = q.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                q2.cancel_running();
            });
            std::thread::spawn(move || {
                std::thread::sleep(grace + Duration::from_secs(2));
                tracing::error!("shutdown did not finish in time; exiting");
                std::process::exit(1);
            });
        };
        axum::serve(listener, routes::router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServeError::Runtime)
    })?;
    queue.begin_shutdown();
    queue.cancel_running();
    drop(queue);
    let _ = worker.join();
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT (and stdin EOF when asked) set `stop`.
fn spawn_signal_watchers(
    stop: tokio::sync::watch::Sender<bool>,
    stdin_eof: bool,
) -> Result<(), ServeError> {
    let stop = Arc::new(stop);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            let _ = s.send(true);
        });
    }
    #[cfg(not(unix))]
    {
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = s.send(true);
        });
    }
    if stdin_eof {
        std::thread::Builder::new()
            .name("llava-med-stdin".into())
            .spawn(move || {
                let mut sink = [0u8; 4096];
                let mut stdin = std::io::stdin().lock();
                while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
                tracing::info!("stdin closed");
                let _ = stop.send(true);
            })
            .map_err(ServeError::Runtime)?;
    }
    Ok(())
}
