//! The gpt handler served end to end with the real SmolLM2-135M-Instruct of the default store:
//! the OpenAI-compatible API (checked with the official `openai` Python client, streaming
//! included), TorchServe's predictions with chunked streaming, and bad requests.

use cresset_e2e::{repo_root, Server};
use serde_json::{json, Value};

fn smollm2() -> Server {
    let server = Server::start(&["--model-store", "model_store", "--models", "smollm2"]);
    server.wait_healthy();
    server
}

#[test]
fn smollm2_answers_paris_through_the_chat_api_and_the_official_client() {
    let server = smollm2();
    let reply = server.post_json(
        "/v1/chat/completions",
        &json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 24
        }),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(content.contains("Paris"), "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    let models = server.get("/v1/models").json();
    assert!(models["data"]
        .as_array()
        .is_some_and(|d| d.iter().any(|m| m["id"] == "smollm2")));

    let python = std::env::var("CRESSET_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg(repo_root().join("tests/openai_client.py"))
        .arg(format!("{}/v1", server.inference))
        .arg("smollm2")
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn predictions_stream_tokens_as_chunks_and_bad_requests_get_400() {
    let server = smollm2();
    let reply = server.post_json(
        "/predictions/smollm2",
        &json!({"data": "The capital of France is", "max_new_tokens": 8, "stream": true}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(!reply.text().is_empty());
    let whole = server.post_json(
        "/predictions/smollm2",
        &json!({"data": "The capital of France is", "max_new_tokens": 8}),
    );
    assert_eq!(
        whole.json()["generated_text"].as_str(),
        Some(reply.text().as_str()),
        "streamed and whole agree"
    );

    let long = "word ".repeat(3000);
    for (path, body, needle) in [
        (
            "/predictions/smollm2",
            json!({"data": "hi", "max_new_tokens": -5}),
            "max_new_tokens",
        ),
        (
            "/predictions/smollm2",
            json!({"data": "hi", "temperature": -1}),
            "temperature",
        ),
        ("/predictions/smollm2", json!({"data": long}), "context"),
        (
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "bogus": true}),
            "bogus",
        ),
        (
            "/v1/completions",
            json!({"model": "smollm2", "prompt": "hi", "temperature": -0.1}),
            "temperature",
        ),
    ] {
        let reply = server.post_json(path, &body);
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.text());
        assert!(reply.text().contains(needle), "{path}: {}", reply.text());
    }
    let missing = server.post_json("/v1/completions", &json!({"model": "nope", "prompt": "hi"}));
    assert_eq!(missing.status, 404);
    let error: Value = missing.json();
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{error}"
    );
    // Still serving.
    let ok = server.post_json(
        "/predictions/smollm2",
        &json!({"data": "Hello", "max_new_tokens": 2}),
    );
    assert_eq!(ok.status, 200);
}
