//! The gRPC APIs, with tonic: on the gRPC listener (`grpc_address`; off unless set) the Open
//! Inference Protocol's `inference.GRPCInferenceService` ([`oip`]) and TorchServe's own
//! inference API ([`torchserve`]); on the gRPC management listener (`grpc_management_address`;
//! off unless set) TorchServe's management API ([`management`]). Each runs the same code as its
//! REST twin, takes the same token (`authorization: Bearer <key>` metadata), the same caps and
//! permits, and refuses inference during a shutdown as REST does.

pub mod management;
pub mod oip;
pub mod torchserve;

use std::sync::Arc;

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
async fn serve_on(
    router: tonic::transport::server::Router,
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

/// A server that bounds what one connection may have in flight: messages are read whole before
/// a call runs (the calls themselves are bounded by the server's body slots).
/// Keepalive pings find connections whose client has gone.
fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
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
    let router = builder()
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
        builder().add_service(management::service(state)),
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

/// Check the call's `authorization` metadata against the token it needs.
fn authorize<T>(state: &AppState, request: &tonic::Request<T>, key: Key) -> Result<(), Status> {
    let Some(keys) = state.keys.as_ref() else {
        return Ok(());
    };
    let wanted = match key {
        Key::Inference if !state.config.inference_token_auth => return Ok(()),
        Key::Inference => &keys.inference,
        Key::Management => &keys.management,
    };
    let given = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    crate::http::check_bearer(given, wanted).map_err(Status::unauthenticated)
}
