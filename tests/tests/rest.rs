//! TorchServe's REST behaviour where its docs are the reference: `PUT /predictions` (what
//! `curl -T file` sends), 404 and 405 with the API's error body on every listener, `POST
//! /models` with a JSON body, `jobQueueStatus` in describe. Clients are real: `curl` and HTTP.

use std::process::Command;

use cresset_e2e::{curl, Server};
use serde_json::{json, Value};

fn error_body(body: &str, code: u16, kind: &str) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["type"], kind, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

#[test]
fn put_predicts_and_unknown_routes_and_methods_get_404_and_405_bodies() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    // `curl -T file` PUTs the file.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("input.txt");
    std::fs::write(&file, "hello from a file").expect("write");
    let (code, body) = curl(
        &["-T", file.to_str().expect("utf-8")],
        &format!("{}/predictions/echo", server.inference),
    );
    assert_eq!((code, body.as_str()), (200, "hello from a file"));
    let (code, body) = curl(
        &["-X", "PUT", "--data-binary", "versioned"],
        &format!("{}/predictions/echo/1.0", server.inference),
    );
    assert_eq!((code, body.as_str()), (200, "versioned"));

    for (base, method, path, code, kind) in [
        (
            &server.inference,
            "GET",
            "/nothing/here",
            404,
            "ResourceNotFoundException",
        ),
        (
            &server.inference,
            "GET",
            "/predictions/echo",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.inference,
            "DELETE",
            "/predictions/echo",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.inference,
            "PUT",
            "/explanations/echo",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.inference,
            "POST",
            "/ping",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.inference,
            "GET",
            "/v1/completions",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.inference,
            "POST",
            "/v2/health/ready",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.management,
            "PATCH",
            "/models",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.management,
            "POST",
            "/models/echo",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.management,
            "GET",
            "/models/echo/1.0/set-default",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.management,
            "GET",
            "/workflows",
            404,
            "ResourceNotFoundException",
        ),
        (
            &server.metrics,
            "POST",
            "/metrics",
            405,
            "MethodNotAllowedException",
        ),
        (
            &server.metrics,
            "GET",
            "/metrics/x",
            404,
            "ResourceNotFoundException",
        ),
    ] {
        let (got, body) = curl(&["-X", method], &format!("{base}{path}"));
        assert_eq!(got, code, "{method} {path}: {body}");
        error_body(&body, code, kind);
    }
    // What exists still answers.
    assert_eq!(server.get("/ping").status, 200);

    // `/metrics?name[]=` answers the named families only.
    let metrics = |query: &str| curl(&[], &format!("{}/metrics{query}", server.metrics));
    let (code, all) = metrics("");
    assert_eq!(code, 200);
    assert!(all.contains("# TYPE cresset_workers gauge") && all.contains("cresset_queue_depth"));
    let (code, some) = metrics("?name[]=cresset_workers&name%5B%5D=cresset_queue_depth");
    assert_eq!(code, 200);
    let families: Vec<&str> = some
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        families,
        ["cresset_queue_depth", "cresset_workers"],
        "{some}"
    );
    let (code, body) = metrics("?names=cresset_workers");
    assert_eq!(code, 400, "{body}");
    error_body(&body, 400, "BadRequestException");
}

#[test]
fn models_register_from_a_json_body_and_describe_has_the_queue_status() {
    let store = tempfile::tempdir().expect("tempdir");
    let echo = cresset_e2e::repo_root().join("model_store/echo");
    let copy = store.path().join("echo");
    std::fs::create_dir(&copy).expect("mkdir");
    for entry in std::fs::read_dir(&echo).expect("read echo") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, copy.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let server = Server::start(&["--model-store", store.path().to_str().expect("utf-8")]);
    server.wait_healthy();
    let register = |query: &str, body: &Value| {
        server.manage(
            "POST",
            &format!("/models{query}"),
            "application/json",
            body.to_string().as_bytes(),
        )
    };
    let r = register(
        "?synchronous=true",
        &json!({"url": "echo", "model_name": "from_json", "initial_workers": 2, "batch_size": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = &server.manage("GET", "/models/from_json", "", b"").json()[0];
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["batchSize"], 3, "{v}");
    assert_eq!(
        v["jobQueueStatus"],
        json!({"remainingCapacity": 100, "pendingRequests": 0}),
        "{v}"
    );
    assert_eq!(
        server
            .post("/predictions/from_json", "text/plain", b"x")
            .text(),
        "x"
    );
    for (query, body, says) in [
        ("", json!({"model_name": "m"}), "must give `url`"),
        (
            "",
            json!({"url": "echo", "workers": 1}),
            "unknown field `workers`",
        ),
        (
            "",
            json!({"url": "echo", "initial_workers": "two"}),
            "initial_workers",
        ),
        (
            "?model_name=a",
            json!({"url": "echo", "model_name": "b"}),
            "`model_name` is given in the query",
        ),
        ("", json!(["echo"]), "bad JSON registration body"),
    ] {
        let r = register(query, &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(says), "{body}: {message}");
    }
    let big = json!({"url": "x".repeat(70_000)});
    assert_eq!(register("", &big).status, 413);

    // TorchServe's words for each management answer.
    let said = |r: cresset_e2e::Reply| {
        (
            r.status,
            r.json()["status"].as_str().unwrap_or_default().to_owned(),
        )
    };
    assert_eq!(
        said(register("", &json!({"url": "echo", "model_name": "later"}))),
        (202, "Processing worker updates...".to_owned())
    );
    assert_eq!(
        said(register("", &json!({"url": "echo", "model_name": "idle", "initial_workers": 0}))),
        (
            200,
            "Model \"idle\" Version: 1.0 registered with 0 initial workers. Use scale workers API to add workers for the model."
                .to_owned()
        )
    );
    assert_eq!(
        said(server.manage("PUT", "/models/idle?min_worker=1&synchronous=true", "", b"")),
        (
            200,
            "Workers scaled to 1 for model: idle, version: 1.0".to_owned()
        )
    );
    // TorchServe clients send its defaults; other values are refused, saying why.
    assert_eq!(
        server
            .manage(
                "PUT",
                "/models/idle?min_worker=1&timeout=-1&number_gpu=0&synchronous=true",
                "",
                b""
            )
            .status,
        200
    );
    let refused = server.manage("PUT", "/models/idle?min_worker=1&timeout=5", "", b"");
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("`timeout`"), "{}", refused.text());
    assert_eq!(
        said(server.manage("PUT", "/models/idle/1.0/set-default", "", b"")),
        (
            200,
            "Default version successfully updated for model \"idle\" to \"1.0\"".to_owned()
        )
    );
    assert_eq!(
        said(server.manage("DELETE", "/models/idle", "", b"")),
        (200, "Model \"idle\" unregistered".to_owned())
    );
}

#[test]
fn a_torchserve_config_properties_configures_the_server() {
    let store = tempfile::tempdir().expect("tempdir");
    cresset_e2e::dir_archive(store.path(), "plain", "echo", "", &[]);
    cresset_e2e::dir_archive(
        store.path(),
        "pinned",
        "echo",
        "min_workers = 1\nmax_workers = 1\njob_queue_size = 5\nresponse_timeout_s = 9\n",
        &[],
    );
    let properties = store.path().join("config.properties");
    std::fs::write(
        &properties,
        format!(
            "# as TorchServe users write it\ninference_address=http://127.0.0.1:8080\n\
             model_store={}\nload_models=plain,pinned\ndefault_workers_per_model=2\n\
             job_queue_size=7\ndefault_response_timeout=33\nenable_metrics_api=true\n",
            store.path().display()
        ),
    )
    .expect("write config.properties");
    // The harness's own flags (ephemeral addresses, no token) win over the file, as flags do.
    let server = Server::start(&[
        "--ts-config",
        properties.to_str().expect("utf-8"),
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "plain,pinned",
    ]);
    server.wait_healthy();
    let describe = |m: &str| {
        server
            .manage("GET", &format!("/models/{m}"), "", b"")
            .json()[0]
            .clone()
    };
    let plain = describe("plain");
    assert_eq!(
        plain["workers"].as_array().map(Vec::len),
        Some(2),
        "{plain}"
    );
    assert_eq!(plain["responseTimeout"], 33, "{plain}");
    assert_eq!(plain["jobQueueStatus"]["remainingCapacity"], 7, "{plain}");
    // A model's own config wins over the server's defaults.
    let pinned = describe("pinned");
    assert_eq!(
        pinned["workers"].as_array().map(Vec::len),
        Some(1),
        "{pinned}"
    );
    assert_eq!(pinned["responseTimeout"], 9, "{pinned}");
    assert_eq!(pinned["jobQueueStatus"]["remainingCapacity"], 5, "{pinned}");
    assert!(server
        .log()
        .contains("`enable_metrics_api` (config.properties) is not used by Cresset"));

    // TLS settings stop the server, naming the key.
    std::fs::write(&properties, "private_key_file=/etc/key.pem\n").expect("write");
    let out = Command::new(cresset_e2e::cresset_bin())
        .args(["serve", "--ts-config", properties.to_str().expect("utf-8")])
        .output()
        .expect("run cresset");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`private_key_file`") && stderr.contains("plain HTTP"),
        "{stderr}"
    );
}
