//! One pre-norm decoder for the causal LMs Cresset serves, with the family deciding the
//! details:
//!
//! - **Llama** (`LlamaForCausalLM`, also Mistral-style configs): RMSNorm, rotary position
//!   embeddings (with the `rope_scaling` types Llama 3 uses), SwiGLU, grouped-query attention,
//!   tied or untied embeddings; from a HuggingFace checkpoint or a GGUF file (dequantized at
//!   load, llama.cpp's q/k row permutation undone).
//! - **GPT-2** (`GPT2LMHeadModel`): LayerNorm, learned position embeddings, a GELU MLP, biases
//!   everywhere, Conv1D weights (transposed at load), the head tied to the embeddings.
//! - **BLOOM** (`BloomForCausalLM`): LayerNorm (also after the word embeddings), ALiBi biases
//!   instead of positions, query/key/value fused per head (reordered at load), a GELU MLP,
//!   the head tied to the embeddings.
//!
//! Every family gets the same machinery: a slot KV cache, tensor parallelism
//! ([`Decoder::shard`]), per-layer device placement and disk offload, and layer-by-layer
//! loading ([`LoadOptions`]).
//!
//! The KV cache ([`SlotCache`]) is allocated once with one slot per running sequence; a step
//! writes each sequence's new keys and values at its own position, in place, and reads the
//! rows as a view when the running slots are `0..n` (a gather otherwise).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::gguf::{unpermute_qk, Gguf};
use crate::layers::{Activation, HfConfig, Linear};
use crate::weights::Weights;
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

/// Where a decoder layer's weights go at load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerTarget {
    /// On this device.
    Device(Device),
    /// In `offload_folder`, read for each use.
    Disk,
}

/// How to load a decoder.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The weights' dtype.
    pub kind: Kind,
    /// The device of the embeddings, norms and head, and of layers without a target.
    pub device: Device,
    /// Read each tensor from the checkpoint when its layer is built (and place or offload the
    /// layer before the next is read), instead of reading the whole state dict first.
    pub low_cpu_mem_usage: bool,
    /// Per-layer targets; layers past the end go to `device`.
    pub layers: Vec<LayerTarget>,
    /// Where disk-offloaded layers are written.
    pub offload_folder: Option<PathBuf>,
    /// The device of the embeddings (GPT-2's positions and BLOOM's embedding norm with them);
    /// default `device`. A tied head is the embedding matrix, so it is here too.
    pub embeddings: Option<Device>,
    /// The device of the final norm and an untied head; default `device`.
    pub head: Option<Device>,
}

impl LoadOptions {
    /// Everything on `device`, the state dict read first.
    pub fn new(kind: Kind, device: Device) -> Self {
        Self {
            kind,
            device,
            low_cpu_mem_usage: false,
            layers: Vec::new(),
            offload_folder: None,
            embeddings: None,
            head: None,
        }
    }
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
        let rope = self.family == Family::Llama;
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
    /// Query, key and value projections, stacked in that order.
    qkv: Linear,
    o_proj: Linear,
    /// Llama: gate and up stacked (`2 × inter` rows); GPT-2 and BLOOM: up (`inter` rows).
    gate_up: Linear,
    down: Linear,
    /// BLOOM: the ALiBi slopes of this part's heads (f32, on its device).
    slopes: Option<Tensor>,
    device: Device,
    /// Set when the weights live in this file (disk offload) and are read for each use.
    offloaded: Option<PathBuf>,
    /// The mapped offload file the weights of a part read from disk point into (declared last:
    /// it is dropped after the tensors).
    _backing: Option<Arc<memmap2::Mmap>>,
}

/// A norm's weight, and its bias for LayerNorm (none for RMSNorm).
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Norm {
    fn bytes(&self) -> u64 {
        tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

struct Layer {
    input_norm: Norm,
    post_norm: Norm,
    parts: Vec<Part>,
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
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

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.qkv,
            &mut self.o_proj,
            &mut self.gate_up,
            &mut self.down,
        ]
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
        for linear in self.linears_mut() {
            linear.weight = Tensor::zeros([0], (Kind::Float, Device::Cpu));
            linear.bias = None;
        }
        self.offloaded = Some(path.to_path_buf());
        Ok(())
    }

    /// This part with its weights from `map` (its offload file, memory-mapped). CPU tensors of
    /// the model's dtype point into the mapping (no copy; the part keeps it alive); others are
    /// copied and converted.
    fn with_weights(
        &self,
        path: &Path,
        map: &Arc<memmap2::Mmap>,
        kind: Kind,
    ) -> Result<Part, ModelError> {
        let bytes: &[u8] = map;
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
            let data = &bytes[start..end];
            let aligned = (data.as_ptr() as usize) % src.elt_size_in_bytes() == 0;
            if src == kind && self.device == Device::Cpu && aligned {
                let mut strides = vec![1i64; info.shape.len()];
                for i in (0..info.shape.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * info.shape[i + 1];
                }
                // SAFETY: `data` lies inside `map` (parse_header checked the offsets against
                // its length, and the size against the shape); the returned part holds `map`
                // in `_backing`, dropped after its tensors. The mapping is read-only and the
                // weights are never written (forward passes only read them).
                let t = unsafe {
                    Tensor::f_from_blob(data.as_ptr(), &info.shape, &strides, src, Device::Cpu)?
                };
                return Ok(Some(t));
            }
            let t = Tensor::f_from_data_size(data, &info.shape, src)?;
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
            slopes: self.slopes.as_ref().map(Tensor::shallow_clone),
            device: self.device,
            offloaded: None,
            _backing: Some(Arc::clone(map)),
        })
    }

    /// Cut this (whole) part into `devices.len()` parts: key/value heads (with their query
    /// heads) and feed-forward columns split as evenly as they go. The output projections'
    /// biases go with the first part only, since the parts' outputs are summed.
    fn split(&self, head_dim: i64, gated: bool, devices: &[Device]) -> Vec<Part> {
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
            let gu_ranges: Vec<(i64, i64)> = if gated {
                vec![(inter_at, inter), (self.inter + inter_at, inter)]
            } else {
                vec![(inter_at, inter)]
            };
            let on = |t: Tensor| t.to_device(*device);
            let first = i == 0;
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
                    bias: self
                        .o_proj
                        .bias
                        .as_ref()
                        .filter(|_| first)
                        .map(|b| on(b.copy())),
                },
                gate_up: Linear {
                    weight: on(rows(&self.gate_up.weight, &gu_ranges)),
                    bias: self.gate_up.bias.as_ref().map(|b| on(rows(b, &gu_ranges))),
                },
                down: Linear {
                    weight: on(self.down.weight.narrow(1, inter_at, inter)),
                    bias: self
                        .down
                        .bias
                        .as_ref()
                        .filter(|_| first)
                        .map(|b| on(b.copy())),
                },
                slopes: self
                    .slopes
                    .as_ref()
                    .map(|s| on(s.narrow(0, kv_at * group, kv * group))),
                device: *device,
                offloaded: None,
                _backing: None,
            });
            kv_at += kv;
            inter_at += inter;
        }
        parts
    }

    fn to_device(&mut self, device: Device) {
        for linear in self.linears_mut() {
            linear.weight = linear.weight.to_device(device);
            linear.bias = linear.bias.as_ref().map(|b| b.to_device(device));
        }
        self.slopes = self.slopes.as_ref().map(|s| s.to_device(device));
        self.device = device;
    }
}

/// A loaded decoder.
pub struct Decoder {
    /// Its configuration.
    pub config: DecoderConfig,
    embed: Tensor,
    /// GPT-2's learned position embeddings.
    positions: Option<Tensor>,
    /// BLOOM's LayerNorm after the word embeddings.
    embed_norm: Option<Norm>,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Tensor,
    /// Llama: `[max_positions, head_dim]` cos and signed sin tables (see [`rope_tables`]), in
    /// the model's dtype; none for the other families.
    rope: Option<(Tensor, Tensor)>,
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

/// Where a checkpoint's tensors are named and laid out.
#[derive(Debug, Clone)]
enum Naming {
    /// HuggingFace Llama (`model.layers.N.self_attn.q_proj.weight`, ...).
    Llama,
    /// GGUF (`blk.N.attn_q.weight`, ...), q/k rows permuted by llama.cpp.
    Gguf,
    /// HuggingFace GPT-2, with its prefix (`transformer.` or none); Conv1D weights.
    Gpt2(String),
    /// HuggingFace BLOOM, with its prefix; q/k/v fused per head.
    Bloom(String),
}

/// The tensors a decoder is built from, by canonical name, with their shapes in the layout the
/// decoder computes with: `[out, in]` weights, query/key/value stacked, gate/up stacked.
fn canonical(cfg: &DecoderConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let (q, kv) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
    let layer_norm = cfg.family != Family::Llama;
    let gated = if cfg.gated_mlp() { 2 } else { 1 };
    let mut out = vec![("embed".to_owned(), vec![cfg.vocab_size, h])];
    let norm = |out: &mut Vec<(String, Vec<i64>)>, name: &str| {
        out.push((format!("{name}.weight"), vec![h]));
        if layer_norm {
            out.push((format!("{name}.bias"), vec![h]));
        }
    };
    match cfg.family {
        Family::Gpt2 => out.push(("positions".into(), vec![cfg.max_positions, h])),
        Family::Bloom => norm(&mut out, "embed_norm"),
        Family::Llama => {}
    }
    for l in 0..cfg.layers {
        norm(&mut out, &format!("{l}.input_norm"));
        out.push((format!("{l}.qkv.weight"), vec![q + 2 * kv, h]));
        if cfg.attention_bias {
            out.push((format!("{l}.qkv.bias"), vec![q + 2 * kv]));
        }
        out.push((format!("{l}.o.weight"), vec![h, q]));
        if cfg.attention_bias {
            out.push((format!("{l}.o.bias"), vec![h]));
        }
        norm(&mut out, &format!("{l}.post_norm"));
        out.push((format!("{l}.gate_up.weight"), vec![gated * i, h]));
        if cfg.mlp_bias {
            out.push((format!("{l}.gate_up.bias"), vec![gated * i]));
        }
        out.push((format!("{l}.down.weight"), vec![h, i]));
        if cfg.mlp_bias {
            out.push((format!("{l}.down.bias"), vec![h]));
        }
    }
    norm(&mut out, "norm");
    if !cfg.tie_embeddings {
        out.push(("lm_head".into(), vec![cfg.vocab_size, h]));
    }
    out
}

/// A reader of checkpoint tensors by the checkpoint's own names, checking shapes.
type Raw<'a> = dyn FnMut(&str, &[i64]) -> Result<Tensor, ModelError> + 'a;

/// Read the canonical tensor `name` through `raw`, converting names and layouts.
fn fetch(
    cfg: &DecoderConfig,
    naming: &Naming,
    raw: &mut Raw<'_>,
    name: &str,
    shape: &[i64],
) -> Result<Tensor, ModelError> {
    let h = cfg.hidden;
    let (q, kv, i) = (
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
        cfg.intermediate,
    );
    let (layer, what) = match name.split_once('.') {
        Some((l, rest)) if l.parse::<u32>().is_ok() => (Some(l), rest),
        _ => (None, name),
    };
    let suffix = what.rsplit('.').next().unwrap_or("weight");
    // Pieces stacked into one tensor: weights `[rows, h]`, biases `[rows]`.
    let mut stack = |names: &[(String, i64)]| -> Result<Tensor, ModelError> {
        let pieces = names
            .iter()
            .map(|(n, rows)| {
                let piece_shape = if suffix == "weight" {
                    vec![*rows, h]
                } else {
                    vec![*rows]
                };
                raw(n, &piece_shape)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&pieces, 0))
    };
    let conv1d = |t: Tensor| t.transpose(0, 1).contiguous();
    match naming {
        Naming::Llama => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw("model.embed_tokens.weight", shape),
                    "norm.weight" => raw("model.norm.weight", shape),
                    _ => raw("lm_head.weight", shape),
                };
            };
            let b = format!("model.layers.{l}");
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.input_layernorm.weight"), shape),
                "post_norm" => raw(&format!("{b}.post_attention_layernorm.weight"), shape),
                "qkv" => stack(&[
                    (format!("{b}.self_attn.q_proj.{suffix}"), q),
                    (format!("{b}.self_attn.k_proj.{suffix}"), kv),
                    (format!("{b}.self_attn.v_proj.{suffix}"), kv),
                ]),
                "o" => raw(&format!("{b}.self_attn.o_proj.{suffix}"), shape),
                "gate_up" => stack(&[
                    (format!("{b}.mlp.gate_proj.{suffix}"), i),
                    (format!("{b}.mlp.up_proj.{suffix}"), i),
                ]),
                _ => raw(&format!("{b}.mlp.down_proj.{suffix}"), shape),
            }
        }
        Naming::Gguf => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw("token_embd.weight", shape),
                    "norm.weight" => raw("output_norm.weight", shape),
                    _ => raw("output.weight", shape),
                };
            };
            let b = format!("blk.{l}");
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.attn_norm.weight"), shape),
                "post_norm" => raw(&format!("{b}.ffn_norm.weight"), shape),
                "qkv" => {
                    let wq = raw(&format!("{b}.attn_q.weight"), &[q, h])?;
                    let wk = raw(&format!("{b}.attn_k.weight"), &[kv, h])?;
                    let wv = raw(&format!("{b}.attn_v.weight"), &[kv, h])?;
                    let wq = unpermute_qk(&wq, cfg.heads);
                    let wk = unpermute_qk(&wk, cfg.kv_heads);
                    Ok(Tensor::cat(&[wq, wk, wv], 0))
                }
                "o" => raw(&format!("{b}.attn_output.weight"), shape),
                "gate_up" => stack(&[
                    (format!("{b}.ffn_gate.weight"), i),
                    (format!("{b}.ffn_up.weight"), i),
                ]),
                _ => raw(&format!("{b}.ffn_down.weight"), shape),
            }
        }
        Naming::Gpt2(p) => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw(&format!("{p}wte.weight"), shape),
                    "positions" => raw(&format!("{p}wpe.weight"), shape),
                    _ => raw(&format!("{p}ln_f.{suffix}"), shape),
                };
            };
            let b = format!("{p}h.{l}");
            let weight = suffix == "weight";
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.ln_1.{suffix}"), shape),
                "post_norm" => raw(&format!("{b}.ln_2.{suffix}"), shape),
                "qkv" if weight => raw(&format!("{b}.attn.c_attn.weight"), &[h, 3 * h]).map(conv1d),
                "qkv" => raw(&format!("{b}.attn.c_attn.bias"), shape),
                "o" if weight => raw(&format!("{b}.attn.c_proj.weight"), &[h, h]).map(conv1d),
                "o" => raw(&format!("{b}.attn.c_proj.bias"), shape),
                "gate_up" if weight => raw(&format!("{b}.mlp.c_fc.weight"), &[h, i]).map(conv1d),
                "gate_up" => raw(&format!("{b}.mlp.c_fc.bias"), shape),
                _ if weight => raw(&format!("{b}.mlp.c_proj.weight"), &[i, h]).map(conv1d),
                _ => raw(&format!("{b}.mlp.c_proj.bias"), shape),
            }
        }
        Naming::Bloom(p) => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw(&format!("{p}word_embeddings.weight"), shape),
                    n if n.starts_with("embed_norm.") => {
                        raw(&format!("{p}word_embeddings_layernorm.{suffix}"), shape)
                    }
                    _ => raw(&format!("{p}ln_f.{suffix}"), shape),
                };
            };
            let b = format!("{p}h.{l}");
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.input_layernorm.{suffix}"), shape),
                "post_norm" => raw(&format!("{b}.post_attention_layernorm.{suffix}"), shape),
                "qkv" => {
                    // BLOOM stacks [q, k, v] per head; the decoder wants all q, then k, then v.
                    let t = raw(
                        &format!("{b}.self_attention.query_key_value.{suffix}"),
                        shape,
                    )?;
                    let (heads, d) = (cfg.heads, cfg.head_dim);
                    Ok(if suffix == "weight" {
                        t.view([heads, 3, d, h]).transpose(0, 1).reshape([3 * h, h])
                    } else {
                        t.view([heads, 3, d]).transpose(0, 1).reshape([3 * h])
                    })
                }
                "o" => raw(&format!("{b}.self_attention.dense.{suffix}"), shape),
                "gate_up" => raw(&format!("{b}.mlp.dense_h_to_4h.{suffix}"), shape),
                _ => raw(&format!("{b}.mlp.dense_4h_to_h.{suffix}"), shape),
            }
        }
    }
}

fn required(t: Option<Tensor>, name: &str) -> Result<Tensor, ModelError> {
    t.ok_or_else(|| ModelError::Checkpoint(format!("the checkpoint has no `{name}` weights")))
}

fn check_shape(name: &str, t: Tensor, shape: &[i64]) -> Result<Tensor, ModelError> {
    if t.size() != shape {
        return Err(ModelError::Checkpoint(format!(
            "tensor `{name}` has shape {:?}, the config implies {shape:?}",
            t.size()
        )));
    }
    Ok(t)
}

/// Map an offload file and fault its pages in (on the read-ahead thread, so that the forward
/// pass finds them resident).
fn map_offload(path: &Path) -> std::io::Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path)?;
    // SAFETY: offload files are written by this process when the model loads and never
    // modified while it lives; the mapping is read-only.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let _ = map.advise(memmap2::Advice::WillNeed);
    let mut touched = 0u8;
    for i in (0..map.len()).step_by(4096) {
        touched ^= map[i];
    }
    std::hint::black_box(touched);
    Ok(Arc::new(map))
}

fn offload_path(folder: &Path, layer: usize, part: usize) -> PathBuf {
    folder.join(format!("layer-{layer}-part-{part}.safetensors"))
}

impl DecoderConfig {
    /// What the device-map planner places, with bytes at `elt_bytes` per element: the
    /// embeddings (and GPT-2's positions, BLOOM's embedding norm), each decoder layer (whole),
    /// the final norm and the output head (0 bytes when tied). Names follow transformers'
    /// module names, so that explicit `device_map`s written for Accelerate apply.
    pub fn modules(&self, elt_bytes: usize) -> Vec<cresset_plan::Module> {
        let (embed, layer, norm) = match self.family {
            Family::Llama => ("model.embed_tokens", "model.layers", "model.norm"),
            Family::Gpt2 => ("transformer.wte", "transformer.h", "transformer.ln_f"),
            Family::Bloom => (
                "transformer.word_embeddings",
                "transformer.h",
                "transformer.ln_f",
            ),
        };
        let mut out: Vec<cresset_plan::Module> = Vec::new();
        let mut add = |name: String, numel: i64, layer: Option<usize>| {
            let bytes = numel.max(0) as u64 * elt_bytes as u64;
            match out.iter_mut().find(|m| m.name == name) {
                Some(m) => m.bytes += bytes,
                None => out.push(cresset_plan::Module { name, bytes, layer }),
            }
        };
        for (name, shape) in canonical(self) {
            let numel: i64 = shape.iter().product();
            let (l, what) = match name.split_once('.') {
                Some((l, rest)) => (l.parse::<usize>().ok(), rest),
                None => (None, name.as_str()),
            };
            match (l, what) {
                (Some(l), _) => add(format!("{layer}.{l}"), numel, Some(l)),
                (None, _) if name == "embed" => add(embed.into(), numel, None),
                (None, _) if name == "positions" => add("transformer.wpe".into(), numel, None),
                (None, _) if name.starts_with("embed_norm") => {
                    add("transformer.word_embeddings_layernorm".into(), numel, None)
                }
                (None, _) if name == "lm_head" => add("lm_head".into(), numel, None),
                _ => add(norm.into(), numel, None),
            }
        }
        if self.tie_embeddings {
            add("lm_head".into(), 0, None);
        }
        out
    }
}

impl Decoder {
    /// Load from a HuggingFace checkpoint directory, everything on `device`.
    pub fn load(
        dir: &Path,
        config: &HfConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::load_with(dir, config, &LoadOptions::new(kind, device))
    }

    /// Load from a HuggingFace checkpoint directory, placing (or offloading) each layer as
    /// `opts` says as soon as it is built.
    pub fn load_with(
        dir: &Path,
        config: &HfConfig,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let cfg = DecoderConfig::from_hf(config)?;
        cfg.validate()?;
        let mut w = if opts.low_cpu_mem_usage {
            Weights::open(dir, opts.kind, opts.device)?
        } else {
            Weights::load(dir, opts.kind, opts.device)?
        };
        let prefix = |w: &Weights, name: &str| {
            if w.contains(&format!("transformer.{name}")) {
                "transformer.".to_owned()
            } else {
                String::new()
            }
        };
        let naming = match cfg.family {
            Family::Llama => Naming::Llama,
            Family::Gpt2 => Naming::Gpt2(prefix(&w, "wte.weight")),
            Family::Bloom => Naming::Bloom(prefix(&w, "word_embeddings.weight")),
        };
        let mut raw = |name: &str, shape: &[i64]| w.take(name, shape);
        Self::build(cfg, &naming, opts, &mut raw, None)
    }

    /// Load from a GGUF file, dequantizing to `kind`, everything on `device`.
    pub fn load_gguf(gguf: &Gguf, kind: Kind, device: Device) -> Result<Self, ModelError> {
        Self::load_gguf_with(gguf, &LoadOptions::new(kind, device))
    }

    /// Load from a GGUF file as `opts` says: with `low_cpu_mem_usage`, each tensor is
    /// dequantized when its layer is built; without, the whole state dict first.
    pub fn load_gguf_with(gguf: &Gguf, opts: &LoadOptions) -> Result<Self, ModelError> {
        let cfg = DecoderConfig::from_gguf(gguf)?;
        cfg.validate()?;
        // Llama 3.1+ GGUFs carry their RoPE scaling as per-frequency divisors.
        let rope_freqs = if gguf.tensors.contains_key("rope_freqs.weight") {
            let factors = gguf.tensor("rope_freqs.weight", Kind::Float, Device::Cpu)?;
            Some(check_shape(
                "rope_freqs.weight",
                factors,
                &[cfg.head_dim / 2],
            )?)
        } else {
            None
        };
        let (kind, device) = (opts.kind, opts.device);
        if opts.low_cpu_mem_usage {
            let mut raw = |name: &str, shape: &[i64]| {
                check_shape(name, gguf.tensor(name, kind, device)?, shape)
            };
            return Self::build(cfg, &Naming::Gguf, opts, &mut raw, rope_freqs);
        }
        let mut all = HashMap::new();
        for name in gguf.tensors.keys() {
            all.insert(name.clone(), gguf.tensor(name, kind, device)?);
        }
        let mut raw = |name: &str, shape: &[i64]| {
            let t = all.remove(name).ok_or_else(|| {
                ModelError::Checkpoint(format!("the GGUF file has no tensor `{name}`"))
            })?;
            check_shape(name, t, shape)
        };
        Self::build(cfg, &Naming::Gguf, opts, &mut raw, rope_freqs)
    }

    fn build(
        cfg: DecoderConfig,
        naming: &Naming,
        opts: &LoadOptions,
        raw: &mut Raw<'_>,
        rope_freqs: Option<Tensor>,
    ) -> Result<Self, ModelError> {
        let shapes: HashMap<String, Vec<i64>> = canonical(&cfg).into_iter().collect();
        let (kind, device) = (opts.kind, opts.device);
        let mut get = |name: &str| -> Result<Option<Tensor>, ModelError> {
            let Some(shape) = shapes.get(name) else {
                return Ok(None);
            };
            let t = check_shape(name, fetch(&cfg, naming, raw, name, shape)?, shape)?;
            Ok(Some(t.to_kind(kind).to_device(device)))
        };
        macro_rules! norm {
            ($prefix:expr) => {{
                let prefix = $prefix;
                Norm {
                    weight: required(get(&format!("{prefix}.weight"))?, &prefix)?,
                    bias: get(&format!("{prefix}.bias"))?,
                }
            }};
        }
        macro_rules! linear {
            ($prefix:expr) => {{
                let prefix = $prefix;
                Linear {
                    weight: required(get(&format!("{prefix}.weight"))?, &prefix)?,
                    bias: get(&format!("{prefix}.bias"))?,
                }
            }};
        }
        let embed = required(get("embed")?, "embed")?;
        let positions = get("positions")?;
        let embed_norm = match cfg.family {
            Family::Bloom => Some(norm!("embed_norm")),
            _ => None,
        };
        let slopes = (cfg.family == Family::Bloom).then(|| {
            Tensor::from_slice(&crate::bloom::alibi_slopes(cfg.heads))
                .to_kind(Kind::Float)
                .to_device(device)
        });
        if opts.layers.contains(&LayerTarget::Disk) {
            let folder = opts.offload_folder.as_deref().ok_or_else(|| {
                ModelError::Config("layers are mapped to disk but no offload folder is set".into())
            })?;
            std::fs::create_dir_all(folder).map_err(|e| {
                ModelError::Checkpoint(format!("cannot create {}: {e}", folder.display()))
            })?;
        }
        let mut layers = Vec::new();
        for l in 0..cfg.layers as usize {
            let input_norm = norm!(format!("{l}.input_norm"));
            let qkv = linear!(format!("{l}.qkv"));
            let o_proj = linear!(format!("{l}.o"));
            let post_norm = norm!(format!("{l}.post_norm"));
            let gate_up = linear!(format!("{l}.gate_up"));
            let down = linear!(format!("{l}.down"));
            let mut part = Part {
                heads: cfg.heads,
                kv_heads: cfg.kv_heads,
                inter: cfg.intermediate,
                qkv,
                o_proj,
                gate_up,
                down,
                slopes: slopes.as_ref().map(Tensor::shallow_clone),
                device,
                offloaded: None,
                _backing: None,
            };
            // Place the layer before the next one is read, so that with `low_cpu_mem_usage`
            // at most one layer beyond the resident ones is in memory.
            match opts.layers.get(l) {
                Some(LayerTarget::Disk) => {
                    if let Some(folder) = opts.offload_folder.as_deref() {
                        part.offload(&offload_path(folder, l, 0))?;
                    }
                }
                Some(LayerTarget::Device(d)) if *d != device => part.to_device(*d),
                _ => {}
            }
            layers.push(Layer {
                input_norm,
                post_norm,
                parts: vec![part],
            });
            if opts.low_cpu_mem_usage {
                crate::release_freed_memory();
            }
        }
        let head_device = opts.head.unwrap_or(device);
        let mut norm = norm!("norm");
        norm.weight = norm.weight.to_device(head_device);
        norm.bias = norm.bias.map(|b| b.to_device(head_device));
        let embed_device = opts.embeddings.unwrap_or(device);
        let embed = embed.to_device(embed_device);
        let positions = positions.map(|p| p.to_device(embed_device));
        let embed_norm = embed_norm.map(|n| Norm {
            weight: n.weight.to_device(embed_device),
            bias: n.bias.map(|b| b.to_device(embed_device)),
        });
        let lm_head = if cfg.tie_embeddings {
            embed.shallow_clone()
        } else {
            required(get("lm_head")?, "lm_head")?.to_device(head_device)
        };
        let rope =
            (cfg.family == Family::Llama).then(|| rope_tables(&cfg, rope_freqs, kind, device));
        Ok(Self {
            config: cfg,
            embed,
            positions,
            embed_norm,
            layers,
            norm,
            lm_head,
            rope,
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
        let gated = self.config.gated_mlp();
        for layer in &mut self.layers {
            let whole = match layer.parts.as_slice() {
                [one] => one,
                _ => return Err(ModelError::Config("the model is already sharded".into())),
            };
            layer.parts = whole.split(hd, gated, devices);
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
                part.offload(&offload_path(folder, l, p))?;
            }
        }
        Ok(self)
    }

    /// What the device-map planner places (see [`DecoderConfig::modules`]).
    pub fn modules(&self) -> Vec<cresset_plan::Module> {
        self.config.modules(self.kind.elt_size_in_bytes())
    }

    /// Bytes of weights held in memory (offloaded layers not counted).
    pub fn resident_bytes(&self) -> u64 {
        let mut total = tensor_bytes(&self.embed)
            + self.positions.as_ref().map_or(0, tensor_bytes)
            + self.embed_norm.as_ref().map_or(0, Norm::bytes)
            + self.norm.bytes();
        if !self.config.tie_embeddings {
            total += tensor_bytes(&self.lm_head);
        }
        for layer in &self.layers {
            total += layer.input_norm.bytes() + layer.post_norm.bytes();
            for part in &layer.parts {
                for linear in part.linears() {
                    total +=
                        tensor_bytes(&linear.weight) + linear.bias.as_ref().map_or(0, tensor_bytes);
                }
            }
        }
        total
    }

    /// Move layer `l`'s weights (and so its part of the KV cache) to `device`. The
    /// embeddings, norms and head stay on the model's device; activations cross over.
    pub fn place_layer(&mut self, l: usize, device: Device) -> Result<(), ModelError> {
        let layer = self
            .layers
            .get_mut(l)
            .ok_or_else(|| ModelError::Config(format!("there is no layer {l}")))?;
        for part in &mut layer.parts {
            part.to_device(device);
        }
        Ok(())
    }

    /// Layers whose weights are offloaded to disk.
    pub fn offloaded_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&l| self.layers[l].parts.iter().any(|p| p.offloaded.is_some()))
            .collect()
    }

    /// The device of each layer (of its first part).
    pub fn layer_devices(&self) -> Vec<Device> {
        self.layers
            .iter()
            .map(|l| l.parts.first().map_or(self.device, |p| p.device))
            .collect()
    }

    /// Tensor-parallel parts per layer.
    pub fn shards(&self) -> usize {
        self.layers.first().map(|l| l.parts.len()).unwrap_or(1)
    }

    fn apply_norm(&self, x: &Tensor, n: &Norm) -> Tensor {
        match &n.bias {
            Some(bias) => x.layer_norm(
                [self.config.hidden],
                Some(&n.weight),
                Some(bias),
                self.config.eps,
                true,
            ),
            None => rms_norm(x, &n.weight, self.config.eps),
        }
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
        let embed_dev = self.embed.device();
        let ids = Tensor::from_slice(&ids)
            .view([rows, s])
            .to_device(embed_dev);
        // Absolute positions of the new tokens, per row: [rows, s].
        let pos: Vec<i64> = starts.iter().flat_map(|&p| p..p + s).collect();
        let pos = Tensor::from_slice(&pos).view([rows, s]).to_device(dev);
        // Llama: the rotary tables at these positions, `[rows, 1, s, head_dim]`.
        let rotary = self.rope.as_ref().map(|(cos, sin)| {
            let table = |t: &Tensor| t.index_select(0, &pos.view([-1])).view([rows, 1, s, hd]);
            (table(cos), table(sin))
        });
        // Keys visible to each query: positions ≤ the query's own, within the row's sequence.
        let key_pos = Tensor::arange(end, (Kind::Int64, dev)).view([1, 1, end]);
        // [rows, 1, s, end]
        let mask = key_pos.le_tensor(&pos.unsqueeze(-1)).unsqueeze(1);
        // BLOOM: ALiBi adds slope × key position to the scores (per head; the rest of the
        // relative distance is constant along a row, which softmax ignores).
        let key_pos_f = key_pos.to_kind(Kind::Float).unsqueeze(0); // [1, 1, 1, end]
        let hidden_mask = mask.logical_not();
        let slot_index =
            Tensor::from_slice(&slots.iter().map(|&x| x as i64).collect::<Vec<_>>()).to_device(dev);
        let contiguous = is_prefix(slots);
        // On the embeddings' device, then the residual stream moves to the model's.
        let mut x = Tensor::embedding(&self.embed, &ids, -1, false, false);
        if let Some(table) = &self.positions {
            x = x + table
                .index_select(0, &pos.view([-1]).to_device(embed_dev))
                .view([rows, s, self.config.hidden]);
        }
        if let Some(n) = &self.embed_norm {
            x = self.apply_norm(&x, n);
        }
        let mut x = x.to_device(dev);
        let gated = self.config.gated_mlp();
        // Disk-offloaded parts: their files, read one layer ahead on a helper thread.
        type Mapping = std::thread::JoinHandle<std::io::Result<Arc<memmap2::Mmap>>>;
        let read_ahead = |l: usize| -> Vec<Option<Mapping>> {
            self.layers.get(l).map_or_else(Vec::new, |layer| {
                layer
                    .parts
                    .iter()
                    .map(|p| {
                        p.offloaded
                            .clone()
                            .map(|path| std::thread::spawn(move || map_offload(&path)))
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
                        let map = handle
                            .join()
                            .map_err(|_| {
                                ModelError::Checkpoint(format!("mapping {} failed", path.display()))
                            })?
                            .map_err(|e| {
                                ModelError::Checkpoint(format!(
                                    "cannot map {}: {e}",
                                    path.display()
                                ))
                            })?;
                        Some(part.with_weights(path, &map, self.kind)?)
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
            let normed = self.apply_norm(&x, &layer.input_norm);
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
                let qk = match &rotary {
                    Some((cos, sin)) => {
                        &qk * cos.to_device(pd) + qk.roll([hd / 2], [-1]) * sin.to_device(pd)
                    }
                    None => qk,
                };
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
                let attn_mask = match &part.slopes {
                    Some(slopes) => (slopes.view([1, h, 1, 1]) * key_pos_f.to_device(pd))
                        .masked_fill(&hidden_mask.to_device(pd), f64::NEG_INFINITY)
                        .to_kind(self.kind),
                    None => mask.to_device(pd),
                };
                let attn = Tensor::scaled_dot_product_attention(
                    &q,
                    &keys,
                    &values,
                    Some(&attn_mask),
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
            let normed = self.apply_norm(&x, &layer.post_norm);
            let mut fed: Option<Tensor> = None;
            for &part in &parts {
                if part.inter == 0 {
                    continue;
                }
                let gu = part.gate_up.forward(&normed.to_device(part.device));
                let inter = part.inter;
                let act = if gated {
                    gu.narrow(-1, 0, inter).silu() * gu.narrow(-1, inter, inter)
                } else {
                    self.config.act.forward(&gu)
                };
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
        let x = self.apply_norm(&x.to_device(self.norm.weight.device()), &self.norm);
        Ok(x.to_device(self.lm_head.device())
            .matmul(&self.lm_head.tr()))
    }
}

/// One sequence for [`Decoder::generate`].
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<i64>,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// How to pick tokens.
    pub sampling: crate::sampling::SamplingParams,
    /// Seed for sampling (random when absent).
    pub seed: Option<u64>,
    /// Stop after any of these (included in the output).
    pub stop_ids: Vec<i64>,
}

impl Decoder {
    /// Generate for several prompts together: each sequence gets a slot of one cache, its
    /// prompt is prefilled into it, and then every unfinished sequence decodes one token per
    /// forward pass until each reaches `max_new_tokens` or a stop id. Requests are taken in
    /// groups whose cache (rows × longest sequence) stays within a budget.
    pub fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Vec<i64>>, ModelError> {
        for r in requests {
            if r.prompt.is_empty() {
                return Err(ModelError::Invalid("a prompt has no tokens".into()));
            }
            if r.prompt.len() + r.max_new_tokens > self.config.max_positions as usize {
                return Err(ModelError::Invalid(format!(
                    "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the model's context \
                     of {} tokens",
                    r.prompt.len(),
                    r.max_new_tokens,
                    self.config.max_positions
                )));
            }
        }
        const BUDGET: usize = 1 << 15;
        let mut outputs = Vec::with_capacity(requests.len());
        let mut start = 0;
        while start < requests.len() {
            let mut end = start + 1;
            let mut longest = requests[start].prompt.len() + requests[start].max_new_tokens;
            while end < requests.len() {
                let len = longest.max(requests[end].prompt.len() + requests[end].max_new_tokens);
                if len * (end + 1 - start) > BUDGET {
                    break;
                }
                longest = len;
                end += 1;
            }
            outputs.extend(self.generate_group(&requests[start..end], longest as i64)?);
            start = end;
        }
        Ok(outputs)
    }

    fn generate_group(
        &self,
        requests: &[GenerationRequest],
        capacity: i64,
    ) -> Result<Vec<Vec<i64>>, ModelError> {
        use crate::sampling::{sample, Rng};
        let mut cache = self.new_cache(requests.len(), capacity);
        let mut rngs: Vec<Rng> = requests
            .iter()
            .map(|r| r.seed.map(Rng::seeded).unwrap_or_else(Rng::from_entropy))
            .collect();
        let mut histories: Vec<Vec<i64>> = requests.iter().map(|r| r.prompt.clone()).collect();
        let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); requests.len()];
        // The rows to sample next, with their logits.
        let mut ready: Vec<(usize, Vec<f32>)> = Vec::new();
        for (slot, r) in requests.iter().enumerate() {
            if r.max_new_tokens > 0 {
                let logits = self.forward(&[slot], &[r.prompt.clone()], &mut cache, true)?;
                let row = logits
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu)
                    .view([-1]);
                ready.push((slot, Vec::<f32>::try_from(&row)?));
            }
        }
        while !ready.is_empty() {
            let mut slots = Vec::new();
            let mut tokens = Vec::new();
            for (slot, mut logits) in ready.drain(..) {
                let r = &requests[slot];
                let token = sample(&mut logits, &r.sampling, &histories[slot], &mut rngs[slot]);
                outputs[slot].push(token);
                histories[slot].push(token);
                if outputs[slot].len() < r.max_new_tokens && !r.stop_ids.contains(&token) {
                    slots.push(slot);
                    tokens.push(vec![token]);
                }
            }
            if slots.is_empty() {
                break;
            }
            let logits = self
                .forward(&slots, &tokens, &mut cache, true)?
                .to_kind(Kind::Float)
                .to_device(Device::Cpu);
            let rows = Vec::<Vec<f32>>::try_from(&logits.view([slots.len() as i64, -1]))?;
            ready = slots.into_iter().zip(rows).collect();
        }
        Ok(outputs)
    }
}

/// Llama's rotary tables, `[max_positions, head_dim]`: cos, and sin with rotate_half's sign.
/// rotate_half(x) = cat(−x2, x1) = roll(x, d/2) · (−1 on the first half), so the sign goes
/// into the sin table and RoPE is `x·cos + roll(x, d/2)·sin'`.
fn rope_tables(
    cfg: &DecoderConfig,
    rope_freqs: Option<Tensor>,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let mut inv_freq = Tensor::from_slice(&cfg.inv_freq()).to_kind(Kind::Float);
    if let Some(factors) = rope_freqs {
        inv_freq = inv_freq / factors.to_kind(Kind::Float);
    }
    let positions = Tensor::arange(cfg.max_positions, (Kind::Float, Device::Cpu));
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    let cos = emb.cos().to_kind(kind).to_device(device);
    let half = cfg.head_dim / 2;
    let sign = Tensor::cat(
        &[
            Tensor::full([half], -1.0, (Kind::Float, Device::Cpu)),
            Tensor::ones([half], (Kind::Float, Device::Cpu)),
        ],
        0,
    );
    let sin = (emb.sin() * sign).to_kind(kind).to_device(device);
    (cos, sin)
}

fn is_prefix(slots: &[usize]) -> bool {
    slots.iter().enumerate().all(|(i, &s)| i == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(family: Family) -> DecoderConfig {
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

    #[test]
    fn modules_carry_transformers_names_and_sizes() {
        let llama = tiny(Family::Llama).modules(4);
        let names: Vec<&str> = llama.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens",
                "model.layers.0",
                "model.layers.1",
                "model.norm",
                "lm_head"
            ]
        );
        // A Llama layer: two norms, qkv 24×8, o 8×8, gate+up 32×8, down 8×16, in f32.
        assert_eq!(llama[1].bytes, 4 * (8 + 8 + 24 * 8 + 64 + 32 * 8 + 128));
        assert_eq!(llama[4].bytes, 0, "a tied head has no bytes of its own");
        let bloom = tiny(Family::Bloom).modules(2);
        let names: Vec<&str> = bloom.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "transformer.word_embeddings",
                "transformer.word_embeddings_layernorm",
                "transformer.h.0",
                "transformer.h.1",
                "transformer.ln_f",
                "lm_head"
            ]
        );
        let gpt2 = tiny(Family::Gpt2).modules(2);
        assert_eq!(gpt2[1].name, "transformer.wpe");
        assert_eq!(gpt2[1].bytes, 2 * 16 * 8);
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let cfg = DecoderConfig {
            hidden: 128,
            head_dim: 128,
            heads: 1,
            kv_heads: 1,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            ..tiny(Family::Llama)
        };
        let scaled = cfg.inv_freq();
        let plain = DecoderConfig {
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
