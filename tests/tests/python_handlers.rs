//! TorchServe handlers (`handler.py`) run unchanged by the `python` plugin: handlers written as
//! TorchServe users write them (tests/fixtures/ts_handlers), archived with the real
//! `torch-model-archiver` 0.12.0, registered by upload, answer over HTTP as the same handler
//! answers when TorchServe's own `ts` package runs it (tests/ts_reference.py, in the TorchServe
//! venv, on the same requests). They run in process isolation: a handler that aborts costs its
//! own request, and its worker comes back.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cresset_e2e::{
    assert_same_classes_within, metric_value, repo_root, torch_model_archiver, Server,
};
use serde_json::{json, Value};

/// The TorchServe venv's Python (TorchServe 0.12.0 and its `ts` package).
fn torchserve_python() -> PathBuf {
    cresset_e2e::torchserve_venv().join("bin/python")
}

fn run_python(python: &Path, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(python)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `handler` and its files archived as `name`.mar by torch-model-archiver 0.12.0, also
/// unpacked (for the reference run): (the .mar's bytes, the unpacked folder).
fn mar(work: &Path, name: &str, handler: &str, extra: &[&str]) -> (Vec<u8>, PathBuf) {
    let fixtures = repo_root().join("tests/fixtures/ts_handlers");
    let mut args = vec![
        "--model-name",
        name,
        "--version",
        "1.0",
        "--handler",
        handler,
    ];
    // The fixtures' files beside what the test put in `work` (which wins).
    for file in std::iter::once(&handler).chain(extra) {
        if fixtures.join(file).is_file() && !work.join(file).is_file() {
            std::fs::copy(fixtures.join(file), work.join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
    let files: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|f| *f != "model.pt" && !f.ends_with(".yaml"))
        .collect();
    let joined = files.join(",");
    if !files.is_empty() {
        args.extend(["--extra-files", &joined]);
    }
    if extra.contains(&"model.pt") {
        args.extend(["--serialized-file", "model.pt"]);
    }
    if let Some(config) = extra.iter().find(|f| f.ends_with(".yaml")) {
        args.extend(["--config-file", config]);
    }
    let export = work.join("export");
    std::fs::create_dir_all(&export).expect("mkdir");
    torch_model_archiver(work, &args, &export);
    let path = export.join(format!("{name}.mar"));
    let unpacked = work.join(format!("{name}-unpacked"));
    run_python(
        &cresset_e2e::venv_bin("python"),
        &[
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])",
            path.to_str().expect("utf-8"),
            unpacked.to_str().expect("utf-8"),
        ],
        "",
    );
    (std::fs::read(&path).expect("read the .mar"), unpacked)
}

/// What TorchServe's own `ts` runs the handler in `model_dir` to, on these requests.
fn reference(model_dir: &Path, requests: Value) -> Value {
    let spec = json!({"model_dir": model_dir, "requests": requests});
    let out = run_python(
        &torchserve_python(),
        &[repo_root()
            .join("tests/ts_reference.py")
            .to_str()
            .expect("utf-8")],
        &spec.to_string(),
    );
    serde_json::from_str(out.lines().last().unwrap_or_default()).expect("reference JSON")
}

/// Standard base64, for the reference's binary bodies.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn upload(server: &Server, name: &str, bytes: &[u8]) {
    let reply = server.manage(
        "POST",
        &format!("/models?model_name={name}&synchronous=true"),
        "application/octet-stream",
        bytes,
    );
    assert_eq!(reply.status, 200, "{name}: {}", reply.text());
}

fn post(
    server: &Server,
    model: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> cresset_e2e::Reply {
    server.post_with(
        &format!("/predictions/{model}"),
        content_type,
        headers,
        body.as_bytes(),
    )
}

#[test]
fn torchserve_handlers_answer_as_under_torchserve_and_an_abort_costs_one_request() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    // The classifier's TorchScript file, made by torch in the test venv.
    run_python(
        &cresset_e2e::venv_bin("python"),
        &["-c", "import sys, torch\ntorch.manual_seed(0)\nm = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\ntorch.jit.script(m).save(sys.argv[1])", w.join("model.pt").to_str().expect("utf-8")],
        "",
    );
    let (mlp, mlp_dir) = mar(
        w,
        "mlp",
        "mlp_handler.py",
        &["model.pt", "index_to_name.json"],
    );
    let (stream, stream_dir) = mar(w, "stream", "stream_handler.py", &[]);
    let (ctx, ctx_dir) = mar(w, "ctx", "context_handler.py", &["context-config.yaml"]);
    // A transformers checkpoint from the fixtures, for the text classifier.
    let bert = repo_root().join("tests/fixtures/generated/nlp/bert-seq");
    let checkpoint = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ];
    for file in checkpoint {
        std::fs::copy(bert.join(file), w.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let (text, text_dir) = mar(w, "text", "text_handler.py", &checkpoint);

    let store = tempfile::tempdir().expect("tempdir");
    let python = cresset_e2e::venv_bin("python");
    let server = Server::start_with_env(
        &["--model-store", store.path().to_str().expect("utf-8")],
        &[("CRESSET_PYTHON", python.to_str().expect("utf-8"))],
    );
    server.wait_healthy();
    for (name, bytes) in [
        ("mlp", &mlp),
        ("stream", &stream),
        ("ctx", &ctx),
        ("text", &text),
    ] {
        upload(&server, name, bytes);
    }
    let d = server.manage("GET", "/models/mlp", "", b"").json();
    assert_eq!(d[0]["plugin"]["name"], "python", "{d}");
    assert_eq!(d[0]["isolation"], "process", "always, for Python");

    // A BaseHandler subclass: TorchScript, its own preprocess and postprocess, label names.
    for body in [
        "{\"inputs\": [0.1, -1.5, 2.0, 0.3]}",
        "[3.0, 0.5, -0.25, 1.0]",
    ] {
        let want = reference(
            &mlp_dir,
            json!([{"content_type": "application/json", "body": body, "headers": {}}]),
        );
        let got = post(&server, "mlp", "application/json", &[], body);
        assert_eq!(got.status, 200, "{}", got.text());
        let (got, want) = (got.json(), &want["answers"][0]["body"]);
        let labels: Vec<&String> = got.as_object().expect("labels").keys().collect();
        assert_eq!(labels, ["setosa", "versicolor", "virginica"], "{got}");
        assert_same_classes_within(&got, want, 1e-7);
    }

    // Explanations: the explanations route reaches BaseHandler.explain_handle and the
    // handler's get_insights, as TorchServe's `explain` header does.
    let body = "[0.5, -1.0, 2.0, 0.25]";
    let want = reference(
        &mlp_dir,
        json!([{"content_type": "application/json", "body": body, "headers": {"explain": "True"}}]),
    );
    let got = server.post_with(
        "/explanations/mlp",
        "application/json",
        &[],
        body.as_bytes(),
    );
    assert_eq!(got.status, 200, "{}", got.text());
    let (got, want) = (got.json(), &want["answers"][0]["body"]);
    let pairs: Vec<(f64, f64)> = got
        .as_array()
        .zip(want.as_array())
        .map(|(g, w)| {
            g.iter()
                .zip(w)
                .map(|(a, b)| (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(0.0)))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(pairs.len(), 4, "{got} vs {want}");
    assert!(
        pairs.iter().all(|(a, b)| (a - b).abs() <= 1e-6),
        "{got} vs {want}"
    );

    // A transformers text classifier with its own preprocess and postprocess.
    for body in ["what a wonderful day", "this is the worst film I have seen"] {
        let want = reference(
            &text_dir,
            json!([{"content_type": "text/plain", "body": body, "headers": {}}]),
        );
        let got = post(&server, "text", "text/plain", &[], body);
        assert_eq!(got.status, 200, "{}", got.text());
        let (got, want) = (got.json(), &want["answers"][0]["body"]);
        assert_eq!(
            got.as_object().map(|o| o.keys().collect::<Vec<_>>()),
            want.as_object().map(|o| o.keys().collect::<Vec<_>>()),
            "{got} vs {want}"
        );
        assert_same_classes_within(&got, want, 1e-7);
    }

    // Streaming with send_intermediate_predict_response: the chunks, then the final answer.
    let want = reference(
        &stream_dir,
        json!([{"content_type": "text/plain", "body": "alpha", "headers": {}}]),
    );
    let mut expected: String = want["chunks"][0]
        .as_array()
        .expect("chunks")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    expected.push_str(want["answers"][0]["body"].as_str().expect("final"));
    assert_eq!(expected, "alpha-0;alpha-1;alpha-2;alpha-done");
    let got = post(&server, "stream", "text/plain", &[], "alpha");
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), expected);
    assert_eq!(got.header("transfer-encoding"), Some("chunked"));

    // model_yaml_config, request headers, a response status and header, a metric.
    let want = reference(
        &ctx_dir,
        json!([{"content_type": "text/plain", "body": "hi", "headers": {"x-caller": "tester"}}]),
    );
    let got = post(
        &server,
        "ctx",
        "text/plain",
        &[("x-caller", "tester")],
        "hi",
    );
    assert_eq!(
        u64::from(got.status),
        want["answers"][0]["status"].as_u64().unwrap_or(0)
    );
    assert_eq!(got.status, 201);
    assert_eq!(got.header("x-greeted"), Some("tester"));
    assert_eq!(got.json(), want["answers"][0]["body"], "{}", got.text());
    let metrics = server.metrics_text();
    assert_eq!(
        metric_value(&metrics, "cresset_ts_Greetings{model=\"ctx\""),
        Some(1.0),
        "{metrics}"
    );
    assert!(server.log().contains("TorchServe handler initialised"));
    // A multipart form: the handler finds the `data` field under its name (this one reads
    // `body`, which such a request lacks in TorchServe too), the other fields beside it.
    let want = reference(
        &ctx_dir,
        json!([{"content_type": "text/plain", "body": "hi", "headers": {}, "field": "data"}]),
    );
    let (status, text) = cresset_e2e::curl(
        &["-F", "data=hi;type=text/plain"],
        &format!("{}/predictions/ctx", server.inference),
    );
    assert_eq!(status, 201, "{text}");
    let got: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(got, want["answers"][0]["body"]);
    assert_eq!(got["body"], Value::Null);

    // A Cresset archive with `handler = "python"`: `handler.py` by default, and without a YAML
    // config the handler's `model_yaml_config` is the `[handler]` table.
    let dir = cresset_e2e::dir_archive(
        store.path(),
        "pyarchive",
        "python",
        "[handler]\nparts = 2\n",
        &[(
            "handler.py",
            &std::fs::read(repo_root().join("tests/fixtures/ts_handlers/stream_handler.py"))
                .expect("fixture"),
        )],
    );
    assert!(dir.is_dir());
    server.register("url=pyarchive&synchronous=true");
    let got = post(&server, "pyarchive", "text/plain", &[], "x");
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "x-0;x-1;x-done");

    // A built-in handler's Python version, by choice: TorchServe's image_classifier on a
    // TorchScript resnet18 and real photographs (JPEG and PNG), as TorchServe runs it.
    let vision = repo_root().join("tests/fixtures/generated/vision");
    for file in ["model.pt", "index_to_name.json"] {
        std::fs::copy(vision.join("resnet18").join(file), w.join(file)).expect("copy");
    }
    std::fs::write(w.join("opt-in.yaml"), "python_builtin_handlers: true\n").expect("yaml");
    let (classifier, classifier_dir) = mar(
        w,
        "classifier",
        "image_classifier",
        &["model.pt", "index_to_name.json", "opt-in.yaml"],
    );
    upload(&server, "classifier", &classifier);
    let d = server.manage("GET", "/models/classifier", "", b"").json();
    assert_eq!(d[0]["plugin"]["name"], "python", "{d}");
    for photo in ["chelsea.jpg", "coffee.png"] {
        let bytes = std::fs::read(vision.join("photos").join(photo)).expect("photo");
        let want = reference(
            &classifier_dir,
            json!([{"content_type": "application/octet-stream", "body_base64": base64(&bytes), "headers": {}}]),
        );
        let got = server.post(
            "/predictions/classifier",
            "application/octet-stream",
            &bytes,
        );
        assert_eq!(got.status, 200, "{photo}: {}", got.text());
        let (got, want) = (got.json(), &want["answers"][0]["body"]);
        let names = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(names(&got), names(want), "{photo}");
        assert_eq!(names(&got).map(|n| n.len()), Some(5), "{photo}: the top 5");
        assert_same_classes_within(&got, want, 1e-7);
    }

    // An exception in the handler answers the batch with 503, as TorchServe does, naming it.
    let got = post(&server, "ctx", "text/plain", &[], "raise");
    assert_eq!(got.status, 503, "{}", got.text());
    assert!(
        got.text().contains("ValueError: asked to fail"),
        "{}",
        got.text()
    );

    // os.abort() in the handler: that request fails naming the signal, the other models
    // answer, and the next request gets a new interpreter.
    let got = post(&server, "ctx", "text/plain", &[], "abort");
    assert_eq!(got.status, 500, "{}", got.text());
    assert!(got.text().contains("SIGABRT"), "{}", got.text());
    let got = post(&server, "mlp", "application/json", &[], "[0, 0, 0, 0]");
    assert_eq!(got.status, 200, "{}", got.text());
    let got = post(&server, "ctx", "text/plain", &[("x-caller", "again")], "hi");
    assert_eq!(got.status, 201, "{}", got.text());
    assert_eq!(got.json()["caller"], "again");
}
