//! What a model version's workers share: its settings, tokenizers and labels, read once when
//! the version loads, and its weights, loaded once per device the first time a worker there
//! needs them (so two CPU workers hold one copy).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cresset_plugin_api::sdk::{settings, LoadContext, SharedModel};
use cresset_plugin_api::PluginError;
use cresset_torch::decoder::{Decoder, DecoderConfig};
use cresset_torch::encoder::{Encoder, EncoderConfig};
use cresset_torch::layers::{Dtype, HfConfig};
use cresset_torch::tch::{Device, Kind};
use cresset_torch::tokenizers::{PostProcessorWrapper, Tokenizer, TruncationParams};
use cresset_torch::ReadOnly;

use crate::Mode;

/// Settings from the `[handler]` table.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_length: usize,
    pub max_batch_tokens: usize,
    pub doc_stride: usize,
    pub max_answer_len: usize,
    pub handle_impossible_answer: bool,
    pub max_new_tokens: usize,
    pub n_steps: usize,
    pub explain_batch: usize,
    pub multi_label: bool,
    /// Whether explanations are served (`captum_explanation`, the reference's switch).
    pub explanations: bool,
    /// `response_format = "torchserve"`: answers shaped as the reference handler's (sequence
    /// classification answers the label).
    pub torchserve_format: bool,
}

/// The network of a model version on one device.
pub(crate) enum Network {
    Encoder(Encoder),
    Decoder(Decoder),
}

/// A model version, shared by its workers.
pub struct NlpModel {
    pub(crate) mode: Mode,
    pub(crate) settings: Settings,
    pub(crate) tokenizer: Tokenizer,
    /// The tokenizer without its post-processor (QA encodes each sequence with it).
    pub(crate) bare_tokenizer: Tokenizer,
    pub(crate) labels: Vec<String>,
    pub(crate) pad_id: i64,
    pub(crate) cls_id: Option<u32>,
    pub(crate) eos_ids: Vec<i64>,
    /// Generation: the decoder's context in tokens.
    pub(crate) context: u64,
    dir: PathBuf,
    hf: HfConfig,
    dtype: Dtype,
    /// The weights per device (`Device`'s debug form), loaded by the first worker there.
    networks: Mutex<HashMap<String, Arc<ReadOnly<Network>>>>,
}

/// The id of the first of these tokens the tokenizer knows.
fn token_id(tokenizer: &Tokenizer, candidates: &[&str]) -> Option<u32> {
    candidates.iter().find_map(|t| tokenizer.token_to_id(t))
}

/// `[handler]` as this plugin reads it (any other key is refused, naming it), over the
/// archive's `setup_config.json` (the generalized NLP handler's settings file).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerKeys {
    /// The checkpoint folder in the archive (default: the archive's root).
    pub model_path: Option<String>,
    /// The task (default: from config.json's `architectures`).
    pub mode: Option<String>,
    /// The weights' dtype (default `auto`).
    pub dtype: Option<String>,
    pub max_length: Option<u64>,
    pub truncation: Option<bool>,
    pub max_batch_tokens: Option<u64>,
    pub doc_stride: Option<u64>,
    pub max_answer_len: Option<u64>,
    pub handle_impossible_answer: Option<bool>,
    pub max_new_tokens: Option<u64>,
    pub n_steps: Option<u64>,
    pub explain_batch: Option<u64>,
    pub labels_file: Option<String>,
    // The generalized NLP handler's names (its setup_config.json keys).
    /// The hub name the checkpoint was made from (kept, not fetched).
    pub model_name: Option<String>,
    /// Checked, not applied: tokenizer.json's normalizer decides.
    pub do_lower_case: Option<bool>,
    /// Must be the checkpoint's label count.
    pub num_labels: Option<u64>,
    /// Whether explanations are served (default true).
    pub captum_explanation: Option<bool>,
    /// Accepted: fused attention is always on.
    #[serde(rename = "BetterTransformer")]
    pub better_transformer: Option<bool>,
    pub response_format: Option<settings::ResponseFormat>,
    // In its setup_config.json too: how the checkpoint was saved, the embedding layer Captum
    // used, and switches for other runtimes (accepted; logged when on).
    pub save_mode: Option<String>,
    pub embedding_name: Option<String>,
    #[serde(rename = "FasterTransformer")]
    pub faster_transformer: Option<bool>,
    pub model_parallel: Option<bool>,
}

impl SharedModel for NlpModel {
    fn load(ctx: &LoadContext) -> Result<Self, PluginError> {
        // The generalized handler's archives carry their settings in setup_config.json.
        let merged = settings::merged_with_file(
            &ctx.model_dir,
            "setup_config.json",
            &ctx.handler_config,
            &[
                "max_length",
                "num_labels",
                "max_batch_tokens",
                "doc_stride",
                "max_answer_len",
                "max_new_tokens",
                "n_steps",
                "explain_batch",
            ],
        )?;
        let keys: HandlerKeys = settings::parse(&merged)?;
        for (key, on) in [
            ("FasterTransformer", keys.faster_transformer),
            ("model_parallel", keys.model_parallel),
        ] {
            if on == Some(true) {
                tracing::info!("`{key}` (the generalized handler's) has no effect here");
            }
        }
        let dir = settings::path_inside(
            &ctx.model_dir,
            "model_path",
            keys.model_path.as_deref().unwrap_or("."),
        )?;
        let hf = HfConfig::read(&dir).map_err(PluginError::from)?;
        let mode = match keys.mode.as_deref() {
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
        let dtype =
            Dtype::parse(keys.dtype.as_deref().unwrap_or("auto")).map_err(PluginError::from)?;
        // What the configuration says of the network, before any weight is read.
        let (model_limit, model_vocab, num_labels, model_pad) = if mode == Mode::TextGeneration {
            let c = DecoderConfig::from_hf(&hf).map_err(PluginError::from)?;
            (c.max_positions as usize, c.vocab_size, 0, None)
        } else {
            let c = EncoderConfig::from_hf(&hf).map_err(PluginError::from)?;
            (
                c.max_input_len() as usize,
                c.vocab_size,
                c.num_labels,
                Some(c.pad_token_id),
            )
        };
        // The reference handler's keys: `num_labels` must be the checkpoint's; `model_name` (the
        // hub name it was made from) and `do_lower_case` (tokenizer.json's normalizer decides)
        // are checked and kept; `BetterTransformer` asks for what is always on.
        if keys.num_labels.is_some() {
            let given = settings::within("num_labels", keys.num_labels, 1, 1 << 20)?;
            let classifies = matches!(
                mode,
                Mode::SequenceClassification | Mode::TokenClassification
            );
            if classifies && given as i64 != num_labels {
                return Err(PluginError::invalid_input(format!(
                    "`handler.num_labels` is {given} but the checkpoint's config.json has {num_labels} labels"
                )));
            }
        }
        if keys.model_name.is_some()
            || keys.do_lower_case.is_some()
            || keys.save_mode.is_some()
            || keys.embedding_name.is_some()
        {
            tracing::info!(
                model_name = ?keys.model_name,
                do_lower_case = ?keys.do_lower_case,
                save_mode = ?keys.save_mode,
                embedding_name = ?keys.embedding_name,
                "the generalized handler's descriptive settings are kept as given; the checkpoint \
                 and its tokenizer.json decide"
            );
        }
        if keys.better_transformer == Some(true) {
            tracing::info!("`handler.BetterTransformer`: fused attention is always on");
        }
        let max_length = settings::within(
            "max_length",
            keys.max_length,
            model_limit.min(512),
            model_limit,
        )?;
        let truncation = keys.truncation.unwrap_or(false);
        let doc_stride = settings::within(
            "doc_stride",
            keys.doc_stride,
            (max_length / 2).clamp(1, 128),
            max_length,
        )?;
        let settings = Settings {
            max_length,
            max_batch_tokens: settings::within(
                "max_batch_tokens",
                keys.max_batch_tokens,
                16_384,
                1 << 24,
            )?,
            doc_stride,
            max_answer_len: settings::within("max_answer_len", keys.max_answer_len, 15, 512)?,
            handle_impossible_answer: keys.handle_impossible_answer.unwrap_or(false),
            max_new_tokens: settings::within(
                "max_new_tokens",
                keys.max_new_tokens,
                32,
                model_limit,
            )?,
            n_steps: settings::within("n_steps", keys.n_steps, 50, 1000)?,
            explain_batch: settings::within("explain_batch", keys.explain_batch, 10, 1000)?,
            multi_label: hf.opt_str("problem_type").map_err(PluginError::from)?
                == Some("multi_label_classification"),
            explanations: keys.captum_explanation.unwrap_or(true),
            torchserve_format: keys.response_format == Some(settings::ResponseFormat::Torchserve),
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
            keys.labels_file.as_deref().unwrap_or("index_to_name.json"),
        )?;
        let mut labels = if labels_path.is_file() {
            cresset_torch::read_index_to_name(&labels_path).map_err(PluginError::from)?
        } else {
            hf.id2label().unwrap_or_default()
        };
        // Every class of the head has a name: `LABEL_i` where the files give none.
        let n = num_labels as usize;
        if labels.len() < n {
            labels.extend((labels.len()..n).map(|i| format!("LABEL_{i}")));
        }
        let pad_id = model_pad
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
        Ok(Self {
            mode,
            settings,
            tokenizer,
            bare_tokenizer,
            labels,
            pad_id,
            cls_id,
            eos_ids,
            context: model_limit as u64,
            dir,
            hf,
            dtype,
            networks: Mutex::new(HashMap::new()),
        })
    }
}

impl NlpModel {
    /// The dtype the network runs in on `device` (`dtype`, `"auto"` resolved).
    pub(crate) fn kind(&self, device: Device) -> Kind {
        self.dtype.resolve(device, false)
    }

    /// The network on `device`: loaded by the first worker there, shared by the others.
    pub(crate) fn network(&self, device: Device) -> Result<Arc<ReadOnly<Network>>, PluginError> {
        let key = format!("{device:?}");
        // Loading holds the lock: a second worker on the same device waits for the first one's
        // copy instead of loading its own.
        let mut networks = self
            .networks
            .lock()
            .map_err(|_| PluginError::internal("a worker panicked while loading the weights"))?;
        if let Some(n) = networks.get(&key) {
            return Ok(Arc::clone(n));
        }
        let kind = self.kind(device);
        let network = if self.mode == Mode::TextGeneration {
            Network::Decoder(
                Decoder::load(&self.dir, &self.hf, kind, device).map_err(PluginError::from)?,
            )
        } else {
            Network::Encoder(
                Encoder::load(&self.dir, &self.hf, self.mode.head(), kind, device)
                    .map_err(PluginError::from)?,
            )
        };
        let network = Arc::new(ReadOnly::new(network));
        networks.insert(key, Arc::clone(&network));
        Ok(network)
    }

    /// A class's label.
    pub(crate) fn label(&self, i: usize) -> String {
        self.labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{i}"))
    }
}
