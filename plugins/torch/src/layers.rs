//! What the architectures share besides their layers (the crate's one linear layer and one
//! norm are [`crate::decoder::Linear`] and [`crate::decoder::Norm`]): activations, reading
//! `config.json`, dtypes and head reshaping.

use std::path::Path;

use serde_json::Value;
use tch::{Kind, Tensor};

use crate::ModelError;

/// The activations HuggingFace configs name in `hidden_act` / `activation` /
/// `activation_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU: `gelu`.
    Gelu,
    /// The tanh approximation: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parse a config's activation name.
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(ModelError::Config(format!(
                    "activation {other:?} is not supported (supported: gelu, gelu_new, \
                     gelu_pytorch_tanh, gelu_fast, quick_gelu, relu, silu)"
                )))
            }
        })
    }

    /// Apply.
    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// A model's `config.json`, with typed getters whose errors name the key.
pub struct HfConfig {
    value: Value,
    path: String,
}

impl HfConfig {
    /// Read `config.json` from a checkpoint directory.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Config(format!("cannot read {}: {e}", path.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{} is not JSON: {e}", path.display())))?;
        if !value.is_object() {
            return Err(ModelError::Config(format!(
                "{} must hold a JSON object",
                path.display()
            )));
        }
        Ok(Self {
            value,
            path: path.display().to_string(),
        })
    }

    /// Wrap an already parsed value (tests).
    pub fn from_value(value: Value) -> Self {
        Self {
            value,
            path: "config.json".into(),
        }
    }

    /// The raw JSON.
    pub fn value(&self) -> &Value {
        &self.value
    }

    fn bad(&self, key: &str, wanted: &str) -> ModelError {
        ModelError::Config(format!("{}: `{key}` must be {wanted}", self.path))
    }

    /// A string, if present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }

    /// A positive integer, if present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<i64>, ModelError> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n < (1 << 40))
                .map(|n| Some(n as i64))
                .ok_or_else(|| self.bad(key, "a positive integer")),
        }
    }

    /// A positive integer, required.
    pub fn usize(&self, key: &str) -> Result<i64, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::Config(format!("{}: `{key}` is missing", self.path)))
    }

    /// A number, if present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, "a number")),
        }
    }

    /// A boolean, if present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    /// A token id (`pad_token_id`, `eos_token_id`, …): an integer or a list of them.
    pub fn token_ids(&self, key: &str) -> Result<Vec<i64>, ModelError> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Number(n)) => n
                .as_i64()
                .filter(|&n| n >= 0)
                .map(|n| vec![n])
                .ok_or_else(|| self.bad(key, "a token id")),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64()
                        .filter(|&n| n >= 0)
                        .ok_or_else(|| self.bad(key, "token ids"))
                })
                .collect(),
            Some(_) => Err(self.bad(key, "a token id or a list of them")),
        }
    }

    /// `architectures[0]`, if any.
    pub fn architecture(&self) -> Option<&str> {
        self.value
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
    }

    /// `id2label` in index order, if the config has one.
    pub fn id2label(&self) -> Option<Vec<String>> {
        let map = self.value.get("id2label")?.as_object()?;
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_owned())))
            .collect();
        pairs.sort();
        pairs
            .iter()
            .enumerate()
            .all(|(i, (k, _))| i == *k)
            .then(|| pairs.into_iter().map(|(_, v)| v).collect())
    }
}

/// A handler's `dtype` setting: a named dtype, or `"auto"` (chosen for the device: see
/// [`Dtype::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `"auto"`.
    Auto,
    /// A named dtype.
    Fixed(Kind),
}

impl Dtype {
    /// Parse a `dtype` setting: `"auto"` or a name [`parse_dtype`] takes.
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        match name {
            "auto" => Ok(Self::Auto),
            other => parse_dtype(other).map(Self::Fixed).map_err(|_| {
                ModelError::Config(format!(
                    "`dtype` {other:?} is not supported (auto, float32, float16, bfloat16 or float64)"
                ))
            }),
        }
    }

    /// The dtype to run in on `device`. `"auto"` is bf16 on a CPU with native bf16 arithmetic
    /// (AVX512-BF16 or AMX: measured faster there, see BENCHMARKS.md) and f32 on other CPUs and
    /// on GPUs, unless `quantized`: weight-only quantized layers compute in bf16 inside their
    /// kernels whatever the activations are, and f32 activations around them were measured as
    /// fast and closer to the dense model (so they stay f32).
    pub fn resolve(self, device: tch::Device, quantized: bool) -> Kind {
        match self {
            Self::Fixed(kind) => kind,
            Self::Auto if device == tch::Device::Cpu && !quantized && cpu_has_native_bf16() => {
                Kind::BFloat16
            }
            Self::Auto => Kind::Float,
        }
    }
}

pub use cresset_plan::cpu_has_native_bf16;

/// The floating dtype a config or handler asks for: `float32`/`f32`, `float16`/`f16`/`half`,
/// `bfloat16`/`bf16`.
pub fn parse_dtype(name: &str) -> Result<Kind, ModelError> {
    Ok(match name {
        "float32" | "f32" | "fp32" | "float" => Kind::Float,
        "float16" | "f16" | "fp16" | "half" => Kind::Half,
        "bfloat16" | "bf16" => Kind::BFloat16,
        // Accelerate's reference handler offers it; the dense decoder runs in it (slowly).
        "float64" | "f64" | "double" => Kind::Double,
        other => {
            return Err(ModelError::Config(format!(
                "dtype {other:?} is not supported (float32, float16, bfloat16 or float64)"
            )))
        }
    })
}

/// Split `[b, s, heads*dim]` into `[b, heads, s, dim]`.
pub fn split_heads(x: &Tensor, heads: i64) -> Tensor {
    let size = x.size();
    let (b, s, h) = (size[0], size[1], size[2]);
    x.view([b, s, heads, h / heads]).transpose(1, 2)
}

/// Merge `[b, heads, s, dim]` back into `[b, s, heads*dim]`.
pub fn merge_heads(x: &Tensor) -> Tensor {
    let size = x.size();
    let (b, heads, s, d) = (size[0], size[1], size[2], size[3]);
    x.transpose(1, 2).contiguous().view([b, s, heads * d])
}
