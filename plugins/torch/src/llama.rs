//! The Llama architecture (`LlamaForCausalLM`): RMSNorm, rotary position embeddings (with the
//! `rope_scaling` types Llama 3 uses), SwiGLU, grouped-query attention, tied or untied
//! embeddings. Weights come from a HuggingFace checkpoint (`config.json` + safetensors) or a
//! GGUF file (dequantized at load, llama.cpp's q/k row permutation undone).
//!
//! The KV cache ([`SlotCache`]) is allocated once with one slot per running sequence; a step
//! writes each sequence's new keys and values at its own position, in place, and reads the
//! rows as a view when the running slots are `0..n` (a gather otherwise).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::gguf::{unpermute_qk, Gguf};
use crate::layers::{HfConfig, Linear};
use crate::weights::Weights;
use crate::ModelError;

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

/// Llama's sizes.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
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
    /// SwiGLU inner size.
    pub intermediate: i64,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Context length.
    pub max_positions: i64,
    /// Whether the output projection is the embedding matrix.
    pub tie_embeddings: bool,
    /// Whether q/k/v/o projections have biases (Qwen-style checkpoints).
    pub attention_bias: bool,
}

impl LlamaConfig {
    /// From a HuggingFace `config.json`.
    pub fn from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        match config.opt_str("model_type")? {
            Some("llama") | Some("mistral") => {}
            other => {
                return Err(ModelError::Config(format!(
                    "model_type {other:?} is not llama"
                )))
            }
        }
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
        if config.opt_bool("mlp_bias")? == Some(true) {
            return Err(ModelError::Config(
                "llama: mlp_bias is not supported".into(),
            ));
        }
        Ok(Self {
            vocab_size: config.usize("vocab_size")?,
            hidden,
            layers: config.usize("num_hidden_layers")?,
            heads,
            kv_heads: config.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim: config.opt_usize("head_dim")?.unwrap_or(hidden / heads),
            intermediate: config.usize("intermediate_size")?,
            eps: config.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_positions: config.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_embeddings: config.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: config.opt_bool("attention_bias")?.unwrap_or(false),
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
        })
    }

    fn validate(&self) -> Result<(), ModelError> {
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
        if self.heads % self.kv_heads != 0 || self.head_dim % 2 != 0 {
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

    /// The inverse frequencies of the rotary embedding, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
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

/// One tensor-parallel part of a layer: some attention heads (with their key/value heads) and
/// some feed-forward columns, on one device. An unsharded layer has one part with all of them.
struct Part {
    heads: i64,
    kv_heads: i64,
    inter: i64,
    qkv: Linear,
    o_proj: Linear,
    gate_up: Linear,
    down: Linear,
    device: Device,
    /// Set when the weights live in this file (disk offload) and are read for each use.
    offloaded: Option<PathBuf>,
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    parts: Vec<Part>,
}

/// Split `total` into `n` near-equal counts (the first ones one larger).
fn split_counts(total: i64, n: i64) -> Vec<i64> {
    (0..n)
        .map(|i| total / n + i64::from(i < total % n))
        .collect()
}

const PART_TENSORS: [&str; 4] = ["qkv", "o_proj", "gate_up", "down"];

impl Part {
    fn linears(&self) -> [&Linear; 4] {
        [&self.qkv, &self.o_proj, &self.gate_up, &self.down]
    }

    /// Write the weights to `path` (safetensors) and let them go from memory.
    fn offload(&mut self, path: &Path) -> Result<(), ModelError> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (name, linear) in PART_TENSORS.iter().zip(self.linears()) {
            named.push((format!("{name}.weight"), &linear.weight));
            if let Some(b) = &linear.bias {
                named.push((format!("{name}.bias"), b));
            }
        }
        Tensor::write_safetensors(&named, path)?;
        for linear in [
            &mut self.qkv,
            &mut self.o_proj,
            &mut self.gate_up,
            &mut self.down,
        ] {
            linear.weight = Tensor::zeros([0], (Kind::Float, Device::Cpu));
            linear.bias = None;
        }
        self.offloaded = Some(path.to_path_buf());
        Ok(())
    }

    /// This part with its weights read from `bytes` (the offload file's contents).
    fn with_weights(&self, path: &Path, bytes: &[u8], kind: Kind) -> Result<Part, ModelError> {
        let header = crate::weights::parse_header(path, bytes, bytes.len() as u64)?;
        let tensor = |name: &str| -> Result<Option<Tensor>, ModelError> {
            let Some(info) = header.tensors.get(name) else {
                return Ok(None);
            };
            let start = (header.data_start + info.data_offsets[0]) as usize;
            let end = (header.data_start + info.data_offsets[1]) as usize;
            let src = crate::weights::kind_of_dtype(&info.dtype).ok_or_else(|| {
                ModelError::Checkpoint(format!("{}: dtype {}", path.display(), info.dtype))
            })?;
            let t = Tensor::f_from_data_size(&bytes[start..end], &info.shape, src)?;
            Ok(Some(t.to_kind(kind).to_device(self.device)))
        };
        let linear = |name: &str| -> Result<Linear, ModelError> {
            Ok(Linear {
                weight: tensor(&format!("{name}.weight"))?.ok_or_else(|| {
                    ModelError::Checkpoint(format!("{}: no {name}.weight", path.display()))
                })?,
                bias: tensor(&format!("{name}.bias"))?,
            })
        };
        Ok(Part {
            heads: self.heads,
            kv_heads: self.kv_heads,
            inter: self.inter,
            qkv: linear("qkv")?,
            o_proj: linear("o_proj")?,
            gate_up: linear("gate_up")?,
            down: linear("down")?,
            device: self.device,
            offloaded: None,
        })
    }

    /// Cut this (whole) part into `devices.len()` parts: key/value heads (with their query
    /// heads) and feed-forward columns split as evenly as they go.
    fn split(&self, head_dim: i64, devices: &[Device]) -> Vec<Part> {
        let n = devices.len() as i64;
        let group = self.heads / self.kv_heads;
        let kv_counts = split_counts(self.kv_heads, n);
        let inter_counts = split_counts(self.inter, n);
        let q_rows = self.heads * head_dim;
        let kv_rows = self.kv_heads * head_dim;
        let (mut kv_at, mut inter_at) = (0, 0);
        let rows = |w: &Tensor, ranges: &[(i64, i64)]| {
            let pieces: Vec<Tensor> = ranges.iter().map(|&(a, len)| w.narrow(0, a, len)).collect();
            Tensor::cat(&pieces, 0)
        };
        let mut parts = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let (kv, inter) = (kv_counts[i], inter_counts[i]);
            let (q_at, q_len) = (kv_at * group * head_dim, kv * group * head_dim);
            let (k_at, k_len) = (kv_at * head_dim, kv * head_dim);
            let qkv_ranges = [
                (q_at, q_len),
                (q_rows + k_at, k_len),
                (q_rows + kv_rows + k_at, k_len),
            ];
            let gu_ranges = [(inter_at, inter), (self.inter + inter_at, inter)];
            let on = |t: Tensor| t.to_device(*device);
            parts.push(Part {
                heads: kv * group,
                kv_heads: kv,
                inter,
                qkv: Linear {
                    weight: on(rows(&self.qkv.weight, &qkv_ranges)),
                    bias: self.qkv.bias.as_ref().map(|b| on(rows(b, &qkv_ranges))),
                },
                o_proj: Linear {
                    weight: on(self.o_proj.weight.narrow(1, q_at, q_len)),
                    bias: None,
                },
                gate_up: Linear {
                    weight: on(rows(&self.gate_up.weight, &gu_ranges)),
                    bias: None,
                },
                down: Linear {
                    weight: on(self.down.weight.narrow(1, inter_at, inter)),
                    bias: None,
                },
                device: *device,
                offloaded: None,
            });
            kv_at += kv;
            inter_at += inter;
        }
        parts
    }
}

/// A loaded Llama.
pub struct Llama {
    /// Its configuration.
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `[max_positions, head_dim]` cos and signed sin tables (see `assemble`), in the model's
    /// dtype.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    kind: Kind,
}

/// Per-layer caches of keys and values, `[slots, kv_heads, capacity, head_dim]` per
/// tensor-parallel part (on the part's device, with its key/value heads), allocated once. Each
/// slot holds one sequence; `lens[slot]` positions of it are filled.
pub struct SlotCache {
    keys: Vec<Vec<Tensor>>,
    values: Vec<Vec<Tensor>>,
    /// Filled positions per slot.
    pub lens: Vec<i64>,
    /// Positions per slot.
    pub capacity: i64,
}

impl SlotCache {
    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    if x.kind() == Kind::Float {
        // libtorch's fused kernel: one op instead of five.
        let size = x.size()[x.dim() - 1];
        return x.rms_norm([size], Some(weight), eps);
    }
    // In f32, then back, as transformers does for half types.
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let variance = xf
        .pow_tensor_scalar(2)
        .mean_dim([-1i64].as_slice(), true, Kind::Float);
    let normed = (xf * (variance + eps).rsqrt()).to_kind(kind);
    weight * normed
}

impl Llama {
    /// Load from a HuggingFace checkpoint directory.
    pub fn load(
        dir: &Path,
        config: &HfConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_hf(config)?;
        cfg.validate()?;
        let mut w = Weights::load(dir, kind, device)?;
        let mut take = |name: &str, shape: &[i64]| w.take(name, shape);
        let mut tensors = HashMap::new();
        for (name, shape) in weight_shapes(&cfg) {
            let hf = hf_name(&name);
            let t = if name == "lm_head" && cfg.tie_embeddings {
                continue;
            } else {
                take(&hf, &shape)?
            };
            tensors.insert(name, t);
        }
        if cfg.attention_bias {
            let kv = cfg.kv_heads * cfg.head_dim;
            for l in 0..cfg.layers {
                for (p, n) in [("q", cfg.heads * cfg.head_dim), ("k", kv), ("v", kv)] {
                    let t = take(&format!("model.layers.{l}.self_attn.{p}_proj.bias"), &[n])?;
                    tensors.insert(format!("{l}.{p}.bias"), t);
                }
            }
        }
        Self::assemble(cfg, tensors, kind, device)
    }

    /// Load from a GGUF file, dequantizing to `kind`.
    pub fn load_gguf(gguf: &Gguf, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        cfg.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape) in weight_shapes(&cfg) {
            if name == "lm_head" && cfg.tie_embeddings {
                continue;
            }
            let t = gguf.tensor(&gguf_name(&name), kind, device)?;
            if t.size() != shape {
                return Err(ModelError::Checkpoint(format!(
                    "GGUF tensor for {name} has shape {:?}, the metadata implies {shape:?}",
                    t.size()
                )));
            }
            let t = if name.ends_with(".q") {
                unpermute_qk(&t, cfg.heads)
            } else if name.ends_with(".k") {
                unpermute_qk(&t, cfg.kv_heads)
            } else {
                t
            };
            tensors.insert(name, t);
        }
        // Llama 3.1+ GGUFs carry their RoPE scaling as per-frequency divisors.
        if gguf.tensors.contains_key("rope_freqs.weight") {
            let factors = gguf.tensor("rope_freqs.weight", Kind::Float, Device::Cpu)?;
            if factors.size() != [cfg.head_dim / 2] {
                return Err(ModelError::Checkpoint(format!(
                    "rope_freqs.weight has shape {:?}; head_dim {} needs [{}]",
                    factors.size(),
                    cfg.head_dim,
                    cfg.head_dim / 2
                )));
            }
            tensors.insert("rope_freqs".into(), factors);
        }
        Self::assemble(cfg, tensors, kind, device)
    }

    fn assemble(
        cfg: LlamaConfig,
        mut t: HashMap<String, Tensor>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        let mut get = |name: &str| {
            t.remove(name)
                .ok_or_else(|| ModelError::Checkpoint(format!("missing weight {name}")))
        };
        let embed = get("embed")?;
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let mut bias = |p: &str| t_bias(&mut get, &format!("{l}.{p}.bias"), cfg.attention_bias);
            let (qb, kb, vb) = (bias("q")?, bias("k")?, bias("v")?);
            let q = Linear {
                weight: get(&format!("{l}.q"))?,
                bias: qb,
            };
            let k = Linear {
                weight: get(&format!("{l}.k"))?,
                bias: kb,
            };
            let v = Linear {
                weight: get(&format!("{l}.v"))?,
                bias: vb,
            };
            let gate = Linear {
                weight: get(&format!("{l}.gate"))?,
                bias: None,
            };
            let up = Linear {
                weight: get(&format!("{l}.up"))?,
                bias: None,
            };
            layers.push(Layer {
                input_norm: get(&format!("{l}.input_norm"))?,
                post_norm: get(&format!("{l}.post_norm"))?,
                parts: vec![Part {
                    heads: cfg.heads,
                    kv_heads: cfg.kv_heads,
                    inter: cfg.intermediate,
                    qkv: Linear::fuse(&[q, k, v]),
                    o_proj: Linear {
                        weight: get(&format!("{l}.o"))?,
                        bias: None,
                    },
                    gate_up: Linear::fuse(&[gate, up]),
                    down: Linear {
                        weight: get(&format!("{l}.down"))?,
                        bias: None,
                    },
                    device,
                    offloaded: None,
                }],
            });
        }
        let norm = get("norm")?;
        let lm_head = if cfg.tie_embeddings {
            embed.shallow_clone()
        } else {
            get("lm_head")?
        };
        let mut inv_freq = Tensor::from_slice(&cfg.inv_freq()).to_kind(Kind::Float);
        if let Some(factors) = t.remove("rope_freqs") {
            inv_freq = inv_freq / factors.to_kind(Kind::Float);
        }
        let positions = Tensor::arange(cfg.max_positions, (Kind::Float, Device::Cpu));
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos().to_kind(kind).to_device(device);
        // rotate_half(x) = cat(−x2, x1) = roll(x, d/2) · (−1 on the first half): the sign goes
        // into the sin table.
        let half = cfg.head_dim / 2;
        let sign = Tensor::cat(
            &[
                Tensor::full([half], -1.0, (Kind::Float, Device::Cpu)),
                Tensor::ones([half], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let sin = (emb.sin() * sign).to_kind(kind).to_device(device);
        Ok(Self {
            config: cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            kind,
        })
    }

    /// The device of the embeddings, norms and head (and of an unsharded model's layers).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Tensor parallelism: split every layer's attention heads (query heads with their
    /// key/value heads) and feed-forward columns over `devices`, so that each holds a share of
    /// the weights and, in its caches, of the KV cache. Partial outputs are summed on the
    /// model's device after each attention and feed-forward block (an all-reduce by copies and
    /// a sum; there is no NCCL). Uneven splits are allowed; a part may have no heads.
    pub fn shard(mut self, devices: &[Device]) -> Result<Self, ModelError> {
        if devices.is_empty() || devices.len() as i64 > self.config.intermediate {
            return Err(ModelError::Config(format!(
                "tensor parallelism over {} devices is not possible",
                devices.len()
            )));
        }
        if !self.offloaded_layers().is_empty() {
            return Err(ModelError::Config(
                "tensor parallelism cannot be combined with disk offload".into(),
            ));
        }
        let hd = self.config.head_dim;
        for layer in &mut self.layers {
            let whole = match layer.parts.as_slice() {
                [one] => one,
                _ => return Err(ModelError::Config("the model is already sharded".into())),
            };
            layer.parts = whole.split(hd, devices);
        }
        Ok(self)
    }

    /// Disk offload: write the weights of `layers` to safetensors files in `folder` and free
    /// them from memory. Each forward pass reads an offloaded layer's file when it reaches the
    /// layer (the next one is read ahead on another thread while the current one computes) and
    /// drops the weights after use, so at most two offloaded layers are in memory at a time.
    pub fn offload_layers(mut self, layers: &[usize], folder: &Path) -> Result<Self, ModelError> {
        std::fs::create_dir_all(folder).map_err(|e| {
            ModelError::Checkpoint(format!("cannot create {}: {e}", folder.display()))
        })?;
        for &l in layers {
            let layer = self
                .layers
                .get_mut(l)
                .ok_or_else(|| ModelError::Config(format!("there is no layer {l} to offload")))?;
            for (p, part) in layer.parts.iter_mut().enumerate() {
                part.offload(&folder.join(format!("layer-{l}-part-{p}.safetensors")))?;
            }
        }
        Ok(self)
    }

    /// What the device-map planner places: the embeddings, each decoder layer (whole), the
    /// final norm and the output head (empty when tied), with their bytes.
    pub fn modules(&self) -> Vec<cresset_plan::Module> {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let linear = |l: &Linear| bytes(&l.weight) + l.bias.as_ref().map_or(0, bytes);
        let mut out = vec![cresset_plan::Module {
            name: "model.embed_tokens".into(),
            bytes: bytes(&self.embed),
            layer: None,
        }];
        for (l, layer) in self.layers.iter().enumerate() {
            let parts: u64 = layer
                .parts
                .iter()
                .map(|p| p.linears().iter().map(|x| linear(x)).sum::<u64>())
                .sum();
            out.push(cresset_plan::Module {
                name: format!("model.layers.{l}"),
                bytes: parts + bytes(&layer.input_norm) + bytes(&layer.post_norm),
                layer: Some(l),
            });
        }
        out.push(cresset_plan::Module {
            name: "model.norm".into(),
            bytes: bytes(&self.norm),
            layer: None,
        });
        let tied = self.config.tie_embeddings;
        out.push(cresset_plan::Module {
            name: "lm_head".into(),
            bytes: if tied { 0 } else { bytes(&self.lm_head) },
            layer: None,
        });
        out
    }

    /// Move layer `l`'s weights (and so its part of the KV cache) to `device`. The
    /// embeddings, norms and head stay on the model's device; activations cross over.
    pub fn place_layer(&mut self, l: usize, device: Device) -> Result<(), ModelError> {
        let layer = self
            .layers
            .get_mut(l)
            .ok_or_else(|| ModelError::Config(format!("there is no layer {l}")))?;
        for part in &mut layer.parts {
            for linear in [
                &mut part.qkv,
                &mut part.o_proj,
                &mut part.gate_up,
                &mut part.down,
            ] {
                linear.weight = linear.weight.to_device(device);
                linear.bias = linear.bias.as_ref().map(|b| b.to_device(device));
            }
            part.device = device;
        }
        Ok(())
    }

    /// Layers whose weights are offloaded to disk.
    pub fn offloaded_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&l| self.layers[l].parts.iter().any(|p| p.offloaded.is_some()))
            .collect()
    }

    /// Tensor-parallel parts per layer.
    pub fn shards(&self) -> usize {
        self.layers.first().map(|l| l.parts.len()).unwrap_or(1)
    }

    /// An empty cache of `slots` sequences of up to `capacity` positions each.
    pub fn new_cache(&self, slots: usize, capacity: i64) -> SlotCache {
        let make = || {
            self.layers
                .iter()
                .map(|layer| {
                    layer
                        .parts
                        .iter()
                        .map(|p| {
                            let shape = [slots as i64, p.kv_heads, capacity, self.config.head_dim];
                            Tensor::zeros(shape, (self.kind, p.device))
                        })
                        .collect()
                })
                .collect()
        };
        SlotCache {
            keys: make(),
            values: make(),
            lens: vec![0; slots],
            capacity,
        }
    }

    /// Run `tokens[i]` (new tokens of the sequence in slot `slots[i]`, all rows the same
    /// length `s`) after what each slot holds, and return the logits of every new position,
    /// `[rows, s, vocab]` (or only the last, `[rows, 1, vocab]`, with `last_only`). Advances
    /// each slot by `s`. Rows must be distinct slots.
    pub fn forward(
        &self,
        slots: &[usize],
        tokens: &[Vec<i64>],
        cache: &mut SlotCache,
        last_only: bool,
    ) -> Result<Tensor, ModelError> {
        let rows = slots.len() as i64;
        let s = tokens.first().map(|t| t.len()).unwrap_or(0) as i64;
        if rows == 0 || s == 0 || tokens.iter().any(|t| t.len() as i64 != s) {
            return Err(ModelError::Invalid(
                "a step needs rows of equal, non-zero length".into(),
            ));
        }
        let starts: Vec<i64> = slots
            .iter()
            .map(|&slot| {
                cache
                    .lens
                    .get(slot)
                    .copied()
                    .ok_or_else(|| ModelError::Invalid(format!("no slot {slot}")))
            })
            .collect::<Result<_, _>>()?;
        let end = starts.iter().map(|p| p + s).max().unwrap_or(s);
        if end > cache.capacity || end > self.config.max_positions {
            return Err(ModelError::Invalid(format!(
                "the sequence needs {end} positions; the cache holds {} and the model {}",
                cache.capacity, self.config.max_positions
            )));
        }
        let hd = self.config.head_dim;
        let dev = self.device;
        let ids: Vec<i64> = tokens.iter().flatten().copied().collect();
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= self.config.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let ids = Tensor::from_slice(&ids).view([rows, s]).to_device(dev);
        // Absolute positions of the new tokens, per row: [rows, s].
        let pos: Vec<i64> = starts.iter().flat_map(|&p| p..p + s).collect();
        let pos = Tensor::from_slice(&pos).view([rows, s]).to_device(dev);
        let cos = self
            .cos
            .index_select(0, &pos.view([-1]))
            .view([rows, 1, s, hd]);
        let sin = self
            .sin
            .index_select(0, &pos.view([-1]))
            .view([rows, 1, s, hd]);
        // Keys visible to each query: positions ≤ the query's own, within the row's sequence.
        let key_pos = Tensor::arange(end, (Kind::Int64, dev)).view([1, 1, end]);
        let mask = key_pos.le_tensor(&pos.unsqueeze(-1)).unsqueeze(1); // [rows, 1, s, end]
        let slot_index =
            Tensor::from_slice(&slots.iter().map(|&x| x as i64).collect::<Vec<_>>()).to_device(dev);
        let contiguous = is_prefix(slots);
        let mut x = Tensor::embedding(&self.embed, &ids, -1, false, false);
        // Disk-offloaded parts: their files, read one layer ahead on a helper thread.
        let read_ahead =
            |l: usize| -> Vec<Option<std::thread::JoinHandle<std::io::Result<Vec<u8>>>>> {
                self.layers.get(l).map_or_else(Vec::new, |layer| {
                    layer
                        .parts
                        .iter()
                        .map(|p| {
                            p.offloaded
                                .clone()
                                .map(|path| std::thread::spawn(move || std::fs::read(path)))
                        })
                        .collect()
                })
            };
        let mut pending = read_ahead(0);
        for (l, layer) in self.layers.iter().enumerate() {
            let reads = std::mem::replace(&mut pending, read_ahead(l + 1));
            let mut fetched: Vec<Option<Part>> = Vec::with_capacity(layer.parts.len());
            for (part, read) in layer
                .parts
                .iter()
                .zip(reads.into_iter().chain(std::iter::repeat_with(|| None)))
            {
                fetched.push(match (read, &part.offloaded) {
                    (Some(handle), Some(path)) => {
                        let bytes = handle
                            .join()
                            .map_err(|_| {
                                ModelError::Checkpoint(format!("reading {} failed", path.display()))
                            })?
                            .map_err(|e| {
                                ModelError::Checkpoint(format!(
                                    "cannot read {}: {e}",
                                    path.display()
                                ))
                            })?;
                        Some(part.with_weights(path, &bytes, self.kind)?)
                    }
                    _ => None,
                });
            }
            let parts: Vec<&Part> = layer
                .parts
                .iter()
                .zip(&fetched)
                .map(|(part, f)| f.as_ref().unwrap_or(part))
                .collect();
            let normed = rms_norm(&x, &layer.input_norm, self.config.eps);
            // Each part attends with its own heads; the partial outputs are summed (the
            // all-reduce of tensor parallelism; one part needs none).
            let mut attended: Option<Tensor> = None;
            for (p, &part) in parts.iter().enumerate() {
                if part.heads == 0 {
                    continue;
                }
                let (h, kvh, pd) = (part.heads, part.kv_heads, part.device);
                let qkv = part.qkv.forward(&normed.to_device(pd));
                // RoPE on the query and key heads together: x·cos + roll(x, d/2)·sin', where
                // sin' carries rotate_half's sign (−sin on the first half): four ops do both.
                let qk = qkv
                    .narrow(-1, 0, (h + kvh) * hd)
                    .view([rows, s, h + kvh, hd])
                    .transpose(1, 2);
                let qk = &qk * cos.to_device(pd) + qk.roll([hd / 2], [-1]) * sin.to_device(pd);
                let q = qk.narrow(1, 0, h);
                let k = qk.narrow(1, h, kvh);
                let v = qkv
                    .narrow(-1, (h + kvh) * hd, kvh * hd)
                    .view([rows, s, kvh, hd])
                    .transpose(1, 2);
                let (cache_k, cache_v) = (&cache.keys[l][p], &cache.values[l][p]);
                // Write each row's new keys and values into its slot, in place.
                for (row, (&slot, &start)) in slots.iter().zip(&starts).enumerate() {
                    let row = row as i64;
                    cache_k
                        .get(slot as i64)
                        .narrow(1, start, s)
                        .copy_(&k.get(row));
                    cache_v
                        .get(slot as i64)
                        .narrow(1, start, s)
                        .copy_(&v.get(row));
                }
                // Read this step's rows: a view when the slots are 0..rows, else a gather.
                let (keys, values) = if contiguous {
                    (
                        cache_k.narrow(0, 0, rows).narrow(2, 0, end),
                        cache_v.narrow(0, 0, rows).narrow(2, 0, end),
                    )
                } else {
                    let index = slot_index.to_device(pd);
                    (
                        cache_k.narrow(2, 0, end).index_select(0, &index),
                        cache_v.narrow(2, 0, end).index_select(0, &index),
                    )
                };
                let attn = Tensor::scaled_dot_product_attention(
                    &q,
                    &keys,
                    &values,
                    Some(&mask.to_device(pd)),
                    0.0,
                    false,
                    None,
                    kvh != h,
                );
                let attn = attn.transpose(1, 2).contiguous().view([rows, s, h * hd]);
                let out = part.o_proj.forward(&attn).to_device(dev);
                attended = Some(match attended {
                    Some(sum) => sum + out,
                    None => out,
                });
            }
            if let Some(a) = attended {
                x = x + a;
            }
            let normed = rms_norm(&x, &layer.post_norm, self.config.eps);
            let mut fed: Option<Tensor> = None;
            for &part in &parts {
                if part.inter == 0 {
                    continue;
                }
                let gu = part.gate_up.forward(&normed.to_device(part.device));
                let inter = part.inter;
                let act = gu.narrow(-1, 0, inter).silu() * gu.narrow(-1, inter, inter);
                let out = part.down.forward(&act).to_device(dev);
                fed = Some(match fed {
                    Some(sum) => sum + out,
                    None => out,
                });
            }
            if let Some(f) = fed {
                x = x + f;
            }
        }
        for (&slot, &start) in slots.iter().zip(&starts) {
            cache.lens[slot] = start + s;
        }
        let x = if last_only { x.narrow(1, s - 1, 1) } else { x };
        let x = rms_norm(&x, &self.norm, self.config.eps);
        Ok(x.matmul(&self.lm_head.tr()))
    }
}

fn t_bias(
    get: &mut impl FnMut(&str) -> Result<Tensor, ModelError>,
    name: &str,
    present: bool,
) -> Result<Option<Tensor>, ModelError> {
    if present {
        get(name).map(Some)
    } else {
        Ok(None)
    }
}

fn is_prefix(slots: &[usize]) -> bool {
    slots.iter().enumerate().all(|(i, &s)| i == s)
}

/// Internal weight names and shapes.
fn weight_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let q = cfg.heads * cfg.head_dim;
    let kv = cfg.kv_heads * cfg.head_dim;
    let mut out = vec![
        ("embed".to_owned(), vec![cfg.vocab_size, h]),
        ("norm".to_owned(), vec![h]),
        ("lm_head".to_owned(), vec![cfg.vocab_size, h]),
    ];
    for l in 0..cfg.layers {
        for (n, shape) in [
            ("input_norm", vec![h]),
            ("q", vec![q, h]),
            ("k", vec![kv, h]),
            ("v", vec![kv, h]),
            ("o", vec![h, q]),
            ("post_norm", vec![h]),
            ("gate", vec![i, h]),
            ("up", vec![i, h]),
            ("down", vec![h, i]),
        ] {
            out.push((format!("{l}.{n}"), shape));
        }
    }
    out
}

fn hf_name(name: &str) -> String {
    match name {
        "embed" => "model.embed_tokens.weight".into(),
        "norm" => "model.norm.weight".into(),
        "lm_head" => "lm_head.weight".into(),
        _ => {
            let (l, n) = name.split_once('.').unwrap_or(("0", name));
            let suffix = match n {
                "input_norm" => "input_layernorm.weight",
                "post_norm" => "post_attention_layernorm.weight",
                "q" => "self_attn.q_proj.weight",
                "k" => "self_attn.k_proj.weight",
                "v" => "self_attn.v_proj.weight",
                "o" => "self_attn.o_proj.weight",
                "gate" => "mlp.gate_proj.weight",
                "up" => "mlp.up_proj.weight",
                _ => "mlp.down_proj.weight",
            };
            format!("model.layers.{l}.{suffix}")
        }
    }
}

fn gguf_name(name: &str) -> String {
    match name {
        "embed" => "token_embd.weight".into(),
        "norm" => "output_norm.weight".into(),
        "lm_head" => "output.weight".into(),
        _ => {
            let (l, n) = name.split_once('.').unwrap_or(("0", name));
            let suffix = match n {
                "input_norm" => "attn_norm",
                "post_norm" => "ffn_norm",
                "q" => "attn_q",
                "k" => "attn_k",
                "v" => "attn_v",
                "o" => "attn_output",
                "gate" => "ffn_gate",
                "up" => "ffn_up",
                _ => "ffn_down",
            };
            format!("blk.{l}.{suffix}.weight")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let cfg = LlamaConfig {
            vocab_size: 1,
            hidden: 128,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 128,
            intermediate: 1,
            eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            max_positions: 16,
            tie_embeddings: true,
            attention_bias: false,
        };
        let scaled = cfg.inv_freq();
        let plain = LlamaConfig {
            rope_scaling: None,
            ..cfg
        }
        .inv_freq();
        assert_eq!(scaled[0], plain[0], "the highest frequency is kept");
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 8.0).abs() < 1e-15,
            "the lowest is divided"
        );
    }
}
