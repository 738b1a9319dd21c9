//! The nlp handler served end to end: every mode from an archive built with `cresset archive`
//! (tgz, zip and a plain directory), over real HTTP, on the small random checkpoints of
//! `scripts/make_nlp_fixtures.py` and the real all-MiniLM-L6-v2 of the default store. Answers
//! are compared with what transformers gave; bad inputs get 400 and leave the server healthy.

use std::path::{Path, PathBuf};

use cresset_e2e::{repo_root, run_archiver, Server};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/generated/nlp")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json"))
        .expect("tests/fixtures/generated/nlp/expected.json: run `make models`");
    serde_json::from_str(&text).expect("JSON")
}

/// Archive a checkpoint folder with the nlp handler, as an operator would; in f32 unless
/// `handler_toml` sets `dtype` (the references are transformers' f32 outputs).
fn archive(out: &Path, checkpoint: &str, name: &str, format: &str, handler_toml: &str) -> String {
    let dir = fixtures().join(checkpoint);
    let config = out.join(format!("{name}-config.toml"));
    let dtype = if handler_toml.contains("dtype") {
        ""
    } else {
        "dtype = \"float32\"\n"
    };
    std::fs::write(
        &config,
        format!("batch_size = 8\nmax_workers = 1\n\n[handler]\n{dtype}{handler_toml}\n"),
    )
    .expect("write config");
    let extra: Vec<String> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|p| p.is_file())
    .map(|p| p.display().to_string())
    .collect();
    let (ok, path, err) = run_archiver(&[
        "--model-name",
        name,
        "--handler",
        "nlp",
        "--serialized-file",
        dir.join("model.safetensors").to_str().expect("utf-8"),
        "--extra-files",
        &extra.join(","),
        "--config-file",
        config.to_str().expect("utf-8"),
        "--archive-format",
        format,
        "--export-path",
        out.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    format!("{name}={path}")
}

fn close(a: &Value, b: &Value, what: &str) {
    let (x, y) = (a.as_f64().expect("number"), b.as_f64().expect("number"));
    assert!((x - y).abs() <= 1e-4, "{what}: {x} vs {y}");
}

#[test]
fn every_mode_is_served_from_archives_and_matches_transformers() {
    let expected = expected();
    let out = tempfile::tempdir().expect("tempdir");
    let models = [
        archive(out.path(), "bert-seq", "sentiment", "tgz", ""),
        archive(out.path(), "roberta-tok", "ner", "zip", ""),
        archive(
            out.path(),
            "distilbert-qa",
            "qa",
            "tgz",
            "max_length = 48\ndoc_stride = 16",
        ),
        archive(
            out.path(),
            "gpt2",
            "writer",
            "no-archive",
            "max_new_tokens = 32",
        ),
        archive(
            out.path(),
            "bert-base",
            "embed",
            "zip",
            "mode = \"feature_extraction\"",
        ),
    ];
    let server = Server::start(&["--models", &models.join(",")]);
    server.wait_healthy();

    // Sequence classification: one text as raw text, a list as JSON.
    let seq = &expected["encoders"]["bert-seq"];
    let texts = &seq["cases"][0]["texts"];
    let reply = server.post(
        "/predictions/sentiment",
        "text/plain",
        texts[0].as_str().expect("t").as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["label"], seq["pipeline"][0][0]["label"]);
    assert!(reply.header("x-model-version").is_some());
    let reply = server.post_json("/predictions/sentiment", &json!({ "text": texts }));
    assert_eq!(reply.status, 200, "{}", reply.text());
    for (i, answer) in reply.json().as_array().expect("list").iter().enumerate() {
        let top = &seq["pipeline"][i][0];
        assert_eq!(answer["label"], top["label"]);
        close(&answer["score"], &top["score"], "classification score");
    }

    // Token classification.
    let tok = &expected["encoders"]["roberta-tok"];
    let reply = server.post_json(
        "/predictions/ner",
        &json!({ "data": tok["cases"][0]["texts"][2] }),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let ours = reply.json();
    let theirs = tok["pipeline"][2].as_array().expect("entities");
    assert_eq!(ours.as_array().map(Vec::len), Some(theirs.len()), "{ours}");
    for (a, b) in ours.as_array().expect("entities").iter().zip(theirs) {
        assert_eq!(
            (&a["label"], &a["start"], &a["end"]),
            (&b["entity_group"], &b["start"], &b["end"])
        );
    }

    // Question answering over a long context in 48-token windows.
    let qa = expected["encoders"]["distilbert-qa"]["pipeline"]
        .as_array()
        .expect("qa")
        .iter()
        .find(|e| e["max_seq_len"] == 48)
        .expect("the long-context case")
        .clone();
    let reply = server.post_json(
        "/predictions/qa",
        &json!({"question": qa["question"], "context": qa["context"]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(answer["answer"], qa["answer"]);
    assert_eq!(
        (&answer["start"], &answer["end"]),
        (&qa["start"], &qa["end"])
    );

    // Greedy generation.
    let gpt = &expected["gpt2"];
    let reply = server.post_json("/predictions/writer", &json!({"data": gpt["prompt"]}));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["generated_text"], gpt["greedy_text"]);

    // Embeddings, checked against transformers' hidden states.
    let base = &expected["encoders"]["bert-base"]["cases"][1];
    let reply = server.post_json("/predictions/embed", &json!({"text": base["texts"][0]}));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let ours: Vec<f64> = reply.json()["embedding"]
        .as_array()
        .expect("vector")
        .iter()
        .map(|x| x.as_f64().expect("f"))
        .collect();
    let theirs: Vec<f64> = base["embedding"][0]
        .as_array()
        .expect("vector")
        .iter()
        .map(|x| x.as_f64().expect("f"))
        .collect();
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        ours.len() == theirs.len() && diff <= 1e-4,
        "embedding diff {diff}"
    );

    // Explanations over HTTP.
    let reply = server.post_json(
        "/explanations/sentiment",
        &json!({"text": texts[1], "n_steps": 50}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let explanation = reply.json();
    let total: f64 = explanation["attributions"]
        .as_array()
        .expect("attributions")
        .iter()
        .map(|v| v.as_f64().expect("f"))
        .sum();
    let delta = explanation["f_input"].as_f64().expect("f")
        - explanation["f_baseline"].as_f64().expect("f");
    assert!(
        (total - delta).abs() <= 0.05 * delta.abs(),
        "completeness: {total} vs {delta}"
    );
    let reply = server.post_json("/explanations/ner", &json!({"text": "x"}));
    assert_eq!(reply.status, 501, "{}", reply.text());
}

#[test]
fn bad_inputs_get_400_naming_the_problem_and_the_server_stays_healthy() {
    let out = tempfile::tempdir().expect("tempdir");
    let models = [
        archive(
            out.path(),
            "bert-seq",
            "sentiment",
            "tgz",
            "max_length = 32",
        ),
        archive(out.path(), "bert-qa", "qa", "tgz", ""),
        archive(out.path(), "gpt2", "writer", "tgz", ""),
    ];
    let server = Server::start(&["--models", &models.join(",")]);
    server.wait_healthy();
    let long = "words ".repeat(100);
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "sentiment",
            "application/json",
            json!({"text": ""}).to_string().into_bytes(),
            "`text` is empty",
        ),
        (
            "sentiment",
            "text/plain",
            b"   ".to_vec(),
            "`body` is empty",
        ),
        (
            "sentiment",
            "application/json",
            json!({"text": long}).to_string().into_bytes(),
            "max_length is 32",
        ),
        (
            "sentiment",
            "text/plain",
            vec![b'o', b'k', 0xC3, 0x28],
            "not valid UTF-8",
        ),
        (
            "sentiment",
            "application/json",
            json!({"text": ["fine", 3]}).to_string().into_bytes(),
            "`text[1]` must be a string",
        ),
        (
            "sentiment",
            "application/json",
            json!({"text": {"nested": true}}).to_string().into_bytes(),
            "`text` must be a string",
        ),
        (
            "sentiment",
            "application/json",
            b"{not json".to_vec(),
            "not valid JSON",
        ),
        (
            "qa",
            "application/json",
            json!({"question": "Who?"}).to_string().into_bytes(),
            "has no `context`",
        ),
        (
            "qa",
            "application/json",
            json!({"question": 1, "context": "c"})
                .to_string()
                .into_bytes(),
            "`body.question` must be a string",
        ),
        (
            "writer",
            "application/json",
            json!({"data": "hi", "max_new_tokens": -1})
                .to_string()
                .into_bytes(),
            "`max_new_tokens`",
        ),
        (
            "writer",
            "application/json",
            json!({"data": "hi", "temperature": -0.5})
                .to_string()
                .into_bytes(),
            "`temperature`",
        ),
        (
            "writer",
            "application/json",
            json!({"data": long, "max_new_tokens": 100})
                .to_string()
                .into_bytes(),
            "context of 128 tokens",
        ),
    ];
    for (model, ct, body, needle) in &cases {
        let reply = server.post(&format!("/predictions/{model}"), ct, body);
        assert_eq!(reply.status, 400, "{model} {needle}: {}", reply.text());
        let error = reply.json();
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{model}: {message:?} should mention {needle:?}"
        );
    }
    // Nothing was lost: every model still answers.
    assert_eq!(server.get("/ping").status, 200);
    let ok = server.post_json("/predictions/sentiment", &json!({"text": "still fine"}));
    assert_eq!(ok.status, 200, "{}", ok.text());
    let ok = server.post_json(
        "/predictions/qa",
        &json!({"question": "Who?", "context": "Ada wrote it."}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let ok = server.post_json(
        "/predictions/writer",
        &json!({"data": "hi", "max_new_tokens": 2}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    // A misspelled setting is refused at registration, naming it and what was meant.
    let typo = archive(out.path(), "bert-seq", "typo", "tgz", "max_lenght = 32");
    let file = typo
        .split_once('=')
        .map_or(typo.as_str(), |(_, f)| f)
        .to_owned();
    let bytes = std::fs::read(&file).expect("read the archive");
    let reply = server.manage(
        "POST",
        "/models?synchronous=true",
        "application/octet-stream",
        &bytes,
    );
    let message = reply.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        message.contains("`handler.max_lenght`") && message.contains("did you mean `max_length`?"),
        "{message}"
    );
}

#[test]
fn the_default_store_serves_real_minilm_embeddings() {
    let server = Server::start(&["--model-store", "model_store", "--models", "minilm"]);
    server.wait_healthy();
    let sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A monkey is playing drums.",
    ];
    let reply = server.post_json("/predictions/minilm", &json!({ "text": sentences }));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let vectors: Vec<Vec<f64>> = reply
        .json()
        .as_array()
        .expect("list")
        .iter()
        .map(|v| {
            v["embedding"]
                .as_array()
                .expect("vector")
                .iter()
                .map(|x| x.as_f64().expect("f"))
                .collect()
        })
        .collect();
    assert!(vectors.iter().all(|v| v.len() == 384));
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!(cos(&vectors[0], &vectors[1]) > cos(&vectors[0], &vectors[2]));
    // The store's config leaves the workers to the server: the nlp plugin's instances share
    // the weights, so it gets one worker per core (at most four), and the describe API says so.
    let described = server.manage("GET", "/models/minilm", "", b"").json();
    let v = &described[0];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert_eq!(v["autoWorkers"], true, "{v}");
    assert_eq!(v["minWorkers"].as_u64(), Some(cores.min(4)), "{v}");
    assert_eq!(
        v["workers"].as_array().map(Vec::len),
        Some(cores.min(4) as usize),
        "{v}"
    );
    assert!(
        v["plugin"]["capabilities"]
            .as_array()
            .is_some_and(|c| c.contains(&json!("shared_weights"))),
        "{v}"
    );
    // Concurrent requests are batched into shared forward passes.
    let url = format!("{}/predictions/minilm", server.inference);
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                ureq::post(&url)
                    .header("content-type", "text/plain")
                    .send(format!("sentence number {i}, to embed"))
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread"), 200);
    }
    let metrics = server.metrics_text();
    let passes =
        metric_value(&metrics, "cresset_nlp_forward_passes_total").expect("the plugin's counter");
    assert!(
        passes < 17.0,
        "17 requests took {passes} forward passes: they were not batched"
    );
}

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}
