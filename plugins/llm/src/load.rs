//! Loading a checkpoint folder: the model (a HuggingFace safetensors checkpoint or a GGUF file),
//! its tokenizer, its chat template and the special tokens generation needs.

use std::path::Path;

use cresset_plugin_api::sdk::settings;
use cresset_plugin_api::PluginError;
use cresset_torch::decoder::{Decoder, DecoderConfig, LoadOptions};
use cresset_torch::gguf::Gguf;
use cresset_torch::layers::HfConfig;
use cresset_torch::sentencepiece::SentencePiece;
use cresset_torch::tokenizers::Tokenizer;
use serde_json::Value;

/// A loaded model, its tokenizer and what generation needs from the checkpoint.
pub struct Loaded {
    /// The model.
    pub model: Decoder,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template (Jinja), if the checkpoint has one.
    pub chat_template: Option<String>,
    /// Token ids that end a sequence.
    pub eos_ids: Vec<i64>,
    /// The BOS token text, for templates.
    pub bos_token: String,
    /// The EOS token text, for templates.
    pub eos_token: String,
    /// A BOS id to put before text prompts (GGUF's `tokenizer.ggml.add_bos_token`); a
    /// `tokenizer.json` adds its own through its post-processor.
    pub add_bos: Option<i64>,
}

/// Decides how a model loads (dtype, devices, layer placement) once its configuration is
/// known and before any weight is read.
pub type Placer<'a> = dyn Fn(&DecoderConfig) -> Result<LoadOptions, PluginError> + 'a;

/// A tokenizer named apart from the checkpoint (`handler.tokenizer_path`, as GPT-fast names its
/// SentencePiece `tokenizer.model`): it replaces the checkpoint's own.
pub struct NamedTokenizer {
    tokenizer: Tokenizer,
    /// The SentencePiece model's BOS (put before text prompts, as GPT-fast does) and EOS ids.
    bos: Option<i64>,
    eos: Option<i64>,
}

impl NamedTokenizer {
    /// A `tokenizer.json`, or else a SentencePiece model.
    pub fn read(path: &Path) -> Result<Self, PluginError> {
        if path.extension().is_some_and(|x| x == "json") {
            let tokenizer = cresset_torch::load_tokenizer_file(path).map_err(PluginError::from)?;
            return Ok(Self {
                tokenizer,
                bos: None,
                eos: None,
            });
        }
        let sp = SentencePiece::open(path)
            .map_err(|e| PluginError::invalid_input(format!("`handler.tokenizer_path`: {e}")))?;
        Ok(Self {
            tokenizer: sp.tokenizer().map_err(PluginError::from)?,
            bos: sp.bos_id.map(i64::from),
            eos: sp.eos_id.map(i64::from),
        })
    }
}

/// Load a checkpoint folder: a `.gguf` (`model_file`, or the only one; Llama) or a HuggingFace
/// safetensors checkpoint (Llama, GPT-2 or BLOOM), loaded as `place` decides. A
/// `named` tokenizer replaces the checkpoint's, which is then not read.
pub fn load(
    dir: &Path,
    model_file: Option<&str>,
    named: Option<&NamedTokenizer>,
    place: &Placer<'_>,
) -> Result<Loaded, PluginError> {
    let gguf_path = settings::named_or_only_file(dir, "model_file", model_file, "gguf")?;
    let tokenizer_json = dir.join("tokenizer.json");
    let tokenizer_config: Option<Value> =
        std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let token_text = |key: &str| -> Option<String> {
        let v = tokenizer_config.as_ref()?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))
            .map(str::to_owned)
    };
    let mut gguf_bos: Option<i64> = None;
    let mut add_bos_id: Option<i64> = None;
    let (model, checkpoint_tokenizer, template, mut eos_ids) = match gguf_path {
        Some(path) => {
            let gguf = Gguf::open(&path).map_err(PluginError::from)?;
            let config = DecoderConfig::from_gguf(&gguf).map_err(PluginError::from)?;
            let model =
                Decoder::load_gguf_with(&gguf, &place(&config)?).map_err(PluginError::from)?;
            let tokenizer = if named.is_some() {
                None
            } else if tokenizer_json.is_file() {
                Some(cresset_torch::load_tokenizer(dir).map_err(PluginError::from)?)
            } else {
                Some(gguf.tokenizer().map_err(PluginError::from)?)
            };
            let template = gguf
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            // The end of a turn (Llama 3's `<|eot_id|>`) ends generation too.
            let eos: Vec<i64> = ["eos_token_id", "eot_token_id", "eom_token_id"]
                .iter()
                .filter_map(|k| {
                    gguf.get(&format!("tokenizer.ggml.{k}"))
                        .and_then(|v| v.as_u64())
                })
                .map(|v| v as i64)
                .collect();
            gguf_bos = gguf
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as i64);
            let add_bos = gguf
                .get("tokenizer.ggml.add_bos_token")
                .is_some_and(|v| *v == cresset_torch::gguf::Value::Bool(true));
            add_bos_id = gguf_bos.filter(|_| add_bos);
            (model, tokenizer, template, eos)
        }
        None => {
            let hf = HfConfig::read(dir).map_err(PluginError::from)?;
            let config = DecoderConfig::from_hf(&hf).map_err(PluginError::from)?;
            let model =
                Decoder::load_with(dir, &hf, &place(&config)?).map_err(PluginError::from)?;
            let tokenizer = match named {
                Some(_) => None,
                None => Some(cresset_torch::load_tokenizer(dir).map_err(PluginError::from)?),
            };
            let template = token_text("chat_template");
            let eos =
                cresset_torch::gpt2::generation_eos_ids(dir, &hf).map_err(PluginError::from)?;
            (model, tokenizer, template, eos)
        }
    };
    let tokenizer = match named {
        Some(named) => {
            gguf_bos = named.bos.or(gguf_bos);
            // GPT-fast puts BOS before every prompt.
            add_bos_id = named.bos;
            eos_ids.extend(named.eos.filter(|e| !eos_ids.contains(e)));
            named.tokenizer.clone()
        }
        None => checkpoint_tokenizer
            .ok_or_else(|| PluginError::internal("the checkpoint's tokenizer was not read"))?,
    };
    let id_text = |id: i64| tokenizer.id_to_token(id as u32).unwrap_or_default();
    let eos_token = token_text("eos_token")
        .or_else(|| eos_ids.first().map(|&i| id_text(i)))
        .unwrap_or_default();
    let bos_token = token_text("bos_token")
        .or_else(|| gguf_bos.map(id_text))
        .unwrap_or_default();
    if let Some(id) = tokenizer.token_to_id(&eos_token) {
        if !eos_ids.contains(&i64::from(id)) {
            eos_ids.push(i64::from(id));
        }
    }
    Ok(Loaded {
        model,
        tokenizer,
        chat_template: template,
        eos_ids,
        bos_token,
        eos_token,
        add_bos: add_bos_id,
    })
}
