//! The text plugin: TorchServe's `text_classifier` handler, for text classification models
//! that are not HuggingFace checkpoints (those are the `nlp` plugin's): a model that takes
//! token ids and bag offsets (`model(text, offsets)`, an `EmbeddingBag` as in TorchServe's
//! text classification example) in TorchScript, as an AOTInductor package or in ONNX.
//!
//! A request carries one text (the raw body, `curl -d 'text' -H 'Content-Type: text/plain'`;
//! or `{"data": "..."}`) or several (KServe v1 `{"instances": ["...", ...]}`). Each text goes
//! through TorchServe's own preprocessing ([`normalize`]: HTML removed, lowercased,
//! contractions expanded, accents and punctuation removed, `basic_english` tokens and their
//! bigrams) and the vocabulary; the texts of a batch run in one pass as bags of one
//! `EmbeddingBag` input (TorchServe's handler runs one text at a time). The answer is each
//! class's softmax probability, named by `index_to_name.json`: `{"World": 0.1, "Sports": ...}`
//! per text, as TorchServe's handler answers.
//!
//! `[handler]` keys: `model_file` (default: the archive's serialized file, else `model.pt`),
//! `format` (`"auto"`: told by the file; `"torchscript"`, `"aoti"`, `"onnx"`), `vocab_file`
//! (default `vocab.json`, else `vocab.txt`, else `source_vocab.pt`), `unk_token` (`"<unk>"`:
//! the index of unknown tokens), `ngrams` (2), `labels_file` (`index_to_name.json`), `topk`
//! (default: every class).
//!
//! The vocabulary is a JSON list of tokens (the index is the position, as torchtext's
//! `get_itos()` gives it), a JSON object of token to index (`get_stoi()`), or a text file of
//! one token per line, or TorchServe's `source_vocab.pt`: a torchtext vocabulary that
//! `torch.save` wrote, read without running pickle code ([`cresset_plan::pickle::read_vocab`]).

pub mod contractions;
pub mod normalize;
mod vocab;

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};
use cresset_torch::model_file::{FormatKey, Runner};
use cresset_torch::tch::{Device, Kind, Tensor};
use serde_json::{json, Value};

pub use vocab::Vocab;

/// `[handler]` as this plugin reads it (any other key is refused, naming it).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    model_file: Option<String>,
    format: Option<FormatKey>,
    vocab_file: Option<String>,
    unk_token: Option<String>,
    ngrams: Option<u64>,
    labels_file: Option<String>,
    topk: Option<u64>,
}

/// How a request framed its texts, and so how its answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One text: the answer is its classes.
    One,
    /// KServe v1 `instances`: `{"predictions": [...]}`, one per text.
    Instances,
}

/// One request's texts as token ids.
pub struct Prepared {
    framing: Framing,
    ids: Vec<Vec<i64>>,
}

/// One request's class scores per text, or its own error.
pub type Produced = Result<(Framing, Vec<Tensor>), PluginError>;

/// The text classification handler.
pub struct TextHandler {
    runner: Runner,
    device: Device,
    vocab: Vocab,
    ngrams: usize,
    labels: Option<Vec<String>>,
    topk: Option<i64>,
    threads: u32,
    /// Forward passes run so far (the batching tests count them).
    pub forward_passes: u64,
}

impl TextHandler {
    /// The token ids of `text`: TorchServe's preprocessing, then the vocabulary.
    pub fn ids(&self, text: &str) -> Result<Vec<i64>, PluginError> {
        normalize::tokens(text, self.ngrams)
            .iter()
            .map(|t| self.vocab.index(t))
            .collect()
    }

    /// Run texts (as ids) in one pass: each text's class scores.
    pub fn forward(&mut self, texts: &[&[i64]]) -> Result<Vec<Tensor>, PluginError> {
        self.forward_passes += 1;
        let flat: Vec<i64> = texts.iter().flat_map(|t| t.iter().copied()).collect();
        let mut offsets = Vec::with_capacity(texts.len());
        let mut start = 0i64;
        for t in texts {
            offsets.push(start);
            start += t.len() as i64;
        }
        // Texts without tokens are refused in `preprocess` for a compiled package; a pass of
        // none is never run on one.
        if flat.is_empty() && matches!(self.runner, Runner::Aoti(_)) {
            return Err(PluginError::invalid_input(
                "the text has no tokens after preprocessing, and an AOTInductor model takes at \
                 least one",
            ));
        }
        let ids = Tensor::from_slice(&flat);
        let offsets = Tensor::from_slice(&offsets);
        let outputs = self.runner.run(&[&ids, &offsets], self.device)?;
        let scores = outputs
            .into_iter()
            .next()
            .ok_or_else(|| PluginError::internal("the model answered no output"))?;
        if scores.dim() != 2 || scores.size()[0] != texts.len() as i64 {
            return Err(PluginError::internal(format!(
                "the model answered {:?} for {} texts; a text classifier answers [texts, classes]",
                scores.size(),
                texts.len()
            )));
        }
        let scores = scores.to_kind(Kind::Float);
        Ok((0..texts.len() as i64).map(|i| scores.get(i)).collect())
    }

    fn answer(&self, scores: &Tensor) -> Result<Value, PluginError> {
        let k = self.topk.unwrap_or(*scores.size().last().unwrap_or(&0));
        let labels = self.labels.as_deref().unwrap_or_default();
        cresset_torch::torchscript::top_classes(scores, k, labels)
    }
}

/// The texts of one request.
fn texts(request: &Request) -> Result<(Framing, Vec<String>), PluginError> {
    let body = request.body.as_slice();
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let json = request.content_type.starts_with("application/json")
        || (request.content_type.is_empty() && first == Some(&b'{'));
    if !json {
        let text = std::str::from_utf8(body)
            .map_err(|e| PluginError::invalid_input(format!("the text is not UTF-8: {e}")))?;
        return Ok((Framing::One, vec![text.to_owned()]));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        PluginError::invalid_input(format!(
            "the body is JSON but not valid: {e}. Send the text as the body (text/plain), as \
             {{\"data\": \"...\"}} or as {{\"instances\": [\"...\", ...]}}"
        ))
    })?;
    let field = |v: &Value, name: &str| -> Result<String, PluginError> {
        let text = match v {
            Value::String(s) => Some(s.as_str()),
            Value::Object(map) => ["data", "text", "body"]
                .iter()
                .find_map(|k| map.get(*k))
                .and_then(Value::as_str),
            _ => None,
        };
        text.map(str::to_owned).ok_or_else(|| {
            PluginError::invalid_input(format!(
                "`{name}` must be a string or an object with a string `data` (or `text`)"
            ))
        })
    };
    if let Some(instances) = value.get("instances") {
        let list = instances
            .as_array()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                PluginError::invalid_input("`instances` must be a non-empty list of texts")
            })?;
        let texts = list
            .iter()
            .enumerate()
            .map(|(i, item)| field(item, &format!("instances[{i}]")))
            .collect::<Result<_, _>>()?;
        return Ok((Framing::Instances, texts));
    }
    Ok((Framing::One, vec![field(&value, "the body")?]))
}

impl Handler for TextHandler {
    const NAME: &'static str = "text";
    const SUMMARY: &'static str =
        "text classification over token ids and bag offsets (TorchServe's text_classifier), on a TorchScript, AOTInductor or ONNX model";
    type Input = Prepared;
    type Output = Produced;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let config: Settings = settings::parse(&ctx.handler_config)?;
        let (path, format) =
            cresset_torch::model_file::resolve(ctx, config.model_file.as_deref(), config.format)?;
        let vocab = Vocab::from_archive(
            ctx,
            config.vocab_file.as_deref(),
            config.unk_token.as_deref().unwrap_or("<unk>"),
        )?;
        let (runner, device) = Runner::load(ctx, &path, format)?;
        let labels =
            cresset_torch::torchscript::archive_labels(ctx, config.labels_file.as_deref())?;
        let mut handler = Self {
            runner,
            device,
            vocab,
            ngrams: settings::within("ngrams", config.ngrams, 2, 6)? as usize,
            labels,
            topk: config
                .topk
                .map(|k| settings::within("topk", Some(k), 1, 1 << 20))
                .transpose()?
                .map(|k| k as i64),
            threads: ctx.assignment.intra_op_threads,
            forward_passes: 0,
        };
        // One pass on a known token and one on two texts: the model takes (ids, offsets) and
        // answers [texts, classes].
        let _threads = cresset_torch::threads::Batch::enter(handler.threads);
        let probe = [handler.vocab.first_index()];
        handler.forward(&[&probe, &probe]).map_err(|e| {
            PluginError::invalid_input(format!(
                "the model does not answer token ids and offsets as a text classifier \
                     (model(text, offsets) -> [texts, classes]): {}",
                e.message
            ))
        })?;
        handler.forward_passes = 0;
        tracing::info!(model = %ctx.model_name, ?format, vocab = handler.vocab.len(), "text model loaded");
        Ok(handler)
    }

    fn preprocess(&mut self, request: &Request) -> Result<Prepared, PluginError> {
        let (framing, texts) = texts(request)?;
        let ids = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.ids(t)
                    .and_then(|ids| {
                        // A compiled package trusts its inputs, and one exported with
                        // `torch.export` takes at least one token.
                        if ids.is_empty() && matches!(self.runner, Runner::Aoti(_)) {
                            return Err(PluginError::invalid_input(
                                "the text has no tokens after preprocessing, and an \
                                 AOTInductor model takes at least one",
                            ));
                        }
                        Ok(ids)
                    })
                    .map_err(|mut e| {
                        if framing == Framing::Instances {
                            e.message = format!("`instances[{i}]`: {}", e.message).into();
                        }
                        e
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Prepared { framing, ids })
    }

    fn inference(
        &mut self,
        batch: Vec<Prepared>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Produced>, PluginError> {
        let _threads = cresset_torch::threads::Batch::enter(self.threads);
        // Every text of the batch in one pass; when that fails, request by request, so that a
        // failure is its own request's.
        let all: Vec<&[i64]> = batch
            .iter()
            .flat_map(|p| p.ids.iter().map(Vec::as_slice))
            .collect();
        if batch.len() > 1 {
            if let Ok(mut rows) = self.forward(&all) {
                return Ok(batch
                    .iter()
                    .map(|p| {
                        let rest = rows.split_off(p.ids.len());
                        Ok((p.framing, std::mem::replace(&mut rows, rest)))
                    })
                    .collect());
            }
        }
        Ok(batch
            .iter()
            .map(|p| {
                let texts: Vec<&[i64]> = p.ids.iter().map(Vec::as_slice).collect();
                Ok((p.framing, self.forward(&texts)?))
            })
            .collect())
    }

    fn postprocess(&mut self, output: Produced) -> Result<Response, PluginError> {
        let (framing, rows) = output?;
        let answers = rows
            .iter()
            .map(|scores| self.answer(scores))
            .collect::<Result<Vec<_>, _>>()?;
        let body = match framing {
            Framing::One => answers.into_iter().next().unwrap_or(Value::Null),
            Framing::Instances => json!({ "predictions": answers }),
        };
        Response::json(&body)
    }
}

cresset_plugin_api::export_handler!(TextHandler);
