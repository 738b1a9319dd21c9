//! The handler's settings (`[handler]` in `model-config.toml`, and the model config's
//! `batch_size` and `parallel_type`), read once into [`Settings`] before anything is loaded.
//! `max_seq_len` alone waits for the checkpoint: its bound is the model's context.

use std::path::{Path, PathBuf};

use cresset_plugin_api::sdk::{settings, InitContext};
use cresset_plugin_api::PluginError;
use cresset_torch::decoder::{LayerTarget, LoadOptions, Quantize};
use cresset_torch::layers::Dtype;
use cresset_torch::tch::{Device, Kind};
use serde_json::Value;

/// What `[handler]` asks for.
pub(crate) struct Settings {
    /// The checkpoint folder (`model_path`).
    pub dir: PathBuf,
    /// The `.gguf` to load (`model_file`, or `model_path` naming the file), when named.
    pub model_file: Option<String>,
    /// A tokenizer that replaces the checkpoint's (`tokenizer_path`: GPT-fast's SentencePiece
    /// `tokenizer.model`, or a `tokenizer.json`).
    pub tokenizer: Option<PathBuf>,
    /// The weights' dtype (`dtype`).
    pub kind: Kind,
    /// The instance's device.
    pub device: Device,
    /// One shard per device (`parallel_type = "tp"`: the assigned GPUs, or `tp_shards` on the
    /// CPU).
    pub shards: Option<Vec<Device>>,
    /// A chat template that overrides the checkpoint's (`chat_template`).
    pub chat_template: Option<String>,
    /// A draft model for speculative decoding (`draft_model`, `speculate_k`).
    pub draft: Option<DraftSettings>,
    /// The default most new tokens (`max_new_tokens`).
    pub max_new_tokens: usize,
    /// Prompt tokens prefilled per step, across sequences (`prefill_tokens_per_step`).
    pub prefill_budget: usize,
    /// KV-cache slots: the model config's `batch_size`.
    pub slots: usize,
    /// How the weights are quantized (`quantize`, `group_size`).
    pub quantize: Quantization,
    /// Sampling for requests that ask for none (`temperature`, `top_k`, as GPT-fast's handler
    /// takes them).
    pub sampling: SamplingDefaults,
    /// `response_format = "torchserve"`: `/predictions` answers the generated text as plain
    /// text rather than `{"generated_text"}`.
    pub plain_text: bool,
    /// On a GPU: decode steps replay CUDA graphs (`cuda_graphs`, default on; GPT-fast's
    /// `compile` sets it too).
    pub cuda_graphs: bool,
    /// On a GPU: the attention kernels libtorch may choose (`attention_backend`).
    pub attention: AttentionBackend,
    /// The keys as given (the device map's are read once the checkpoint's shape is known).
    pub keys: HandlerKeys,
}

/// `attention_backend`: which scaled-dot-product attention kernels run on a GPU. Decode steps
/// read the cache with a mask (its length bucketed), which FlashAttention does not take, so the
/// choice is among the kernels that do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionBackend {
    /// libtorch's own choice (the default).
    Auto,
    /// Memory-efficient attention only (with the math kernel where it cannot run).
    Efficient,
    /// The reference composition of matmuls and softmax only.
    Math,
}

/// `quantize`: how the linear layers' weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quantization {
    /// `"auto"` (the default): a GGUF file's quantized tensors stay as they are (Q4_0, Q4_1,
    /// Q4_K as int4; Q8_0, Q5_K, Q6_K as int8) where the model runs wholly on the CPU; dense
    /// weights stay dense.
    Auto,
    /// `"none"`: everything dense in `dtype` (a GGUF file is dequantized).
    None,
    /// `"int8"` or `"int4"`: quantize every linear layer at load (gpt-fast's recipes).
    AtLoad(Quantize),
}

impl Quantization {
    fn read(keys: &HandlerKeys) -> Result<Self, PluginError> {
        let group = match keys.group_size {
            None => 32,
            Some(g @ (32 | 64 | 128 | 256)) => g as i64,
            Some(other) => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.group_size` must be 32, 64, 128 or 256. Given: {other}"
                )))
            }
        };
        Ok(match keys.quantize.unwrap_or(QuantizeKey::Auto) {
            QuantizeKey::Auto => Self::Auto,
            QuantizeKey::None => Self::None,
            QuantizeKey::Int8 => Self::AtLoad(Quantize::Int8),
            QuantizeKey::Int4 => Self::AtLoad(Quantize::Int4 { group }),
        })
    }

    /// Set `opts` as this asks; `split` says the model will be split for tensor parallelism.
    pub fn apply(self, opts: &mut LoadOptions, split: bool) {
        match self {
            Self::Auto => {
                let cpu = |d: Device| d == Device::Cpu;
                opts.keep_gguf_quantization = !split
                    && cpu(opts.device)
                    && opts.embeddings.is_none_or(cpu)
                    && opts.head.is_none_or(cpu)
                    && opts
                        .layers
                        .iter()
                        .all(|t| matches!(t, LayerTarget::Device(Device::Cpu)));
            }
            Self::None => {}
            Self::AtLoad(how) => opts.quantize = Some(how),
        }
    }
}

/// `model_path`: the checkpoint folder (default: the archive's root), or a file in it. A `.gguf`
/// file is loaded as `model_file`; a `model.safetensors` or `pytorch_model.bin` names its
/// folder; GPT-fast's `model.pth` (its own tensor names) is refused, naming what to give
/// instead.
fn model_path(
    ctx: &InitContext,
    keys: &HandlerKeys,
) -> Result<(PathBuf, Option<String>), PluginError> {
    let path = settings::path_inside(
        &ctx.model_dir,
        "model_path",
        keys.model_path.as_deref().unwrap_or("."),
    )?;
    if !path.is_file() {
        return Ok((path, None));
    }
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match path.extension().and_then(|x| x.to_str()) {
        Some("gguf") => Ok((parent, Some(name.to_owned()))),
        Some("safetensors") => Ok((parent, None)),
        Some("bin") if name.starts_with("pytorch_model") => Ok((parent, None)),
        _ => Err(PluginError::invalid_input(format!(
            "`handler.model_path` names {name:?}: GPT-fast's model.pth (its own tensor names) is \
             not read. Give a HuggingFace folder with config.json and model.safetensors or \
             pytorch_model.bin, or a .gguf file"
        ))),
    }
}

/// The handler's sampling defaults, for requests that name no sampling parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct SamplingDefaults {
    /// `temperature` (0: greedy).
    pub temperature: Option<f64>,
    /// `top_k`.
    pub top_k: Option<u64>,
}

/// Where the draft model is and how far it speculates.
pub(crate) struct DraftSettings {
    /// Its checkpoint folder.
    pub dir: PathBuf,
    /// Its `.gguf`, when `draft_model` names a file.
    pub file: Option<String>,
    /// Tokens drafted per step (`speculate_k`).
    pub k: usize,
}

/// `[handler]` as the `gpt` handler reads it (any other key is refused, naming it). Every key is
/// optional; [`Settings::read`] checks the values and fills in the defaults.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerKeys {
    /// The checkpoint folder in the archive, or a `.gguf`/`model.safetensors` in it.
    pub model_path: Option<String>,
    /// The `.gguf` in `model_path` to load.
    pub model_file: Option<String>,
    /// The weights' dtype (default `auto`).
    pub dtype: Option<String>,
    pub quantize: Option<QuantizeKey>,
    pub group_size: Option<u64>,
    pub tp_shards: Option<u64>,
    pub chat_template: Option<String>,
    pub draft_model: Option<String>,
    pub speculate_k: Option<u64>,
    pub max_new_tokens: Option<u64>,
    pub prefill_tokens_per_step: Option<u64>,
    pub max_seq_len: Option<u64>,
    // Accelerate's settings (the device map and layer-by-layer loading).
    pub max_length: Option<u64>,
    pub device_map: Option<Value>,
    pub max_memory: Option<Value>,
    pub offload_folder: Option<String>,
    pub low_cpu_mem_usage: Option<bool>,
    pub offload_state_dict: Option<bool>,
    // GPT-fast's names: its tokenizer, `speculative` with `draft_model_path`, sampling
    // defaults, `compile`.
    pub tokenizer_path: Option<String>,
    pub speculative: Option<bool>,
    pub draft_model_path: Option<String>,
    pub temperature: Option<f64>,
    pub top_k: Option<u64>,
    pub compile: Option<bool>,
    /// On a GPU: replay decode steps as CUDA graphs (default true).
    pub cuda_graphs: Option<bool>,
    /// On a GPU: `auto`, `efficient` or `math`.
    pub attention_backend: Option<AttentionBackend>,
    /// `"torchserve"`: `/predictions` answers plain text, as the reference handlers do.
    pub response_format: Option<settings::ResponseFormat>,
}

/// `quantize`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizeKey {
    Auto,
    None,
    Int8,
    Int4,
}

impl Settings {
    /// Read and check every setting that does not depend on the checkpoint.
    pub fn read(ctx: &InitContext) -> Result<Self, PluginError> {
        let keys: HandlerKeys = settings::parse(&ctx.handler_config)?;
        let (dir, named_file) = model_path(ctx, &keys)?;
        let dtype =
            Dtype::parse(keys.dtype.as_deref().unwrap_or("auto")).map_err(PluginError::from)?;
        let device = cresset_torch::instance_device(ctx);
        let tensor_parallel = ctx
            .model_config
            .get("parallel_type")
            .and_then(Value::as_str)
            == Some("tp");
        let shards = if tensor_parallel {
            Some(match device {
                Device::Cuda(_) => ctx
                    .assignment
                    .device_ids
                    .iter()
                    .filter_map(|&id| usize::try_from(id).ok().map(Device::Cuda))
                    .collect(),
                _ => vec![Device::Cpu; settings::within("tp_shards", keys.tp_shards, 2, 64)?],
            })
        } else {
            None
        };
        // GPT-fast's `draft_model_path` is `draft_model`; its `speculative = false` turns the
        // draft off.
        let draft_rel = match (
            keys.draft_model.as_deref(),
            keys.draft_model_path.as_deref(),
        ) {
            (Some(_), Some(_)) => {
                return Err(PluginError::invalid_input(
                    "give `handler.draft_model` or `handler.draft_model_path`, not both",
                ))
            }
            (a, b) => a.or(b),
        };
        let draft_rel = match (keys.speculative, draft_rel) {
            (None, rel) => rel,
            (Some(true), None) => {
                return Err(PluginError::invalid_input(
                    "`handler.speculative` is true but no `draft_model_path` names the draft",
                ))
            }
            (Some(true), rel) => rel,
            (Some(false), _) => None,
        };
        // GPT-fast's `compile` (torch.compile, whose "reduce-overhead" mode is CUDA graphs)
        // means graphs here; `cuda_graphs` wins where both are given.
        let cuda_graphs = keys.cuda_graphs.or(keys.compile).unwrap_or(true);
        if keys.compile.is_some() && device == Device::Cpu {
            tracing::info!(
                "`handler.compile` (GPT-fast's torch.compile) has no effect on the CPU: the \
                 decoder runs on libtorch's kernels as it is; on a GPU it sets `cuda_graphs`"
            );
        }
        let sampling = SamplingDefaults {
            temperature: match keys.temperature {
                Some(t) if !(0.0..=100.0).contains(&t) => {
                    return Err(PluginError::invalid_input(format!(
                        "`handler.temperature` must be a number from 0 to 100. Given: {t}"
                    )))
                }
                t => t,
            },
            top_k: keys
                .top_k
                .map(|k| settings::within("top_k", Some(k), 1, 1 << 20).map(|k| k as u64))
                .transpose()?,
        };
        let draft = match draft_rel {
            None => None,
            Some(rel) => {
                let path = settings::path_inside(&ctx.model_dir, "draft_model", rel)?;
                if !path.exists() {
                    return Err(PluginError::not_found(format!(
                        "the draft model `{rel}` is not in the archive"
                    )));
                }
                let (dir, file) = if path.is_file() {
                    let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
                    (
                        path.parent().map(Path::to_path_buf).unwrap_or_default(),
                        name,
                    )
                } else {
                    (path, None)
                };
                let k = settings::within("speculate_k", keys.speculate_k, 4, 16)?;
                Some(DraftSettings { dir, file, k })
            }
        };
        let model_file = match (keys.model_file.as_deref(), named_file) {
            (Some(_), Some(_)) => {
                return Err(PluginError::invalid_input(
                    "`handler.model_path` names a file: give no `handler.model_file` with it",
                ))
            }
            (a, b) => a.map(str::to_owned).or(b),
        };
        let tokenizer = match keys.tokenizer_path.as_deref() {
            None => None,
            Some(rel) => {
                let path = settings::path_inside(&ctx.model_dir, "tokenizer_path", rel)?;
                if !path.is_file() {
                    return Err(PluginError::not_found(format!(
                        "the tokenizer `{rel}` (`handler.tokenizer_path`) is not a file in the archive"
                    )));
                }
                Some(path)
            }
        };
        let quantize = Quantization::read(&keys)?;
        // Whether the layers will be quantized decides what `dtype = "auto"` means.
        let quantized = match quantize {
            Quantization::None => false,
            Quantization::AtLoad(_) => true,
            Quantization::Auto => {
                device == Device::Cpu
                    && shards.is_none()
                    && settings::named_or_only_file(
                        &dir,
                        "model_file",
                        model_file.as_deref(),
                        "gguf",
                    )?
                    .is_some()
            }
        };
        let kind = match (dtype, device) {
            // bf16 on a GPU that has it (compute capability 8.0 and later: A100, H100, L4...):
            // half the weight traffic of f32, and what the reference decodes in.
            (Dtype::Auto, Device::Cuda(index)) if !quantized => {
                match cresset_torch::cuda_graph::capability(index) {
                    Ok(c) if c >= 80 => Kind::BFloat16,
                    _ => Kind::Float,
                }
            }
            _ => dtype.resolve(device, quantized),
        };
        if kind == Kind::Double && quantized {
            return Err(PluginError::invalid_input(
                "`dtype` float64 cannot run the quantized kernels: set `handler.quantize = \"none\"`",
            ));
        }
        Ok(Self {
            kind,
            dir,
            model_file,
            tokenizer,
            device,
            shards,
            chat_template: keys.chat_template.clone(),
            draft,
            max_new_tokens: settings::within("max_new_tokens", keys.max_new_tokens, 256, 1 << 20)?,
            prefill_budget: settings::within(
                "prefill_tokens_per_step",
                keys.prefill_tokens_per_step,
                512,
                1 << 20,
            )?,
            slots: ctx
                .model_config
                .get("batch_size")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 256) as usize,
            quantize,
            sampling,
            plain_text: keys.response_format == Some(settings::ResponseFormat::Torchserve),
            cuda_graphs,
            attention: keys.attention_backend.unwrap_or(AttentionBackend::Auto),
            keys,
        })
    }

    /// Positions per KV-cache slot, prompt and generated tokens together: at most `context`
    /// (what the model and its draft can hold), min(`context`, 2048) by default.
    pub fn max_seq_len(&self, context: usize) -> Result<usize, PluginError> {
        // Accelerate's `max_length` (prompt and generated tokens) is this handler's
        // `max_seq_len`; an explicit `max_seq_len` wins.
        match (self.keys.max_seq_len, self.keys.max_length) {
            (None, Some(n)) => settings::within("max_length", Some(n), 0, context),
            (n, _) => settings::within("max_seq_len", n, context.min(2048), context),
        }
    }
}
