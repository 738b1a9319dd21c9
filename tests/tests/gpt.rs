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
    // The generation metrics are exported, per model and version.
    let metrics = server.metrics_text();
    for name in [
        "cresset_time_to_first_token_seconds_count{",
        "cresset_time_per_output_token_seconds_count{",
        "cresset_generated_tokens_total{",
        "cresset_running_sequences{",
        "cresset_waiting_sequences{",
        "cresset_kv_slots_used_ratio{",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in metrics"));
        assert!(line.contains("model=\"smollm2\""), "{line}");
    }
    let tokens: f64 = metrics
        .lines()
        .find(|l| l.starts_with("cresset_generated_tokens_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(
        tokens >= 18.0,
        "8 + 8 + 2 tokens at least were generated: {tokens}"
    );
}

/// Read server-sent events until `[DONE]`, returning each event's text piece and when it came.
fn read_events(
    reader: impl std::io::Read,
    started: std::time::Instant,
) -> Vec<(String, std::time::Duration)> {
    let mut events = Vec::new();
    for value in cresset_e2e::sse_events(reader) {
        let piece = value["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        events.push((piece, started.elapsed()));
    }
    events
}

fn stream_completion(server: &Server, prompt: &str, max_tokens: u32) -> impl std::io::Read {
    let response = ureq::post(&format!("{}/v1/completions", server.inference))
        .header("content-type", "application/json")
        .send(json!({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true}).to_string())
        .expect("stream starts");
    response.into_body().into_reader()
}

#[test]
fn a_second_request_joins_the_running_batch_and_both_equal_their_solo_runs() {
    let server = smollm2();
    let (long, short) = (
        "Once upon a time, in a small village,",
        "The three primary colors are",
    );
    let solo = |prompt: &str, n: u32| -> String {
        read_events(
            stream_completion(&server, prompt, n),
            std::time::Instant::now(),
        )
        .into_iter()
        .map(|(p, _)| p)
        .collect()
    };
    let (long_solo, short_solo) = (solo(long, 60), solo(short, 8));
    let started = std::time::Instant::now();
    let first = stream_completion(&server, long, 60);
    let mut lines = std::io::BufReader::new(first);
    // Wait for the long one's first event, then start the short one beside it.
    let mut head = String::new();
    while !head.starts_with("data: ") {
        head.clear();
        std::io::BufRead::read_line(&mut lines, &mut head).expect("first event");
    }
    let second = std::thread::spawn({
        let url = format!("{}/v1/completions", server.inference);
        move || {
            let t0 = std::time::Instant::now();
            let response = ureq::post(&url)
                .header("content-type", "application/json")
                .send(json!({"model": "smollm2", "prompt": "The three primary colors are", "max_tokens": 8, "temperature": 0, "stream": true}).to_string())
                .expect("second stream");
            let events = read_events(response.into_body().into_reader(), t0);
            (t0, events)
        }
    });
    let rest = read_events(lines, started);
    let long_done = started.elapsed();
    let (t0, short_events) = second.join().expect("second client");
    let first_piece: String =
        serde_json::from_str::<Value>(head.trim_start_matches("data: ").trim())
            .map(|v| {
                v["choices"][0]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_default();
    let long_text: String = std::iter::once(first_piece)
        .chain(rest.into_iter().map(|(p, _)| p))
        .collect();
    let short_text: String = short_events.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        long_text, long_solo,
        "the long one is unchanged by its neighbour"
    );
    assert_eq!(short_text, short_solo, "the short one equals its solo run");
    let short_first = (t0 - started) + short_events.first().map(|e| e.1).expect("an event");
    assert!(
        short_first * 2 < long_done,
        "the newcomer's first token came at {short_first:?}; the long one ended at {long_done:?}"
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot_at_the_next_step() {
    let server = smollm2();
    let mut reader = std::io::BufReader::new(stream_completion(
        &server,
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        2000,
    ));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("first event");
    }
    let running = || {
        server
            .metrics_text()
            .lines()
            .find(|l| l.starts_with("cresset_running_sequences{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // Counting on, the sequence runs (the gauge is set after each step).
    for _ in 0..3 {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("more events");
    }
    // The gauge is set at the end of a step, which may come after the step's chunks have
    // reached the client: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while running() != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the sequence runs: {:?}",
            running()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(reader);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while running() != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not freed within 5 s (2000 tokens take ~90 s)"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
