//! Text over HTTP: a TorchServe `text_classifier` archive made by the real
//! `torch-model-archiver` (the model of TorchServe's text classification example, its
//! vocabulary as `vocab.json`, its class names) registers and answers texts sent as a plain
//! body (`curl -d`), as JSON and as KServe v1 instances, with TorchServe's own handler's
//! probabilities (scripts/make_text_fixtures.py); the same archive with the model as ONNX
//! answers the same.

use std::path::{Path, PathBuf};

use cresset_e2e::{assert_same_classes, curl, repo_root, torch_model_archiver, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/generated/text");
    assert!(
        dir.join("expected.json").is_file(),
        "run `make models` first"
    );
    dir
}

fn mar(file: &str, name: &str, export: &Path) {
    torch_model_archiver(
        &fixtures(),
        &[
            "--model-name",
            name,
            "--version",
            "1.0",
            "--serialized-file",
            file,
            "--handler",
            "text_classifier",
            "--extra-files",
            "vocab.json,index_to_name.json",
        ],
        export,
    );
}

#[test]
fn text_classifier_archives_answer_as_torchserves_handler() {
    let store = tempfile::tempdir().expect("tempdir");
    mar("model.pt", "news", store.path());
    mar("model.onnx", "news_onnx", store.path());
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "news=news.mar,news_onnx=news_onnx.mar",
    ]);
    server.wait_healthy();
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let cases = expected["cases"].as_array().expect("cases");
    for case in cases {
        let text = case["text"].as_str().expect("text");
        for model in ["news", "news_onnx"] {
            let url = format!("{}/predictions/{model}", server.inference);
            // `curl -d` sends the text as a form body; TorchServe users send it so.
            let (code, body) = curl(
                &["--data-binary", text, "-H", "Content-Type: text/plain"],
                &url,
            );
            assert_eq!(code, 200, "{model}: {body}");
            assert_same_classes(&serde_json::from_str(&body).expect("json"), &case["answer"]);
            let reply =
                server.post_json(&format!("/predictions/{model}"), &json!({ "data": text }));
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_same_classes(&reply.json(), &case["answer"]);
        }
    }
    let texts: Vec<&Value> = cases.iter().map(|c| &c["text"]).collect();
    let reply = server.post_json("/v1/models/news:predict", &json!({ "instances": texts }));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let predictions = reply.json()["predictions"].clone();
    for (i, case) in cases.iter().enumerate() {
        assert_same_classes(&predictions[i], &case["answer"]);
    }
    // A body that is not text is a 400 that says why; the model goes on answering.
    let url = format!("{}/predictions/news", server.inference);
    let bad = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(bad.path(), [0xffu8, 0xfe, 0x00]).expect("write");
    let (code, body) = curl(
        &[
            "--data-binary",
            &format!("@{}", bad.path().display()),
            "-H",
            "Content-Type: text/plain",
        ],
        &url,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not UTF-8"), "{body}");
    let (code, _) = curl(
        &[
            "--data-binary",
            "Stocks rally",
            "-H",
            "Content-Type: text/plain",
        ],
        &url,
    );
    assert_eq!(code, 200);
}
