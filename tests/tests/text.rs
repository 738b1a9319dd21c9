//! Text over HTTP: a TorchServe `text_classifier` archive made by the real
//! `torch-model-archiver` (the model of TorchServe's text classification example, its
//! vocabulary as `vocab.json`, its class names) registers and answers texts sent as a plain
//! body (`curl -d`), as JSON and as KServe v1 instances, with TorchServe's own handler's
//! probabilities (scripts/make_text_fixtures.py); the same archive with the model as ONNX
//! answers the same; and archives made as TorchServe's text classification example makes them,
//! with the vocabulary as `source_vocab.pt` from each torchtext, answer the same too.

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

/// What TorchServe's own handler answered (scripts/make_text_fixtures.py).
fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).expect("read"))
        .expect("json")
}

/// `model` answers `case`'s text, sent as curl sends it (`--data-binary`, as TorchServe users
/// send text), with TorchServe's handler's answer.
fn curl_answers_as_torchserve(server: &Server, model: &str, case: &Value) {
    let text = case["text"].as_str().expect("text");
    let url = format!("{}/predictions/{model}", server.inference);
    let (code, body) = curl(
        &["--data-binary", text, "-H", "Content-Type: text/plain"],
        &url,
    );
    assert_eq!(code, 200, "{model}: {body}");
    assert_same_classes(&serde_json::from_str(&body).expect("json"), &case["answer"]);
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
    let expected = expected();
    let cases = expected["cases"].as_array().expect("cases");
    for case in cases {
        let text = case["text"].as_str().expect("text");
        for model in ["news", "news_onnx"] {
            curl_answers_as_torchserve(&server, model, case);
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

/// `torch-model-archiver ... --extra-files "index_to_name.json,source_vocab.pt"`, as TorchServe's
/// text classification example archives its model: the vocabulary is the pickled torchtext
/// Vocab that torch.save wrote. Each of torchtext 0.6's (zip and legacy format) and
/// torchtext 0.18's is read, and the answers are TorchServe's handler's.
#[test]
fn torchserves_example_archives_with_source_vocab_pt_answer_as_its_handler() {
    let store = tempfile::tempdir().expect("tempdir");
    let vocabs = [
        ("tt06", fixtures().join("source_vocab.pt")),
        ("tt06_legacy", fixtures().join("source_vocab_legacy.pt")),
        (
            "tt018",
            repo_root().join("tests/fixtures/torchtext/source_vocab_0.18.pt"),
        ),
    ];
    for (name, vocab) in &vocabs {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["model.pt", "index_to_name.json"] {
            std::fs::copy(fixtures().join(f), dir.path().join(f)).expect("copy");
        }
        std::fs::copy(vocab, dir.path().join("source_vocab.pt")).expect("copy");
        torch_model_archiver(
            dir.path(),
            &[
                "--model-name",
                name,
                "--version",
                "1.0",
                "--serialized-file",
                "model.pt",
                "--handler",
                "text_classifier",
                "--extra-files",
                "index_to_name.json,source_vocab.pt",
            ],
            store.path(),
        );
    }
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "tt06=tt06.mar,tt06_legacy=tt06_legacy.mar,tt018=tt018.mar",
    ]);
    server.wait_healthy();
    let expected = expected();
    for case in expected["cases"].as_array().expect("cases") {
        for (name, _) in &vocabs {
            curl_answers_as_torchserve(&server, name, case);
        }
    }
}
