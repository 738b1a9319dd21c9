//! The nlp handler against HuggingFace pipelines on the same small random checkpoints
//! (`scripts/make_nlp_fixtures.py`): classification scores, grouped entities, QA answers
//! (including long contexts split into windows), greedy GPT-2 text, explanation completeness,
//! batching, and bad inputs. The handler runs as a library here; `tests/` serves it over HTTP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cresset_plugin_api::sdk::testing::{init_context, instance, request, run};
use cresset_plugin_api::sdk::ModelHandler;
use cresset_plugin_api::{ErrorCode, PluginError, Response};
use cresset_plugin_nlp::{Mode, NlpHandler};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/generated/nlp")
}

fn expected() -> Value {
    let path = fixtures().join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make models` first", path.display()));
    serde_json::from_str(&text).expect("expected.json parses")
}

/// The handler on checkpoint `name`, in f32 unless `config` says otherwise (the references are
/// transformers' f32 outputs; `dtype = "auto"` would run in bf16 on a CPU with native bf16).
fn handler(name: &str, mut config: Value) -> NlpHandler {
    if config.get("dtype").is_none() {
        config["dtype"] = json!("float32");
    }
    instance::<NlpHandler>(&init_context(fixtures().join(name), config))
        .unwrap_or_else(|e| panic!("{name}: {}", e.message))
}

fn body(result: &Result<Response, PluginError>) -> Value {
    match result {
        Ok(r) => serde_json::from_slice(&r.body).expect("JSON answer"),
        Err(e) => panic!("error {:?}: {}", e.code, e.message),
    }
}

fn ask(h: &mut NlpHandler, value: Value) -> Value {
    let run = run(h, &[request("application/json", value.to_string())]);
    body(&run.finals[0])
}

fn close(a: &Value, b: &Value, what: &str) {
    let (a, b) = (a.as_f64().expect("number"), b.as_f64().expect("number"));
    assert!((a - b).abs() <= 1e-4, "{what}: {a} vs {b}");
}

fn families() -> [&'static str; 3] {
    ["bert", "roberta", "distilbert"]
}

#[test]
fn modes_are_inferred_from_architectures() {
    for (dir, mode) in [
        ("bert-base", Mode::FeatureExtraction),
        ("roberta-seq", Mode::SequenceClassification),
        ("distilbert-tok", Mode::TokenClassification),
        ("bert-qa", Mode::QuestionAnswering),
        ("gpt2", Mode::TextGeneration),
    ] {
        assert_eq!(handler(dir, json!({})).mode(), mode, "{dir}");
    }
    let err = instance::<NlpHandler>(&init_context(
        fixtures().join("bert-seq"),
        json!({"mode": "summarize"}),
    ))
    .err()
    .expect("unknown mode");
    assert!(err.message.contains("`handler.mode`"), "{}", err.message);
}

#[test]
fn an_unknown_architecture_is_a_clear_error_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures().join("bert-seq").join(f), dir.path().join(f)).expect("copy");
    }
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("bert-seq/config.json")).expect("config"),
    )
    .expect("json");
    config["architectures"] = json!(["BertForMaskedLM"]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
    let err = instance::<NlpHandler>(&init_context(dir.path(), json!({})))
        .err()
        .expect("refused");
    assert_eq!(err.code, ErrorCode::INVALID_INPUT);
    assert!(err.message.contains("BertForMaskedLM"), "{}", err.message);
}

#[test]
fn classification_matches_the_text_classification_pipeline() {
    let expected = expected();
    for family in families() {
        let name = format!("{family}-seq");
        let spec = &expected["encoders"][&name];
        let texts = &spec["cases"][0]["texts"];
        let mut h = handler(&name, json!({}));
        let answers = ask(&mut h, json!({ "text": texts }));
        for (i, pipeline) in spec["pipeline"]
            .as_array()
            .expect("pipeline")
            .iter()
            .enumerate()
        {
            let ours = &answers[i];
            assert_eq!(ours["label"], pipeline[0]["label"], "{name} text {i}");
            close(&ours["score"], &pipeline[0]["score"], &name);
            for entry in pipeline.as_array().expect("scores") {
                let label = entry["label"].as_str().expect("label");
                close(
                    &ours["scores"][label],
                    &entry["score"],
                    &format!("{name} {label}"),
                );
            }
        }
    }
}

#[test]
fn entities_match_the_token_classification_pipeline() {
    let expected = expected();
    for family in families() {
        let name = format!("{family}-tok");
        let spec = &expected["encoders"][&name];
        let mut h = handler(&name, json!({}));
        let texts = &spec["cases"][0]["texts"];
        let answers = ask(&mut h, json!({ "text": texts }));
        for (i, pipeline) in spec["pipeline"]
            .as_array()
            .expect("pipeline")
            .iter()
            .enumerate()
        {
            let ours = answers[i].as_array().expect("entities");
            let theirs = pipeline.as_array().expect("entities");
            assert_eq!(
                ours.len(),
                theirs.len(),
                "{name} text {i}: {ours:?} vs {theirs:?}"
            );
            for (a, b) in ours.iter().zip(theirs) {
                assert_eq!(a["label"], b["entity_group"], "{name} text {i}");
                assert_eq!(
                    (&a["start"], &a["end"]),
                    (&b["start"], &b["end"]),
                    "{name} text {i}"
                );
                close(&a["score"], &b["score"], &name);
                // Our word is the text's own span; the pipeline's is re-joined from pieces.
                let (wa, wb) = (
                    a["word"].as_str().expect("w"),
                    b["word"].as_str().expect("w"),
                );
                let wb = wb.to_lowercase().replace(" ##", "");
                assert_eq!(wa.to_lowercase().trim(), wb.trim().trim_start_matches("##"));
            }
        }
        assert!(answers
            .as_array()
            .expect("list")
            .iter()
            .any(|a| a.as_array().is_some_and(|e| !e.is_empty())));
    }
}

#[test]
fn answers_match_the_question_answering_pipeline_including_long_contexts() {
    let expected = expected();
    for family in families() {
        let name = format!("{family}-qa");
        let spec = &expected["encoders"][&name];
        let mut handlers: HashMap<(u64, u64), NlpHandler> = HashMap::new();
        for entry in spec["pipeline"].as_array().expect("pipeline") {
            let key = (
                entry["max_seq_len"].as_u64().expect("len"),
                entry["doc_stride"].as_u64().expect("stride"),
            );
            // The pipeline's default window (384) is longer than these models' 128 positions;
            // the fixture's short contexts fit either way.
            let (len, stride) = if key.0 > 128 { (128, 64) } else { key };
            let h = handlers.entry(key).or_insert_with(|| {
                handler(&name, json!({"max_length": len, "doc_stride": stride}))
            });
            let ours = ask(
                h,
                json!({
                    "question": entry["question"],
                    "context": entry["context"],
                    "handle_impossible_answer": entry["handle_impossible_answer"],
                }),
            );
            let what = format!("{name} {:?}", entry["question"]);
            assert_eq!(ours["answer"], entry["answer"], "{what}");
            assert_eq!(
                (&ours["start"], &ours["end"]),
                (&entry["start"], &entry["end"]),
                "{what}"
            );
            close(&ours["score"], &entry["score"], &what);
        }
        assert!(
            handlers.keys().any(|(len, _)| *len == 48),
            "a long context ran in windows"
        );
        // `truncation` does not cut QA contexts, and a small token budget only splits passes.
        let long = spec["pipeline"]
            .as_array()
            .expect("pipeline")
            .iter()
            .find(|e| e["max_seq_len"] == 48)
            .expect("long case");
        let mut split = handler(
            &name,
            json!({"max_length": 48, "doc_stride": 16, "truncation": true, "max_batch_tokens": 100}),
        );
        let ours = ask(
            &mut split,
            json!({"question": long["question"], "context": long["context"]}),
        );
        assert_eq!(
            ours["answer"], long["answer"],
            "{name}: truncation or chunking changed the answer"
        );
        close(&ours["score"], &long["score"], &name);
        assert!(
            split.forward_passes() > 1,
            "{name}: the windows ran in several passes"
        );
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let expected = expected();
    let spec = &expected["gpt2"];
    let mut h = handler("gpt2", json!({}));
    let out = ask(
        &mut h,
        json!({"text": spec["prompt"], "max_new_tokens": 32}),
    );
    assert_eq!(out["generated_text"], spec["greedy_text"]);
    assert_eq!(out["tokens"], 32);
    // Sampling with a seed repeats; another seed (almost surely) differs.
    let sample = |h: &mut NlpHandler, seed: u64| {
        ask(
            h,
            json!({"text": spec["prompt"], "max_new_tokens": 16, "temperature": 1.0, "top_k": 50, "seed": seed}),
        )
    };
    assert_eq!(sample(&mut h, 1), sample(&mut h, 1));
    assert_ne!(sample(&mut h, 1), sample(&mut h, 2));
}

#[test]
fn explanations_are_complete_within_five_percent() {
    let expected = expected();
    for family in families() {
        let name = format!("{family}-seq");
        let text = &expected["encoders"][&name]["cases"][0]["texts"][1];
        let mut h = handler(&name, json!({}));
        let requests = [request(
            "application/json",
            json!({"text": text}).to_string(),
        )];
        let finals = {
            let mut collect = run_explain(&mut h, &requests);
            collect.remove(0)
        };
        let out = body(&finals);
        assert_eq!(out["n_steps"], 50);
        let attributions: Vec<f64> = out["attributions"]
            .as_array()
            .expect("attributions")
            .iter()
            .map(|v| v.as_f64().expect("float"))
            .collect();
        assert_eq!(
            attributions.len(),
            out["tokens"].as_array().expect("tokens").len()
        );
        let total: f64 = attributions.iter().sum();
        let expected_total =
            out["f_input"].as_f64().expect("f") - out["f_baseline"].as_f64().expect("f");
        assert!(
            (total - expected_total).abs() <= 0.05 * expected_total.abs(),
            "{name}: sum {total} vs f(x) - f(x') {expected_total}"
        );
        // A requested class by name.
        let requests = [request(
            "application/json",
            json!({"text": text, "target": "negative"}).to_string(),
        )];
        let out = body(&run_explain(&mut h, &requests)[0]);
        assert_eq!(out["label"], "negative");
    }
}

fn run_explain(
    h: &mut NlpHandler,
    requests: &[cresset_plugin_api::Request],
) -> Vec<Result<Response, PluginError>> {
    // The explain path as the host drives it, through the SDK's testing sink.
    cresset_plugin_api::sdk::testing::run_with(h, requests, NlpHandler::explain).finals
}

#[test]
fn embeddings_are_normalised_vectors() {
    let mut h = handler("bert-base", json!({}));
    let out = ask(
        &mut h,
        json!({"text": ["one text", "another, longer text"]}),
    );
    for item in out.as_array().expect("list") {
        let v: Vec<f64> = item["embedding"]
            .as_array()
            .expect("vector")
            .iter()
            .map(|x| x.as_f64().expect("f"))
            .collect();
        assert_eq!(v.len(), 32);
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
}

#[test]
fn a_bad_request_fails_alone_and_its_neighbours_share_one_pass() {
    let mut h = handler("bert-seq", json!({"max_length": 16}));
    let long = "word ".repeat(40);
    let requests = [
        request(
            "application/json",
            json!({"text": "a fine sentence"}).to_string(),
        ),
        request("application/json", json!({"text": 42}).to_string()),
        request("text/plain", b"\xff\xfe not utf-8".to_vec()),
        request("application/json", json!({"text": ""}).to_string()),
        request("application/json", json!({"text": long}).to_string()),
        request(
            "application/json",
            json!({"text": ["two", "texts"]}).to_string(),
        ),
    ];
    let finals = run(&mut h, &requests).finals;
    assert!(finals[0].is_ok() && finals[5].is_ok());
    assert_eq!(
        h.forward_passes(),
        1,
        "the good requests share one forward pass"
    );
    for (i, needle) in [
        (1, "`text` must be a string"),
        (2, "UTF-8"),
        (3, "`text` is empty"),
        (4, "max_length is 16"),
    ] {
        let err = finals[i]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("request {i} should fail"));
        assert_eq!(err.code, ErrorCode::INVALID_INPUT, "{i}");
        assert!(err.message.contains(needle), "{i}: {}", err.message);
    }
    assert_eq!(body(&finals[5]).as_array().map(Vec::len), Some(2));
    // With truncation on, the long text is cut instead.
    let mut cut = handler("bert-seq", json!({"max_length": 16, "truncation": true}));
    assert!(run(&mut cut, &[request("text/plain", long)]).finals[0].is_ok());
    // QA without a context.
    let mut qa = handler("bert-qa", json!({}));
    let err = run(
        &mut qa,
        &[request(
            "application/json",
            json!({"question": "why?"}).to_string(),
        )],
    )
    .finals
    .remove(0)
    .err()
    .expect("no context");
    assert!(err.message.contains("has no `context`"), "{}", err.message);
}

#[test]
fn the_generalized_handlers_setting_names_are_understood() {
    // Its setup_config.json keys load as they are.
    let mut h = handler(
        "bert-seq",
        json!({"model_name": "bert-base-uncased", "mode": "sequence_classification",
               "do_lower_case": true, "num_labels": 3, "max_length": 64,
               "captum_explanation": true, "BetterTransformer": true}),
    );
    let out = ask(&mut h, json!({"text": "a fine day"}));
    assert!(out["label"].is_string(), "{out}");
    // `captum_explanation = false` turns explanations off.
    let mut off = handler("bert-seq", json!({"captum_explanation": false}));
    let requests = [request(
        "application/json",
        json!({"text": "a fine day"}).to_string(),
    )];
    let err = run_explain(&mut off, &requests)[0]
        .clone()
        .expect_err("explanations are off");
    assert_eq!(err.code, ErrorCode::UNSUPPORTED);
    assert!(
        err.message.contains("captum_explanation"),
        "{}",
        err.message
    );
    // `num_labels` must be the checkpoint's.
    let ctx = init_context(
        fixtures().join("bert-seq"),
        json!({"num_labels": 5, "dtype": "float32"}),
    );
    let err = instance::<NlpHandler>(&ctx).err().expect("refused");
    assert!(
        err.message.contains("`handler.num_labels` is 5"),
        "{}",
        err.message
    );
    // Token classification's `{"label_list": "[...]"}` form of index_to_name.json.
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixtures().join("bert-tok")).expect("read") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let labels: Vec<String> = (0..5).map(|i| format!("TAG{i}")).collect();
    std::fs::write(
        dir.path().join("index_to_name.json"),
        json!({"label_list": format!("[{}]", labels.join(", "))}).to_string(),
    )
    .expect("write labels");
    let ctx = init_context(dir.path(), json!({"dtype": "float32"}));
    let mut h = instance::<NlpHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
    let out = ask(&mut h, json!({"text": "Ada Lovelace lived in London"}));
    let text = out.to_string();
    assert!(
        text.contains("TAG"),
        "the label_list names are used: {text}"
    );
}

#[test]
fn response_format_torchserve_answers_the_label_as_the_reference_does() {
    let mut h = handler("bert-seq", json!({"response_format": "torchserve"}));
    let want = ask(
        &mut handler("bert-seq", json!({})),
        json!({"text": "a fine day"}),
    )["label"]
        .as_str()
        .expect("label")
        .to_owned();
    let out = run(
        &mut h,
        &[request(
            "application/json",
            json!({"text": "a fine day"}).to_string(),
        )],
    );
    let response = out.finals[0].as_ref().expect("answer");
    assert_eq!(response.content_type.as_str(), "text/plain; charset=utf-8");
    assert_eq!(String::from_utf8_lossy(&response.body), want);
    let ctx = init_context(
        fixtures().join("bert-seq"),
        json!({"response_format": "xml", "dtype": "float32"}),
    );
    let err = instance::<NlpHandler>(&ctx).err().expect("refused");
    assert!(
        err.message.contains("`handler.response_format`"),
        "{}",
        err.message
    );
}

#[test]
fn the_generalized_handlers_setup_config_json_loads_as_it_is() {
    // TorchServe's Huggingface_Transformers example writes numbers as strings; `[handler]`
    // wins over the file. (max_length 150 is over this small checkpoint's 128 positions, so
    // `[handler]` brings it down.)
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixtures().join("bert-seq")).expect("read") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(
        dir.path().join("setup_config.json"),
        r#"{
 "model_name":"bert-base-uncased",
 "mode":"sequence_classification",
 "do_lower_case":true,
 "num_labels":"3",
 "save_mode":"pretrained",
 "max_length":"150",
 "captum_explanation":false,
 "embedding_name": "bert",
 "FasterTransformer":false,
 "BetterTransformer":false,
 "model_parallel":false
}"#,
    )
    .expect("write setup_config.json");
    let err = instance::<NlpHandler>(&init_context(dir.path(), json!({"dtype": "float32"})))
        .err()
        .expect("150 positions do not fit 128");
    assert!(err.message.contains("max_length"), "{}", err.message);
    let mut h = instance::<NlpHandler>(&init_context(
        dir.path(),
        json!({"dtype": "float32", "max_length": 64}),
    ))
    .unwrap_or_else(|e| panic!("{}", e.message));
    let out = ask(&mut h, json!({"text": "a fine day"}));
    assert!(out["label"].is_string(), "{out}");
    // The file's `captum_explanation: false` holds.
    let requests = [request(
        "application/json",
        json!({"text": "a fine day"}).to_string(),
    )];
    assert!(run_explain(&mut h, &requests)[0].is_err());
    // A typo in the file is named too.
    std::fs::write(
        dir.path().join("setup_config.json"),
        r#"{"mode": "sequence_classification", "max_lenght": "64"}"#,
    )
    .expect("write");
    let err = instance::<NlpHandler>(&init_context(dir.path(), json!({"dtype": "float32"})))
        .err()
        .expect("refused");
    assert!(
        err.message.contains("did you mean `max_length`?"),
        "{}",
        err.message
    );
}

#[test]
fn float64_gives_the_float32_answer() {
    let text = json!({"text": "a fine day"});
    let f32_answer = ask(&mut handler("bert-seq", json!({})), text.clone());
    let f64_answer = ask(&mut handler("bert-seq", json!({"dtype": "float64"})), text);
    assert_eq!(f64_answer["label"], f32_answer["label"]);
    let (a, b) = (
        f64_answer["score"].as_f64().expect("score"),
        f32_answer["score"].as_f64().expect("score"),
    );
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
}
