//! The gRPC APIs, with tonic: on the gRPC listener (`grpc_address`; off unless set) the Open
//! Inference Protocol's `inference.GRPCInferenceService` ([`oip`]) and TorchServe's own
//! inference API ([`torchserve`]); on the gRPC management listener (`grpc_management_address`;
//! off unless set) TorchServe's management API ([`management`]). Each runs the same code as its
//! REST twin, takes the same token (`authorization: Bearer <key>` metadata, checked by
//! [`KeyCheck`] from the call's path before its message is read, as REST checks the header
//! before the body), the same caps and permits, and refuses inference during a shutdown as REST
//! does.

pub mod management;
pub mod oip;
pub mod torchserve;

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::{Code, Status};

use crate::http::{ApiError, AppState};

/// The messages and services generated from `proto/`, in modules named by their packages.
pub mod proto {
    /// The Open Inference Protocol (`proto/grpc_predict_v2.proto`).
    pub mod inference {
        tonic::include_proto!("inference");
    }
    /// TorchServe's packages.
    pub mod org {
        pub mod pytorch {
            pub mod serve {
                pub mod grpc {
                    /// `proto/torchserve_inference.proto`.
                    pub mod inference {
                        tonic::include_proto!("org.pytorch.serve.grpc.inference");
                    }
                    /// `proto/torchserve_management.proto`.
                    pub mod management {
                        tonic::include_proto!("org.pytorch.serve.grpc.management");
                    }
                }
            }
        }
    }
    /// `google.rpc.Status` (`proto/google/rpc/status.proto`).
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
}

/// Serve `router`'s services on `listener` until `shutdown` resolves.
/// The layers every gRPC server has.
type Layers = tower::layer::util::Stack<KeyCheckLayer, tower::layer::util::Identity>;

async fn serve_on(
    router: tonic::transport::server::Router<Layers>,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let incoming =
        tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener::from_std(listener)?);
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A server that checks each call's key before reading its message ([`KeyCheck`]) and bounds
/// what one connection may have in flight: messages are read whole before a call runs (the
/// calls themselves are bounded by the server's body slots). Keepalive pings find connections
/// whose client has gone.
fn builder(state: Arc<AppState>) -> tonic::transport::Server<Layers> {
    tonic::transport::Server::builder()
        .layer(KeyCheckLayer { state })
        .max_concurrent_streams(Some(16))
        .concurrency_limit_per_connection(16)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// Serve the inference services (the Open Inference Protocol's and TorchServe's) on
/// `listener` until `shutdown` resolves.
pub async fn serve(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let router = builder(state.clone())
        .add_service(oip::service(state.clone()))
        .add_service(torchserve::service(state));
    serve_on(router, listener, shutdown).await
}

/// Serve TorchServe's management service on `listener` until `shutdown` resolves.
pub async fn serve_management(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_on(
        builder(state.clone()).add_service(management::service(state)),
        listener,
        shutdown,
    )
    .await
}

/// The gRPC status for an API error: its code by the HTTP status REST would give, its message
/// as REST's body says it (a plugin's error: its own message).
fn status(e: &ApiError) -> Status {
    let http = actix_web::ResponseError::status_code(e).as_u16();
    let message = match e {
        ApiError::Plugin(p) => p.message.to_string(),
        other => other.to_string(),
    };
    Status::new(code_for(http), crate::http::error::redact(&message))
}

/// The gRPC code for an HTTP status (TorchServe's mapping where it has one).
fn code_for(http: u16) -> Code {
    match http {
        200..=299 => Code::Ok,
        400 | 431 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        503 => Code::Unavailable,
        400..=499 => Code::FailedPrecondition,
        _ => Code::Internal,
    }
}

/// Which token a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// The inference token, when the inference API needs one.
    Inference,
    /// The management token, whenever tokens are on.
    Management,
}

/// The key a call needs, by its path (`/package.Service/Method`): none for health
/// (`ServerLive`, `ServerReady`, TorchServe's `Ping`, as REST's health routes), the inference
/// key for the inference services, the management key for the management service. A path of
/// no service needs none: tonic answers it UNIMPLEMENTED without reading it.
fn key_for(path: &str) -> Option<Key> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("inference.GRPCInferenceService", "ServerLive" | "ServerReady")
        | ("org.pytorch.serve.grpc.inference.InferenceAPIsService", "Ping") => None,
        ("inference.GRPCInferenceService", _)
        | ("org.pytorch.serve.grpc.inference.InferenceAPIsService", _) => Some(Key::Inference),
        ("org.pytorch.serve.grpc.management.ManagementAPIsService", _) => Some(Key::Management),
        _ => None,
    }
}

/// Check a call's `authorization` header against the token it needs.
fn authorize(state: &AppState, headers: &http::HeaderMap, key: Key) -> Result<(), Status> {
    let Some(keys) = state.keys.as_ref() else {
        return Ok(());
    };
    let wanted = match key {
        Key::Inference if !state.config.inference_token_auth => return Ok(()),
        Key::Inference => &keys.inference,
        Key::Management => &keys.management,
    };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    crate::http::check_bearer(given, wanted).map_err(Status::unauthenticated)
}

/// The layer of [`KeyCheck`].
#[derive(Clone)]
pub struct KeyCheckLayer {
    state: Arc<AppState>,
}

impl<S> tower::Layer<S> for KeyCheckLayer {
    type Service = KeyCheck<S>;

    fn layer(&self, inner: S) -> KeyCheck<S> {
        KeyCheck {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Answers UNAUTHENTICATED, before the call's message is read, to a call without the key its
/// path needs ([`key_for`]); passes the others on.
#[derive(Clone)]
pub struct KeyCheck<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S, B> tower::Service<http::Request<B>> for KeyCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<Self::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let checked = key_for(request.uri().path())
            .map_or(Ok(()), |key| authorize(&self.state, request.headers(), key));
        match checked {
            Ok(()) => futures_util::future::Either::Left(self.inner.call(request)),
            Err(refused) => {
                futures_util::future::Either::Right(std::future::ready(Ok(refused.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_but_health_needs_its_apis_key() {
        assert_eq!(key_for("/inference.GRPCInferenceService/ServerLive"), None);
        assert_eq!(
            key_for("/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping"),
            None
        );
        assert_eq!(
            key_for("/inference.GRPCInferenceService/ModelInfer"),
            Some(Key::Inference)
        );
        assert_eq!(
            key_for("/org.pytorch.serve.grpc.inference.InferenceAPIsService/StreamPredictions2"),
            Some(Key::Inference)
        );
        assert_eq!(
            key_for("/org.pytorch.serve.grpc.management.ManagementAPIsService/RegisterModel"),
            Some(Key::Management)
        );
        assert_eq!(key_for("/other.Service/Call"), None);
        assert_eq!(key_for("/"), None);
    }
}
