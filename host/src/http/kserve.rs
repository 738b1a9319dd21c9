//! KServe v1 (`:predict`) and the Open Inference Protocol v2 (health, model metadata and
//! readiness, `infer`), on the inference listener. Bodies go to the plugin unchanged, with the
//! `cresset-protocol` parameter telling it which shape to answer in.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::inference::{run, Protocol};
use super::{resource, ApiError, AppState};
use crate::registry::ModelState;
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
        cfg.service(resource(path).route(web::post().to(predict)));
    }
}

fn target(req: &HttpRequest) -> (String, Option<String>) {
    let model = req.match_info().get("model").unwrap_or_default().to_owned();
    (model, req.match_info().get("version").map(str::to_owned))
}

/// `:predict` (KServe v1) and `/infer` (OIP v2): the protocol follows from the path.
async fn predict(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (model, version) = target(&req);
    let protocol = if req.path().starts_with("/v1/") {
        Protocol::KServeV1
    } else {
        Protocol::KServeV2
    };
    if req
        .headers()
        .contains_key("inference-header-content-length")
    {
        return Ok(oip_error(&ApiError::BadRequest(
            "the binary tensor extension (Inference-Header-Content-Length) is not supported; \
             send the tensors as JSON (tritonclient: binary_data=False)"
                .into(),
        )));
    }
    let response = match run(
        state,
        model.clone(),
        version,
        JobKind::Predict,
        protocol,
        req,
        payload,
        oip_error,
    )
    .await
    {
        Ok(response) => response,
        Err(e) => return Ok(oip_error(&e)),
    };
    if protocol != Protocol::KServeV2 || response.status() != actix_web::http::StatusCode::OK {
        return Ok(response);
    }
    // A v2 answer names the model that was addressed and the version that answered.
    let served = response
        .headers()
        .get("x-model-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (head, body) = response.into_parts();
    let bytes = actix_web::body::to_bytes(body)
        .await
        .map_err(|_| ApiError::Internal("cannot read the plugin's answer".into()))?;
    let named = super::oip::name_model(&bytes, &model, &served).unwrap_or_else(|| bytes.to_vec());
    Ok(head.set_body(named).map_into_boxed_body())
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
    let chosen = state.registry.get(&model, version.as_deref())?;
    let versions: Vec<String> = match version {
        Some(v) => vec![v],
        None => state
            .registry
            .versions(&model)?
            .0
            .iter()
            .map(|v| v.version.clone())
            .collect(),
    };
    let platform = chosen
        .plugin()
        .map(|p| format!("cresset/{}", p.description.name))
        .unwrap_or_else(|| "cresset".into());
    Ok(HttpResponse::Ok().json(json!({
        "name": model,
        "versions": versions,
        "platform": platform,
        "inputs": [],
        "outputs": [],
    })))
}

async fn model_ready(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (model, version) = target(&req);
    let v = state.registry.get(&model, version.as_deref())?;
    let ready = v.state() == ModelState::Ready && v.live_workers() > 0;
    let body = json!({ "name": model, "version": v.version, "ready": ready });
    Ok(if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}
