//! A decoder's configuration: its sizes, and the decisions that differ between the three
//! families ([`Family`]), parsed from a HuggingFace `config.json` or a GGUF file's metadata.
//!
//! The rest of the decoder asks the configuration one question per decision
//! ([`DecoderConfig::gated_mlp`], [`DecoderConfig::positions`], [`DecoderConfig::layer_norm`],
//! [`DecoderConfig::embedding_norm`]) and never the family, so that a new family is a new arm
//! here and in the checkpoint's naming, not a check scattered through the forward pass.

use crate::gguf::Gguf;
use crate::layers::{Activation, HfConfig};
use crate::ModelError;

/// The decoder families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// RMSNorm, RoPE, SwiGLU.
    Llama,
    /// LayerNorm, learned positions, GELU MLP.
    Gpt2,
    /// LayerNorm, ALiBi, GELU MLP.
    Bloom,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's scheme: low frequencies divided by `factor`, high ones kept, a smooth ramp
    /// between.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelength bound (in units of the original context) of the low band.
        low_freq_factor: f64,
        /// Wavelength bound of the high band.
        high_freq_factor: f64,
        /// The context the model was trained with.
        original_max_position_embeddings: f64,
    },
    /// Every frequency divided by `factor` (position interpolation).
    Linear {
        /// The divisor.
        factor: f64,
    },
}

/// A decoder's sizes and family.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// The family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden: i64,
    /// Decoder layers.
    pub layers: i64,
    /// Query heads.
    pub heads: i64,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: i64,
    /// Per-head size.
    pub head_dim: i64,
    /// Feed-forward inner size.
    pub intermediate: i64,
    /// Norm epsilon.
    pub eps: f64,
    /// RoPE base (Llama).
    pub rope_theta: f64,
    /// RoPE rescaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Context length (BLOOM has none; its value is a bound for caches).
    pub max_positions: i64,
    /// Whether the output projection is the embedding matrix.
    pub tie_embeddings: bool,
    /// Whether the q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
    /// The MLP activation (Llama's is SiLU, gated).
    pub act: Activation,
}

/// How a decoder tells the positions of tokens apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Rotary embeddings applied to queries and keys in every layer (Llama).
    Rotary,
    /// A learned table added to the word embeddings (GPT-2).
    Learned,
    /// ALiBi: a per-head bias on the attention scores, growing with the key's position (BLOOM).
    Alibi,
}

impl DecoderConfig {
    /// From a HuggingFace `config.json` (`model_type` llama, mistral, gpt2 or bloom).
    pub fn from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        match config.opt_str("model_type")? {
            Some("llama") | Some("mistral") => Self::llama_from_hf(config),
            Some("gpt2") => {
                let g = crate::gpt2::Gpt2Config::from_hf(config)?;
                Ok(Self {
                    family: Family::Gpt2,
                    vocab_size: g.vocab_size,
                    hidden: g.hidden,
                    layers: g.layers,
                    heads: g.heads,
                    kv_heads: g.heads,
                    head_dim: if g.heads > 0 { g.hidden / g.heads } else { 0 },
                    intermediate: g.inner,
                    eps: g.eps,
                    rope_theta: 0.0,
                    rope_scaling: None,
                    max_positions: g.max_positions,
                    tie_embeddings: true,
                    attention_bias: true,
                    mlp_bias: true,
                    act: g.act,
                })
            }
            Some("bloom") => {
                let b = crate::bloom::BloomConfig::from_hf(config)?;
                Ok(Self {
                    family: Family::Bloom,
                    vocab_size: b.vocab_size,
                    hidden: b.hidden,
                    layers: b.layers,
                    heads: b.heads,
                    kv_heads: b.heads,
                    head_dim: b.hidden / b.heads,
                    intermediate: 4 * b.hidden,
                    eps: b.eps,
                    rope_theta: 0.0,
                    rope_scaling: None,
                    // ALiBi has no trained context; this only bounds caches.
                    max_positions: 1 << 20,
                    tie_embeddings: true,
                    attention_bias: true,
                    mlp_bias: true,
                    act: Activation::GeluTanh,
                })
            }
            other => Err(ModelError::Config(format!(
                "model_type {other:?} is not a supported causal LM (llama, mistral, gpt2, bloom)"
            ))),
        }
    }

    fn llama_from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        if !matches!(config.opt_str("hidden_act")?, None | Some("silu")) {
            return Err(ModelError::Config(
                "llama: only hidden_act \"silu\" is supported".into(),
            ));
        }
        let hidden = config.usize("hidden_size")?;
        let heads = config.usize("num_attention_heads")?;
        // transformers 5 writes `rope_parameters` (theta and type together); older configs
        // have `rope_theta` and `rope_scaling`.
        let params = config
            .value()
            .get("rope_parameters")
            .filter(|v| v.is_object());
        let scaling =
            params.or_else(|| config.value().get("rope_scaling").filter(|v| v.is_object()));
        let rope_scaling = match scaling {
            Some(v) => parse_rope_scaling(v)?,
            None => None,
        };
        let rope_theta = match params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
        {
            Some(theta) => theta,
            None => config.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        Ok(Self {
            family: Family::Llama,
            vocab_size: config.usize("vocab_size")?,
            hidden,
            layers: config.usize("num_hidden_layers")?,
            heads,
            kv_heads: config.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim: config
                .opt_usize("head_dim")?
                .unwrap_or(hidden / heads.max(1)),
            intermediate: config.usize("intermediate_size")?,
            eps: config.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_positions: config.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_embeddings: config.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: config.opt_bool("attention_bias")?.unwrap_or(false),
            mlp_bias: config.opt_bool("mlp_bias")?.unwrap_or(false),
            act: Activation::Silu,
        })
    }

    /// From a GGUF file's `llama.*` metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        let arch = gguf.str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Config(format!(
                "GGUF architecture {arch:?} is not llama"
            )));
        }
        let int = |key: &str| -> Result<i64, ModelError> {
            let v = gguf.u64(&format!("llama.{key}"))?;
            i64::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < 1 << 32)
                .ok_or_else(|| {
                    ModelError::Config(format!("GGUF `llama.{key}` = {v} is out of range"))
                })
        };
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let float = |key: &str| gguf.get(&format!("llama.{key}")).and_then(|v| v.as_f64());
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => gguf
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|t| t.len() as i64)
                .ok_or_else(|| ModelError::Config("GGUF has no vocabulary size".into()))?,
        };
        let rope_scaling = match gguf.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: float("rope.scaling.factor").unwrap_or(1.0),
            }),
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "GGUF rope scaling {other:?} is not supported (linear; Llama 3's comes as `rope_freqs.weight`)"
                )))
            }
        };
        Ok(Self {
            family: Family::Llama,
            vocab_size,
            hidden,
            layers: int("block_count")?,
            heads,
            kv_heads: int("attention.head_count_kv").unwrap_or(heads),
            head_dim: match int("rope.dimension_count") {
                Ok(d) => d,
                Err(_) => hidden / heads,
            },
            intermediate: int("feed_forward_length")?,
            eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_positions: int("context_length")?,
            tie_embeddings: !gguf.tensors.contains_key("output.weight"),
            attention_bias: false,
            mlp_bias: false,
            act: Activation::Silu,
        })
    }

    /// Whether the MLP is gated (Llama's SwiGLU: gate and up projections stacked).
    pub fn gated_mlp(&self) -> bool {
        self.family == Family::Llama
    }

    /// How positions are told apart.
    pub fn positions(&self) -> Positions {
        match self.family {
            Family::Llama => Positions::Rotary,
            Family::Gpt2 => Positions::Learned,
            Family::Bloom => Positions::Alibi,
        }
    }

    /// Whether the norms are LayerNorms (a weight and a bias) rather than RMSNorms (a weight).
    pub fn layer_norm(&self) -> bool {
        self.family != Family::Llama
    }

    /// Whether a norm follows the word embeddings (BLOOM).
    pub fn embedding_norm(&self) -> bool {
        self.family == Family::Bloom
    }

    /// Check the sizes are usable.
    pub fn validate(&self) -> Result<(), ModelError> {
        let sizes = [
            self.vocab_size,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.intermediate,
            self.max_positions,
        ];
        if sizes.iter().any(|&n| n <= 0) {
            return Err(ModelError::Config(format!(
                "every size must be positive: {sizes:?}"
            )));
        }
        let rope = self.positions() == Positions::Rotary;
        if self.heads % self.kv_heads != 0 || (rope && self.head_dim % 2 != 0) {
            return Err(ModelError::Config(format!(
                "{} query heads cannot share {} key/value heads (or head_dim {} is odd)",
                self.heads, self.kv_heads, self.head_dim
            )));
        }
        if self.layers > 1024 || self.max_positions > 1 << 22 {
            return Err(ModelError::Config(
                "implausible layer count or context length".into(),
            ));
        }
        Ok(())
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>, ModelError> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str, default: Option<f64>| {
        v.get(key)
            .and_then(|x| x.as_f64())
            .or(default)
            .ok_or_else(|| ModelError::Config(format!("rope scaling: `{key}` is missing")))
    };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor", None)?,
            low_freq_factor: num("low_freq_factor", Some(1.0))?,
            high_freq_factor: num("high_freq_factor", Some(4.0))?,
            original_max_position_embeddings: num(
                "original_max_position_embeddings",
                Some(8192.0),
            )?,
        })),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor", None)?,
        })),
        other => Err(ModelError::Config(format!(
            "rope scaling type {other:?} is not supported (default, llama3, linear)"
        ))),
    }
}

/// A small configuration of `family` for unit tests.
#[cfg(test)]
pub(super) fn tiny(family: Family) -> DecoderConfig {
    DecoderConfig {
        family,
        vocab_size: 10,
        hidden: 8,
        layers: 2,
        heads: 2,
        kv_heads: 2,
        head_dim: 4,
        intermediate: 16,
        eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_positions: 16,
        tie_embeddings: true,
        attention_bias: family != Family::Llama,
        mlp_bias: family != Family::Llama,
        act: Activation::GeluTanh,
    }
}
