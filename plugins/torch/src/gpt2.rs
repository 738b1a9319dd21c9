//! GPT-2's configuration (`GPT2LMHeadModel`) and the end-of-sequence ids generation stops at.
//! The model itself runs as a [`crate::decoder::Decoder`] of the GPT-2 family.

use std::path::Path;

use crate::layers::{Activation, HfConfig};
use crate::ModelError;

/// GPT-2's sizes from `config.json`.
#[derive(Debug, Clone)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Context length (`n_positions`).
    pub max_positions: i64,
    /// Hidden size (`n_embd`).
    pub hidden: i64,
    /// Layers.
    pub layers: i64,
    /// Heads.
    pub heads: i64,
    /// Feed-forward size (`n_inner`, default 4 × hidden).
    pub inner: i64,
    /// Layer norm epsilon.
    pub eps: f64,
    /// Activation.
    pub act: Activation,
}

impl Gpt2Config {
    /// Read from `config.json`.
    pub fn from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        match config.opt_str("model_type")? {
            Some("gpt2") => {}
            other => {
                return Err(ModelError::Config(format!(
                    "model_type {other:?} is not gpt2"
                )))
            }
        }
        if config.opt_bool("scale_attn_by_inverse_layer_idx")? == Some(true) {
            return Err(ModelError::Config(
                "scale_attn_by_inverse_layer_idx is not supported".into(),
            ));
        }
        if config.opt_bool("scale_attn_weights")? == Some(false) {
            return Err(ModelError::Config(
                "scale_attn_weights = false is not supported".into(),
            ));
        }
        let hidden = config.usize("n_embd")?;
        Ok(Self {
            vocab_size: config.usize("vocab_size")?,
            max_positions: match config.opt_usize("n_positions")? {
                Some(n) => n,
                None => config.usize("n_ctx")?,
            },
            hidden,
            layers: config.usize("n_layer")?,
            heads: config.usize("n_head")?,
            inner: config.opt_usize("n_inner")?.unwrap_or(4 * hidden),
            eps: config.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            act: Activation::parse(config.opt_str("activation_function")?.unwrap_or("gelu_new"))?,
        })
    }
}

/// The end-of-sequence ids generation stops at, as transformers decides them: from
/// `generation_config.json` when the checkpoint has one (where a missing `eos_token_id` means
/// none), else from `config.json`.
pub fn generation_eos_ids(dir: &Path, config: &HfConfig) -> Result<Vec<i64>, ModelError> {
    if dir.join("generation_config.json").is_file() {
        let text = std::fs::read_to_string(dir.join("generation_config.json"))
            .map_err(|e| ModelError::Config(format!("cannot read generation_config.json: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("generation_config.json is not JSON: {e}")))?;
        return HfConfig::from_value(value).token_ids("eos_token_id");
    }
    config.token_ids("eos_token_id")
}
