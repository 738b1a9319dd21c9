//! What the fidelity tests share: the generated fixtures and reading expected values.
// Each test binary uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cresset_torch::decoder::{Decoder, KvReads};
use cresset_torch::generation::{Finish, Scheduler, Sequence};
use cresset_torch::layers::HfConfig;
use cresset_torch::sampling::{Rng, SamplingParams};
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

    /// Greedy generation through the scheduler, three slots for five prompts (the case's
    /// prompt twice, its batch prompt, both changed) that end at different steps, prefilling at
    /// most 4 tokens per step: rows decode in every subset of the slots beside slots that are
    /// still prefilling, and slots are reused. `static_decode`: decode steps in repeating
    /// shapes, with CUDA graphs if `Some(true)`. The tokens of each prompt, in order (the case's
    /// prompt is the second and the fifth, with 32 tokens each).
    pub fn scheduled(
        &self,
        model: &Decoder,
        reads: KvReads,
        static_decode: Option<bool>,
    ) -> Vec<Vec<i64>> {
        let short = ids(&self.spec["batch"]["prompt_ids"]);
        let mut longer = self.prompt.clone();
        longer.extend([5, 6, 7, 8]);
        let prompts = [
            short.clone(),
            self.prompt.clone(),
            longer,
            short[..short.len() - 1].to_vec(),
            self.prompt.clone(),
        ];
        let lengths = [7usize, 32, 20, 11, 32];
        let _guard = tch::no_grad_guard();
        let mut cache = model.new_cache(3, 128);
        cache.reads = reads;
        let mut scheduler: Scheduler<()> = Scheduler::new(cache, 4, None);
        if let Some(graphs) = static_decode {
            assert!(scheduler
                .use_static_decode(model, graphs, true)
                .expect("warm-up"));
            assert_eq!(scheduler.cuda_graphs(), graphs, "graphs as asked");
        }
        for (i, p) in prompts.iter().enumerate() {
            let sampling = SamplingParams::default();
            scheduler.enqueue(Sequence::new(i, p.clone(), sampling, Rng::seeded(0), ()));
        }
        let mut outputs = vec![Vec::new(); prompts.len()];
        while !scheduler.is_idle() {
            let ended = scheduler
                .step(model, |seq, _| {
                    if seq.generated().len() >= lengths[seq.index] {
                        seq.finish = Some(Finish::Length);
                    }
                })
                .expect("step");
            for seq in ended {
                outputs[seq.index] = seq.generated().to_vec();
            }
        }
        outputs
    }
}
