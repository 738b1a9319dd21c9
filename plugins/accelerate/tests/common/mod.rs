//! What the accelerate tests share: the generated fixtures and one greedy generation.
// Each test binary uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cresset_plugin_accelerate::AccelerateHandler;
use cresset_plugin_api::sdk::testing::{request, step_one};
use serde_json::{json, Value};

/// `tests/fixtures/generated/<set>` (made by `make models`).
pub fn generated(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/generated")
        .join(set)
}

/// That folder's `expected.json`.
pub fn expected(set: &str) -> Value {
    let text =
        std::fs::read_to_string(generated(set).join("expected.json")).expect("run `make models`");
    serde_json::from_str(&text).expect("JSON")
}

/// `prompt` through the handler in TorchServe's format: the `generated_text` (greedy).
pub fn generate(h: &mut AccelerateHandler, prompt: &str, max_new_tokens: usize) -> String {
    let body = json!({"data": prompt, "max_new_tokens": max_new_tokens}).to_string();
    let response = step_one(h, request("application/json", body), 10_000)
        .unwrap_or_else(|e| panic!("{}", e.message));
    let value: Value = serde_json::from_slice(&response.body).expect("JSON");
    value["generated_text"].as_str().expect("text").to_owned()
}
