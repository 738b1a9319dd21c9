//! Fidelity: cresset-torch's architectures against HuggingFace `transformers` on the same
//! weights. `scripts/make_nlp_fixtures.py` (run by `make test`) builds small random BERT,
//! RoBERTa, DistilBERT (every head) and GPT-2 checkpoints and records what transformers gives;
//! the real all-MiniLM-L6-v2 comes from the package index. Tolerance: 1e-4 in f32.

mod common;

use std::path::{Path, PathBuf};

use common::{expected, fixtures, floats, ids as ids_of, tensor_floats};

use cresset_torch::decoder::{Decoder, GenerationRequest};
use cresset_torch::encoder::{mean_pool_normalized, Encoder, EncoderHead};
use cresset_torch::layers::HfConfig;
use cresset_torch::sampling::SamplingParams;
use cresset_torch::tch::{Device, Kind, Tensor};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn max_diff(what: &str, ours: &[f64], theirs: &[f64]) -> f64 {
    let diff = common::max_abs_diff(ours, theirs);
    assert!(
        diff <= TOLERANCE,
        "{what}: max abs diff {diff:e} > {TOLERANCE:e}"
    );
    diff
}

/// Tokenize with our tokenizer and check the ids agree with transformers'.
fn encode(dir: &Path, case: &Value, i: usize) -> tokenizers::Encoding {
    let tokenizer = cresset_torch::load_tokenizer(dir).expect("tokenizer");
    let encoding = if let Some(texts) = case.get("texts") {
        tokenizer.encode(texts[i].as_str().expect("text"), true)
    } else {
        let pair = &case["pairs"][i];
        let (q, c) = (pair[0].as_str().expect("q"), pair[1].as_str().expect("c"));
        tokenizer.encode((q, c), true)
    }
    .expect("encode");
    let ids: Vec<i64> = encoding.get_ids().iter().map(|&x| i64::from(x)).collect();
    assert_eq!(
        ids,
        ids_of(&case["input_ids"][i]),
        "{}: token ids",
        dir.display()
    );
    encoding
}

use cresset_torch::tokenizers;

#[test]
fn encoders_match_transformers_for_every_family_and_head() {
    let expected = expected("nlp");
    let encoders = expected["encoders"].as_object().expect("encoders");
    assert!(encoders.len() >= 12, "all families × heads are present");
    let mut worst = 0.0f64;
    for (name, spec) in encoders {
        let dir = fixtures("nlp").join(name);
        let config = HfConfig::read(&dir).expect("config");
        let head = match spec["head"].as_str().expect("head") {
            "base" => EncoderHead::Base,
            "sequence_classification" => EncoderHead::SequenceClassification,
            "token_classification" => EncoderHead::TokenClassification,
            "question_answering" => EncoderHead::QuestionAnswering,
            other => panic!("unknown head {other}"),
        };
        let model = Encoder::load(&dir, &config, head, Kind::Float, Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (c, case) in spec["cases"].as_array().expect("cases").iter().enumerate() {
            let n = case["input_ids"].as_array().expect("ids").len();
            let encodings: Vec<_> = (0..n).map(|i| encode(&dir, case, i)).collect();
            // One padded batch, as transformers ran it.
            let longest = encodings.iter().map(|e| e.len()).max().expect("rows");
            let pad = model.config.pad_token_id;
            let mut ids = vec![pad; n * longest];
            let mut types = vec![0i64; n * longest];
            let mut mask = vec![0i64; n * longest];
            for (r, e) in encodings.iter().enumerate() {
                for j in 0..e.len() {
                    ids[r * longest + j] = i64::from(e.get_ids()[j]);
                    types[r * longest + j] = i64::from(e.get_type_ids()[j]);
                    mask[r * longest + j] = 1;
                }
            }
            let shape = [n as i64, longest as i64];
            let (ids, types, mask) = (
                Tensor::from_slice(&ids).view(shape),
                Tensor::from_slice(&types).view(shape),
                Tensor::from_slice(&mask).view(shape),
            );
            let out = tch::no_grad(|| model.forward(&ids, Some(&types), &mask));
            for (r, e) in encodings.iter().enumerate() {
                let len = e.len() as i64;
                let what = format!("{name} case {c} row {r}");
                let hidden = out.hidden.get(r as i64).narrow(0, 0, len);
                worst = worst.max(max_diff(
                    &format!("{what} hidden"),
                    &tensor_floats(&hidden),
                    &floats(&case["last_hidden_state"][r]),
                ));
                let logits = out.logits.as_ref().map(|l| l.get(r as i64));
                match head {
                    EncoderHead::Base => {
                        let pooled = mean_pool_normalized(
                            &out.hidden.narrow(0, r as i64, 1),
                            &mask.narrow(0, r as i64, 1),
                        );
                        worst = worst.max(max_diff(
                            &format!("{what} embedding"),
                            &tensor_floats(&pooled),
                            &floats(&case["embedding"][r]),
                        ));
                    }
                    EncoderHead::SequenceClassification => {
                        worst = worst.max(max_diff(
                            &format!("{what} logits"),
                            &tensor_floats(&logits.expect("logits")),
                            &floats(&case["logits"][r]),
                        ));
                    }
                    EncoderHead::TokenClassification => {
                        worst = worst.max(max_diff(
                            &format!("{what} logits"),
                            &tensor_floats(&logits.expect("logits").narrow(0, 0, len)),
                            &floats(&case["logits"][r]),
                        ));
                    }
                    EncoderHead::QuestionAnswering => {
                        let l = logits.expect("logits").narrow(0, 0, len);
                        worst = worst.max(max_diff(
                            &format!("{what} start"),
                            &tensor_floats(&l.select(1, 0)),
                            &floats(&case["start_logits"][r]),
                        ));
                        worst = worst.max(max_diff(
                            &format!("{what} end"),
                            &tensor_floats(&l.select(1, 1)),
                            &floats(&case["end_logits"][r]),
                        ));
                    }
                }
            }
        }
    }
    eprintln!("encoders: worst max abs diff {worst:e}");
}

#[test]
fn sharded_checkpoints_load_to_the_same_weights() {
    let dir = fixtures("nlp").join("bert-seq-sharded");
    assert!(
        dir.join("model.safetensors.index.json").is_file(),
        "the fixture is sharded"
    );
    let one = Encoder::load(
        &fixtures("nlp").join("bert-seq"),
        &HfConfig::read(&fixtures("nlp").join("bert-seq")).expect("config"),
        EncoderHead::SequenceClassification,
        Kind::Float,
        Device::Cpu,
    )
    .expect("single");
    let sharded = Encoder::load(
        &dir,
        &HfConfig::read(&dir).expect("config"),
        EncoderHead::SequenceClassification,
        Kind::Float,
        Device::Cpu,
    )
    .expect("sharded");
    let ids = Tensor::from_slice(&[101i64, 7592, 2088, 102]).view([1, 4]);
    let mask = Tensor::ones([1, 4], (Kind::Int64, Device::Cpu));
    let a = tch::no_grad(|| one.forward(&ids, None, &mask))
        .logits
        .expect("logits");
    let b = tch::no_grad(|| sharded.forward(&ids, None, &mask))
        .logits
        .expect("logits");
    assert_eq!(tensor_floats(&a), tensor_floats(&b));
}

#[test]
fn real_minilm_embeddings_match_and_rank_by_meaning() {
    let expected = expected("nlp");
    let spec = &expected["minilm"];
    let dir = PathBuf::from(std::env::var("CRESSET_MINILM_DIR").unwrap_or_else(|_| {
        let cache = std::env::var("CRESSET_CACHE").expect("CRESSET_CACHE is set by scripts/env.sh");
        format!("{cache}/assets/all-minilm-l6-v2")
    }));
    let config = HfConfig::read(&dir).expect("config");
    let model = Encoder::load(&dir, &config, EncoderHead::Base, Kind::Float, Device::Cpu)
        .expect("minilm loads");
    let tokenizer = cresset_torch::load_tokenizer(&dir).expect("tokenizer");
    let sentences: Vec<&str> = spec["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .map(|s| s.as_str().expect("sentence"))
        .collect();
    let mut embeddings = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let e = tokenizer.encode(*s, true).expect("encode");
        let ids: Vec<i64> = e.get_ids().iter().map(|&x| i64::from(x)).collect();
        assert_eq!(
            ids,
            ids_of(&spec["input_ids"][i]),
            "the baked-in padding is overridden"
        );
        let ids = Tensor::from_slice(&ids).view([1, -1]);
        let mask = ids.ones_like();
        let out = tch::no_grad(|| model.forward(&ids, None, &mask));
        let pooled = tensor_floats(&mean_pool_normalized(&out.hidden, &mask));
        max_diff(
            &format!("minilm {s:?}"),
            &pooled,
            &floats(&spec["embedding"][i]),
        );
        embeddings.push(pooled);
    }
    let cosine = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let query = sentences
        .iter()
        .position(|s| *s == "A man is eating food.")
        .expect("query sentence");
    let bread = sentences
        .iter()
        .position(|s| s.contains("bread"))
        .expect("bread");
    let drums = sentences
        .iter()
        .position(|s| s.contains("drums"))
        .expect("drums");
    let (to_bread, to_drums) = (
        cosine(&embeddings[query], &embeddings[bread]),
        cosine(&embeddings[query], &embeddings[drums]),
    );
    assert!(
        to_bread > to_drums,
        "bread {to_bread} should beat drums {to_drums}"
    );
}

#[test]
fn gpt2_logits_and_greedy_tokens_match_transformers() {
    let expected = expected("nlp");
    let spec = &expected["gpt2"];
    let dir = fixtures("nlp").join(spec["dir"].as_str().expect("dir"));
    let config = HfConfig::read(&dir).expect("config");
    let model = Decoder::load(&dir, &config, Kind::Float, Device::Cpu).expect("gpt2 loads");
    let tokenizer = cresset_torch::load_tokenizer(&dir).expect("tokenizer");
    let prompt = spec["prompt"].as_str().expect("prompt");
    let ids: Vec<i64> = tokenizer
        .encode(prompt, true)
        .expect("encode")
        .get_ids()
        .iter()
        .map(|&x| i64::from(x))
        .collect();
    assert_eq!(ids, ids_of(&spec["prompt_ids"]));
    let mut cache = model.new_cache(1, ids.len() as i64);
    let logits = tch::no_grad(|| model.forward(&[0], &[ids.clone()], &mut cache, true))
        .expect("forward")
        .view([1, -1]);
    max_diff(
        "gpt2 last logits",
        &tensor_floats(&logits.get(0)),
        &floats(&spec["logits_last"]),
    );
    let greedy = ids_of(&spec["greedy_ids"]);
    assert_eq!(greedy.len(), 32);
    let request = GenerationRequest {
        prompt: ids.clone(),
        max_new_tokens: 32,
        sampling: SamplingParams::default(),
        seed: None,
        stop_ids: Vec::new(),
    };
    let ours = tch::no_grad(|| model.generate(std::slice::from_ref(&request))).expect("generate");
    assert_eq!(ours[0], greedy, "greedy continuation is token-identical");
    // Batched with a shorter prompt beside it (each in its own cache slot), the answer is the
    // same.
    let short = GenerationRequest {
        prompt: ids[..2].to_vec(),
        ..request.clone()
    };
    let alone = tch::no_grad(|| model.generate(std::slice::from_ref(&short))).expect("alone");
    let both = tch::no_grad(|| model.generate(&[short, request.clone()])).expect("batched");
    assert_eq!(
        both[1], greedy,
        "the longer prompt keeps its greedy tokens in a batch"
    );
    assert_eq!(
        both[0], alone[0],
        "the shorter prompt gives what it gives alone"
    );
    // Rows with different budgets share a batch; the shorter stops at its own limit.
    let mut brief = request.clone();
    brief.max_new_tokens = 3;
    let mixed = tch::no_grad(|| model.generate(&[brief, request.clone()])).expect("mixed");
    assert_eq!(mixed[0], greedy[..3].to_vec());
    assert_eq!(mixed[1], greedy);
    let text = tokenizer
        .decode(&greedy.iter().map(|&t| t as u32).collect::<Vec<_>>(), true)
        .expect("decode");
    assert_eq!(text, spec["greedy_text"].as_str().expect("text"));
}

#[test]
fn half_precision_models_load_and_stay_close_to_f32() {
    let dir = fixtures("nlp").join("bert-seq");
    let config = HfConfig::read(&dir).expect("config");
    let ids = Tensor::from_slice(&[101i64, 7592, 2088, 2003, 2307, 102, 0]).view([1, 7]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0]).view([1, 7]);
    let logits = |kind| {
        let model = Encoder::load(
            &dir,
            &config,
            EncoderHead::SequenceClassification,
            kind,
            Device::Cpu,
        )
        .expect("load");
        let out = tch::no_grad(|| model.forward(&ids, None, &mask));
        let logits = out.logits.expect("logits");
        assert_eq!(logits.kind(), kind, "computed in the asked dtype");
        tensor_floats(&logits)
    };
    let full = logits(Kind::Float);
    for kind in [Kind::BFloat16, Kind::Half] {
        let half = logits(kind);
        let scale = full.iter().map(|x| x.abs()).fold(0.0, f64::max);
        let diff = full
            .iter()
            .zip(&half)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff <= 0.05 * scale.max(1.0),
            "{kind:?}: max diff {diff} (scale {scale})"
        );
    }
}
