//! API errors, mapped to HTTP statuses in one place, with TorchServe's body shape:
//! `{"code": 404, "type": "ModelNotFoundException", "message": "..."}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use cresset_plugin_api::{ErrorCode, PluginError};

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
}

impl ApiError {
    fn type_name(&self) -> &'static str {
        match self {
            Self::ModelNotFound(_) => "ModelNotFoundException",
            Self::BadRequest(_) => "BadRequestException",
            Self::Conflict(_) => "ConflictStatusException",
            Self::Forbidden(_) => "ForbiddenException",
            Self::Unauthorized(_) => "UnauthorizedException",
            Self::TooManyRequests(_) => "TooManyRequestsException",
            Self::PayloadTooLarge(_) => "RequestEntityTooLargeException",
            Self::Unavailable(_) => "ServiceUnavailableException",
            Self::Timeout { .. } => "ResponseTimeoutException",
            Self::Internal(_) => "InternalServerException",
            Self::ClientGone => "ClientClosedRequest",
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
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
        let message = match self {
            Self::Plugin(e) => e.message.to_string(),
            other => other.to_string(),
        };
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
        }
    }
}
