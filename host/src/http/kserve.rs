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
    run(
        state,
        model,
        version,
        JobKind::Predict,
        protocol,
        req,
        payload,
    )
    .await
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
