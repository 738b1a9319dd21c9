//! The TorchScript plugin: Cresset's BaseHandler.
//!
//! It loads `model.pt` (a TorchScript module) on the instance's device and runs it under
//! libtorch's InferenceMode. Requests carry tensors as JSON, either TorchServe's
//! `{"data": [[...]]}` (the first dimension is the batch) or KServe v2's
//! `{"inputs": [{"name", "shape", "datatype", "data"}]}`. With an `index_to_name.json`, outputs
//! of the first form become the top-k labels with their probabilities, as TorchServe's
//! classifier handlers return them.
//!
//! `[handler]` keys: `model_file` (default: the archive's serialized file, else `model.pt`),
//! `labels_file` (default
//! `index_to_name.json`, optional), `topk` (default 5), `softmax` (default true: apply softmax
//! to the output before ranking labels).
//!
//! Batching: requests whose tensors share their trailing shape and dtype are concatenated on
//! the first dimension and run in one forward pass, then split back. If that pass fails, each
//! request of the group is run alone, so a malformed request fails by itself.

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};
use cresset_torch::tch::{self, CModule, Device, IValue, Kind, Tensor};
use cresset_torch::{
    tensor_from_nested, tensor_from_v2, tensor_to_nested, tensor_to_v2, TorchError, V2Input,
};
use serde_json::{json, Value};

/// How a request framed its tensors (and so how its answer is framed).
#[derive(Debug, Clone)]
pub enum Framing {
    /// `{"data": [[...]]}`.
    Data,
    /// KServe v1: `{"instances": [[...]]}` in, `{"predictions": [...]}` out.
    Instances,
    /// KServe v2, with the request's `id` if it gave one.
    V2 {
        /// The request id to echo.
        id: Option<String>,
    },
}

/// One preprocessed request.
pub struct Prepared {
    framing: Framing,
    inputs: Vec<Tensor>,
}

/// One request's outputs, or its own error.
pub type Produced = Result<(Framing, Vec<Tensor>), PluginError>;

/// The TorchScript BaseHandler.
pub struct TorchScriptHandler {
    module: CModule,
    device: Device,
    labels: Option<Vec<String>>,
    topk: i64,
    softmax: bool,
    model_name: String,
    model_version: String,
    /// libtorch threads the host assigned this worker.
    threads: u32,
    /// Forward passes run so far (the batching tests count them).
    forward_passes: u64,
}

fn torch_err(e: TorchError) -> PluginError {
    match e {
        TorchError::InvalidInput(m) => PluginError::invalid_input(m),
        TorchError::Torch(e) => PluginError::internal(format!("libtorch: {e}")),
    }
}

/// `[handler]` as this plugin reads it (any other key is refused, naming it).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The TorchScript file in the archive (default: the archive's serialized file).
    model_file: Option<String>,
    /// The class names (default `index_to_name.json`).
    labels_file: Option<String>,
    /// Classes answered per row (default 5).
    topk: Option<u64>,
    /// Softmax over the outputs before the top k (default true).
    softmax: Option<bool>,
}

pub use cresset_torch::torchscript::read_labels;

impl TorchScriptHandler {
    /// Parse one request's body.
    pub fn parse(body: &[u8]) -> Result<Prepared, PluginError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            PluginError::invalid_input(format!(
                "the body must be JSON with `data` (a nested list of numbers) or `inputs` (KServe v2 tensors): {e}"
            ))
        })?;
        if let Some(inputs) = value.get("inputs") {
            let inputs: Vec<V2Input> = serde_json::from_value(inputs.clone()).map_err(|e| {
                PluginError::invalid_input(format!(
                    "`inputs` must be a list of {{name, shape, datatype, data}}: {e}"
                ))
            })?;
            if inputs.is_empty() {
                return Err(PluginError::invalid_input("`inputs` must not be empty"));
            }
            if let Some((i, _)) = inputs
                .iter()
                .enumerate()
                .find(|(_, input)| input.shape.is_empty())
            {
                return Err(PluginError::invalid_input(format!(
                    "`inputs[{i}].shape` must have at least one dimension (the first is the batch). Given: []"
                )));
            }
            let tensors = inputs
                .iter()
                .enumerate()
                .map(|(i, input)| tensor_from_v2(input, i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(torch_err)?;
            let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
            return Ok(Prepared {
                framing: Framing::V2 { id },
                inputs: tensors,
            });
        }
        if let Some(instances) = value.get("instances") {
            let tensor = tensor_from_nested("instances", instances).map_err(torch_err)?;
            if tensor.dim() == 0 || tensor.size()[0] == 0 {
                return Err(PluginError::invalid_input(
                    "`instances` must hold at least one instance",
                ));
            }
            return Ok(Prepared {
                framing: Framing::Instances,
                inputs: vec![tensor],
            });
        }
        let data = match &value {
            Value::Object(map) => map.get("data").ok_or_else(|| {
                PluginError::invalid_input("the body must have a `data` or an `inputs` field")
            })?,
            list @ Value::Array(_) => list,
            _ => {
                return Err(PluginError::invalid_input(
                    "the body must be a JSON object with `data` or `inputs`",
                ))
            }
        };
        let tensor = tensor_from_nested("data", data).map_err(torch_err)?;
        if tensor.dim() == 0 || tensor.size()[0] == 0 {
            return Err(PluginError::invalid_input(
                "`data` must hold at least one row",
            ));
        }
        Ok(Prepared {
            framing: Framing::Data,
            inputs: vec![tensor],
        })
    }

    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, tch::TchError> {
        self.forward_passes += 1;
        let _inference = cresset_torch::InferenceMode::enter();
        let args: Vec<IValue> = inputs
            .iter()
            .map(|t| IValue::Tensor(t.to_device(self.device)))
            .collect();
        let outputs = match self.module.forward_is(&args)? {
            IValue::Tensor(t) => vec![t],
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .map(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    _ => Err(tch::TchError::Convert(
                        "the model returned a non-tensor item".into(),
                    )),
                })
                .collect::<Result<_, _>>()?,
            IValue::TensorList(ts) => ts,
            _ => {
                return Err(tch::TchError::Convert(
                    "the model must return a tensor or a tuple of tensors".into(),
                ))
            }
        };
        Ok(outputs
            .into_iter()
            .map(|t| t.to_device(Device::Cpu))
            .collect())
    }

    /// Run a group of requests with the same signature in one pass and split the outputs.
    /// `None` when the pass failed or did not keep the batch dimension.
    fn forward_group(&mut self, group: &[&Prepared]) -> Option<Vec<Vec<Tensor>>> {
        // Only batchable requests (see `inference`) reach here: each has inputs with a first dim.
        let rows: Vec<i64> = group.iter().map(|p| p.inputs[0].size()[0]).collect();
        let total: i64 = rows.iter().sum();
        let inputs: Vec<Tensor> = (0..group[0].inputs.len())
            .map(|i| Tensor::cat(&group.iter().map(|p| &p.inputs[i]).collect::<Vec<_>>(), 0))
            .collect();
        let outputs = self.forward(&inputs).ok()?;
        if outputs.iter().any(|o| o.dim() == 0 || o.size()[0] != total) {
            return None;
        }
        let mut per_request: Vec<Vec<Tensor>> = group.iter().map(|_| Vec::new()).collect();
        for output in outputs {
            for (slot, part) in per_request
                .iter_mut()
                .zip(output.split_with_sizes(&rows, 0))
            {
                slot.push(part);
            }
        }
        Some(per_request)
    }

    fn labelled(&self, output: &Tensor, labels: &[String]) -> Result<Value, PluginError> {
        let scores = if output.dim() == 1 {
            output.unsqueeze(0)
        } else {
            output.shallow_clone()
        };
        let scores = scores.to_kind(Kind::Float);
        let probs = if self.softmax {
            scores.softmax(-1, Kind::Float)
        } else {
            scores
        };
        cresset_torch::torchscript::top_labels(&probs, self.topk, labels).map(Value::Array)
    }
}

impl Handler for TorchScriptHandler {
    const NAME: &'static str = "torchscript";
    const SUMMARY: &'static str =
        "runs a TorchScript model on JSON tensors (TorchServe's BaseHandler)";
    type Input = Prepared;
    type Output = Produced;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let config: Settings = settings::parse(&ctx.handler_config)?;
        let (module, device) =
            cresset_torch::torchscript::load_module(ctx, config.model_file.as_deref())?;
        let labels =
            cresset_torch::torchscript::archive_labels(ctx, config.labels_file.as_deref())?;
        let topk = settings::within("topk", config.topk, 5, 1 << 20)? as i64;
        let softmax = config.softmax.unwrap_or(true);
        tracing::info!(model = %ctx.model_name, device = ?device, labels = labels.as_ref().map(Vec::len), "TorchScript model loaded");
        Ok(Self {
            module,
            device,
            labels,
            topk,
            softmax,
            model_name: ctx.model_name.clone(),
            model_version: ctx.model_version.clone(),
            threads: ctx.assignment.intra_op_threads,
            forward_passes: 0,
        })
    }

    fn preprocess(&mut self, request: &Request) -> Result<Prepared, PluginError> {
        Self::parse(&request.body)
    }

    fn inference(
        &mut self,
        batch: Vec<Prepared>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Produced>, PluginError> {
        let _batch = cresset_torch::threads::Batch::enter(self.threads);
        // Group batchable requests by signature (every input's trailing shape and dtype). A
        // request is batchable when all its inputs share one first (batch) dimension; any other
        // request runs alone and never opens a group that others could join.
        type Signature = Vec<(Vec<i64>, Kind)>;
        let signature = |p: &Prepared| -> Option<Signature> {
            let rows = p.inputs.first()?.size().first().copied()?;
            p.inputs
                .iter()
                .map(|t| {
                    let size = t.size();
                    (size.first() == Some(&rows)).then(|| (size[1..].to_vec(), t.kind()))
                })
                .collect()
        };
        let mut groups: Vec<(Option<Signature>, Vec<usize>)> = Vec::new();
        for (i, p) in batch.iter().enumerate() {
            let sig = signature(p);
            match groups.iter_mut().find(|(s, _)| sig.is_some() && *s == sig) {
                Some((_, members)) => members.push(i),
                None => groups.push((sig, vec![i])),
            }
        }
        let mut results: Vec<Option<Produced>> = batch.iter().map(|_| None).collect();
        for (_, members) in groups {
            let group: Vec<&Prepared> = members.iter().map(|&i| &batch[i]).collect();
            if group.len() > 1 {
                if let Some(outputs) = self.forward_group(&group) {
                    for (&i, out) in members.iter().zip(outputs) {
                        results[i] = Some(Ok((batch[i].framing.clone(), out)));
                    }
                    continue;
                }
            }
            // Alone: a failure here is this request's own.
            for &i in &members {
                let p = &batch[i];
                results[i] = Some(
                    self.forward(&p.inputs)
                        .map(|out| (p.framing.clone(), out))
                        .map_err(|e| {
                            PluginError::invalid_input(format!("the model rejected the input: {e}"))
                        }),
                );
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PluginError::internal("no output: this is a bug"))))
            .collect())
    }

    fn postprocess(&mut self, output: Produced) -> Result<Response, PluginError> {
        let (framing, outputs) = output?;
        let body = match framing {
            Framing::V2 { id } => {
                let outputs = outputs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| tensor_to_v2(&format!("output{i}"), t))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(torch_err)?;
                let mut body = json!({ "model_name": self.model_name, "model_version": self.model_version, "outputs": outputs });
                if let Some(id) = id {
                    body["id"] = json!(id);
                }
                body
            }
            Framing::Data | Framing::Instances => {
                let key = if matches!(framing, Framing::Instances) {
                    "predictions"
                } else {
                    "data"
                };
                match (&self.labels, outputs.as_slice()) {
                    (Some(labels), [first, ..]) if key == "data" => self.labelled(first, labels)?,
                    (Some(labels), [first, ..]) => json!({ key: self.labelled(first, labels)? }),
                    (Some(_), []) => {
                        return Err(PluginError::internal("the model returned no outputs"))
                    }
                    (None, [single]) => {
                        json!({ key: tensor_to_nested(single).map_err(torch_err)? })
                    }
                    (None, many) => json!({
                        key: many.iter().map(tensor_to_nested).collect::<Result<Vec<_>, _>>().map_err(torch_err)?
                    }),
                }
            }
        };
        Response::json(&body)
    }
}

cresset_plugin_api::export_handler!(TorchScriptHandler);

#[cfg(test)]
mod tests {
    use super::*;
    use cresset_plugin_api::sdk::testing;
    use cresset_plugin_api::ErrorCode;
    use std::path::Path;

    /// The default store's iris model, made by `make models`.
    fn iris() -> TorchScriptHandler {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../model_store/iris");
        assert!(dir.join("model.pt").is_file(), "run `make models` first");
        TorchScriptHandler::initialize(&testing::init_context(
            dir,
            json!({"labels_file": "none.json"}),
        ))
        .expect("loads")
    }

    fn data(rows: Value) -> Request {
        testing::request("application/json", json!({ "data": rows }).to_string())
    }

    #[test]
    fn same_shaped_requests_share_one_forward_pass_and_a_bad_one_fails_alone() {
        let mut h = iris();
        let batch = [
            data(json!([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])),
            data(json!([[1.0, 2.0]])),
            data(json!([[4.0, 3.0, 2.0, 1.0]])),
            testing::request("application/json", "{not json"),
        ];
        let run = testing::run(&mut h, &batch);
        // Requests 0 and 2 run together; request 1 (2 features) runs alone and fails.
        assert_eq!(h.forward_passes, 2);
        let rows = |i: usize| -> usize {
            let r = run.finals[i].as_ref().expect("ok");
            serde_json::from_slice::<Value>(&r.body).expect("json")["data"]
                .as_array()
                .expect("rows")
                .len()
        };
        assert_eq!((rows(0), rows(2)), (2, 1));
        let e1 = run.finals[1].as_ref().expect_err("bad shape");
        assert_eq!(e1.code, ErrorCode::INVALID_INPUT);
        assert!(
            e1.message.contains("the model rejected the input"),
            "{}",
            e1.message
        );
        let e3 = run.finals[3].as_ref().expect_err("bad json");
        assert!(e3.message.contains("must be JSON"), "{}", e3.message);
    }

    #[test]
    fn a_batched_answer_equals_the_answers_one_by_one() {
        let mut h = iris();
        let a = json!([[5.1, 3.5, 1.4, 0.2]]);
        let b = json!([[6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]);
        let together = testing::run(&mut h, &[data(a.clone()), data(b.clone())]);
        let alone_a = testing::run(&mut h, &[data(a)]);
        let alone_b = testing::run(&mut h, &[data(b)]);
        // Batching may change the order of float reductions, not the answer.
        let rows = |r: &Result<Response, PluginError>| -> Vec<Vec<f64>> {
            let v: Value = serde_json::from_slice(&r.as_ref().expect("ok").body).expect("json");
            serde_json::from_value(v["data"].clone()).expect("rows of numbers")
        };
        let close = |a: Vec<Vec<f64>>, b: Vec<Vec<f64>>| {
            assert_eq!(a.len(), b.len());
            let diff = a
                .iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(diff <= 1e-5, "max abs diff {diff}");
        };
        close(rows(&together.finals[0]), rows(&alone_a.finals[0]));
        close(rows(&together.finals[1]), rows(&alone_b.finals[0]));
    }

    #[test]
    fn a_scalar_v2_input_fails_alone_and_its_neighbours_succeed() {
        let mut h = iris();
        let scalar =
            json!({"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [1.0]}]});
        let run = testing::run(
            &mut h,
            &[
                testing::request("application/json", scalar.to_string()),
                data(json!([[1.0, 2.0, 3.0, 4.0]])),
            ],
        );
        let e = run.finals[0].as_ref().expect_err("scalar");
        assert!(
            e.message
                .contains("`inputs[0].shape` must have at least one dimension"),
            "{}",
            e.message
        );
        assert!(run.finals[1].is_ok());
    }

    #[test]
    fn a_label_file_with_an_absurd_index_is_refused() {
        let dir = tempfile_dir();
        let path = dir.join("index_to_name.json");
        std::fs::write(&path, r#"{"0": "a", "100000000000": "b"}"#).expect("write");
        let err = read_labels(&path).expect_err("refused");
        assert!(
            err.message
                .contains("class index 100000000000 is too large"),
            "{}",
            err.message
        );
        std::fs::write(&path, r#"{"0": ["n0", "tench"], "2": "c"}"#).expect("write");
        assert_eq!(
            read_labels(&path).expect("reads"),
            vec!["tench".to_owned(), String::new(), "c".to_owned()]
        );
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cresset-ts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn bad_handler_config_is_refused_with_the_key_named() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../model_store/iris");
        let err =
            TorchScriptHandler::initialize(&testing::init_context(dir.clone(), json!({"topk": 0})))
                .err()
                .expect("refused");
        assert!(
            err.message
                .contains("`handler.topk` must be an integer from 1 to"),
            "{}",
            err.message
        );
        let err = TorchScriptHandler::initialize(&testing::init_context(
            dir.clone(),
            json!({"softmax": "yes"}),
        ))
        .err()
        .expect("refused");
        assert!(
            err.message
                .starts_with("`handler.softmax`: invalid type: string \"yes\", expected a boolean"),
            "{}",
            err.message
        );
        let err = TorchScriptHandler::initialize(&testing::init_context(
            dir,
            json!({"model_file": "missing.pt"}),
        ))
        .err()
        .expect("refused");
        assert_eq!(err.code, ErrorCode::NOT_FOUND);
        let err = TorchScriptHandler::initialize(&testing::init_context(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../model_store/iris"),
            json!({"top_k": 2}),
        ))
        .err()
        .expect("refused");
        assert!(
            err.message.contains("`handler.top_k`") && err.message.contains("`topk`"),
            "{}",
            err.message
        );
    }

    /// On a GPU machine: the same model on `cuda:0` answers as on the CPU (within 1e-5).
    #[cfg(feature = "gpu")]
    #[test]
    fn gpu_outputs_match_cpu_outputs() {
        assert!(
            tch::Cuda::is_available(),
            "the gpu feature needs a CUDA device"
        );
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../model_store/iris");
        let config = json!({"labels_file": "none.json"});
        let mut cpu =
            TorchScriptHandler::initialize(&testing::init_context(dir.clone(), config.clone()))
                .expect("cpu");
        let mut ctx = testing::init_context(dir, config);
        ctx.assignment.device_type = cresset_plugin_api::DeviceType::GPU;
        ctx.assignment.device_ids = vec![0].into();
        let mut gpu = TorchScriptHandler::initialize(&ctx).expect("gpu");
        assert_eq!(gpu.device, Device::Cuda(0));
        let request = data(json!([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]));
        let parse = |h: &mut TorchScriptHandler| -> Vec<f64> {
            let run = testing::run(h, std::slice::from_ref(&request));
            let v: Value =
                serde_json::from_slice(&run.finals[0].as_ref().expect("ok").body).expect("json");
            v["data"]
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .expect("row")
                        .iter()
                        .map(|x| x.as_f64().expect("number"))
                })
                .collect()
        };
        let (a, b) = (parse(&mut cpu), parse(&mut gpu));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(diff <= 1e-5, "max abs diff {diff}");
    }
}
