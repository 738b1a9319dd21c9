//! The OpenAI-compatible API: `POST /v1/completions`, `POST /v1/chat/completions` (with
//! `"stream": true` as server-sent events) and `GET /v1/models`, so that OpenAI's client
//! libraries work unchanged.
//!
//! The host routes by the body's `model` and frames the answer; the plugin (such as `gpt`)
//! reads the OpenAI request (it sees `cresset-protocol` = `openai-completions` or
//! `openai-chat`) and writes OpenAI-shaped objects: the whole answer, or one chunk per piece of
//! text and a last one with `finish_reason` (and `usage` when asked). Errors use OpenAI's
//! `{"error": {"message", "type", "param", "code"}}`.

use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

use super::inference::{acquire, answer, receive, request_id, respond, Framing, Protocol};
use super::{resource, ApiError, AppState};
use crate::worker::JobKind;

/// Register the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/models").route(web::get().to(models)))
        .service(resource("/v1/completions").route(web::post().to(completions)))
        .service(resource("/v1/chat/completions").route(web::post().to(chat)));
}

/// An error in OpenAI's shape.
fn openai_error(status: StatusCode, message: &str) -> HttpResponse {
    let kind = match status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 | 403 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    HttpResponse::build(status).json(json!({
        "error": {"message": super::error::redact(message), "type": kind, "param": null, "code": null}
    }))
}

fn render(e: &ApiError) -> HttpResponse {
    let message = match e {
        ApiError::Plugin(p) => p.message.to_string(),
        other => other.to_string(),
    };
    openai_error(e.status_code(), &message)
}

async fn models(state: web::Data<AppState>) -> HttpResponse {
    let (versions, _) = state.registry.list(0, usize::MAX);
    let data: Vec<Value> = versions
        .iter()
        .map(|v| json!({"id": v.name, "object": "model", "created": 0, "owned_by": "cresset"}))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

async fn completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    generate(state, req, payload, Protocol::OpenAiCompletions).await
}

async fn chat(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    generate(state, req, payload, Protocol::OpenAiChat).await
}

async fn generate(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    protocol: Protocol,
) -> HttpResponse {
    let id = request_id(&req);
    let started = Instant::now();
    let (request, arriving) = match receive(&state, &id, protocol, &req, payload).await {
        Ok(r) => r,
        Err(e) => return render(&e),
    };
    let body: Value = match serde_json::from_slice(&request.body) {
        Ok(v) => v,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not valid JSON: {e}"),
            )
        }
    };
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "`model` must be a string naming a served model",
        );
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                &format!("`stream` must be true or false. Given: {v}"),
            )
        }
    };
    let target = match state.registry.get(model, None) {
        Ok(t) => t,
        Err(_) => {
            return openai_error(
                StatusCode::NOT_FOUND,
                &format!("The model `{model}` does not exist"),
            )
        }
    };
    let permit = match acquire(&state, &target) {
        Ok(p) => p,
        Err(e) => return render(&e),
    };
    drop(arriving);
    let framing = if stream { Framing::Sse } else { Framing::Raw };
    let result = answer(&target, JobKind::Predict, request, &req, permit, framing).await;
    respond(&state, &target, &id, started, result, render)
}
