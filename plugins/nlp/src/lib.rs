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
//! | `dtype` | `float32` | `float32`, `float16` or `bfloat16` |
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

mod input;
mod tasks;

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, Host, InitContext};
use cresset_plugin_api::{Capabilities, PluginError, Request, Response};
use cresset_torch::decoder::Decoder;
use cresset_torch::encoder::{mean_pool_normalized, Encoder, EncoderHead};
use cresset_torch::generation::GenerationRequest;
use cresset_torch::layers::{parse_dtype, HfConfig};
use cresset_torch::sampling::SamplingParams;
use cresset_torch::tch::{Device, Kind, Tensor};
use cresset_torch::tokenizers::{
    Encoding, PostProcessor, PostProcessorWrapper, Tokenizer, TruncationDirection, TruncationParams,
};
use cresset_torch::InferenceMode;
use serde_json::{json, Map, Value};

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

    fn head(self) -> EncoderHead {
        match self {
            Self::SequenceClassification => EncoderHead::SequenceClassification,
            Self::TokenClassification => EncoderHead::TokenClassification,
            Self::QuestionAnswering => EncoderHead::QuestionAnswering,
            Self::TextGeneration | Self::FeatureExtraction => EncoderHead::Base,
        }
    }
}

enum Model {
    Encoder(Encoder),
    Decoder(Decoder),
}

/// Settings from the `[handler]` table.
#[derive(Debug, Clone)]
struct Settings {
    max_length: usize,
    max_batch_tokens: usize,
    doc_stride: usize,
    max_answer_len: usize,
    handle_impossible_answer: bool,
    max_new_tokens: usize,
    n_steps: usize,
    explain_batch: usize,
    multi_label: bool,
}

/// One QA pair after tokenization: the context and its windows.
struct QaItem {
    context: Vec<char>,
    windows: Vec<Encoding>,
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

/// The generalized NLP handler.
pub struct NlpHandler {
    mode: Mode,
    model: Model,
    tokenizer: Tokenizer,
    /// The tokenizer without its post-processor (QA encodes each sequence with it).
    bare_tokenizer: Tokenizer,
    labels: Vec<String>,
    settings: Settings,
    pad_id: i64,
    cls_id: Option<u32>,
    eos_ids: Vec<i64>,
    device: Device,
    host: Host,
    forward_passes: u64,
}

/// The id of the first of these tokens the tokenizer knows.
fn token_id(tokenizer: &Tokenizer, candidates: &[&str]) -> Option<u32> {
    candidates.iter().find_map(|t| tokenizer.token_to_id(t))
}

impl NlpHandler {
    /// The mode this handler serves.
    pub fn mode(&self) -> Mode {
        self.mode
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

    fn encode_text(&self, field: &str, text: &str) -> Result<Encoding, PluginError> {
        let encoding = self
            .tokenizer
            .encode_char_offsets(text, true)
            .map_err(|e| PluginError::invalid_input(format!("cannot tokenize `{field}`: {e}")))?;
        let max = self.settings.max_length;
        if encoding.len() > max {
            return Err(PluginError::invalid_input(format!(
                "`{field}` is {} tokens long; max_length is {max} (set `handler.truncation = true` to cut it)",
                encoding.len()
            )));
        }
        Ok(encoding)
    }

    /// Tokenize a question with its context, cutting a long context into overlapping windows
    /// of at most `max_length` tokens that share `doc_stride` context tokens (as HuggingFace's
    /// `truncation="only_second"` with `stride` does). The windows are built here from the
    /// context's own truncation, then the pair template, because tokenizers 0.23.2 merges the
    /// overflow of a truncated pair differently from its Python release.
    fn encode_pair(
        &self,
        field: &str,
        question: &str,
        context: &str,
    ) -> Result<Vec<Encoding>, PluginError> {
        // Each sequence is encoded without the post-processor, which runs once, on the pair.
        let tokenize = |text: &str| {
            self.bare_tokenizer
                .encode_char_offsets(text, false)
                .map_err(|e| PluginError::invalid_input(format!("cannot tokenize `{field}`: {e}")))
        };
        let question_enc = tokenize(question)?;
        let mut context_enc = tokenize(context)?;
        let added = self
            .tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(true))
            .unwrap_or(0);
        let max = self.settings.max_length;
        let room = max.saturating_sub(added + question_enc.len());
        if room == 0 || (context_enc.len() > room && room <= self.settings.doc_stride) {
            return Err(PluginError::invalid_input(format!(
                "`{field}`: the question is {} tokens long, which leaves no room for the context \
                 within max_length {max} (with doc_stride {})",
                question_enc.len(),
                self.settings.doc_stride
            )));
        }
        context_enc.truncate(room, self.settings.doc_stride, TruncationDirection::Right);
        let mut pieces = context_enc.take_overflowing();
        pieces.insert(0, context_enc);
        if pieces.len() > MAX_WINDOWS {
            return Err(PluginError::invalid_input(format!(
                "`{field}`: the context needs {} windows; the most is {MAX_WINDOWS}",
                pieces.len()
            )));
        }
        pieces
            .into_iter()
            .map(|piece| {
                self.tokenizer
                    .post_process(question_enc.clone(), Some(piece), true)
                    .map_err(|e| PluginError::internal(format!("tokenizer: {e}")))
            })
            .collect()
    }

    fn generation_request(
        &self,
        field: &str,
        prompt: &str,
        options: &Map<String, Value>,
    ) -> Result<GenerationRequest, PluginError> {
        let Model::Decoder(gpt) = &self.model else {
            return Err(PluginError::internal("generation without a decoder"));
        };
        let context = gpt.config.max_positions as u64;
        let ids: Vec<i64> = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| PluginError::invalid_input(format!("cannot tokenize `{field}`: {e}")))?
            .get_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        let max_new = input::opt_uint(options, "max_new_tokens", context)?
            .map(|n| n as usize)
            .unwrap_or(self.settings.max_new_tokens);
        if ids.is_empty() {
            return Err(PluginError::invalid_input(format!(
                "`{field}` has no tokens"
            )));
        }
        if (ids.len() + max_new) as u64 > context {
            return Err(PluginError::invalid_input(format!(
                "`{field}` is {} tokens long; with max_new_tokens {max_new} that exceeds the \
                 model's context of {context} tokens",
                ids.len()
            )));
        }
        // Sampling when asked for (`do_sample`), or implied by a sampling parameter; greedy
        // otherwise, and always when `do_sample` is false or `temperature` is 0.
        let do_sample = input::opt_bool(options, "do_sample")?;
        let temperature = input::opt_f64(options, "temperature", 0.0, 100.0)?;
        let top_k = input::opt_uint(options, "top_k", 1 << 20)?.unwrap_or(0) as usize;
        let top_p = input::opt_f64(options, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
        let implied = temperature.is_some() || top_k > 0 || top_p < 1.0;
        let temperature = match do_sample {
            Some(false) => 0.0,
            _ if do_sample == Some(true) || implied => temperature.unwrap_or(1.0),
            _ => 0.0,
        };
        let sampling = SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p,
            repetition_penalty: input::opt_f64(options, "repetition_penalty", 0.01, 100.0)?
                .unwrap_or(1.0) as f32,
        };
        Ok(GenerationRequest {
            prompt: ids,
            max_new_tokens: max_new,
            sampling,
            seed: input::opt_uint(options, "seed", u64::MAX)?,
            stop_ids: self.eos_ids.clone(),
        })
    }

    /// Pad a list of encodings into `[n, longest]` id, type and mask tensors on the device.
    fn batch_tensors(&self, encodings: &[&Encoding]) -> (Tensor, Tensor, Tensor) {
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let n = encodings.len();
        let mut ids = vec![self.pad_id; n * longest];
        let mut types = vec![0i64; n * longest];
        let mut mask = vec![0i64; n * longest];
        for (row, e) in encodings.iter().enumerate() {
            for (j, ((&id, &ty), &m)) in e
                .get_ids()
                .iter()
                .zip(e.get_type_ids())
                .zip(e.get_attention_mask())
                .enumerate()
            {
                ids[row * longest + j] = i64::from(id);
                types[row * longest + j] = i64::from(ty);
                mask[row * longest + j] = i64::from(m);
            }
        }
        let shape = [n as i64, longest as i64];
        let make = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(self.device);
        (make(&ids), make(&types), make(&mask))
    }

    /// Forward passes over every sequence, as few as the token budget allows (one for any usual
    /// batch); returns `(logits, hidden, mask)` on the CPU in f32, rows in order, padded to the
    /// longest sequence.
    fn run_encoder_chunked(
        &mut self,
        encodings: &[&Encoding],
    ) -> Result<(Option<Tensor>, Tensor, Tensor), PluginError> {
        let width = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1) as i64;
        let mut logits = Vec::new();
        let mut hidden = Vec::new();
        let mut masks = Vec::new();
        let mut start = 0;
        while start < encodings.len() {
            let mut end = start + 1;
            let mut longest = encodings[start].len();
            while end < encodings.len() {
                let len = longest.max(encodings[end].len());
                if len * (end + 1 - start) > self.settings.max_batch_tokens {
                    break;
                }
                longest = len;
                end += 1;
            }
            let (l, h, m) = self.run_encoder(&encodings[start..end])?;
            self.count_pass();
            // Pad each chunk's rows to the overall longest so that the chunks stack.
            let pad = width - h.size()[1];
            if let Some(l) = l {
                logits.push(if l.dim() == 3 {
                    l.constant_pad_nd([0, 0, 0, pad])
                } else {
                    l
                });
            }
            hidden.push(h.constant_pad_nd([0, 0, 0, pad]));
            masks.push(m.constant_pad_nd([0, pad]));
            start = end;
        }
        let logits = (!logits.is_empty()).then(|| Tensor::cat(&logits, 0));
        Ok((logits, Tensor::cat(&hidden, 0), Tensor::cat(&masks, 0)))
    }

    /// One forward pass over these sequences; returns `(logits, hidden, mask)` on the CPU in f32.
    fn run_encoder(
        &self,
        encodings: &[&Encoding],
    ) -> Result<(Option<Tensor>, Tensor, Tensor), PluginError> {
        let Model::Encoder(encoder) = &self.model else {
            return Err(PluginError::internal("encoder task without an encoder"));
        };
        let (ids, types, mask) = self.batch_tensors(encodings);
        let _mode = InferenceMode::enter();
        let out = encoder.forward(&ids, Some(&types), &mask);
        let cpu = |t: Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu);
        Ok((
            out.logits.map(cpu),
            cpu(out.hidden),
            mask.to_device(Device::Cpu),
        ))
    }

    fn classify(&self, logits: &[f32]) -> Value {
        let probs: Vec<f64> = if self.settings.multi_label || logits.len() == 1 {
            logits
                .iter()
                .map(|&l| 1.0 / (1.0 + (-f64::from(l)).exp()))
                .collect()
        } else {
            softmax(logits)
        };
        let best = probs
            .iter()
            .enumerate()
            .fold(0, |b, (i, p)| if *p > probs[b] { i } else { b });
        let scores: Map<String, Value> = probs
            .iter()
            .enumerate()
            .map(|(i, p)| (self.label(i), json!(p)))
            .collect();
        json!({"label": self.label(best), "score": probs[best], "scores": scores})
    }

    fn label(&self, i: usize) -> String {
        self.labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{i}"))
    }

    fn entities(&self, encoding: &Encoding, logits: &[Vec<f32>], text: &str) -> Value {
        let specials = encoding.get_special_tokens_mask();
        let offsets = encoding.get_offsets();
        let tokens: Vec<TokenPrediction> = logits
            .iter()
            .enumerate()
            .filter(|(i, _)| specials.get(*i) == Some(&0))
            .filter_map(|(i, row)| {
                let probs = softmax(row);
                let label = probs
                    .iter()
                    .enumerate()
                    .fold(0, |b, (j, p)| if *p > probs[b] { j } else { b });
                let (start, end) = *offsets.get(i)?;
                Some(TokenPrediction {
                    label,
                    score: probs[label],
                    start,
                    end,
                })
            })
            .collect();
        let chars: Vec<char> = text.chars().collect();
        json!(group_entities(&tokens, &self.labels, &chars))
    }

    fn answer(
        &self,
        item: &QaItem,
        rows: &[(Vec<f32>, Vec<f32>)],
        handle_impossible: bool,
    ) -> Value {
        // As the pipeline: each window proposes its best spans (12 for one answer, since
        // snapping to words can merge some); spans giving the same text (ignoring case) add
        // their scores; the best total wins, unless the null answer beats it.
        let mut answers: Vec<Candidate> = Vec::new();
        let mut null_score = f64::INFINITY;
        for (window, (start, end)) in item.windows.iter().zip(rows) {
            let allowed: Vec<bool> = window
                .get_sequence_ids()
                .iter()
                .zip(window.get_ids())
                .map(|(seq, id)| *seq == Some(1) || Some(*id) == self.cls_id)
                .collect();
            let n = window.len();
            let (spans, null) = top_spans(
                &start[..n],
                &end[..n],
                &allowed,
                self.settings.max_answer_len,
                12,
            );
            null_score = null_score.min(null);
            for span in spans {
                let word_chars = window
                    .token_to_word(span.start)
                    .zip(window.token_to_word(span.end))
                    .and_then(|((_, ws), (_, we))| {
                        Some((
                            window.word_to_chars(ws, 1)?.0,
                            window.word_to_chars(we, 1)?.1,
                        ))
                    });
                let offsets = window.get_offsets();
                let Some((s, e)) = word_chars
                    .or_else(|| Some((offsets.get(span.start)?.0, offsets.get(span.end)?.1)))
                else {
                    continue;
                };
                let text: String = item
                    .context
                    .get(s..e.max(s))
                    .map(|c| c.iter().collect())
                    .unwrap_or_default();
                answers.push(Candidate {
                    score: span.score,
                    start: s,
                    end: e,
                    text,
                });
            }
        }
        match pick_answer(answers, null_score, handle_impossible) {
            Some(a) => {
                json!({"answer": a.text, "score": a.score, "start": a.start, "end": a.end, "has_answer": !a.text.is_empty()})
            }
            _ => json!({
                "answer": "",
                "score": if null_score.is_finite() { null_score } else { 0.0 },
                "start": 0,
                "end": 0,
                "has_answer": false
            }),
        }
    }

    fn explain_one(
        &self,
        text_field: &str,
        text: &str,
        options: &Map<String, Value>,
    ) -> Result<Value, PluginError> {
        let Model::Encoder(encoder) = &self.model else {
            return Err(PluginError::unsupported(
                "explanations need an encoder model",
            ));
        };
        let encoding = self.encode_text(text_field, text)?;
        let (ids, types, mask) = self.batch_tensors(&[&encoding]);
        let baseline_ids: Vec<i64> = encoding
            .get_ids()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .map(|(&id, &special)| {
                if special == 1 {
                    i64::from(id)
                } else {
                    self.pad_id
                }
            })
            .collect();
        let baseline = Tensor::from_slice(&baseline_ids)
            .view([1, baseline_ids.len() as i64])
            .to_device(self.device);
        let predicted = {
            let _mode = InferenceMode::enter();
            let out = encoder.forward(&ids, Some(&types), &mask);
            out.logits
                .map(|l| l.argmax(-1, false).int64_value(&[0]))
                .unwrap_or(0)
        };
        let target = match options.get("target") {
            None | Some(Value::Null) => predicted,
            Some(Value::String(label)) => {
                let known =
                    &self.labels[..self.labels.len().min(encoder.config.num_labels as usize)];
                known.iter().position(|l| l == label).ok_or_else(|| {
                    PluginError::invalid_input(format!(
                        "`target` {label:?} is not a label (labels: {})",
                        self.labels.join(", ")
                    ))
                })? as i64
            }
            Some(v) => v
                .as_u64()
                .filter(|&i| i < encoder.config.num_labels as u64)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    PluginError::invalid_input(format!(
                        "`target` must be a label or a class index below {}. Given: {v}",
                        encoder.config.num_labels
                    ))
                })?,
        };
        let n_steps = input::opt_uint(options, "n_steps", MAX_N_STEPS)?
            .map(|n| n.max(1) as usize)
            .unwrap_or(self.settings.n_steps);
        let attribution = encoder
            .integrated_gradients(
                &ids,
                &baseline,
                Some(&types),
                &mask,
                target,
                n_steps,
                self.settings.explain_batch,
            )
            .map_err(PluginError::from)?;
        let total: f64 = attribution.per_token.iter().map(|&a| f64::from(a)).sum();
        let expected = attribution.at_input - attribution.at_baseline;
        Ok(json!({
            "tokens": encoding.get_tokens(),
            "attributions": attribution.per_token,
            "target": target,
            "label": self.label(target as usize),
            "n_steps": n_steps,
            "f_input": attribution.at_input,
            "f_baseline": attribution.at_baseline,
            "convergence_delta": total - expected,
        }))
    }
}

impl Handler for NlpHandler {
    const NAME: &'static str = "nlp";
    const SUMMARY: &'static str = "HuggingFace encoders and GPT-2 for classification, NER, QA, \
                                   generation and embeddings (TorchServe's generalized handler)";
    const CAPABILITIES: Capabilities = Capabilities::EXPLANATIONS;
    type Input = Prepared;
    type Output = Produced;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let config = &ctx.handler_config;
        let dir = settings::folder_inside(&ctx.model_dir, config, "model_path")?;
        let hf = HfConfig::read(&dir).map_err(PluginError::from)?;
        let mode = match settings::string(config, "mode")? {
            Some(name) => Mode::parse(name)?,
            None => {
                let arch = hf.architecture().unwrap_or("(none)");
                Mode::from_architecture(arch).ok_or_else(|| {
                    PluginError::invalid_input(format!(
                        "config.json names architecture {arch:?}, which the nlp handler does not \
                         know; set `handler.mode` or use a BERT, RoBERTa, DistilBERT or GPT-2 \
                         checkpoint"
                    ))
                })?
            }
        };
        let kind = parse_dtype(settings::string(config, "dtype")?.unwrap_or("float32"))
            .map_err(PluginError::from)?;
        let device = cresset_torch::instance_device(ctx);
        let model = if mode == Mode::TextGeneration {
            Model::Decoder(Decoder::load(&dir, &hf, kind, device).map_err(PluginError::from)?)
        } else {
            Model::Encoder(
                Encoder::load(&dir, &hf, mode.head(), kind, device).map_err(PluginError::from)?,
            )
        };
        let model_limit = match &model {
            Model::Encoder(e) => e.config.max_input_len() as usize,
            Model::Decoder(g) => g.config.max_positions as usize,
        };
        let max_length =
            settings::integer(config, "max_length", model_limit.min(512), model_limit)?;
        let truncation = settings::boolean(config, "truncation", false)?;
        let doc_stride = settings::integer(
            config,
            "doc_stride",
            (max_length / 2).clamp(1, 128),
            max_length,
        )?;
        let settings = Settings {
            max_length,
            max_batch_tokens: settings::integer(config, "max_batch_tokens", 16_384, 1 << 24)?,
            doc_stride,
            max_answer_len: settings::integer(config, "max_answer_len", 15, 512)?,
            handle_impossible_answer: settings::boolean(config, "handle_impossible_answer", false)?,
            max_new_tokens: settings::integer(config, "max_new_tokens", 32, model_limit)?,
            n_steps: settings::integer(config, "n_steps", 50, 1000)?,
            explain_batch: settings::integer(config, "explain_batch", 10, 1000)?,
            multi_label: hf.opt_str("problem_type").map_err(PluginError::from)?
                == Some("multi_label_classification"),
        };
        let mut tokenizer = cresset_torch::load_tokenizer(&dir).map_err(PluginError::from)?;
        // QA encodes each sequence with this one: no post-processor, no truncation (its
        // windows cover the whole context).
        let mut bare_tokenizer = tokenizer.clone();
        bare_tokenizer.with_post_processor(None::<PostProcessorWrapper>);
        if truncation && mode != Mode::TextGeneration {
            tokenizer
                .with_truncation(Some(TruncationParams {
                    max_length,
                    ..TruncationParams::default()
                }))
                .map_err(|e| PluginError::invalid_input(format!("tokenizer: {e}")))?;
        }
        let model_vocab = match &model {
            Model::Encoder(e) => e.config.vocab_size,
            Model::Decoder(g) => g.config.vocab_size,
        };
        let highest = tokenizer.get_vocab(true).into_values().max().unwrap_or(0);
        if i64::from(highest) >= model_vocab {
            return Err(PluginError::invalid_input(format!(
                "tokenizer.json has token id {highest} but the model's vocab_size is \
                 {model_vocab}: they do not belong together"
            )));
        }
        let labels_path = settings::path_inside(
            &ctx.model_dir,
            "labels_file",
            settings::string(config, "labels_file")?.unwrap_or("index_to_name.json"),
        )?;
        let labels = if labels_path.is_file() {
            cresset_torch::read_index_to_name(&labels_path).map_err(PluginError::from)?
        } else {
            hf.id2label().unwrap_or_default()
        };
        // Every class of the head has a name: `LABEL_i` where the files give none.
        let mut labels = labels;
        if let Model::Encoder(e) = &model {
            let n = e.config.num_labels as usize;
            if labels.len() < n {
                labels.extend((labels.len()..n).map(|i| format!("LABEL_{i}")));
            }
        }
        let pad_id = match &model {
            Model::Encoder(e) => Some(e.config.pad_token_id),
            Model::Decoder(_) => None,
        };
        let pad_id = pad_id
            .or_else(|| token_id(&tokenizer, &["[PAD]", "<pad>"]).map(i64::from))
            .or_else(|| {
                hf.token_ids("pad_token_id")
                    .ok()
                    .and_then(|v| v.first().copied())
            })
            .unwrap_or(0);
        let cls_id = token_id(&tokenizer, &["[CLS]", "<s>"]);
        let eos_ids =
            cresset_torch::gpt2::generation_eos_ids(&dir, &hf).map_err(PluginError::from)?;
        tracing::info!(model = %ctx.model_name, ?mode, %max_length, ?device, "nlp model loaded");
        Ok(Self {
            mode,
            model,
            tokenizer,
            bare_tokenizer,
            labels,
            settings,
            pad_id,
            cls_id,
            eos_ids,
            device,
            host: ctx.host.clone(),
            forward_passes: 0,
        })
    }

    fn preprocess(&mut self, request: &Request) -> Result<Prepared, PluginError> {
        let parsed = parse(request, self.mode == Mode::QuestionAnswering)?;
        let name = parsed.field.clone();
        let field = |many: bool, i: usize| {
            if many {
                format!("{name}[{i}]")
            } else {
                name.clone()
            }
        };
        let (kind, many) = match parsed.inputs {
            Inputs::Texts { texts, many } if self.mode == Mode::TextGeneration => {
                let requests = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| self.generation_request(&field(many, i), t, &parsed.options))
                    .collect::<Result<_, _>>()?;
                (PreparedKind::Generate(requests), many)
            }
            Inputs::Texts { texts, many } => {
                let encodings = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| self.encode_text(&field(many, i), t))
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
                            windows: self.encode_pair(&field, q, c)?,
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
                        .unwrap_or(self.settings.handle_impossible_answer);
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
        if self.mode == Mode::TextGeneration {
            let Model::Decoder(gpt) = &self.model else {
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
                            let text = self.tokenizer.decode(&ids, true).map_err(|e| {
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
                        let value = match self.mode {
                            Mode::FeatureExtraction => {
                                let pooled = mean_pool_normalized(
                                    &hidden.narrow(0, row as i64, 1),
                                    &mask.narrow(0, row as i64, 1),
                                );
                                json!({"embedding": Vec::<f32>::try_from(pooled.view([-1])).map_err(|e| PluginError::internal(e.to_string()))?})
                            }
                            Mode::SequenceClassification => {
                                let l = logits_row(&logits_rows, row)?;
                                self.classify(
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
                                self.entities(encoding, &rows, text)
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
                        values.push(self.answer(item, &windows, *handle_impossible));
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
            Response::json(&value)
        }
    }

    fn explain(
        &mut self,
        requests: &[Request],
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        requests
            .iter()
            .map(|request| {
                if self.mode != Mode::SequenceClassification {
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
