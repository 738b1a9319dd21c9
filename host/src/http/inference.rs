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
use super::{ApiError, AppState};
use crate::registry::{ModelVersion, SubmitError};
use crate::worker::{Job, JobKind, Reply, REPLY_BUFFER};

/// Register the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ping", web::get().to(ping))
        .route("/predictions/{model}", web::post().to(infer))
        .route("/predictions/{model}/{version}", web::post().to(infer))
        .route("/explanations/{model}", web::post().to(infer))
        .route("/explanations/{model}/{version}", web::post().to(infer));
}

/// Healthy only when every model that should have workers has them all up.
pub(super) async fn ping(state: web::Data<AppState>) -> HttpResponse {
    let (ready, not_ready) = state.registry.readiness();
    if ready {
        HttpResponse::Ok().json(serde_json::json!({ "status": "Healthy" }))
    } else {
        HttpResponse::InternalServerError()
            .json(serde_json::json!({ "status": "Unhealthy", "models": not_ready }))
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
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Self::TorchServe => "torchserve",
            Self::KServeV1 => "kserve-v1",
            Self::KServeV2 => "kserve-v2",
        }
    }
}

/// How often a waiting request checks that its client is still connected.
const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Headers never passed to plugins.
const PRIVATE_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

fn request_id(req: &HttpRequest) -> String {
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
) -> Result<HttpResponse, ApiError> {
    // Answer 404 before reading a body for nobody, but hold no reference to the version while
    // the body arrives: a slow client must not keep a version from draining.
    state
        .registry
        .get(&model, version.as_deref())
        .map_err(ApiError::from)?;
    let id = request_id(&req);
    // The global cap: answer 429 at once rather than queue without bound. The permit lives as
    // long as the request, streams included.
    let permit = match state.in_flight.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            state
                .metrics
                .requests_total
                .with_label_values(&[model.as_str(), "", "429"])
                .inc();
            return Err(ApiError::TooManyRequests(
                state.config.max_concurrent_requests,
            ));
        }
    };
    let started = Instant::now();
    let request = match tokio::time::timeout(
        BODY_TIMEOUT,
        read_request(&state, &id, protocol, &req, payload),
    )
    .await
    {
        Ok(request) => request?,
        Err(_) => {
            return Err(ApiError::BadRequest(format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            )))
        }
    };
    let target = state
        .registry
        .get(&model, version.as_deref())
        .map_err(ApiError::from)?;
    let result = answer(&target, kind, request, &req, permit).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status_code(),
    };
    let labels = [target.name.as_str(), target.version.as_str()];
    state
        .metrics
        .requests_total
        .with_label_values(&[labels[0], labels[1], status.as_str()])
        .inc();
    // For a stream, this is the time to its first chunk.
    state
        .metrics
        .request_latency
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    // Errors carry the version and request id too.
    let mut response = result.unwrap_or_else(|e| e.error_response());
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&target.version) {
        headers.insert(HeaderName::from_static("x-model-version"), v);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    Ok(response)
}

/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Read the body and make the plugin's `Request`.
async fn read_request(
    state: &AppState,
    id: &str,
    protocol: Protocol,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Request, ApiError> {
    let (content_type, body, mut params) =
        read_body(req, payload, state.config.max_request_size).await?;
    params.push(KeyValue::new("cresset-protocol", protocol.name()));
    if let Ok(query) = web::Query::<Vec<(String, String)>>::from_query(req.query_string()) {
        params.extend(
            query
                .into_inner()
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v)),
        );
    }
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

async fn answer(
    target: &ModelVersion,
    kind: JobKind,
    request: Request,
    req: &HttpRequest,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<HttpResponse, ApiError> {
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
    let peer = req.conn_data::<PeerSocket>();
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
        Ok(Some(Reply::Final(Ok(response)))) => Ok(whole(response)),
        Ok(Some(Reply::Final(Err(e)))) => Err(ApiError::Plugin(e)),
        Ok(Some(Reply::Chunk(first))) => {
            Ok(streamed(first, rx, timeout, target.name.clone(), permit))
        }
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

fn whole(response: Response) -> HttpResponse {
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
) -> HttpResponse {
    let mut builder = HttpResponse::Ok();
    if !first.content_type.is_empty() {
        builder.content_type(first.content_type.as_str());
    }
    with_plugin_headers(&mut builder, &first.headers);
    let head = futures_util::stream::once(async move {
        Ok::<Bytes, actix_web::Error>(Bytes::from(first.body.into_vec()))
    });
    let tail = futures_util::stream::unfold(Some(rx), move |rx| {
        // The stream owns the concurrency permit: it is released when the stream ends.
        let _permit = &permit;
        let model = model.clone();
        async move {
            let mut rx = rx?;
            match tokio::time::timeout(idle_timeout, rx.recv()).await {
                Ok(Some(Reply::Chunk(c))) => Some((Ok(Bytes::from(c.body.into_vec())), Some(rx))),
                Ok(Some(Reply::Final(Ok(r)))) => Some((Ok(Bytes::from(r.body.into_vec())), None)),
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
) -> Result<(String, Vec<u8>, Vec<KeyValue>), ApiError> {
    if super::body::is_multipart(req) {
        return read_multipart(req, payload, max).await;
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(ApiError::PayloadTooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((content_type, body, Vec::new()))
}

async fn read_multipart(
    req: &HttpRequest,
    payload: web::Payload,
    max: usize,
) -> Result<(String, Vec<u8>, Vec<KeyValue>), ApiError> {
    let (mut form, over_cap) = super::body::capped_multipart(req, payload, max as u64);
    let failed = |what: String| {
        if over_cap() {
            ApiError::PayloadTooLarge(max)
        } else {
            ApiError::BadRequest(what)
        }
    };
    let mut data: Option<(String, Vec<u8>)> = None;
    let mut params = Vec::new();
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| failed(format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or_default().to_owned();
        let field_type = field
            .content_type()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk =
                chunk.map_err(|e| failed(format!("malformed multipart field `{name}`: {e}")))?;
            bytes.extend_from_slice(&chunk);
        }
        if (name == "data" || name == "body") && data.is_none() {
            data = Some((field_type, bytes));
        } else {
            params.push(KeyValue::new(
                name,
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    let (content_type, body) =
        data.ok_or_else(|| ApiError::BadRequest("the multipart form has no `data` field".into()))?;
    Ok((content_type, body, params))
}
