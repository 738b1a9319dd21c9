//! TorchServe's management API: register (`register`: from the store, a URL or an upload),
//! list, describe, scale, set-default, unregister. Each call's work is a function of the
//! server's state and its parameters, answering an [`Answer`], which the REST routes here and
//! TorchServe's gRPC management service (`crate::grpc::management`) both send.

mod register;

use std::sync::Arc;
use std::time::SystemTime;

use actix_web::http::StatusCode;
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{resource, ApiError, AppState};
use crate::registry::{ModelState, ModelVersion};

/// Register the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/models")
            .route(web::post().to(register::register))
            .route(web::get().to(list)),
    );
    for path in ["/models/{model}", "/models/{model}/{version}"] {
        cfg.service(
            resource(path)
                .route(web::get().to(describe))
                .route(web::put().to(scale))
                .route(web::delete().to(unregister)),
        );
    }
    cfg.service(
        resource("/models/{model}/{version}/set-default").route(web::put().to(set_default)),
    );
}

/// Write the snapshot before acknowledging a change, so that no acknowledged change is lost.
fn persist(state: &AppState) -> Result<(), ApiError> {
    state
        .registrar
        .persist()
        .map_err(|e| ApiError::Internal(format!("cannot write the snapshot: {e}")))
}

pub use register::{register_url, RegisterParams};

/// Run a change in a task of its own and wait for it: a client that goes away (a closed
/// connection, a gRPC deadline) does not leave the change half made (workers started but not
/// recorded, an archive downloaded but not registered).
pub async fn whole<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(change)
        .await
        .map_err(|e| ApiError::Internal(format!("the change stopped: {e}")))?
}

/// What a management call answers: REST's status and JSON body (gRPC's `msg`).
pub struct Answer {
    pub code: StatusCode,
    pub body: Value,
}

impl Answer {
    /// `{"status": message}`, TorchServe's shape for a change.
    fn status(code: StatusCode, message: String) -> Self {
        Self {
            code,
            body: json!({ "status": message }),
        }
    }

    fn ok(body: Value) -> Self {
        Self {
            code: StatusCode::OK,
            body,
        }
    }
}

impl From<Answer> for HttpResponse {
    fn from(a: Answer) -> Self {
        HttpResponse::build(a.code).json(a.body)
    }
}

fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("bad query parameter: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    next_page_token: Option<String>,
}

async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let params: ListParams = query(&req)?;
    list_models(&state, params.limit, params.next_page_token.as_deref()).map(HttpResponse::from)
}

/// A page of the registered models: at most `limit` (100 when not given) from `token` on.
pub fn list_models(
    state: &AppState,
    limit: Option<usize>,
    token: Option<&str>,
) -> Result<Answer, ApiError> {
    let limit = limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "`limit` must be between 1 and 1000. Given: {limit}"
        )));
    }
    let offset = match token {
        None | Some("") => 0,
        Some(token) => token.parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!(
                "`next_page_token` is not a token this server gave. Given: {token:?}"
            ))
        })?,
    };
    let (page, total) = state.registry.list(offset, limit);
    let models: Vec<Value> = page
        .iter()
        .map(|v| json!({ "modelName": v.name, "modelUrl": super::error::redact(&v.origin.url) }))
        .collect();
    let mut body = json!({ "models": models });
    let next = offset.saturating_add(limit);
    if next < total {
        body["nextPageToken"] = json!(next.to_string());
    }
    Ok(Answer::ok(body))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

use crate::isolation::resident_bytes;

fn describe_version(v: &ModelVersion, default: &str) -> Value {
    let state = v.state();
    let (min_workers, max_workers) = v.worker_bounds();
    let processes = v.worker_processes();
    let workers: Vec<Value> = v
        .workers()
        .into_iter()
        .map(|w| {
            let mut worker = json!({
                "id": w.id.to_string(),
                "startTime": rfc3339(w.started),
                "status": w.status.name(),
                "gpu": v.config.device_type == crate::archive::DeviceKind::Gpu,
                "intraOpThreads": w.threads,
            });
            match &processes {
                // Threads of the server: its process.
                None => worker["pid"] = json!(std::process::id()),
                Some(table) => {
                    let process = table.get(&w.id).cloned().unwrap_or_default();
                    worker["pid"] = json!(process.pid);
                    worker["memoryUsage"] =
                        json!(process.pid.and_then(|p| resident_bytes(Some(p))));
                    worker["restarts"] = json!(process.restarts);
                    worker["lastExit"] = json!(process.last_exit);
                }
            }
            worker
        })
        .collect();
    let plugin = v.plugin().map(|p| {
        json!({
            "name": p.description.name.as_str(),
            "version": p.description.plugin_version.as_str(),
            "abiVersion": p.description.abi_version.as_str(),
            "capabilities": p.description.capabilities.names(),
            "sha256": p.sha256,
        })
    });
    let mut body = json!({
        "modelName": v.name,
        "modelVersion": v.version,
        "modelUrl": super::error::redact(&v.origin.url),
        "runtime": "cresset",
        "handler": v.handler,
        "minWorkers": min_workers,
        "maxWorkers": max_workers,
        "autoWorkers": v.auto_workers(),
        "warnings": v.config.warnings,
        "batchSize": v.config.batch_size,
        "maxBatchDelay": v.config.max_batch_delay_ms,
        "responseTimeout": v.config.response_timeout_s,
        "loadedAtStartup": v.origin.at_startup,
        "isDefault": v.version == default,
        "state": state.name(),
        "queueDepth": v.queue_depth(),
        "jobQueueStatus": {
            "remainingCapacity": (v.config.job_queue_size as usize).saturating_sub(v.queue_depth()),
            "pendingRequests": v.queue_depth(),
        },
        "isolation": v.config.isolation.name(),
        "processMemoryUsage": resident_bytes(None),
        "workers": workers,
        "openmpWait": crate::config::openmp_wait(),
        "plugin": plugin,
        "config": serde_json::to_value(&v.config).unwrap_or(Value::Null),
    });
    if let ModelState::Failed(failure) = state {
        body["error"] = json!(super::error::redact(&failure.message));
        body["failure"] = json!(failure.kind.name());
    }
    body
}

async fn describe(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let model = req.match_info().get("model").unwrap_or_default();
    describe_model(&state, model, req.match_info().get("version")).map(HttpResponse::from)
}

/// A model's versions: the default (`version` not given), one, or `all`.
pub fn describe_model(
    state: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<Answer, ApiError> {
    let draining = state.registry.draining(model);
    let (versions, default) = match state.registry.versions(model) {
        Ok(found) => found,
        // A model whose last version is draining is still described, as `Draining`.
        Err(e) if draining.is_empty() => return Err(e.into()),
        Err(_) => (Vec::new(), String::new()),
    };
    let body: Vec<Value> = match version {
        Some("all") => versions
            .iter()
            .chain(&draining)
            .map(|v| describe_version(v, &default))
            .collect(),
        None if versions.is_empty() => draining
            .iter()
            .map(|v| describe_version(v, &default))
            .collect(),
        Some(wanted) if !versions.iter().any(|v| v.version == wanted) => {
            let v = draining
                .iter()
                .find(|v| v.version == wanted)
                .ok_or_else(|| {
                    ApiError::from(crate::registry::RegistryError::NoVersion(
                        model.to_owned(),
                        wanted.to_owned(),
                    ))
                })?;
            vec![describe_version(v, &default)]
        }
        wanted => vec![describe_version(
            &*state.registry.get(model, wanted)?,
            &default,
        )],
    };
    Ok(Answer::ok(json!(body)))
}

/// `PUT /models/{m}[/{v}]` parameters (TorchServe's names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleParams {
    pub min_worker: Option<u32>,
    pub max_worker: Option<u32>,
    pub synchronous: Option<bool>,
    /// TorchServe's: seconds a stopping worker may take over its pending requests (-1: as long
    /// as they need, TorchServe's default and what Cresset's workers always do).
    pub timeout: Option<i64>,
    /// TorchServe's GPUs per worker (legacy): 0 is the only value with a meaning here.
    pub number_gpu: Option<u32>,
}

async fn scale(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let params: ScaleParams = query(&req)?;
    let model = req.match_info().get("model").unwrap_or_default().to_owned();
    let version = req.match_info().get("version").map(str::to_owned);
    let state = state.into_inner();
    whole(async move { scale_workers(state, &model, version.as_deref(), params).await })
        .await
        .map(HttpResponse::from)
}

/// Scale a version's workers (synchronously, or answering 202 at once).
pub async fn scale_workers(
    state: Arc<AppState>,
    model: &str,
    version: Option<&str>,
    params: ScaleParams,
) -> Result<Answer, ApiError> {
    if params.timeout.is_some_and(|t| t != -1) {
        return Err(ApiError::BadRequest(
            "`timeout`: Cresset's workers always finish the requests they hold before they stop (TorchServe's -1); other values are not supported".into(),
        ));
    }
    if params.number_gpu.is_some_and(|n| n != 0) {
        return Err(ApiError::BadRequest(
            "`number_gpu`: a model's GPUs come from its config (`deviceType`, `deviceIds`); give 0 or leave it out".into(),
        ));
    }
    let version = state.registry.get(model, version)?;
    // A version still loading (registered without `synchronous`) is scaled once it is loaded.
    let now = match version.state() {
        ModelState::Loading => version.settled().await,
        other => other,
    };
    if now != ModelState::Ready {
        return Err(ApiError::Conflict(format!(
            "model `{}` version `{}` is {}; only a Ready version can be scaled",
            version.name,
            version.version,
            now.name()
        )));
    }
    let (old_min, old_max) = version.worker_bounds();
    let min = params.min_worker.unwrap_or(old_min);
    let max = params.max_worker.unwrap_or(old_max.max(min));
    if min > 1024 || max > 1024 {
        return Err(ApiError::BadRequest(format!(
            "`min_worker` and `max_worker` must be <= 1024. Given: {min}, {max}"
        )));
    }
    if max < min {
        return Err(ApiError::BadRequest(format!(
            "`max_worker` must be >= `min_worker` ({min}). Given: {max}"
        )));
    }
    // Scale, then record and persist what was achieved, one scaling at a time per version: the
    // snapshot never holds a worker count that did not start.
    let apply = {
        let state = state.clone();
        let version = version.clone();
        async move {
            let _one_at_a_time = version.scale_lock.lock().await;
            let ctx = state.registrar.ctx.clone();
            let scaling = version.clone();
            tokio::task::spawn_blocking(move || scaling.scale(&ctx, min))
                .await
                .map_err(|e| ApiError::Internal(format!("the scaler stopped: {e}")))?
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            version.set_worker_bounds(min, max);
            persist(&state)
        }
    };
    if !params.synchronous.unwrap_or(false) {
        tokio::spawn(async move {
            if let Err(e) = apply.await {
                tracing::error!("scaling failed: {e}");
            }
        });
        return Ok(Answer::status(
            StatusCode::ACCEPTED,
            "Processing worker updates...".into(),
        ));
    }
    apply.await?;
    Ok(Answer::status(
        StatusCode::OK,
        format!(
            "Workers scaled to {min} for model: {}, version: {}",
            version.name, version.version
        ),
    ))
}

async fn set_default(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let model = req.match_info().get("model").unwrap_or_default();
    let version = req.match_info().get("version").unwrap_or_default();
    set_default_version(&state, model, version).map(HttpResponse::from)
}

/// Make `version` the model's default.
pub fn set_default_version(
    state: &AppState,
    model: &str,
    version: &str,
) -> Result<Answer, ApiError> {
    state.registry.set_default(model, version)?;
    persist(state)?;
    tracing::info!(%model, %version, "default version changed");
    Ok(Answer::status(
        StatusCode::OK,
        format!("Default version successfully updated for model \"{model}\" to \"{version}\""),
    ))
}

/// How long an unregister waits for an idle version's workers to stop before it answers.
const UNREGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn unregister(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let model = req.match_info().get("model").unwrap_or_default().to_owned();
    let version = req.match_info().get("version").map(str::to_owned);
    let state = state.into_inner();
    whole(async move { unregister_model(&state, &model, version.as_deref()).await })
        .await
        .map(HttpResponse::from)
}

/// Unregister a version (the default one when `version` is not given).
pub async fn unregister_model(
    state: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<Answer, ApiError> {
    let done = state.registrar.unregister(model, version)?;
    let (name, version) = done.which;
    tracing::info!(model = %name, %version, "unregistered; draining");
    // As TorchServe does, answer once the workers have stopped, unless requests are still in
    // flight on the version: they finish first, and describe shows it `Draining` meanwhile.
    if let Some(drained) = done.drained {
        let _ = tokio::time::timeout(UNREGISTER_WAIT, drained).await;
    }
    done.persisted
        .map_err(|e| ApiError::Internal(format!("cannot write the snapshot: {e}")))?;
    Ok(Answer::status(
        StatusCode::OK,
        format!("Model \"{name}\" unregistered"),
    ))
}
