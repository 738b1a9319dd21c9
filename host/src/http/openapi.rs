//! The OpenAPI description of each listener (`GET /api-description`, or `OPTIONS /`, as
//! TorchServe serves it).

use serde_json::{json, Value};

fn op(summary: &str, params: &[(&str, &str)], responses: &[(u16, &str)]) -> Value {
    let parameters: Vec<Value> = params
        .iter()
        .map(|(name, place)| json!({ "name": name, "in": place, "required": *place == "path", "schema": { "type": "string" } }))
        .collect();
    let responses: serde_json::Map<String, Value> = responses
        .iter()
        .map(|(code, what)| (code.to_string(), json!({ "description": what })))
        .collect();
    json!({ "summary": summary, "parameters": parameters, "responses": responses })
}

fn document(title: &str, paths: Value) -> Value {
    json!({
        "openapi": "3.0.3",
        "info": { "title": title, "version": env!("CARGO_PKG_VERSION") },
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } },
        "security": [ { "bearer": [] } ],
        "paths": paths,
    })
}

const PREDICT_ERRORS: &[(u16, &str)] = &[
    (
        200,
        "the plugin's answer (streamed in chunks when the plugin streams)",
    ),
    (400, "the plugin refused the input"),
    (401, "missing or wrong token"),
    (404, "no such model or version"),
    (413, "body over max_request_size"),
    (429, "over max_concurrent_requests"),
    (503, "model loading, failed, or queue full"),
    (504, "no answer within response_timeout_s"),
];

/// The inference listener.
pub fn inference() -> Value {
    let model = [("model", "path")];
    let versioned = [("model", "path"), ("version", "path")];
    document(
        "Cresset inference API",
        json!({
            "/ping": { "get": op("Health: Healthy once every model's workers are up", &[], &[(200, "Healthy"), (500, "Unhealthy")]) },
            "/predictions/{model}": {
                "post": op("Predict with the default version", &model, PREDICT_ERRORS),
                "put": op("Predict with the default version (`curl -T file`)", &model, PREDICT_ERRORS),
            },
            "/predictions/{model}/{version}": {
                "post": op("Predict with a version", &versioned, PREDICT_ERRORS),
                "put": op("Predict with a version (`curl -T file`)", &versioned, PREDICT_ERRORS),
            },
            "/explanations/{model}": { "post": op("Explain with the default version", &model, PREDICT_ERRORS) },
            "/explanations/{model}/{version}": { "post": op("Explain with a version", &versioned, PREDICT_ERRORS) },
            "/v1/models/{model}:predict": { "post": op("KServe v1 predict", &model, PREDICT_ERRORS) },
            "/v2": { "get": op("OIP v2 server metadata", &[], &[(200, "metadata")]) },
            "/v2/health/live": { "get": op("OIP v2 liveness", &[], &[(200, "live")]) },
            "/v2/health/ready": { "get": op("OIP v2 readiness", &[], &[(200, "ready"), (503, "not ready")]) },
            "/v2/models/{model}": { "get": op("OIP v2 model metadata", &model, &[(200, "metadata"), (404, "no such model")]) },
            "/v2/models/{model}/versions/{version}": { "get": op("OIP v2 model metadata", &versioned, &[(200, "metadata"), (404, "no such version")]) },
            "/v2/models/{model}/ready": { "get": op("OIP v2 model readiness", &model, &[(200, "ready"), (503, "not ready")]) },
            "/v2/models/{model}/versions/{version}/ready": { "get": op("OIP v2 model readiness", &versioned, &[(200, "ready"), (503, "not ready")]) },
            "/v2/models/{model}/infer": { "post": op("OIP v2 inference", &model, PREDICT_ERRORS) },
            "/v2/models/{model}/versions/{version}/infer": { "post": op("OIP v2 inference", &versioned, PREDICT_ERRORS) },
            "/api-description": { "get": op("This document", &[], &[(200, "OpenAPI 3")]) },
        }),
    )
}

/// The management listener.
pub fn management() -> Value {
    let model = [("model", "path")];
    let versioned = [("model", "path"), ("version", "path")];
    let register = [
        ("url", "query"),
        ("model_name", "query"),
        ("batch_size", "query"),
        ("max_batch_delay", "query"),
        ("initial_workers", "query"),
        ("synchronous", "query"),
        ("response_timeout", "query"),
    ];
    let scale = [
        ("model", "path"),
        ("min_worker", "query"),
        ("max_worker", "query"),
        ("synchronous", "query"),
    ];
    let scale_v = [
        ("model", "path"),
        ("version", "path"),
        ("min_worker", "query"),
        ("max_worker", "query"),
        ("synchronous", "query"),
    ];
    document(
        "Cresset management API",
        json!({
            "/models": {
                "post": op("Register an archive from the store, an allowed URL, or the body (upload)", &register,
                    &[(200, "registered (synchronous)"), (202, "registered; loading"), (400, "bad archive or parameter"), (401, "token"), (403, "URL not allowed"), (404, "no such archive"), (409, "version exists"), (413, "upload too large")]),
                "get": op("List models", &[("limit", "query"), ("next_page_token", "query")], &[(200, "a page of models")]),
            },
            "/models/{model}": {
                "get": op("Describe the default version", &model, &[(200, "description"), (404, "no such model")]),
                "put": op("Scale the default version", &scale, &[(200, "scaled"), (202, "scaling"), (400, "bad bounds"), (409, "not Ready")]),
                "delete": op("Unregister the default version (drained)", &model, &[(200, "unregistered"), (404, "no such model"), (409, "default with siblings")]),
            },
            "/models/{model}/{version}": {
                "get": op("Describe a version (or `all`)", &versioned, &[(200, "description"), (404, "no such version")]),
                "put": op("Scale a version", &scale_v, &[(200, "scaled"), (202, "scaling"), (400, "bad bounds"), (409, "not Ready")]),
                "delete": op("Unregister a version (drained)", &versioned, &[(200, "unregistered"), (404, "no such version"), (409, "default with siblings")]),
            },
            "/models/{model}/{version}/set-default": {
                "put": op("Make a Ready version the default", &versioned, &[(200, "default changed"), (404, "no such version"), (409, "not Ready")]),
            },
            "/api-description": { "get": op("This document", &[], &[(200, "OpenAPI 3")]) },
        }),
    )
}

/// The metrics listener.
pub fn metrics() -> Value {
    document(
        "Cresset metrics API",
        json!({
            "/metrics": { "get": op("Prometheus text exposition", &[], &[(200, "metrics"), (401, "token")]) },
            "/api-description": { "get": op("This document", &[], &[(200, "OpenAPI 3")]) },
        }),
    )
}
