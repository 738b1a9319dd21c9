//! KServe v1 (`:predict`) and the Open Inference Protocol v2 (health, model metadata and
//! readiness, `infer`), on the inference listener. Bodies go to the plugin as JSON (the binary
//! tensor extension decoded first), with the `cresset-protocol` parameter telling it which
//! shape to answer in.

use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use cresset_plugin_api::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::inference::{
    acquire, await_answer, receive, request_id, respond, run, Answered, Protocol,
};
use super::peer::PeerSocket;
use super::{resource, ApiError, AppState};
use crate::registry::{ModelState, ModelVersion};
use crate::worker::JobKind;

/// Register the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/models/{model:[^/:]+}:predict").route(web::post().to(predict)))
        .service(resource("/v2").route(web::get().to(server_metadata)))
        .service(resource("/v2/health/live").route(web::get().to(live)))
        .service(resource("/v2/health/ready").route(web::get().to(ready)));
    for path in [
        "/v2/models/{model}",
        "/v2/models/{model}/versions/{version}",
    ] {
        cfg.service(resource(path).route(web::get().to(metadata)));
    }
    for path in [
        "/v2/models/{model}/ready",
        "/v2/models/{model}/versions/{version}/ready",
    ] {
        cfg.service(resource(path).route(web::get().to(model_ready)));
    }
    for path in [
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    ] {
        cfg.service(resource(path).route(web::post().to(infer)));
    }
}

fn target(req: &HttpRequest) -> (String, Option<String>) {
    let model = req.match_info().get("model").unwrap_or_default().to_owned();
    (model, req.match_info().get("version").map(str::to_owned))
}

/// `:predict` (KServe v1).
async fn predict(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (model, version) = target(&req);
    Ok(run(
        state,
        model,
        version,
        JobKind::Predict,
        Protocol::KServeV1,
        req,
        payload,
        oip_error,
    )
    .await
    .unwrap_or_else(|e| oip_error(&e)))
}

/// `/infer` (Open Inference Protocol v2): tensors as JSON, or in the binary tensor extension
/// (a JSON header of `Inference-Header-Content-Length` bytes, then the binary inputs); the
/// outputs the request asks for in binary come back so (all of them with
/// `parameters.binary_data_output`, each named one as its `parameters.binary_data` says).
async fn infer(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let (model, version) = target(&req);
    let id = request_id(&req);
    let started = Instant::now();
    let (target, result) = match receive_v2(&state, &req, payload, &model, version, &id).await {
        Ok((target, request, binary, permit)) => {
            let peer = req.conn_data::<PeerSocket>();
            let answered = run_v2(&target, &model, request, peer, permit)
                .await
                .and_then(|answer| v2_http(answer, &binary));
            (target, answered)
        }
        Err(e) => return oip_error(&e),
    };
    respond(&state, &target, &id, started, result, oip_error)
}

/// Receive a v2 request over REST as plain JSON (the binary extension decoded), checked: the
/// version to run, the request, which outputs go back in binary, and an in-flight permit.
async fn receive_v2(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    model: &str,
    version: Option<String>,
    id: &str,
) -> Result<
    (
        Arc<ModelVersion>,
        Request,
        crate::tensor_wire::BinaryOutputs,
        OwnedSemaphorePermit,
    ),
    ApiError,
> {
    // 404 before reading a body for nobody.
    state.registry.get(model, version.as_deref())?;
    let header_len = match req.headers().get("inference-header-content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "Inference-Header-Content-Length must be a number of bytes".into(),
                    )
                })?,
        ),
    };
    let (mut request, arriving) = receive(state, id, Protocol::KServeV2, req, payload).await?;
    let binary = match header_len {
        Some(len) => {
            let (json, binary) = crate::tensor_wire::request_from_binary(
                &request.body,
                len,
                state.config.max_request_size,
            )
            .map_err(ApiError::BadRequest)?;
            request.body = json.into();
            request.content_type = "application/json".into();
            binary
        }
        None => match serde_json::from_slice::<Value>(&request.body) {
            Ok(mut value) => {
                let binary = crate::tensor_wire::wants_binary_output(&mut value);
                if binary.any() {
                    request.body = serde_json::to_vec(&value)
                        .map_err(|e| ApiError::Internal(e.to_string()))?
                        .into();
                }
                binary
            }
            // Not JSON: the check below says so.
            Err(_) => Default::default(),
        },
    };
    super::oip::check_v2(&request.body).map_err(ApiError::BadRequest)?;
    let target = state.registry.get(model, version.as_deref())?;
    let permit = acquire(state, &target)?;
    drop(arriving);
    Ok((target, request, binary, permit))
}

/// Run a checked v2 request (JSON) on `target`: the plugin's answer, with the model that was
/// addressed and the version that answered named in it. Shared by REST and gRPC.
pub(crate) async fn run_v2(
    target: &ModelVersion,
    model: &str,
    request: Request,
    peer: Option<&PeerSocket>,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    match await_answer(target, JobKind::Predict, request, peer, permit).await? {
        Answered::Whole(mut response) => {
            if response.status == 200 {
                if let Some(named) = super::oip::name_model(&response.body, model, &target.version)
                {
                    response.body = named.into();
                }
            }
            Ok(response)
        }
        Answered::Stream(..) => Err(ApiError::Internal(format!(
            "model `{model}` streams its answer, which the Open Inference Protocol cannot carry"
        ))),
    }
}

/// A v2 answer over REST: as the plugin gave it, or with the outputs the client asked for in
/// binary.
fn v2_http(
    response: Response,
    binary: &crate::tensor_wire::BinaryOutputs,
) -> Result<HttpResponse, ApiError> {
    if !binary.any() || response.status != 200 {
        return Ok(super::inference::whole(response));
    }
    let Some((body, header_len)) =
        crate::tensor_wire::answer_to_binary(&response.body, binary).map_err(ApiError::Internal)?
    else {
        return Ok(super::inference::whole(response));
    };
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(("inference-header-content-length", header_len.to_string()))
        .body(body))
}

/// KServe's and the Open Inference Protocol's error body: `{"error": "..."}`.
fn oip_error(e: &ApiError) -> HttpResponse {
    let full = e.to_string();
    HttpResponse::build(actix_web::ResponseError::status_code(e))
        .json(json!({ "error": super::error::redact(&full) }))
}

/// `GET /v2`: the server's metadata.
async fn server_metadata() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "cresset",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "live": true }))
}

/// Ready as `/ping` is: every model that should have workers has them all up.
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let (ready, details) = super::inference::readiness(&state);
    let mut body = json!({ "ready": ready });
    super::inference::merge(&mut body, details);
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metadata(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (model, version) = target(&req);
    let (versions, platform) = model_metadata(&state, &model, version.as_deref())?;
    Ok(HttpResponse::Ok().json(json!({
        "name": model,
        "versions": versions,
        "platform": platform,
        "inputs": [],
        "outputs": [],
    })))
}

/// A model's v2 metadata (REST and gRPC): the versions (the one asked for, else all) and the
/// platform, `cresset/<plugin>`.
pub(crate) fn model_metadata(
    state: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<(Vec<String>, String), ApiError> {
    let chosen = state.registry.get(model, version)?;
    let versions: Vec<String> = match version {
        Some(v) => vec![v.to_owned()],
        None => state
            .registry
            .versions(model)?
            .0
            .iter()
            .map(|v| v.version.clone())
            .collect(),
    };
    let platform = chosen
        .plugin()
        .map(|p| format!("cresset/{}", p.description.name))
        .unwrap_or_else(|| "cresset".into());
    Ok((versions, platform))
}

/// Whether a model version takes requests (REST and gRPC `ModelReady`): loaded, with a live
/// worker, and the server not shutting down.
pub(crate) fn model_is_ready(state: &AppState, v: &ModelVersion) -> bool {
    !state.is_draining() && v.state() == ModelState::Ready && v.live_workers() > 0
}

async fn model_ready(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (model, version) = target(&req);
    let v = state.registry.get(&model, version.as_deref())?;
    let ready = model_is_ready(&state, &v);
    let body = json!({ "name": model, "version": v.version, "ready": ready });
    Ok(if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}
