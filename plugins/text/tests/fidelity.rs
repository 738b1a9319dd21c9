//! The text handler against TorchServe 0.12.0's own `TextClassifier` (scripts/make_text_fixtures.py,
//! made by `make models`): the same tokens and ids for every test text (HTML, contractions,
//! accents, punctuation, Unicode spaces, unknown words), and the same probabilities from the
//! same model in TorchScript, as an AOTInductor package and in ONNX, one text at a time and
//! batched.

use std::path::{Path, PathBuf};

use cresset_plugin_api::sdk::{testing, Handler};
use cresset_plugin_api::ErrorCode;
use cresset_plugin_text::{normalize, TextHandler, Vocab};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/generated/text");
    assert!(
        dir.join("expected.json").is_file(),
        "run `make models` first"
    );
    dir
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).expect("read"))
        .expect("json")
}

fn handler(config: Value) -> TextHandler {
    TextHandler::initialize(&testing::init_context(fixtures(), config))
        .unwrap_or_else(|e| panic!("{}", e.message))
}

fn body(run: &testing::Run, i: usize) -> Value {
    serde_json::from_slice(&run.finals[i].as_ref().expect("answered").body).expect("json")
}

/// The largest difference between two answers' probabilities (same classes).
fn worst(a: &Value, b: &Value) -> f64 {
    let (a, b) = (
        a.as_object().expect("object"),
        b.as_object().expect("object"),
    );
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    a.iter()
        .map(|(k, p)| {
            let q = b.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            (p.as_f64().expect("p") - q).abs()
        })
        .fold(0.0, f64::max)
}

#[test]
fn tokens_and_ids_are_torchserves() {
    let expected = expected();
    let ngrams = expected["ngrams"].as_u64().expect("ngrams") as usize;
    let h = handler(json!({}));
    for case in expected["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        // TorchServe's `tokens` are its words (before the n-grams are added).
        let words: Vec<String> = case["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().expect("token").to_owned())
            .collect();
        let ours = normalize::tokens(text, 1);
        assert_eq!(ours, words, "{text:?}");
        assert_eq!(
            normalize::tokens(text, ngrams).len(),
            case["ids"].as_array().expect("ids").len()
        );
        let ids: Vec<i64> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|i| i.as_i64().expect("id"))
            .collect();
        assert_eq!(h.ids(text).expect("ids"), ids, "{text:?}");
    }
}

#[test]
fn every_format_answers_torchserves_probabilities_alone_and_batched() {
    let expected = expected();
    let cases = expected["cases"].as_array().expect("cases");
    for file in ["model.pt", "model.pt2", "model.onnx"] {
        let mut h = handler(json!({ "model_file": file }));
        // One request per text, in one batch: one forward pass.
        let requests: Vec<_> = cases
            .iter()
            .map(|c| {
                testing::request(
                    "text/plain",
                    c["text"].as_str().expect("text").as_bytes().to_vec(),
                )
            })
            .collect();
        let run = testing::run(&mut h, &requests);
        assert_eq!(h.forward_passes, 1, "{file}: one pass for the batch");
        for (i, case) in cases.iter().enumerate() {
            let diff = worst(&body(&run, i), &case["answer"]);
            assert!(diff <= 1e-6, "{file}: {:?}: {diff}", case["text"]);
            // Alone, and as JSON.
            let alone = testing::run(
                &mut h,
                &[testing::request(
                    "application/json",
                    serde_json::to_vec(&json!({"data": case["text"]})).expect("json"),
                )],
            );
            let diff = worst(&body(&alone, 0), &case["answer"]);
            assert!(diff <= 1e-6, "{file}: {:?} alone: {diff}", case["text"]);
        }
        // KServe v1: the texts of one request, one prediction each.
        let instances: Vec<&Value> = cases.iter().map(|c| &c["text"]).collect();
        let run = testing::run(
            &mut h,
            &[testing::request(
                "application/json",
                serde_json::to_vec(&json!({ "instances": instances })).expect("json"),
            )],
        );
        let predictions = body(&run, 0)["predictions"].clone();
        for (i, case) in cases.iter().enumerate() {
            let diff = worst(&predictions[i], &case["answer"]);
            assert!(diff <= 1e-6, "{file}: instances[{i}]: {diff}");
        }
    }
}

#[test]
fn texts_without_tokens_are_answered_and_bad_bodies_fail_alone() {
    let mut h = handler(json!({"topk": 2}));
    let run = testing::run(
        &mut h,
        &[
            testing::request("text/plain", b"!!! ...".to_vec()),
            testing::request("text/plain", vec![0xff, 0xfe]),
            testing::request("application/json", b"{\"data\": 7}".to_vec()),
            testing::request("text/plain", b"Stocks rally".to_vec()),
        ],
    );
    // No tokens: an empty bag (the EmbeddingBag's zeros), answered; top 2 classes.
    assert_eq!(body(&run, 0).as_object().expect("object").len(), 2);
    for (i, says) in [(1, "not UTF-8"), (2, "must be a string")] {
        let err = run.finals[i].as_ref().expect_err("refused");
        assert_eq!(err.code, ErrorCode::INVALID_INPUT);
        assert!(err.message.contains(says), "{}", err.message);
    }
    assert_eq!(body(&run, 3).as_object().expect("object").len(), 2);
    // An AOTInductor package was exported for at least one token: a text without any is
    // refused by itself, its neighbour answered.
    let mut aoti = handler(json!({"model_file": "model.pt2"}));
    let run = testing::run(
        &mut aoti,
        &[
            testing::request("text/plain", b"<p></p> !!!".to_vec()),
            testing::request("text/plain", b"Stocks rally".to_vec()),
        ],
    );
    let err = run.finals[0].as_ref().expect_err("refused");
    assert!(err.message.contains("no tokens"), "{}", err.message);
    assert_eq!(body(&run, 1).as_object().expect("object").len(), 4);
}

#[test]
fn archives_without_a_readable_vocabulary_or_a_text_model_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["model.pt", "index_to_name.json"] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).expect("copy");
    }
    let load = |config: Value| {
        TextHandler::initialize(&testing::init_context(dir.path(), config))
            .err()
            .map(|e| e.message.to_string())
            .unwrap_or_default()
    };
    assert!(load(json!({})).contains("no vocabulary"));
    std::fs::write(dir.path().join("source_vocab.pt"), b"PK\x03\x04").expect("write");
    let err = load(json!({}));
    assert!(
        err.contains("source_vocab.pt: not a torch.save zip"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("source_vocab.pt")).expect("remove");
    std::fs::write(dir.path().join("vocab.json"), b"{\"a\": -1}").expect("write");
    assert!(load(json!({})).contains("not an index"));
    std::fs::write(dir.path().join("vocab.json"), b"[\"<unk>\", \"a\"]").expect("write");
    assert!(
        load(json!({"ngram": 2})).contains("ngrams"),
        "{}",
        load(json!({"ngram": 2}))
    );
    assert!(load(json!({"ngrams": 0})).contains("from 1 to 6"));
    // Without `<unk>`, an unknown word is the request's error.
    std::fs::write(dir.path().join("vocab.json"), b"[\"a\", \"b\"]").expect("write");
    let mut h = TextHandler::initialize(&testing::init_context(dir.path(), json!({})))
        .unwrap_or_else(|e| panic!("{}", e.message));
    let run = testing::run(
        &mut h,
        &[testing::request("text/plain", b"a zebra".to_vec())],
    );
    let err = run.finals[0].as_ref().expect_err("refused");
    assert!(err.message.contains("\"zebra\""), "{}", err.message);
    // A model that does not take (ids, offsets): the vision fixtures' resnet18.
    let resnet = fixtures().join("../vision/resnet18/model.pt");
    std::fs::copy(resnet, dir.path().join("model.pt")).expect("copy");
    assert!(load(json!({})).contains("as a text classifier"));
}

/// TorchServe's `source_vocab.pt` as each torchtext saved it, read without running pickle code:
/// the Python `Vocab` of TorchServe's example (torchtext 0.6, by torch.save's zip and legacy
/// formats), a plain dict (scripts/make_text_fixtures.py) and torchtext 0.18's (committed, with
/// what torchtext itself answered: scripts/make_torchtext_vocab.py). Each holds the tokens of
/// vocab.json at the same indices, and an unknown token takes the index `vocab[token]` gives.
#[test]
fn torchserves_source_vocab_is_read_from_every_torchtext() {
    let itos: Vec<String> =
        serde_json::from_slice(&std::fs::read(fixtures().join("vocab.json")).expect("vocab.json"))
            .expect("json");
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/torchtext");
    let torchtext: Value = serde_json::from_slice(
        &std::fs::read(committed.join("lookups.json")).expect("lookups.json"),
    )
    .expect("json");
    assert_eq!(
        torchtext["itos"],
        json!(itos),
        "the same corpus, the same vocabulary"
    );
    // Each kind keeps its own rule for unknown tokens, whatever `unk_token` says: torchtext's
    // Python Vocab looks them up as "<unk>", its C++ one takes its default index (or fails),
    // and only a plain dict is the handler's to say.
    let no_default = committed.join("source_vocab_0.18_no_default.pt");
    for (path, unknown) in [
        (fixtures().join("source_vocab.pt"), [Some(0), Some(0)]),
        (
            fixtures().join("source_vocab_legacy.pt"),
            [Some(0), Some(0)],
        ),
        (committed.join("source_vocab_0.18.pt"), [Some(0), Some(0)]),
        (no_default.clone(), [None, None]),
        (fixtures().join("source_vocab_dict.pt"), [Some(0), None]),
    ] {
        for (unk, expect) in ["<unk>", "<none>"].into_iter().zip(unknown) {
            let vocab = Vocab::read(&path, unk).unwrap_or_else(|e| panic!("{}", e.message));
            assert_eq!(vocab.len(), itos.len(), "{}", path.display());
            for (i, token) in itos.iter().enumerate() {
                assert_eq!(vocab.index(token).expect("known"), i as i64, "{token:?}");
            }
            assert_eq!(
                vocab.index("zebra").ok(),
                expect,
                "{} {unk}",
                path.display()
            );
        }
    }
    let err = Vocab::read(&no_default, "<unk>")
        .expect("read")
        .index("zebra")
        .expect_err("unknown");
    assert!(
        err.message.contains("names no default index"),
        "{}",
        err.message
    );
    let vocab = Vocab::read(&committed.join("source_vocab_0.18.pt"), "<unk>").expect("read");
    for (token, index) in torchtext["lookups"].as_object().expect("lookups") {
        assert_eq!(vocab.index(token).ok(), index.as_i64(), "{token:?}");
    }
    // A text classifier archive with only source_vocab.pt answers as TorchServe's handler.
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["model.pt", "index_to_name.json", "source_vocab.pt"] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).expect("copy");
    }
    let mut h = TextHandler::initialize(&testing::init_context(dir.path(), json!({})))
        .unwrap_or_else(|e| panic!("{}", e.message));
    let expected = expected();
    let case = &expected["cases"][0];
    let text = case["text"].as_str().expect("text");
    let run = testing::run(
        &mut h,
        &[testing::request("text/plain", text.as_bytes().to_vec())],
    );
    assert!(worst(&body(&run, 0), &case["answer"]) < 1e-6);
}
