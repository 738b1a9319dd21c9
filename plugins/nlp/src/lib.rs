//! The generalized NLP handler: one plugin for sequence classification, token classification
//! (NER), extractive question answering, text generation and sentence embeddings, chosen by
//! configuration (TorchServe's `Transformer_handler_generalized`).
//!
//! It reads a HuggingFace checkpoint from the archive (`config.json`, `model.safetensors` or
//! sharded safetensors, `tokenizer.json`) and runs it with `cresset-torch`'s architectures:
//! BERT, RoBERTa and DistilBERT encoders with their heads, and GPT-2 for generation.
//! Switching task needs another checkpoint and config, never code.
//!
//! `[handler]` keys (all optional):
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `mode` | from `architectures` | `sequence_classification`, `token_classification`, `question_answering`, `text_generation`, `feature_extraction` |
//! | `model_path` | `.` | the checkpoint folder inside the archive |
//! | `dtype` | `auto` | `auto` (bf16 on a CPU with native bf16, else f32), `float32`, `float16` or `bfloat16` |
//! | `max_length` | 512 (or the model's limit) | the most tokens per sequence (per window for QA) |
//! | `truncation` | false | cut longer texts instead of refusing them with 400 |
//! | `max_batch_tokens` | 16384 | the most tokens (rows × longest row) in one forward pass |
//! | `labels_file` | `index_to_name.json` | labels; else `config.json` `id2label` |
//! | `doc_stride` | min(128, max_length / 2) | QA: tokens shared by consecutive windows of a long context |
//! | `max_answer_len` | 15 | QA: the longest answer, in tokens |
//! | `handle_impossible_answer` | false | QA: answer "" when no span beats the null score |
//! | `max_new_tokens` | 32 | generation default |
//! | `n_steps` | 50 | explanations: integration steps |
//! | `explain_batch` | 10 | explanations: rows per forward/backward pass |

mod answers;
mod encode;
mod explain;
mod input;
mod model;
mod run;
mod tasks;

use std::sync::Arc;

use cresset_plugin_api::sdk::{BatchContext, Host, InitContext, ModelHandler};
use cresset_plugin_api::{Capabilities, PluginError, Request, Response};
use cresset_torch::encoder::{mean_pool_normalized, EncoderHead};
use cresset_torch::generation::GenerationRequest;
use cresset_torch::tch::{Device, Tensor};
use cresset_torch::tokenizers::Encoding;
use cresset_torch::{InferenceMode, ReadOnly};
use serde_json::{json, Value};

use answers::QaItem;
use model::Network;
pub use model::NlpModel;

pub use input::{parse, Inputs, Parsed, MAX_TEXTS};
pub use tasks::{
    group_entities, pick_answer, softmax, top_spans, Candidate, Entity, Span, TokenPrediction,
};

/// The most QA windows one request may need.
const MAX_WINDOWS: usize = 256;
/// The most texts one explanation request may carry, and the most integration steps.
const MAX_EXPLAIN_TEXTS: usize = 8;
const MAX_N_STEPS: u64 = 500;

/// The task a model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Label a whole text.
    SequenceClassification,
    /// Label each token; answer with entities.
    TokenClassification,
    /// Find the answer to a question in a context.
    QuestionAnswering,
    /// Continue a prompt (GPT-2).
    TextGeneration,
    /// Sentence embeddings.
    FeatureExtraction,
}

impl Mode {
    /// Parse the `mode` key.
    pub fn parse(name: &str) -> Result<Self, PluginError> {
        Ok(match name {
            "sequence_classification" => Self::SequenceClassification,
            "token_classification" => Self::TokenClassification,
            "question_answering" => Self::QuestionAnswering,
            "text_generation" => Self::TextGeneration,
            "feature_extraction" => Self::FeatureExtraction,
            other => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.mode` {other:?} is not one of sequence_classification, \
                     token_classification, question_answering, text_generation, \
                     feature_extraction"
                )))
            }
        })
    }

    /// The mode an `architectures` entry implies (as KServe's HuggingFace server infers it).
    pub fn from_architecture(arch: &str) -> Option<Self> {
        if arch == "GPT2LMHeadModel" {
            return Some(Self::TextGeneration);
        }
        Some(match EncoderHead::from_architecture(arch)?.1 {
            EncoderHead::Base => Self::FeatureExtraction,
            EncoderHead::SequenceClassification => Self::SequenceClassification,
            EncoderHead::TokenClassification => Self::TokenClassification,
            EncoderHead::QuestionAnswering => Self::QuestionAnswering,
        })
    }

    pub(crate) fn head(self) -> EncoderHead {
        match self {
            Self::SequenceClassification => EncoderHead::SequenceClassification,
            Self::TokenClassification => EncoderHead::TokenClassification,
            Self::QuestionAnswering => EncoderHead::QuestionAnswering,
            Self::TextGeneration | Self::FeatureExtraction => EncoderHead::Base,
        }
    }
}

/// A request after preprocessing.
pub struct Prepared {
    kind: PreparedKind,
    many: bool,
}

enum PreparedKind {
    Texts {
        texts: Vec<String>,
        encodings: Vec<Encoding>,
    },
    Qa {
        items: Vec<QaItem>,
        handle_impossible: bool,
    },
    Generate(Vec<GenerationRequest>),
}

/// One request's answers (one JSON value per text), or its error.
pub type Produced = Result<(Vec<Value>, bool), PluginError>;

/// A worker of the generalized NLP handler: the model version's shared parts, its network on
/// this worker's device (shared with the other workers there), and its own counters.
pub struct NlpHandler {
    model: Arc<NlpModel>,
    network: Arc<ReadOnly<Network>>,
    device: Device,
    /// libtorch threads the host assigned this worker.
    threads: u32,
    host: Host,
    forward_passes: u64,
}

impl NlpHandler {
    /// The mode this handler serves.
    pub fn mode(&self) -> Mode {
        self.model.mode
    }

    /// Batched forward passes (or generation runs) so far.
    pub fn forward_passes(&self) -> u64 {
        self.forward_passes
    }

    fn count_pass(&mut self) {
        self.forward_passes += 1;
        self.host.counter(
            "nlp_forward_passes_total",
            "Batched forward passes (or generation runs) of the nlp handler",
            &[],
            1.0,
        );
    }
}

impl ModelHandler for NlpHandler {
    const NAME: &'static str = "nlp";
    const SUMMARY: &'static str = "HuggingFace encoders and GPT-2 for classification, NER, QA, \
                                   generation and embeddings (TorchServe's generalized handler)";
    // Instances share the network (NlpModel): a worker per core costs activations only.
    const CAPABILITIES: Capabilities =
        Capabilities(Capabilities::EXPLANATIONS.0 | Capabilities::SHARED_WEIGHTS.0);
    type Model = NlpModel;
    type Input = Prepared;
    type Output = Produced;

    fn initialize(model: &Arc<NlpModel>, ctx: &InitContext) -> Result<Self, PluginError> {
        let device = cresset_torch::instance_device(ctx);
        let network = model.network(device)?;
        tracing::info!(
            model = %ctx.model_name, mode = ?model.mode, max_length = model.settings.max_length,
            ?device, kind = ?model.kind(device), "nlp worker ready"
        );
        Ok(Self {
            model: Arc::clone(model),
            network,
            device,
            threads: ctx.assignment.intra_op_threads,
            host: ctx.host.clone(),
            forward_passes: 0,
        })
    }

    fn preprocess(&mut self, request: &Request) -> Result<Prepared, PluginError> {
        let parsed = parse(request, self.model.mode == Mode::QuestionAnswering)?;
        let name = parsed.field.clone();
        let field = |many: bool, i: usize| {
            if many {
                format!("{name}[{i}]")
            } else {
                name.clone()
            }
        };
        let (kind, many) = match parsed.inputs {
            Inputs::Texts { texts, many } if self.model.mode == Mode::TextGeneration => {
                let requests = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        self.model
                            .generation_request(&field(many, i), t, &parsed.options)
                    })
                    .collect::<Result<_, _>>()?;
                (PreparedKind::Generate(requests), many)
            }
            Inputs::Texts { texts, many } => {
                let encodings = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| self.model.encode_text(&field(many, i), t))
                    .collect::<Result<_, _>>()?;
                (PreparedKind::Texts { texts, encodings }, many)
            }
            Inputs::Pairs { pairs, many } => {
                let items = pairs
                    .iter()
                    .enumerate()
                    .map(|(i, (q, c))| {
                        let field = field(many, i);
                        Ok(QaItem {
                            context: c.chars().collect(),
                            windows: self.model.encode_pair(&field, q, c)?,
                        })
                    })
                    .collect::<Result<Vec<QaItem>, PluginError>>()?;
                let windows: usize = items.iter().map(|i| i.windows.len()).sum();
                if windows > MAX_WINDOWS {
                    return Err(PluginError::invalid_input(format!(
                        "`{name}`: the contexts need {windows} windows of max_length tokens; the \
                         most per request is {MAX_WINDOWS}"
                    )));
                }
                let handle_impossible =
                    input::opt_bool(&parsed.options, "handle_impossible_answer")?
                        .unwrap_or(self.model.settings.handle_impossible_answer);
                (
                    PreparedKind::Qa {
                        items,
                        handle_impossible,
                    },
                    many,
                )
            }
        };
        Ok(Prepared { kind, many })
    }

    fn inference(
        &mut self,
        batch: Vec<Prepared>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Produced>, PluginError> {
        let _batch = cresset_torch::threads::Batch::enter(self.threads);
        if self.model.mode == Mode::TextGeneration {
            let Network::Decoder(gpt) = &**self.network else {
                return Err(PluginError::internal("generation without a decoder"));
            };
            let requests: Vec<GenerationRequest> = batch
                .iter()
                .flat_map(|p| match &p.kind {
                    PreparedKind::Generate(r) => r.clone(),
                    _ => Vec::new(),
                })
                .collect();
            let outputs = {
                let _mode = InferenceMode::enter();
                gpt.generate(&requests).map_err(PluginError::from)?
            };
            self.count_pass();
            let mut outputs = outputs.into_iter();
            return batch
                .iter()
                .map(|p| {
                    let n = match &p.kind {
                        PreparedKind::Generate(r) => r.len(),
                        _ => 0,
                    };
                    let values = outputs
                        .by_ref()
                        .take(n)
                        .map(|ids| {
                            let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                            let text = self.model.tokenizer.decode(&ids, true).map_err(|e| {
                                PluginError::internal(format!("cannot decode tokens: {e}"))
                            })?;
                            Ok(json!({"generated_text": text, "tokens": ids.len()}))
                        })
                        .collect::<Result<Vec<_>, PluginError>>();
                    Ok(values.map(|v| (v, p.many)))
                })
                .collect();
        }
        // Every sequence of every request (every window of every QA context) in one pass.
        let mut sequences: Vec<&Encoding> = Vec::new();
        for p in &batch {
            match &p.kind {
                PreparedKind::Texts { encodings, .. } => sequences.extend(encodings),
                PreparedKind::Qa { items, .. } => {
                    sequences.extend(items.iter().flat_map(|i| &i.windows))
                }
                PreparedKind::Generate(_) => {}
            }
        }
        let (logits, hidden, mask) = self.run_encoder_chunked(&sequences)?;
        let logits_rows: Option<Vec<Tensor>> = logits.map(|l| l.unbind(0));
        let mut row = 0usize;
        let mut results = Vec::with_capacity(batch.len());
        for p in &batch {
            let mut values = Vec::new();
            match &p.kind {
                PreparedKind::Texts { texts, encodings } => {
                    for (text, encoding) in texts.iter().zip(encodings) {
                        let value = match self.model.mode {
                            Mode::FeatureExtraction => {
                                let pooled = mean_pool_normalized(
                                    &hidden.narrow(0, row as i64, 1),
                                    &mask.narrow(0, row as i64, 1),
                                );
                                json!({"embedding": Vec::<f32>::try_from(pooled.view([-1])).map_err(|e| PluginError::internal(e.to_string()))?})
                            }
                            Mode::SequenceClassification => {
                                let l = logits_row(&logits_rows, row)?;
                                self.model.classify(
                                    &Vec::<f32>::try_from(&l)
                                        .map_err(|e| PluginError::internal(e.to_string()))?,
                                )
                            }
                            Mode::TokenClassification => {
                                let l = logits_row(&logits_rows, row)?.narrow(
                                    0,
                                    0,
                                    encoding.len() as i64,
                                );
                                let rows = Vec::<Vec<f32>>::try_from(&l)
                                    .map_err(|e| PluginError::internal(e.to_string()))?;
                                self.model.entities(encoding, &rows, text)
                            }
                            Mode::QuestionAnswering | Mode::TextGeneration => {
                                return Err(PluginError::internal("texts in a pair mode"))
                            }
                        };
                        values.push(value);
                        row += 1;
                    }
                }
                PreparedKind::Qa {
                    items,
                    handle_impossible,
                } => {
                    for item in items {
                        let mut windows = Vec::with_capacity(item.windows.len());
                        for _ in &item.windows {
                            let l = logits_row(&logits_rows, row)?;
                            let start = Vec::<f32>::try_from(l.select(1, 0))
                                .map_err(|e| PluginError::internal(e.to_string()))?;
                            let end = Vec::<f32>::try_from(l.select(1, 1))
                                .map_err(|e| PluginError::internal(e.to_string()))?;
                            windows.push((start, end));
                            row += 1;
                        }
                        values.push(self.model.answer(item, &windows, *handle_impossible));
                    }
                }
                PreparedKind::Generate(_) => {}
            }
            results.push(Ok((values, p.many)));
        }
        Ok(results)
    }

    fn postprocess(&mut self, output: Produced) -> Result<Response, PluginError> {
        let (mut values, many) = output?;
        if many {
            Response::json(&values)
        } else {
            let value = values
                .pop()
                .ok_or_else(|| PluginError::internal("no answer"))?;
            match value {
                // `response_format = "torchserve"`: a label alone is plain text, as TorchServe
                // sends a handler's string.
                Value::String(label) if self.model.settings.torchserve_format => {
                    Ok(Response::ok("text/plain; charset=utf-8", label))
                }
                value => Response::json(&value),
            }
        }
    }

    fn explain(
        &mut self,
        requests: &[Request],
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        let _batch = cresset_torch::threads::Batch::enter(self.threads);
        requests
            .iter()
            .map(|request| {
                if !self.model.settings.explanations {
                    return Err(PluginError::unsupported(
                        "explanations are off for this model (`handler.captum_explanation = false`)",
                    ));
                }
                if self.model.mode != Mode::SequenceClassification {
                    return Err(PluginError::unsupported(
                        "explanations are available in sequence_classification mode",
                    ));
                }
                let parsed = parse(request, false)?;
                let Inputs::Texts { texts, many } = parsed.inputs else {
                    return Err(PluginError::invalid_input("explanations need `text`"));
                };
                if texts.len() > MAX_EXPLAIN_TEXTS {
                    return Err(PluginError::invalid_input(format!(
                        "`{}` has {} texts; explanations take at most {MAX_EXPLAIN_TEXTS} per request",
                        parsed.field,
                        texts.len()
                    )));
                }
                let values = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let field = if many {
                            format!("{}[{i}]", parsed.field)
                        } else {
                            parsed.field.clone()
                        };
                        self.explain_one(&field, t, &parsed.options)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.postprocess(Ok((values, many)))
            })
            .collect()
    }
}

fn logits_row(rows: &Option<Vec<Tensor>>, i: usize) -> Result<Tensor, PluginError> {
    rows.as_ref()
        .and_then(|r| r.get(i))
        .map(Tensor::shallow_clone)
        .ok_or_else(|| PluginError::internal("the model returned too few rows"))
}

cresset_plugin_api::export_handler!(NlpHandler);

#[cfg(test)]
mod tests {
    use cresset_plugin_api::sdk::testing::{init_context, request, run};
    use cresset_plugin_api::sdk::SharedModel;

    use super::*;

    #[test]
    fn workers_on_one_device_share_one_copy_of_the_weights() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/generated/nlp/bert-seq");
        let ctx = init_context(&dir, json!({"dtype": "float32"}));
        let model = Arc::new(NlpModel::load(&ctx.model_context()).expect("load"));
        let mut a = NlpHandler::initialize(&model, &ctx).expect("first worker");
        let mut b = NlpHandler::initialize(&model, &ctx).expect("second worker");
        assert!(Arc::ptr_eq(&a.network, &b.network), "one network for both");
        let ask = |h: &mut NlpHandler| {
            let out = run(h, &[request("text/plain", "a fine day")]);
            out.finals[0].as_ref().expect("answer").body.clone()
        };
        assert_eq!(ask(&mut a), ask(&mut b));
        // The weights belong to the model version: they outlive a worker, and go with the
        // version once its last worker has gone.
        let weights = Arc::downgrade(&a.network);
        drop(a);
        assert!(weights.upgrade().is_some());
        drop(b);
        drop(model);
        assert!(weights.upgrade().is_none());
    }
}
