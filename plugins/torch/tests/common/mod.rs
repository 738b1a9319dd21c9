//! What the fidelity tests share: the generated fixtures and reading expected values.
// Each test binary uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cresset_torch::decoder::Decoder;
use cresset_torch::layers::HfConfig;
use cresset_torch::tch::{self, Device, Kind, Tensor};
use serde_json::Value;

/// `tests/fixtures/generated/<name>` (made by `make models`).
pub fn fixtures(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/generated")
        .join(name)
}

/// That folder's `expected.json`.
pub fn expected(name: &str) -> Value {
    let path = fixtures(name).join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make models` first", path.display()));
    serde_json::from_str(&text).expect("expected.json parses")
}

/// Every number of a nested JSON list, flattened.
pub fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number")],
        other => panic!("not numbers: {other}"),
    }
}

/// A JSON list of token ids.
pub fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect()
}

/// A tensor's values, flattened, in f64.
pub fn tensor_floats(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("floats")
}

/// The largest absolute difference.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A decoder's logits for every position of `prompt`, from an empty cache, on the CPU.
pub fn prompt_logits(model: &Decoder, prompt: &[i64]) -> Vec<f64> {
    let mut cache = model.new_cache(1, 64);
    let out = tch::no_grad(|| model.forward(&[0], &[prompt.to_vec()], &mut cache, false))
        .expect("forward");
    tensor_floats(&out.to_device(Device::Cpu))
}

/// A generated checkpoint (`set` is `llm` or `nlp`, `name` its key in `expected.json`) with
/// what transformers gave for it.
pub struct Case {
    /// Its entry in `expected.json`.
    pub spec: Value,
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: HfConfig,
    /// The prompt's token ids.
    pub prompt: Vec<i64>,
}

impl Case {
    /// Read the case.
    pub fn new(set: &str, name: &str) -> Self {
        let spec = expected(set)[name].clone();
        let dir = fixtures(set).join(spec["dir"].as_str().expect("dir"));
        let config = HfConfig::read(&dir).expect("config");
        let prompt = ids(&spec["prompt_ids"]);
        Self {
            spec,
            dir,
            config,
            prompt,
        }
    }

    /// The model in f32 on `device`, everything there.
    pub fn load(&self, device: Device) -> Decoder {
        Decoder::load(&self.dir, &self.config, Kind::Float, device).expect("load")
    }
}
