//! KServe v1, the Open Inference Protocol v2, and each listener's OpenAPI description.

use cresset_e2e::{expected_json, Server};
use serde_json::{json, Value};

fn max_abs_diff(a: &[Value], b: &[Value]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs())
        .fold(0.0, f64::max)
}

fn flat(rows: &Value) -> Vec<Value> {
    rows.as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| r.as_array().expect("row").clone())
        .collect()
}

#[test]
fn open_inference_protocol_v2_health_metadata_readiness_and_infer() {
    let expected = expected_json();
    let server = Server::start(&["--models", "iris,echo"]);
    assert_eq!(server.get("/v2/health/live").json()["live"], true);
    server.wait_healthy();
    let ready = server.get("/v2/health/ready");
    assert_eq!(
        (ready.status, ready.json()["ready"].as_bool()),
        (200, Some(true))
    );

    let meta = server.get("/v2/models/iris");
    assert_eq!(meta.status, 200, "{}", meta.text());
    let meta = meta.json();
    assert_eq!(
        (meta["name"].as_str(), meta["platform"].as_str()),
        (Some("iris"), Some("cresset/torchscript"))
    );
    assert_eq!(meta["versions"], json!(["1.0"]));
    assert_eq!(
        server.get("/v2/models/iris/versions/1.0/ready").json()["ready"],
        true
    );
    assert_eq!(server.get("/v2/models/nope").status, 404);
    assert_eq!(server.get("/v2/models/iris/versions/9/ready").status, 404);

    let inputs = &expected["iris"]["inputs"];
    let body = json!({
        "id": "r1",
        "inputs": [{"name": "x", "shape": [5, 4], "datatype": "FP32", "data": flat(inputs)}]
    });
    let reply = server.post_json("/v2/models/iris/infer", &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let out = reply.json();
    assert_eq!(
        (out["id"].as_str(), out["model_name"].as_str()),
        (Some("r1"), Some("iris"))
    );
    assert_eq!(out["outputs"][0]["shape"], json!([5, 3]));
    let diff = max_abs_diff(
        out["outputs"][0]["data"].as_array().expect("data"),
        &flat(&expected["iris"]["logits"]),
    );
    assert!(diff <= 1e-5, "max abs diff {diff}");
    let versioned = server.post_json("/v2/models/iris/versions/1.0/infer", &body);
    assert_eq!(versioned.status, 200);
}

#[test]
fn kserve_v1_predict_takes_instances_and_answers_predictions() {
    let expected = expected_json();
    let server = Server::start(&["--models", "iris"]);
    server.wait_healthy();
    let reply = server.post_json(
        "/v1/models/iris:predict",
        &json!({"instances": expected["iris"]["inputs"]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let predictions = reply.json()["predictions"]
        .as_array()
        .expect("predictions")
        .clone();
    assert_eq!(predictions.len(), 5);
    for (row, want) in predictions.iter().zip(
        expected["iris"]["top_probabilities"]
            .as_array()
            .expect("probs"),
    ) {
        let got: Vec<Value> = row.as_object().expect("labels").values().cloned().collect();
        assert!(max_abs_diff(&got, want.as_array().expect("row")) <= 1e-5);
    }
    assert_eq!(
        server
            .post_json("/v1/models/nope:predict", &json!({"instances": [[1]]}))
            .status,
        404
    );
}

#[test]
fn every_listener_describes_itself_in_openapi() {
    let server = Server::start(&[]);
    let get = |base: &str, path: &str| -> Value {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent.get(format!("{base}{path}")).call().expect("GET");
        assert_eq!(r.status().as_u16(), 200);
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json")
    };
    let inference = get(&server.inference, "/api-description");
    assert_eq!(inference["openapi"], "3.0.3");
    for path in [
        "/predictions/{model}",
        "/v2/models/{model}/infer",
        "/v1/models/{model}:predict",
        "/ping",
    ] {
        assert!(inference["paths"].get(path).is_some(), "{path} missing");
    }
    let management = get(&server.management, "/api-description");
    for path in ["/models", "/models/{model}/{version}/set-default"] {
        assert!(management["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(get(&server.metrics, "/api-description")["paths"]
        .get("/metrics")
        .is_some());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = ureq::http::Request::options(format!("{}/", server.inference))
        .body(())
        .expect("request");
    let mut options = agent.run(request).expect("OPTIONS");
    assert_eq!(options.status().as_u16(), 200);
    let doc: Value =
        serde_json::from_str(&options.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(doc, inference);
}

#[test]
fn kserve_bodies_are_checked_by_the_host_and_echo_answers_in_each_protocols_shape() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let meta = server.get("/v2");
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json()["name"], "cresset");
    assert!(meta.json()["version"].is_string());

    // echo, the reference for plugin authors: each protocol in its own shape.
    let v1 = server.post_json(
        "/v1/models/echo:predict",
        &json!({"instances": [[1, 2], [3, 4]]}),
    );
    assert_eq!(v1.status, 200, "{}", v1.text());
    assert_eq!(v1.json(), json!({"predictions": [[1, 2], [3, 4]]}));
    let input = json!({"name": "t", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]});
    let v2 = server.post_json(
        "/v2/models/echo/infer",
        &json!({"id": "q1", "inputs": [input, {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}),
    );
    assert_eq!(v2.status, 200, "{}", v2.text());
    let out = v2.json();
    assert_eq!(out["id"], "q1");
    assert_eq!(
        (out["model_name"].as_str(), out["model_version"].as_str()),
        (Some("echo"), Some("1.0"))
    );
    assert_eq!(out["outputs"][0], input);
    assert_eq!(out["outputs"][1]["data"], json!(["hi"]));
    // Addressed by version, the answer names it.
    let versioned = server.post_json(
        "/v2/models/echo/versions/1.0/infer",
        &json!({"inputs": [{"name": "b", "shape": [], "datatype": "BOOL", "data": true}]}),
    );
    assert_eq!(versioned.json()["model_version"], "1.0");

    // Bad bodies are 400s with OIP's {"error": ...} body, before the plugin sees them.
    for (path, body, says) in [
        (
            "/v1/models/echo:predict",
            json!({"inputs": [[1]]}).to_string(),
            "needs `instances`",
        ),
        (
            "/v2/models/echo/infer",
            json!({"id": "x"}).to_string(),
            "needs `inputs`",
        ),
        (
            "/v2/models/echo/infer",
            json!({"inputs": [{"name": "t", "shape": [3], "datatype": "FP32", "data": [1, 2]}]})
                .to_string(),
            "holds 3 elements but `data` has 2",
        ),
        (
            "/v2/models/echo/infer",
            json!({"inputs": [{"name": "t", "shape": [1], "datatype": "FLOAT", "data": [1]}]})
                .to_string(),
            "`datatype` must be one of",
        ),
        (
            "/v2/models/echo/infer",
            "{\"inputs\": [".to_owned(),
            "not valid JSON",
        ),
    ] {
        let reply = server.post(path, "application/json", body.as_bytes());
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.text());
        let error = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(error.contains(says), "{body}: {error}");
    }
    // A missing model is a 404 in the same shape.
    let missing = server.post_json("/v2/models/nope/infer", &json!({"inputs": []}));
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].is_string());
    // The binary tensor extension: a JSON header, then the tensor's bytes; the outputs come
    // back the same way when asked for.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                    "parameters": {"binary_data_size": 8}}],
        "parameters": {"binary_data_output": true}
    }))
    .expect("json");
    let mut body = header.clone();
    body.extend(1.5f32.to_le_bytes());
    body.extend((-2.0f32).to_le_bytes());
    let mut binary = agent
        .post(format!("{}/v2/models/echo/infer", server.inference))
        .header("Inference-Header-Content-Length", header.len().to_string())
        .header("content-type", "application/octet-stream")
        .send(&body[..])
        .expect("POST");
    assert_eq!(binary.status().as_u16(), 200);
    let length: usize = binary
        .headers()
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Inference-Header-Content-Length");
    let answer = binary.body_mut().read_to_vec().expect("body");
    let head: Value = serde_json::from_slice(&answer[..length]).expect("json header");
    assert_eq!(head["model_name"], "echo");
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
    assert_eq!(&answer[length..], &body[header.len()..]);
    // A header length past the body is refused, naming it.
    let mut bad = agent
        .post(format!("{}/v2/models/echo/infer", server.inference))
        .header("Inference-Header-Content-Length", "100000")
        .header("content-type", "application/octet-stream")
        .send(&body[..])
        .expect("POST");
    assert_eq!(bad.status().as_u16(), 400);
    let text = bad.body_mut().read_to_string().expect("body");
    assert!(text.contains("Inference-Header-Content-Length"), "{text}");
}

/// NVIDIA's `tritonclient` (the package index's, in the test venv) drives the Open Inference
/// Protocol over HTTP and gRPC: liveness, readiness, server and model metadata, and the iris
/// TorchScript model on FP32 tensors sent four ways (HTTP JSON, HTTP binary, gRPC raw and
/// gRPC typed contents), each answering what REST's JSON answers; bad requests get gRPC errors
/// with reasons.
#[test]
fn tritonclient_drives_the_open_inference_protocol_over_http_and_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&[
        "--models",
        &cresset_e2e::raw_iris_archive(dir.path()),
        "--grpc-address",
        "127.0.0.1:0",
    ]);
    server.wait_healthy();
    let inputs = json!([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]);
    let rest = server.post_json(
        "/v2/models/iris_raw/infer",
        &json!({"inputs": [{"name": "input0", "shape": [2, 4], "datatype": "FP32",
                            "data": inputs}]}),
    );
    assert_eq!(rest.status, 200, "{}", rest.text());
    let rest_out: Vec<f64> = rest.json()["outputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(rest_out.len(), 6);
    let out = std::process::Command::new(cresset_e2e::venv_bin("python"))
        .arg(cresset_e2e::repo_root().join("tests/triton_client.py"))
        .arg(server.inference.trim_start_matches("http://"))
        .arg(server.grpc.as_deref().expect("grpc address"))
        .arg("iris_raw")
        .arg(inputs.to_string())
        .output()
        .expect("run tritonclient");
    assert!(
        out.status.success(),
        "tritonclient failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let answers: Value = serde_json::from_slice(&out.stdout).expect("json");
    for way in ["http_json", "http_binary", "grpc_raw", "grpc_typed"] {
        let got: Vec<f64> = answers[way]
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .expect("row")
                    .iter()
                    .filter_map(Value::as_f64)
            })
            .collect();
        assert_eq!(got.len(), rest_out.len(), "{way}: {}", answers[way]);
        // FP32 on the wire: the same float32 values REST's JSON carried.
        for (a, b) in got.iter().zip(&rest_out) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{way}: {a} vs {b}"
            );
        }
    }
}
