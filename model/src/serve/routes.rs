//! The HTTP endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::ServeOptions;
use super::api::ChatRequest;
use super::conversation::Conversation;
use super::error::ApiError;
use super::images::{self, ImageLimits};
use super::queue::{CancelOnDrop, JobEvent, Queue, Work};
use crate::engine::Engine;
use crate::generate::{FinishReason, Generation, SamplingParams};
use crate::llava::IMAGE_SLOT;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The model (handlers use its tokenizer; compute happens on the queue's worker).
    pub engine: Arc<Engine>,
    /// The queue.
    pub queue: Arc<Queue>,
    /// Server options.
    pub options: Arc<ServeOptions>,
    /// When the server started (Unix seconds), the model's `created`.
    pub started: u64,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).expect("JSON value"),
    )
        .into_response()
}

impl AppState {
    /// With an API key, checks `Authorization: Bearer <key>` in constant time.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.options.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            None => Err(ApiError::unauthorized(
                "missing API key: send `Authorization: Bearer <key>`",
            )),
            Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("incorrect API key")),
        }
    }

    fn model_object(&self) -> Value {
        json!({"id": self.options.model_name, "object": "model", "created": self.started,
               "owned_by": "llava-med"})
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    let status = if st.queue.is_shutting_down() {
        "shutting_down"
    } else {
        "ok"
    };
    json_response(
        StatusCode::OK,
        &json!({"status": status, "model": st.options.model_name,
                "device": st.engine.device.kind.to_string(), "queue": st.queue.health()}),
    )
}

async fn models(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [st.model_object()]}),
    )
}

async fn model(State(st): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return e.into_response();
    }
    if id != st.options.model_name {
        return ApiError::not_found("model_not_found", format!("no model `{id}` here"))
            .into_response();
    }
    json_response(StatusCode::OK, &st.model_object())
}

async fn not_found(State(st): State<AppState>, req: Request) -> Response {
    if let Err(e) = st.authorize(req.headers()) {
        return e.into_response();
    }
    ApiError::not_found(
        "not_found",
        format!("no endpoint {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::method_not_allowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

async fn chat(State(st): State<AppState>, req: Request) -> Response {
    let start = Instant::now();
    let id = format!("chatcmpl-{:024x}", rand::random::<u128>() >> 32);
    let result = chat_inner(&st, &id, req).await;
    match result {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(
                id,
                status = e.status.as_u16(),
                code = e.code,
                ms = start.elapsed().as_millis() as u64,
                "chat completion refused"
            );
            e.into_response()
        }
    }
}

/// A request checked and prepared: what the worker needs, plus what the response needs.
struct Prepared {
    work: Work,
    stream: bool,
    include_usage: bool,
}

async fn chat_inner(st: &AppState, id: &str, req: Request) -> Result<Response, ApiError> {
    st.authorize(req.headers())?;
    let limit = st.options.max_body_bytes();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(body_too_large(limit));
    }
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                body_too_large(limit)
            } else {
                ApiError::bad_request("invalid_body", format!("cannot read the request body: {e}"))
            }
        })?;
    let request = ChatRequest::parse(&body)?;
    drop(body);
    let settings = request.settings(&st.options.model_name)?;
    let conversation = Conversation::from_messages(&request.messages)?;
    let slot = st.queue.admit()?;
    // Image decoding and tokenising run beside the generation thread, not on the async runtime.
    let engine = st.engine.clone();
    let options = st.options.clone();
    let stream = request.stream;
    let include_usage = request.include_usage();
    let prepared = tokio::task::spawn_blocking(move || -> Result<Prepared, ApiError> {
        let limits = ImageLimits {
            max_bytes: options.max_image_bytes,
            allow_local_files: options.allow_local_files,
            decode_timeout: options.decode_timeout,
        };
        let images = conversation
            .images
            .iter()
            .enumerate()
            .map(|(i, img)| images::decode(i, img, &limits))
            .collect::<Result<Vec<_>, _>>()?;
        let template = options.template.unwrap_or(engine.template);
        let ids = engine.conversation_ids(
            template,
            conversation.system.as_deref(),
            &conversation.turns,
            !images.is_empty(),
        )?;
        let slots = ids.iter().filter(|&&i| i == IMAGE_SLOT).count();
        if slots != images.len() {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("the prompt has {slots} image placeholder(s) but {} image(s) were sent", images.len()),
            ));
        }
        if !images.is_empty() && engine.preprocess().is_none() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "this model is text-only and takes no images",
            ));
        }
        if options.log_prompts {
            tracing::info!(prompt = %template.render(conversation.system.as_deref(), &conversation.turns), "prompt");
        }
        let room = engine
            .model
            .lm
            .max_positions()
            .saturating_sub(engine.prompt_positions(&ids));
        Ok(Prepared {
            work: Work {
                template,
                ids,
                images,
                sampling: SamplingParams {
                    temperature: settings.temperature,
                    top_p: settings.top_p,
                    seed: settings.seed,
                },
                max_new_tokens: settings.max_tokens.unwrap_or(room).min(room),
                stop: settings.stop,
            },
            stream,
            include_usage,
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??;
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = st.queue.submit(slot, prepared.work, tx)?;
    let reply = Reply {
        id: id.to_string(),
        model: st.options.model_name.clone(),
        created: now(),
        start: Instant::now(),
    };
    if prepared.stream {
        Ok(reply.stream(rx, CancelOnDrop(cancel), prepared.include_usage))
    } else {
        let guard = CancelOnDrop(cancel);
        let r = reply.complete(rx).await;
        drop(guard);
        r
    }
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::too_large(
        "request_too_large",
        format!(
            "the request body is over the server's limit of {:.1} MB (it follows --max-image-mb)",
            limit as f64 / 1e6
        ),
    )
}

/// What identifies one answer.
struct Reply {
    id: String,
    model: String,
    created: u64,
    start: Instant,
}

impl Reply {
    fn usage(g: &Generation) -> Value {
        let completion = g.tokens.len();
        json!({"prompt_tokens": g.prompt_positions, "completion_tokens": completion,
               "total_tokens": g.prompt_positions + completion,
               "prompt_tokens_details": {"cached_tokens": g.cached_positions}})
    }

    fn finish_reason(g: &Generation) -> &'static str {
        match g.finish {
            FinishReason::Length => "length",
            _ => "stop",
        }
    }

    fn log(&self, g: &Generation, stream: bool) {
        tracing::info!(
            id = self.id,
            stream,
            prompt_tokens = g.prompt_positions,
            cached_tokens = g.cached_positions,
            completion_tokens = g.tokens.len(),
            finish = Self::finish_reason(g),
            ms = self.start.elapsed().as_millis() as u64,
            "chat completion"
        );
    }

    /// A non-streaming answer: waits for the whole generation.
    async fn complete(
        self,
        mut rx: mpsc::UnboundedReceiver<JobEvent>,
    ) -> Result<Response, ApiError> {
        while let Some(event) = rx.recv().await {
            match event {
                JobEvent::Started | JobEvent::Text(_) => {}
                JobEvent::Failed(e) => return Err(e),
                JobEvent::Done(g) => {
                    self.log(&g, false);
                    let body = json!({
                        "id": self.id, "object": "chat.completion", "created": self.created,
                        "model": self.model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                                     "finish_reason": Self::finish_reason(&g), "logprobs": null}],
                        "usage": Self::usage(&g),
                    });
                    return Ok(json_response(StatusCode::OK, &body));
                }
            }
        }
        Err(ApiError::internal("the generation ended without an answer"))
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        Event::default().data(
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
            .to_string(),
        )
    }

    /// A streaming answer: server-sent `chat.completion.chunk` events, then `[DONE]`. A task forwards the
    /// worker's events; when the client disconnects the response stream is dropped, the task notices at
    /// once and the guard it holds cancels the generation.
    fn stream(
        self,
        mut rx: mpsc::UnboundedReceiver<JobEvent>,
        guard: CancelOnDrop,
        include_usage: bool,
    ) -> Response {
        let (out, out_rx) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
        tokio::spawn(async move {
            let _guard = guard;
            let send = |e: Event| out.send(Ok(e)).is_ok();
            if !send(self.chunk(json!({"role": "assistant", "content": ""}), None)) {
                return;
            }
            loop {
                let event = tokio::select! {
                    _ = out.closed() => return,
                    e = rx.recv() => e,
                };
                let ok = match event {
                    Some(JobEvent::Started) => true,
                    Some(JobEvent::Text(t)) => send(self.chunk(json!({"content": t}), None)),
                    Some(JobEvent::Done(g)) => {
                        self.log(&g, true);
                        send(self.chunk(json!({}), Some(Self::finish_reason(&g))));
                        if include_usage {
                            send(
                                Event::default().data(
                                    json!({"id": self.id, "object": "chat.completion.chunk",
                                       "created": self.created, "model": self.model,
                                       "choices": [], "usage": Self::usage(&g)})
                                    .to_string(),
                                ),
                            );
                        }
                        send(Event::default().data("[DONE]"));
                        return;
                    }
                    Some(JobEvent::Failed(e)) => {
                        send(Event::default().data(e.body().to_string()));
                        send(Event::default().data("[DONE]"));
                        return;
                    }
                    None => return,
                };
                if !ok {
                    return;
                }
            }
        });
        Sse::new(UnboundedReceiverStream::new(out_rx))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
            .into_response()
    }
}
