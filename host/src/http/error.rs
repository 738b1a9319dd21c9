//! API errors, mapped to HTTP statuses in one place, with TorchServe's body shape:
//! `{"code": 404, "type": "ModelNotFoundException", "message": "..."}`.
//!
//! No answer carries a path of the host: messages are redacted here (the work folder, the model
//! store and the plugin folder become `<work_dir>`, `<model_store>`, `<plugin_dir>`, and an
//! extracted archive's folder `<archive>`), and the full message goes to the log instead.

use std::sync::OnceLock;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use cresset_plugin_api::{ErrorCode, PluginError};

use crate::registry::{FailureKind, LoadError, LoadFailure};

/// Folders whose paths are kept out of answers, with what replaces them.
static REDACTED: OnceLock<Vec<(String, &'static str)>> = OnceLock::new();

/// Set the folders to keep out of answers (once, at start-up).
pub fn redact_paths(
    work_dir: &std::path::Path,
    model_store: &std::path::Path,
    plugin_dir: &std::path::Path,
) {
    let mut folders = Vec::new();
    for (dir, name) in [
        (work_dir, "<work_dir>"),
        (model_store, "<model_store>"),
        (plugin_dir, "<plugin_dir>"),
    ] {
        let absolute = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        for form in [absolute, dir.to_owned()] {
            let text = form.to_string_lossy().trim_end_matches('/').to_owned();
            if text.len() > 1 {
                folders.push((text, name));
            }
        }
    }
    // Longest first, so that a folder inside another is replaced as itself.
    folders.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
    let _ = REDACTED.set(folders);
}

/// `message` without host paths.
pub fn redact(message: &str) -> String {
    let mut out = message.to_owned();
    if let Some(folders) = REDACTED.get() {
        for (text, name) in folders {
            if out.contains(text.as_str()) {
                out = out.replace(text.as_str(), name);
            }
        }
    }
    // An archive extracted in this process's scratch folder, or in the archive cache (an
    // entry, or one being unpacked), is just `<archive>`.
    static EXTRACTED: OnceLock<Option<regex::Regex>> = OnceLock::new();
    if let Some(re) = EXTRACTED.get_or_init(|| {
        regex::Regex::new(concat!(
            r"<work_dir>/(?:run-[^/\s]+/models/model-[^/\s`'\x22]+",
            r"|archive-cache/(?:[0-9a-f]{64}|\.unpacking-[^/\s`'\x22]+)/files)"
        ))
        .ok()
    }) {
        out = re.replace_all(&out, "<archive>").into_owned();
    }
    out
}

/// Everything a route can answer with other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such model or version.
    #[error("{0}")]
    ModelNotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with the current state (a version that exists, a default in use).
    #[error("{0}")]
    Conflict(String),
    /// Over the global concurrency cap.
    #[error("the server already has {0} requests in flight, the most `max_concurrent_requests` allows; retry later")]
    TooManyRequests(usize),
    /// Over the cap on bodies arriving at once.
    #[error("the server already receives {0} request bodies, the most `max_bodies_in_transit` allows; retry later")]
    TooManyBodies(usize),
    /// No token, or a wrong one.
    #[error("{0}")]
    Unauthorized(String),
    /// The request is not allowed (for example a URL outside `allowed_urls`).
    #[error("{0}")]
    Forbidden(String),
    /// The body is larger than `max_request_size`.
    #[error("the request body is larger than `max_request_size` ({0} bytes)")]
    PayloadTooLarge(usize),
    /// The model cannot take the request now (loading, failed, queue full).
    #[error("{0}")]
    Unavailable(String),
    /// No final response within `response_timeout_s`.
    #[error("model `{model}` gave no response within `response_timeout_s` ({seconds} s)")]
    Timeout {
        /// The model.
        model: String,
        /// The timeout.
        seconds: u64,
    },
    /// The client closed the connection before the answer was ready (nobody reads this).
    #[error("the client closed the connection")]
    ClientGone,
    /// The plugin refused or failed.
    #[error("{0}")]
    Plugin(PluginError),
    /// A bug or an unexpected failure in the host.
    #[error("{0}")]
    Internal(String),
    /// A synchronous registration whose load failed.
    #[error("model `{model}` version `{version}` failed to load: {failure}")]
    LoadFailed {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// Why, and whose fault.
        failure: LoadFailure,
    },
    /// A request header is over `max_header_size`.
    #[error("request header `{name}` is {size} bytes, more than `max_header_size` ({max} bytes)")]
    HeaderTooLarge {
        /// The header.
        name: String,
        /// Its size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// The body stopped arriving.
    #[error("the request body made no progress for {0} s (`body_idle_timeout`)")]
    BodyStalled(u64),
    /// No route has this path.
    #[error("{0}")]
    RouteNotFound(String),
    /// The path exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        match e.kind() {
            FailureKind::NotFound => Self::ModelNotFound(e.to_string()),
            _ => {
                let failure = e.into_failure();
                match failure.kind {
                    FailureKind::BadArchive | FailureKind::BadModel => {
                        Self::BadRequest(failure.message)
                    }
                    _ => Self::Internal(failure.message),
                }
            }
        }
    }
}

/// The status of a failed load: the client's fault (400), a missing archive (404), or the
/// server's, the plugin's included (500).
fn load_status(kind: FailureKind) -> StatusCode {
    match kind {
        FailureKind::BadArchive | FailureKind::BadModel => StatusCode::BAD_REQUEST,
        FailureKind::NotFound => StatusCode::NOT_FOUND,
        FailureKind::PluginFault
        | FailureKind::MissingPlugin
        | FailureKind::Crashed
        | FailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    /// A request that arrives once the server is shutting down (REST's 503, gRPC's
    /// UNAVAILABLE).
    pub fn shutting_down() -> Self {
        Self::Unavailable(
            "the server is shutting down: it finishes the requests it has and takes no new ones"
                .into(),
        )
    }

    fn type_name(&self) -> &'static str {
        match self {
            Self::ModelNotFound(_) => "ModelNotFoundException",
            Self::BadRequest(_) => "BadRequestException",
            Self::Conflict(_) => "ConflictStatusException",
            Self::Forbidden(_) => "ForbiddenException",
            Self::Unauthorized(_) => "UnauthorizedException",
            Self::TooManyRequests(_) | Self::TooManyBodies(_) => "TooManyRequestsException",
            Self::PayloadTooLarge(_) => "RequestEntityTooLargeException",
            Self::Unavailable(_) => "ServiceUnavailableException",
            Self::Timeout { .. } => "ResponseTimeoutException",
            Self::Internal(_) => "InternalServerException",
            Self::LoadFailed { failure, .. } => match load_status(failure.kind) {
                StatusCode::BAD_REQUEST => "BadRequestException",
                StatusCode::NOT_FOUND => "ModelNotFoundException",
                _ => "InternalServerException",
            },
            Self::HeaderTooLarge { .. } => "RequestHeaderFieldsTooLargeException",
            Self::BodyStalled(_) => "RequestTimeoutException",
            Self::ClientGone => "ClientClosedRequest",
            Self::RouteNotFound(_) => "ResourceNotFoundException",
            Self::MethodNotAllowed(_) => "MethodNotAllowedException",
            Self::Plugin(e) => match e.code {
                ErrorCode::INVALID_INPUT => "BadRequestException",
                ErrorCode::NOT_FOUND => "NotFoundException",
                ErrorCode::UNAVAILABLE | ErrorCode::CANCELLED => "ServiceUnavailableException",
                ErrorCode::UNSUPPORTED => "NotImplementedException",
                _ => "PredictionException",
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::TooManyRequests(_) | Self::TooManyBodies(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::LoadFailed { failure, .. } => load_status(failure.kind),
            Self::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            // nginx's 499: recorded in logs and metrics only.
            Self::ClientGone => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::Plugin(e) => match e.code {
                ErrorCode::INVALID_INPUT => StatusCode::BAD_REQUEST,
                ErrorCode::NOT_FOUND => StatusCode::NOT_FOUND,
                ErrorCode::UNAVAILABLE | ErrorCode::CANCELLED => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::UNSUPPORTED => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let full = match self {
            Self::Plugin(e) => e.message.to_string(),
            other => other.to_string(),
        };
        let message = redact(&full);
        if message != full {
            tracing::info!(
                status = status.as_u16(),
                "answered with host paths redacted: {full}"
            );
        }
        HttpResponse::build(status).json(serde_json::json!({
            "code": status.as_u16(),
            "type": self.type_name(),
            "message": message,
        }))
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError;
        match e {
            RegistryError::NoModel(_) | RegistryError::NoVersion(..) => {
                Self::ModelNotFound(e.to_string())
            }
            RegistryError::Exists(..) | RegistryError::Conflict(_) => Self::Conflict(e.to_string()),
            RegistryError::Forbidden(_) => Self::Forbidden(e.to_string()),
        }
    }
}
