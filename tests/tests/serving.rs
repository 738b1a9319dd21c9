//! The inference API over the echo plugin: formats, headers, errors, health, metrics.

use cresset_e2e::Server;

#[test]
fn echo_returns_the_body_and_content_type_unchanged() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let reply = server.post("/predictions/echo", "text/plain", b"hi");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "hi");
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert_eq!(reply.header("x-model-version"), Some("1.0"));
    assert!(reply
        .header("x-request-id")
        .is_some_and(|id| !id.is_empty()));

    let json = serde_json::json!({"data": [1, 2, 3]});
    let reply = server.post_json("/predictions/echo/1.0", &json);
    assert_eq!((reply.status, reply.json()), (200, json));
}

#[test]
fn multipart_data_field_is_the_body_and_other_fields_are_kept_apart() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let boundary = "XyZ";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nignored\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.bin\"\r\nContent-Type: application/x-thing\r\n\r\npayload-bytes\r\n\
         --{boundary}--\r\n"
    );
    let reply = server.post(
        "/predictions/echo",
        &format!("multipart/form-data; boundary={boundary}"),
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "payload-bytes");
    assert_eq!(reply.header("content-type"), Some("application/x-thing"));

    let no_data = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--{boundary}--\r\n");
    let reply = server.post(
        "/predictions/echo",
        &format!("multipart/form-data; boundary={boundary}"),
        no_data.as_bytes(),
    );
    assert_eq!(reply.status, 400);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`data`"));
}

#[test]
fn request_id_from_the_client_is_echoed() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let response = ureq::post(format!("{}/predictions/echo", server.inference))
        .header("x-request-id", "client-id-42")
        .send(&b"x"[..])
        .expect("POST");
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-id-42")
    );
}

#[test]
fn unknown_models_and_versions_get_torchserve_shaped_404s() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let reply = server.post("/predictions/nope", "text/plain", b"x");
    assert_eq!(reply.status, 404);
    let body = reply.json();
    assert_eq!(body["code"], 404);
    assert_eq!(body["type"], "ModelNotFoundException");
    assert_eq!(body["message"], "Model not found: nope");
    let reply = server.post("/predictions/echo/9.9", "text/plain", b"x");
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.json()["message"],
        "Model version 9.9 does not exist for model echo"
    );
}

#[test]
fn bodies_over_max_request_size_get_413_and_the_server_goes_on() {
    let server = Server::start(&["--models", "echo", "--max-request-size", "1024"]);
    server.wait_healthy();
    let reply = server.post(
        "/predictions/echo",
        "application/octet-stream",
        &vec![7u8; 4096],
    );
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["type"], "RequestEntityTooLargeException");
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"small")
            .text(),
        "small"
    );
    // Multipart part headers count too (the parser would buffer them without a cap).
    let header_bomb = format!(
        "--b\r\nContent-Disposition: form-data; name=\"data\"; x=\"{}\"",
        "y".repeat(8192)
    );
    let reply = server.post(
        "/predictions/echo",
        "multipart/form-data; boundary=b",
        header_bomb.as_bytes(),
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"still")
            .text(),
        "still"
    );
}

#[test]
fn ping_is_healthy_only_once_models_are_ready_and_metrics_count_requests() {
    // The arguments `make serve` uses: a relative store and every model in it.
    let server = Server::start(&["--model-store", "model_store", "--models", "all"]);
    server.wait_healthy();
    assert_eq!(server.get("/ping").json()["status"], "Healthy");
    for _ in 0..3 {
        assert_eq!(
            server.post("/predictions/echo", "text/plain", b"m").status,
            200
        );
    }
    let metrics = server.metrics_text();
    assert!(
        metrics.contains(
            r#"cresset_inference_requests_total{model="echo",status="200",version="1.0"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("cresset_queue_latency_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cresset_model_load_seconds_count{model="iris",version="1.0"} 1"#),
        "{metrics}"
    );
    let iris = server.post_json(
        "/predictions/iris",
        &serde_json::json!({"data": [[5.1, 3.5, 1.4, 0.2]]}),
    );
    assert_eq!(iris.status, 200, "{}", iris.text());
}

#[test]
fn bad_startup_configuration_is_refused_with_the_field_named() {
    let out = std::process::Command::new(cresset_e2e::cresset_bin())
        .args(["serve", "--model-store", "/nonexistent/store"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`model_store` must be an existing folder"),
        "{err}"
    );

    let out = std::process::Command::new(cresset_e2e::cresset_bin())
        .args(["serve", "--inference-address", "localhost"])
        .env(
            "CRESSET_MODEL_STORE",
            cresset_e2e::repo_root().join("model_store"),
        )
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`inference_address` must be an IP address and port"),
        "{err}"
    );
}

#[test]
fn cresset_toml_and_environment_configure_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cresset.toml");
    std::fs::write(
        &config,
        format!(
            "model_store = {:?}\nmodels = [\"renamed=echo\"]\nmax_request_size = 10\n",
            cresset_e2e::repo_root().join("model_store")
        ),
    )
    .expect("write");
    let server = Server::start(&["--config", config.to_str().expect("utf-8")]);
    server.wait_healthy();
    assert_eq!(
        server
            .post("/predictions/renamed", "text/plain", b"short")
            .status,
        200
    );
    assert_eq!(
        server
            .post("/predictions/renamed", "text/plain", b"longer than ten")
            .status,
        413
    );

    std::fs::write(&config, "modle_store = \"x\"\n").expect("write");
    let out = std::process::Command::new(cresset_e2e::cresset_bin())
        .args(["serve", "--config", config.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("modle_store"), "{err}");
}

#[test]
fn explanations_from_a_plugin_without_them_get_501() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let reply = server.post("/explanations/echo", "text/plain", b"why");
    assert_eq!(reply.status, 501, "{}", reply.text());
    assert_eq!(reply.json()["type"], "NotImplementedException");
    assert!(reply.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("has no explanations"));
}

#[test]
fn json_logs_are_one_object_per_line_with_an_access_record_per_request() {
    let server = Server::start(&["--models", "echo", "--log-format", "json", "--log", "info"]);
    server.wait_healthy();
    assert_eq!(
        server.post("/predictions/echo", "text/plain", b"j").status,
        200
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = server.log();
        let records: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(
            records.len(),
            log.lines().count(),
            "every line is JSON:\n{log}"
        );
        let access = records
            .iter()
            .find(|r| r["target"] == "cresset::access" && r["path"] == "/predictions/echo");
        if let Some(access) = access {
            assert_eq!(access["status"], 200);
            assert_eq!(access["model_version"], "1.0");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access record:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
