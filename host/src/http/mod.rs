//! The HTTP APIs: inference (TorchServe's) and metrics.

mod auth;
pub mod body;
pub mod error;
mod guard;
mod inference;
mod kserve;
pub(crate) mod management;
mod oip;
mod openai;
mod openapi;
mod peer;

pub(crate) use auth::check_bearer;
pub use auth::ApiKeys;
pub use error::ApiError;
pub(crate) use inference::{acquire, await_answer, health, readiness, Answered};
pub(crate) use kserve::{model_is_ready, model_metadata, run_v2};
pub(crate) use oip::check_v2;

use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::registry::ModelRegistry;

/// What every route can reach.
pub struct AppState {
    /// The models.
    pub registry: Arc<ModelRegistry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The configuration.
    pub config: Arc<ServerConfig>,
    /// Registers, restores and unregisters models, with the snapshot in step.
    pub registrar: Arc<crate::registry::Registrar>,
    /// Permits for inference requests in flight (`max_concurrent_requests`), taken once the
    /// body has arrived.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Permits for inference bodies arriving (`max_bodies_in_transit`).
    pub in_transit: Arc<tokio::sync::Semaphore>,
    /// The API keys (`None` with `--disable-token-auth`).
    pub keys: Option<ApiKeys>,
    /// Set on SIGTERM or SIGINT: readiness says not ready and new inference requests are
    /// refused while the ones in flight finish.
    pub draining: std::sync::atomic::AtomicBool,
    /// Turns true when the listeners are to close (after the drain); listeners besides the
    /// HTTP ones (gRPC) watch it.
    pub stop: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    /// The state for these parts.
    pub fn new(
        config: Arc<ServerConfig>,
        registrar: Arc<crate::registry::Registrar>,
        keys: Option<ApiKeys>,
    ) -> Self {
        Self {
            registry: registrar.registry.clone(),
            metrics: registrar.ctx.metrics.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
            in_transit: Arc::new(tokio::sync::Semaphore::new(config.max_bodies_in_transit)),
            config,
            registrar,
            keys,
            draining: std::sync::atomic::AtomicBool::new(false),
            stop: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Resolves when the listeners are to close.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.subscribe();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// Whether the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Inference requests in flight or arriving (their bodies in transit).
    pub fn requests_in_progress(&self) -> usize {
        (self.config.max_concurrent_requests - self.in_flight.available_permits())
            + (self.config.max_bodies_in_transit - self.in_transit.available_permits())
    }
}

/// Wait for SIGTERM or SIGINT, then shut down gracefully: readiness turns not ready and new
/// inference requests get 503 at once; the requests in flight (streams included) get up to
/// `shutdown_grace` to finish; then `stop` runs. The listeners stay open meanwhile, so that
/// probes read "not ready" rather than a refused connection.
pub async fn drain_on_signal(state: Arc<AppState>, stop: impl std::future::Future<Output = ()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM and SIGINT: the server stops only when killed");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    let grace = state.config.shutdown_grace;
    state
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(
        signal = name,
        in_progress = state.requests_in_progress(),
        grace_s = grace.as_secs(),
        "shutting down: not ready, refusing new requests, finishing those in flight"
    );
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let left = state.requests_in_progress();
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                in_progress = left,
                "the shutdown grace period is over; stopping with requests unfinished"
            );
            break;
        }
        // A second signal stops at once (a second Ctrl-C).
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            _ = term.recv() => { tracing::warn!(in_progress = left, "a second signal: stopping now"); break; }
            _ = int.recv() => { tracing::warn!(in_progress = left, "a second signal: stopping now"); break; }
        }
    }
    state.stop.send_replace(true);
    stop.await;
}

/// Bind the listeners and return the running server and the addresses it bound (port 0 picks a
/// free port).
pub fn bind(
    state: Arc<AppState>,
) -> std::io::Result<(
    actix_web::dev::Server,
    Vec<(&'static str, std::net::SocketAddr)>,
)> {
    let config = state.config.clone();
    let shutdown_state = state.clone();
    let data = web::Data::from(state);
    let inference_token = web::Data::new(auth::RequiredToken(
        data.keys
            .as_ref()
            .filter(|_| config.inference_token_auth)
            .map(|k| k.inference.clone()),
    ));
    let header_limit = web::Data::new(guard::HeaderLimit(config.max_header_size));
    let management_token = web::Data::new(auth::RequiredToken(
        data.keys.as_ref().map(|k| k.management.clone()),
    ));
    let inference_data = data.clone();
    let max = config.max_request_size;
    let limit = header_limit.clone();
    let inference = HttpServer::new(move || {
        App::new()
            .app_data(inference_data.clone())
            .app_data(inference_token.clone())
            .app_data(limit.clone())
            .app_data(web::PayloadConfig::new(max))
            .wrap(actix_web::middleware::from_fn(auth::require_token))
            .wrap(actix_web::middleware::from_fn(guard::limit_headers))
            .wrap_fn(access_log)
            .configure(inference::routes)
            .configure(kserve::routes)
            .configure(openai::routes)
            .configure(|c| describe_api(c, openapi::inference))
            .default_service(web::to(route_not_found))
    })
    .on_connect(peer::remember_socket)
    .workers(config.http_workers)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(config.inference_address)?;
    let mut addresses: Vec<(&'static str, std::net::SocketAddr)> = inference
        .addrs()
        .into_iter()
        .map(|a| ("inference", a))
        .collect();

    // Bind first: the browser guard needs the bound address (port 0 picks one).
    let management_listener = std::net::TcpListener::bind(config.management_address)?;
    let metrics_listener = std::net::TcpListener::bind(config.metrics_address)?;
    let guard_of = |listener: &std::net::TcpListener| -> std::io::Result<_> {
        Ok(web::Data::new(guard::BrowserGuard {
            bound: listener.local_addr()?,
            allowed_hosts: config.allowed_hosts.clone(),
        }))
    };
    let management_guard = guard_of(&management_listener)?;
    let metrics_guard = guard_of(&metrics_listener)?;

    let management_data = data.clone();
    let metrics_token = management_token.clone();
    let limit = header_limit.clone();
    let management = HttpServer::new(move || {
        App::new()
            .app_data(management_data.clone())
            .app_data(management_token.clone())
            .app_data(management_guard.clone())
            .app_data(limit.clone())
            .wrap(actix_web::middleware::from_fn(auth::require_token))
            .wrap(actix_web::middleware::from_fn(guard::refuse_browsers))
            .wrap(actix_web::middleware::from_fn(guard::limit_headers))
            .wrap_fn(access_log)
            .configure(management::routes)
            .configure(|c| describe_api(c, openapi::management))
            .default_service(web::to(route_not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(management_listener)?;
    addresses.extend(management.addrs().into_iter().map(|a| ("management", a)));

    let metrics_data = data.clone();
    let limit = header_limit;
    let metrics = HttpServer::new(move || {
        App::new()
            .app_data(metrics_data.clone())
            .app_data(metrics_token.clone())
            .app_data(metrics_guard.clone())
            .app_data(limit.clone())
            .wrap(actix_web::middleware::from_fn(auth::require_token))
            .wrap(actix_web::middleware::from_fn(guard::refuse_browsers))
            .wrap(actix_web::middleware::from_fn(guard::limit_headers))
            .service(resource("/metrics").route(web::get().to(render_metrics)))
            .configure(|c| describe_api(c, openapi::metrics))
            .default_service(web::to(route_not_found))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(metrics_listener)?;
    addresses.extend(metrics.addrs().into_iter().map(|a| ("metrics", a)));

    let inference = inference.run();
    let management = management.run();
    let management_handle = management.handle();
    let metrics = metrics.run();
    let metrics_handle = metrics.handle();
    // Run the metrics server beside the inference server; stop it when the latter stops.
    let combined = inference;
    actix_web::rt::spawn(async move {
        let _ = metrics.await;
    });
    actix_web::rt::spawn(async move {
        let _ = management.await;
    });
    let stopper = combined.handle();
    actix_web::rt::spawn(drain_on_signal(shutdown_state, async move {
        metrics_handle.stop(true).await;
        management_handle.stop(true).await;
        stopper.stop(true).await;
    }));
    Ok((combined, addresses))
}

/// `GET /api-description` and `OPTIONS /`: the listener's OpenAPI document.
fn describe_api(cfg: &mut web::ServiceConfig, document: fn() -> serde_json::Value) {
    let doc = web::Data::new(document());
    cfg.app_data(doc)
        .service(resource("/api-description").route(web::get().to(api_description)))
        .service(
            resource("/").route(web::method(actix_web::http::Method::OPTIONS).to(api_description)),
        );
}

/// A route's path: its methods are added with `.route`, and any other method gets a 405 with
/// the API's error body (TorchServe's `MethodNotAllowedException`).
pub(crate) fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn method_not_allowed(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}; see the API description (GET /api-description)",
        req.method(),
        req.path()
    )))
}

/// Any path no route has: a 404 with the API's error body.
async fn route_not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound(format!(
        "no such resource: {} {}; see the API description (GET /api-description)",
        req.method(),
        req.path()
    )))
}

async fn api_description(doc: web::Data<serde_json::Value>) -> HttpResponse {
    HttpResponse::Ok().json(doc.get_ref())
}

/// `GET /metrics[?name[]=family&...]`: every family, or the named ones (TorchServe's filter).
async fn render_metrics(
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let only = metric_names(req.query_string())?;
    state.registry.publish_gauges(&state.metrics);
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&only)))
}

/// The families `name[]` (or `name`) asks for; any other parameter is an error naming it.
fn metric_names(query: &str) -> Result<Vec<String>, ApiError> {
    let mut names = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "name[]" | "name" => names.push(value.into_owned()),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter `{other}`: `/metrics` takes `name[]`"
                )))
            }
        }
        if names.len() > 1000 {
            return Err(ApiError::BadRequest(
                "at most 1000 `name[]` parameters".into(),
            ));
        }
    }
    Ok(names)
}

/// One structured line per request, target `cresset::access`.
fn access_log<S>(
    req: actix_web::dev::ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse, actix_web::Error>>
where
    S: Service<
        actix_web::dev::ServiceRequest,
        Response = ServiceResponse,
        Error = actix_web::Error,
    >,
{
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let fut = srv.call(req);
    async move {
        let res = fut.await?;
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        tracing::info!(
            target: "cresset::access",
            %method,
            %path,
            status = res.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            %peer,
            request_id = %header("x-request-id"),
            model_version = %header("x-model-version"),
            "request"
        );
        Ok(res)
    }
}
