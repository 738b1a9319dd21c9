//! `POST /models`: register an archive from the store, an allowed URL, or an upload (kept in
//! the store as it arrives), with TorchServe's parameters in the query or a JSON body.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use super::super::{ApiError, AppState};
use super::{query, Answer};
use crate::archive::{resolve_in_store, ConfigOverrides, OpenedArchive};
use crate::registry::registrar::RegisterError;
use crate::registry::store::{Incoming, IncomingError};
use crate::registry::{LoadError, ModelState, ModelVersion, Origin};
use actix_web::http::StatusCode;

/// `POST /models` parameters (TorchServe's names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterParams {
    pub url: Option<String>,
    pub model_name: Option<String>,
    pub batch_size: Option<u32>,
    pub max_batch_delay: Option<u64>,
    pub initial_workers: Option<u32>,
    pub synchronous: Option<bool>,
    pub response_timeout: Option<u64>,
}

impl RegisterParams {
    /// These parameters with `other`'s where these have none; a parameter given twice with
    /// different values is an error naming it.
    fn merged(self, other: Self) -> Result<Self, ApiError> {
        fn one<T: PartialEq + std::fmt::Debug>(
            name: &str,
            a: Option<T>,
            b: Option<T>,
        ) -> Result<Option<T>, ApiError> {
            match (a, b) {
                (Some(a), Some(b)) if a != b => Err(ApiError::BadRequest(format!(
                    "`{name}` is given in the query ({a:?}) and in the body ({b:?})"
                ))),
                (a, b) => Ok(a.or(b)),
            }
        }
        Ok(Self {
            url: one("url", self.url, other.url)?,
            model_name: one("model_name", self.model_name, other.model_name)?,
            batch_size: one("batch_size", self.batch_size, other.batch_size)?,
            max_batch_delay: one(
                "max_batch_delay",
                self.max_batch_delay,
                other.max_batch_delay,
            )?,
            initial_workers: one(
                "initial_workers",
                self.initial_workers,
                other.initial_workers,
            )?,
            synchronous: one("synchronous", self.synchronous, other.synchronous)?,
            response_timeout: one(
                "response_timeout",
                self.response_timeout,
                other.response_timeout,
            )?,
        })
    }
}

/// The most bytes of a JSON registration body (`{"url": ..., "initial_workers": ...}`).
const MAX_REGISTER_JSON: usize = 64 * 1024;

/// A JSON registration body: the query's parameters as an object.
async fn register_json(
    state: &AppState,
    mut payload: web::Payload,
) -> Result<RegisterParams, ApiError> {
    let idle = state.config.body_idle_timeout;
    let mut bytes = Vec::new();
    while let Some(chunk) = crate::http::body::next_within(idle, payload.next()).await? {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
        if bytes.len() + chunk.len() > MAX_REGISTER_JSON {
            return Err(ApiError::PayloadTooLarge(MAX_REGISTER_JSON));
        }
        bytes.extend_from_slice(&chunk);
    }
    let bad = |m: String| ApiError::BadRequest(format!("bad JSON registration body: {m}"));
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(bad("it must be an object of the query's parameters".into()));
    };
    // Field by field, so that a value of the wrong type is named.
    let mut params = RegisterParams::default();
    for (key, value) in fields {
        let one = serde_json::Value::Object([(key.clone(), value)].into_iter().collect());
        let field: RegisterParams =
            serde_json::from_value(one).map_err(|e| bad(format!("`{key}`: {e}")))?;
        params = params.merged(field)?;
    }
    Ok(params)
}

pub(super) async fn register(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let mut params: RegisterParams = query(&req)?;
    // TorchServe also takes the parameters as a JSON body; an archive is uploaded with any
    // other content type.
    let json_body = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    let mut payload = Some(payload);
    if json_body {
        if let Some(body) = payload.take() {
            params = params.merged(register_json(&state, body).await?)?;
        }
        if params.url.is_none() {
            return Err(ApiError::BadRequest(
                "a JSON registration body must give `url` (an archive is uploaded with another content type)".into(),
            ));
        }
    }
    let (path, url) = match params.url.as_deref().map(str::trim) {
        Some(url) if !url.is_empty() => locate(&state, url).await?,
        _ => {
            let payload = payload.ok_or_else(|| {
                ApiError::BadRequest("`url` is empty and the body was read as JSON".into())
            })?;
            let path = save_upload(&state, &req, payload).await?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (path, name)
        }
    };
    let state = state.into_inner();
    super::whole(async move { register_archive(&state, params, path, url).await })
        .await
        .map(HttpResponse::from)
}

/// Register the archive `params.url` names (an archive in the store or an allowed http(s)
/// URL): `POST /models?url=...` without its REST parts (an upload, a JSON body).
pub async fn register_url(
    state: Arc<AppState>,
    params: RegisterParams,
) -> Result<Answer, ApiError> {
    let url = params.url.clone().unwrap_or_default();
    let (path, url) = locate(&state, url.trim()).await?;
    register_archive(&state, params, path, url).await
}

/// The archive file `url` names: downloaded from an allowed http(s) URL into the store, or an
/// archive of the store.
async fn locate(state: &AppState, url: &str) -> Result<(PathBuf, String), ApiError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        let parsed = state
            .config
            .allowed_urls
            .check(url)
            .map_err(ApiError::Forbidden)?;
        return Ok((download(state, parsed).await?, url.to_owned()));
    }
    if Path::new(url).is_absolute() {
        return Err(ApiError::Forbidden(format!(
            "`url` must be an archive name in the model store or an allowed http(s) URL, not a path. Given: {url:?}"
        )));
    }
    let path = resolve_in_store(&state.config.model_store, url)
        .map_err(|e| ApiError::ModelNotFound(e.to_string()))?;
    Ok((path, url.to_owned()))
}

/// Register the archive at `path` (named `url` in answers and the snapshot).
async fn register_archive(
    state: &AppState,
    params: RegisterParams,
    path: PathBuf,
    url: String,
) -> Result<Answer, ApiError> {
    let archive_file = state.registrar.archive_name(&path);
    // An archive the server kept (an upload, a download) that is refused is not kept.
    let refused = |e: ApiError| {
        state
            .registrar
            .forget_archive_if_unused(&archive_file, None);
        e
    };

    let ctx = state.registrar.ctx.clone();
    let archive = web::block(move || {
        OpenedArchive::open(
            &path,
            &ctx.extract_dir,
            &ctx.limits,
            ctx.archive_cache.as_deref(),
        )
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the archive reader stopped: {e}")))?
    .map_err(|e| refused(ApiError::from(LoadError::from(e))))?;
    if let Some(name) = &params.model_name {
        crate::archive::validate_name("model_name", name)
            .map_err(|e| refused(ApiError::BadRequest(e)))?;
    }
    let overrides = ConfigOverrides {
        batch_size: params.batch_size,
        max_batch_delay_ms: params.max_batch_delay,
        min_workers: params.initial_workers,
        max_workers: None,
        response_timeout_s: params.response_timeout,
    };
    let config = archive
        .config
        .clone()
        .with_overrides(&overrides)
        .map_err(|e| refused(ApiError::BadRequest(e)))?;
    let origin = Origin {
        url,
        archive_file: archive_file.clone(),
        at_startup: false,
        overrides,
        loaded_before: false,
    };
    let version = Arc::new(ModelVersion::from_archive(
        archive,
        params.model_name.clone(),
        config,
        origin,
    ));
    state
        .registrar
        .register(version.clone())
        .map_err(|e| match e {
            RegisterError::Registry(e) => refused(e.into()),
            other => ApiError::Internal(other.to_string()),
        })?;
    // TorchServe's words: a registration with no workers to start is answered at once.
    let no_workers = || {
        Answer::status(
            StatusCode::OK,
            format!(
                "Model \"{}\" Version: {} registered with 0 initial workers. Use scale workers API to add workers for the model.",
                version.name, version.version
            ),
        )
    };
    if !params.synchronous.unwrap_or(false) {
        if version.config.min_workers == Some(0) {
            return Ok(no_workers());
        }
        return Ok(Answer::status(
            StatusCode::ACCEPTED,
            "Processing worker updates...".into(),
        ));
    }
    match version.settled().await {
        ModelState::Failed(failure) => {
            // A registration that cannot load is not kept.
            state.registrar.withdraw_failed(&version);
            Err(ApiError::LoadFailed {
                model: version.name.clone(),
                version: version.version.clone(),
                failure,
            })
        }
        ModelState::Draining => Err(ApiError::Conflict(format!(
            "model `{}` version `{}` was unregistered while it was loading",
            version.name, version.version
        ))),
        _ if version.worker_bounds().0 == 0 => Ok(no_workers()),
        _ => Ok(Answer::status(
            StatusCode::OK,
            format!(
                "Model \"{}\" Version: {} registered with {} initial workers",
                version.name,
                version.version,
                version.worker_bounds().0
            ),
        )),
    }
}

impl From<IncomingError> for ApiError {
    fn from(e: IncomingError) -> Self {
        match e {
            IncomingError::TooLarge(max) => {
                ApiError::PayloadTooLarge(usize::try_from(max).unwrap_or(usize::MAX))
            }
            IncomingError::Empty => ApiError::BadRequest(
                "give `url` (an archive in the model store, or an allowed http(s) URL), or send the archive as the body".into(),
            ),
            IncomingError::UnknownFormat => ApiError::BadRequest(e.to_string()),
            IncomingError::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Keep a finished upload or download in the store.
async fn keep(
    incoming: Incoming,
    store: PathBuf,
    prefix: &'static str,
) -> Result<PathBuf, ApiError> {
    let (path, _existed) = web::block(move || incoming.keep(&store, prefix))
        .await
        .map_err(|e| ApiError::Internal(format!("the archive writer stopped: {e}")))??;
    Ok(path)
}

async fn save_upload(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<PathBuf, ApiError> {
    crate::http::body::without_panics("upload", receive_upload(state, req, payload)).await
}

async fn receive_upload(
    state: &AppState,
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<PathBuf, ApiError> {
    let max = state.config.max_upload_size;
    let idle = state.config.body_idle_timeout;
    let store = state.config.model_store.clone();
    let mut incoming = Incoming::new(&store, max)?;
    if crate::http::body::is_multipart(req) {
        let (mut form, over_cap) = crate::http::body::capped_multipart(req.headers(), payload, max);
        let too_big = || ApiError::PayloadTooLarge(usize::try_from(max).unwrap_or(usize::MAX));
        let mut taken = false;
        while let Some(field) = crate::http::body::next_within(idle, form.next()).await? {
            let mut field = field.map_err(|e| {
                if over_cap() {
                    too_big()
                } else {
                    ApiError::BadRequest(format!("malformed multipart body: {e}"))
                }
            })?;
            let wanted =
                !taken && matches!(field.name(), Some("data" | "file" | "model" | "archive"));
            taken |= wanted;
            while let Some(chunk) = crate::http::body::next_within(idle, field.next()).await? {
                let chunk: Bytes = chunk.map_err(|e| {
                    if over_cap() {
                        too_big()
                    } else {
                        ApiError::BadRequest(format!("malformed multipart field: {e}"))
                    }
                })?;
                if wanted {
                    incoming.push(&chunk)?;
                }
            }
        }
    } else {
        while let Some(chunk) = crate::http::body::next_within(idle, payload.next()).await? {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the upload: {e}")))?;
            incoming.push(&chunk)?;
        }
    }
    keep(incoming, store, "upload").await
}

/// Download an allowed URL into the model store (kept, like uploads), through an agent that
/// follows no redirect and, for hosts given by name, reaches public addresses only.
async fn download(state: &AppState, url: url::Url) -> Result<PathBuf, ApiError> {
    let max = state.config.max_upload_size;
    let store = state.config.model_store.clone();
    let agent = crate::remote::agent(
        &state.config.allowed_urls,
        std::time::Duration::from_secs(600),
    );
    let incoming = web::block(move || -> Result<Incoming, ApiError> {
        let failed = |e: &dyn std::fmt::Display| {
            ApiError::BadRequest(format!("cannot download `url` {:?}: {e}", url.as_str()))
        };
        let mut response = agent.get(url.as_str()).call().map_err(|e| failed(&e))?;
        if !response.status().is_success() {
            return Err(failed(&format!(
                "the server answered {} (redirects are not followed)",
                response.status()
            )));
        }
        let mut incoming = Incoming::new(&store, max)?;
        let mut reader = response.body_mut().as_reader();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).map_err(|e| failed(&e))?;
            if n == 0 {
                break;
            }
            incoming.push(&buf[..n])?;
        }
        Ok(incoming)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the downloader stopped: {e}")))??;
    keep(incoming, state.config.model_store.clone(), "download").await
}
