//! TorchServe's inference API: `/ping`, `/predictions/{model}[/{version}]`,
//! `/explanations/{model}[/{version}]`.

use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use cresset_plugin_api::{KeyValue, Request, Response};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::peer::PeerSocket;
use super::{resource, ApiError, AppState};
use crate::registry::{ModelVersion, SubmitError};
use crate::worker::{Job, JobKind, Reply, REPLY_BUFFER};

/// Register the routes.
/// Predictions take `PUT` as well as `POST` (what `curl -T file` sends), as in TorchServe.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/ping").route(web::get().to(ping)));
    for path in ["/predictions/{model}", "/predictions/{model}/{version}"] {
        cfg.service(
            resource(path)
                .route(web::post().to(infer))
                .route(web::put().to(infer)),
        );
    }
    for path in ["/explanations/{model}", "/explanations/{model}/{version}"] {
        cfg.service(resource(path).route(web::post().to(infer)));
    }
}

/// Healthy when no model that should have workers is still coming up (failed ones are listed
/// but do not hold it).
pub(super) async fn ping(state: web::Data<AppState>) -> HttpResponse {
    let (ready, body) = health(&state);
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::InternalServerError().json(body)
    }
}

/// Whether the server is ready, and `/ping`'s body: `{"status": "Healthy"}` (or `Unhealthy`)
/// with what [`readiness`] may say.
pub(crate) fn health(state: &AppState) -> (bool, serde_json::Value) {
    let (ready, details) = readiness(state);
    let mut body = serde_json::json!({ "status": if ready { "Healthy" } else { "Unhealthy" } });
    merge(&mut body, details);
    (ready, body)
}

/// Whether the server is ready, and what health routes (which need no token) may say about the
/// models: their names and states when the inference API is open, counts only when it needs a
/// token.
pub(crate) fn readiness(state: &AppState) -> (bool, serde_json::Value) {
    let readiness = state.registry.readiness();
    let named = state.keys.is_none() || !state.config.inference_token_auth;
    let mut details = if named {
        serde_json::json!({ "models": readiness.not_ready, "failed": readiness.failed })
    } else {
        serde_json::json!({
            "notReady": readiness.not_ready.len(),
            "failed": readiness.failed.len(),
        })
    };
    // Shutting down: not ready, whatever the models are.
    if state.is_draining() {
        details["draining"] = true.into();
        return (false, details);
    }
    (readiness.ready(), details)
}

/// Add the fields of `extra` (an object) to `body` (an object).
pub(super) fn merge(body: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
}

/// `/predictions/...` and `/explanations/...`, with or without a version.
async fn infer(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let kind = if req.path().starts_with("/explanations/") {
        JobKind::Explain
    } else {
        JobKind::Predict
    };
    let model = req.match_info().get("model").unwrap_or_default().to_owned();
    let version = req.match_info().get("version").map(str::to_owned);
    run(
        state,
        model,
        version,
        kind,
        Protocol::TorchServe,
        req,
        payload,
        ApiError::error_response,
    )
    .await
}

/// Which API a request came through; plugins see it as the `cresset-protocol` parameter, so
/// that they can answer in that protocol's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/predictions`, `/explanations`.
    TorchServe,
    /// `POST /v1/models/{m}:predict` (`{"instances": [...]}` in, `{"predictions": [...]}` out).
    KServeV1,
    /// `POST /v2/models/{m}/infer` (Open Inference Protocol tensors).
    KServeV2,
    /// `POST /v1/completions` (OpenAI).
    OpenAiCompletions,
    /// `POST /v1/chat/completions` (OpenAI).
    OpenAiChat,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Self::TorchServe => "torchserve",
            Self::KServeV1 => "kserve-v1",
            Self::KServeV2 => "kserve-v2",
            Self::OpenAiCompletions => "openai-completions",
            Self::OpenAiChat => "openai-chat",
        }
    }
}

/// How often a waiting request checks that its client is still connected.
const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Headers never passed to plugins.
const PRIVATE_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

pub(super) fn request_id(req: &HttpRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

pub(super) async fn run(
    state: web::Data<AppState>,
    model: String,
    version: Option<String>,
    kind: JobKind,
    protocol: Protocol,
    req: HttpRequest,
    payload: web::Payload,
    render: fn(&ApiError) -> HttpResponse,
) -> Result<HttpResponse, ApiError> {
    // Answer 404 before reading a body for nobody, but hold no reference to the version while
    // the body arrives: a slow client must not keep a version from draining.
    state
        .registry
        .get(&model, version.as_deref())
        .map_err(ApiError::from)?;
    let id = request_id(&req);
    let started = Instant::now();
    let (request, arriving) = receive(&state, &id, protocol, &req, payload).await?;
    // KServe bodies are the host's to check, before any plugin sees them.
    match protocol {
        Protocol::KServeV1 => super::oip::check_v1(&request.body).map_err(ApiError::BadRequest)?,
        Protocol::KServeV2 => super::oip::check_v2(&request.body).map_err(ApiError::BadRequest)?,
        _ => {}
    }
    let target = state
        .registry
        .get(&model, version.as_deref())
        .map_err(ApiError::from)?;
    let permit = acquire(&state, &target)?;
    drop(arriving);
    let result = answer(&target, kind, request, &req, permit, Framing::Raw).await;
    Ok(respond(&state, &target, &id, started, result, render))
}

/// The global cap on requests in flight, taken once the body has arrived (a slow body must not
/// hold it): answer 429 at once rather than queue without bound. The permit lives as long as
/// the request, streams included.
pub(crate) fn acquire(
    state: &AppState,
    target: &ModelVersion,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state.in_flight.clone().try_acquire_owned().map_err(|_| {
        state
            .metrics
            .requests_total
            .with_label_values(&[target.name.as_str(), target.version.as_str(), "429"])
            .inc();
        ApiError::TooManyRequests(state.config.max_concurrent_requests)
    })
}

/// Receive the request: a body-in-transit slot while it arrives (429 when all are taken), each
/// chunk within `body_idle_timeout` (408 when it stalls). The slot comes back with the request:
/// the caller keeps it until it holds an in-flight permit ([`acquire`]), so that a request is
/// always counted while a shutdown waits for the requests in progress. Refused with 503 once
/// the server is shutting down.
pub(super) async fn receive(
    state: &AppState,
    id: &str,
    protocol: Protocol,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<(Request, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let arriving = state.in_transit.clone().try_acquire_owned().map_err(|_| {
        state
            .metrics
            .requests_total
            .with_label_values(&["", "", "429"])
            .inc();
        ApiError::TooManyBodies(state.config.max_bodies_in_transit)
    })?;
    // Checked with the slot held: a shutdown that starts after this waits for this request.
    if state.is_draining() {
        return Err(ApiError::shutting_down());
    }
    let request = read_request(state, id, protocol, req, payload).await?;
    Ok((request, arriving))
}

/// Count the answer in the metrics, render an error with `render`, and add the version and
/// request id headers.
pub(super) fn respond(
    state: &AppState,
    target: &ModelVersion,
    id: &str,
    started: Instant,
    result: Result<HttpResponse, ApiError>,
    render: impl Fn(&ApiError) -> HttpResponse,
) -> HttpResponse {
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status_code(),
    };
    // For a stream, this is the time to its first chunk.
    state.metrics.record_request(
        &target.name,
        &target.version,
        status.as_u16(),
        started.elapsed().as_secs_f64(),
    );
    // Errors carry the version and request id too.
    let mut response = result.unwrap_or_else(|e| render(&e));
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&target.version) {
        headers.insert(HeaderName::from_static("x-model-version"), v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    response
}

/// Read the body and make the plugin's `Request`.
async fn read_request(
    state: &AppState,
    id: &str,
    protocol: Protocol,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Request, ApiError> {
    let (content_type, body, mut params) = read_body(
        req,
        payload,
        state.config.max_request_size,
        state.config.body_idle_timeout,
    )
    .await?;
    // The server's own parameters (`cresset-protocol`, ...) are the host's to say: a client's
    // own are dropped.
    if let Ok(query) = web::Query::<Vec<(String, String)>>::from_query(req.query_string()) {
        params.extend(
            query
                .into_inner()
                .into_iter()
                .filter(|(k, _)| !k.starts_with(super::body::RESERVED_PREFIX))
                .map(|(k, v)| KeyValue::new(k, v)),
        );
    }
    params.push(KeyValue::new("cresset-protocol", protocol.name()));
    let headers = req
        .headers()
        .iter()
        .filter(|(name, _)| !PRIVATE_HEADERS.contains(&name.as_str()))
        .filter_map(|(name, value)| value.to_str().ok().map(|v| KeyValue::new(name.as_str(), v)))
        .collect::<Vec<_>>();
    Ok(Request {
        id: id.into(),
        content_type: content_type.into(),
        body: body.into(),
        headers: headers.into(),
        params: params.into(),
    })
}

/// How an answer goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// The plugin's bytes as they are; chunks as a chunked body.
    Raw,
    /// Server-sent events: each chunk and the final body as a `data:` event, then
    /// `data: [DONE]` (OpenAI's streaming).
    Sse,
}

fn sse_event(body: &[u8]) -> Bytes {
    let mut event = Vec::with_capacity(body.len() + 8);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// What a model answered: a whole response, or the first chunk of a stream with the rest to
/// come (and the in-flight permit, which the stream keeps until it ends).
pub(crate) enum Answered {
    Whole(Response),
    Stream(
        Response,
        mpsc::Receiver<Reply>,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

/// Submit `request` to `target` and wait for its first reply, within the model's response
/// timeout; while waiting, a client whose connection `peer` has closed cancels it.
pub(crate) async fn await_answer(
    target: &ModelVersion,
    kind: JobKind,
    request: Request,
    peer: Option<&PeerSocket>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Answered, ApiError> {
    let id = request.id.to_string();
    let (tx, mut rx) = mpsc::channel(REPLY_BUFFER);
    target
        .submit(Job { request, kind, reply: tx, enqueued: Instant::now() })
        .map_err(|e| match e {
            SubmitError::NotReady(why) => ApiError::Unavailable(why),
            SubmitError::QueueFull(n) => ApiError::Unavailable(format!(
                "model `{}` already has {n} requests queued, the most `job_queue_size` allows; retry later",
                target.name
            )),
        })?;
    let timeout = Duration::from_secs(target.config.response_timeout_s);
    let deadline = tokio::time::Instant::now() + timeout;
    let first = loop {
        let tick = (tokio::time::Instant::now() + CLIENT_CHECK_INTERVAL).min(deadline);
        tokio::select! {
            reply = rx.recv() => break Ok(reply),
            _ = tokio::time::sleep_until(tick) => {
                if peer.is_some_and(PeerSocket::is_gone) {
                    tracing::debug!(model = %target.name, request_id = %id, "client went away; cancelling");
                    return Err(ApiError::ClientGone);
                }
                if tokio::time::Instant::now() >= deadline {
                    break Err(());
                }
            }
        }
    };
    match first {
        Err(()) => Err(ApiError::Timeout {
            model: target.name.clone(),
            seconds: target.config.response_timeout_s,
        }),
        Ok(None) => Err(ApiError::Internal(format!(
            "the worker of model `{}` stopped without answering",
            target.name
        ))),
        Ok(Some(Reply::Final(Ok(response)))) => Ok(Answered::Whole(response)),
        Ok(Some(Reply::Final(Err(e)))) => Err(ApiError::Plugin(e)),
        Ok(Some(Reply::Chunk(first))) => Ok(Answered::Stream(first, rx, permit)),
    }
}

pub(super) async fn answer(
    target: &ModelVersion,
    kind: JobKind,
    request: Request,
    req: &HttpRequest,
    permit: tokio::sync::OwnedSemaphorePermit,
    framing: Framing,
) -> Result<HttpResponse, ApiError> {
    let peer = req.conn_data::<PeerSocket>();
    match await_answer(target, kind, request, peer, permit).await? {
        Answered::Whole(response) if framing == Framing::Sse => {
            let mut body = Vec::new();
            if !response.body.is_empty() {
                body.extend_from_slice(&sse_event(&response.body));
            }
            body.extend_from_slice(SSE_DONE);
            Ok(HttpResponse::Ok()
                .content_type("text/event-stream")
                .body(body))
        }
        Answered::Whole(response) => Ok(whole(response)),
        Answered::Stream(first, rx, permit) => Ok(streamed(
            first,
            rx,
            Duration::from_secs(target.config.response_timeout_s),
            target.name.clone(),
            permit,
            framing,
        )),
    }
}

fn with_plugin_headers(builder: &mut actix_web::HttpResponseBuilder, headers: &[KeyValue]) {
    for kv in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(kv.key.as_str()),
            HeaderValue::from_str(&kv.value),
        ) {
            builder.insert_header((name, value));
        }
    }
}

pub(super) fn whole(response: Response) -> HttpResponse {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    let mut builder = HttpResponse::build(status);
    if !response.content_type.is_empty() {
        builder.content_type(response.content_type.as_str());
    }
    with_plugin_headers(&mut builder, &response.headers);
    builder.body(response.body.into_vec())
}

/// A chunked response: the first chunk, the chunks that follow, then the final body. A plugin
/// error or a stall longer than the response timeout after the first chunk aborts the stream,
/// so the client sees an incomplete body rather than a false success.
fn streamed(
    first: Response,
    rx: mpsc::Receiver<Reply>,
    idle_timeout: Duration,
    model: String,
    permit: tokio::sync::OwnedSemaphorePermit,
    framing: Framing,
) -> HttpResponse {
    let mut builder = HttpResponse::Ok();
    if framing == Framing::Sse {
        builder.content_type("text/event-stream");
        builder.insert_header(("cache-control", "no-cache"));
    } else if !first.content_type.is_empty() {
        builder.content_type(first.content_type.as_str());
    }
    with_plugin_headers(&mut builder, &first.headers);
    let frame = move |body: Vec<u8>, last: bool| -> Bytes {
        match framing {
            Framing::Raw => Bytes::from(body),
            Framing::Sse => {
                let mut out = if body.is_empty() {
                    Vec::new()
                } else {
                    sse_event(&body).to_vec()
                };
                if last {
                    out.extend_from_slice(SSE_DONE);
                }
                Bytes::from(out)
            }
        }
    };
    let head_body = frame(first.body.into_vec(), false);
    let head = futures_util::stream::once(async move { Ok::<Bytes, actix_web::Error>(head_body) });
    let tail = futures_util::stream::unfold(Some(rx), move |rx| {
        // The stream owns the concurrency permit: it is released when the stream ends.
        let _permit = &permit;
        let model = model.clone();
        async move {
            let mut rx = rx?;
            match tokio::time::timeout(idle_timeout, rx.recv()).await {
                Ok(Some(Reply::Chunk(c))) => Some((Ok(frame(c.body.into_vec(), false)), Some(rx))),
                Ok(Some(Reply::Final(Ok(r)))) => Some((Ok(frame(r.body.into_vec(), true)), None)),
                Ok(Some(Reply::Final(Err(e)))) if framing == Framing::Sse => {
                    // Headers are gone: the error travels as an event, as OpenAI's does.
                    tracing::warn!(%model, "stream ended with an error: {e}");
                    let event = serde_json::json!({"error": {"message": super::error::redact(e.message.as_str()), "type": "server_error", "param": null, "code": null}});
                    Some((Ok(frame(event.to_string().into_bytes(), true)), None))
                }
                Ok(Some(Reply::Final(Err(e)))) => {
                    tracing::warn!(%model, "stream ended with an error: {e}");
                    Some((
                        Err(actix_web::error::ErrorInternalServerError(e.to_string())),
                        None,
                    ))
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(%model, "stream ended without a final response");
                    Some((
                        Err(actix_web::error::ErrorGatewayTimeout("no final response")),
                        None,
                    ))
                }
            }
        }
    });
    builder.streaming(head.chain(tail))
}

/// Read the body: raw bytes or JSON as they are; for `multipart/form-data`, the `data` (or
/// `body`) field is the body and the other fields become parameters.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
    idle: Duration,
) -> Result<(String, Vec<u8>, Vec<KeyValue>), ApiError> {
    if super::body::is_multipart(req) {
        let form = super::body::read_form(req.headers(), payload, max, idle);
        return super::body::without_panics("multipart body", form).await;
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = Vec::new();
    while let Some(chunk) = super::body::next_within(idle, payload.next()).await? {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(ApiError::PayloadTooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((content_type, body, Vec::new()))
}
