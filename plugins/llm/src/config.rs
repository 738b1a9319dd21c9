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
    /// The key that sets the positions per slot: `max_seq_len`, or Accelerate's `max_length`
    /// when only that is given.
    length_key: &'static str,
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
    fn read(config: &Value) -> Result<Self, PluginError> {
        let group = settings::integer(config, "group_size", 32, 256)? as i64;
        if config.get("group_size").is_some() && ![32, 64, 128, 256].contains(&group) {
            return Err(PluginError::invalid_input(format!(
                "`handler.group_size` must be 32, 64, 128 or 256. Given: {group}"
            )));
        }
        Ok(match settings::string(config, "quantize")?.unwrap_or("auto") {
            "auto" => Self::Auto,
            "none" => Self::None,
            "int8" => Self::AtLoad(Quantize::Int8),
            "int4" => Self::AtLoad(Quantize::Int4 { group }),
            other => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.quantize` must be \"auto\", \"none\", \"int8\" or \"int4\". Given: {other:?}"
                )))
            }
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
/// file is loaded as `model_file`; a `model.safetensors` names its folder; GPT-fast's
/// `model.pth` is refused, naming what to give instead.
fn model_path(ctx: &InitContext) -> Result<(PathBuf, Option<String>), PluginError> {
    let path = settings::folder_inside(&ctx.model_dir, &ctx.handler_config, "model_path")?;
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
        _ => Err(PluginError::invalid_input(format!(
            "`handler.model_path` names {name:?}: PyTorch pickles (GPT-fast's model.pth) are not \
             read. Give a folder with config.json and model.safetensors, or a .gguf file"
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

/// The `[handler]` keys the `gpt` handler reads (any other is refused, naming it).
pub const HANDLER_KEYS: [&str; 25] = [
    "model_path",
    "model_file",
    "dtype",
    "quantize",
    "group_size",
    "tp_shards",
    "chat_template",
    "draft_model",
    "speculate_k",
    "max_new_tokens",
    "prefill_tokens_per_step",
    "max_seq_len",
    // Accelerate's settings (the device map and layer-by-layer loading).
    "max_length",
    "device_map",
    "max_memory",
    "offload_folder",
    "low_cpu_mem_usage",
    "offload_state_dict",
    // GPT-fast's names: its tokenizer, `speculative` with `draft_model_path`, sampling
    // defaults, `compile`.
    "tokenizer_path",
    "speculative",
    "draft_model_path",
    "temperature",
    "top_k",
    "compile",
    // `"torchserve"`: `/predictions` answers plain text, as the reference handlers do.
    "response_format",
];

impl Settings {
    /// Read and check every setting that does not depend on the checkpoint.
    pub fn read(ctx: &InitContext) -> Result<Self, PluginError> {
        let config = &ctx.handler_config;
        settings::only(config, &HANDLER_KEYS)?;
        let (dir, named_file) = model_path(ctx)?;
        let dtype = Dtype::parse(settings::string(config, "dtype")?.unwrap_or("auto"))
            .map_err(PluginError::from)?;
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
                _ => vec![Device::Cpu; settings::integer(config, "tp_shards", 2, 64)?],
            })
        } else {
            None
        };
        // GPT-fast's `draft_model_path` is `draft_model`; its `speculative = false` turns the
        // draft off.
        let draft_rel = match (
            settings::string(config, "draft_model")?,
            settings::string(config, "draft_model_path")?,
        ) {
            (Some(_), Some(_)) => {
                return Err(PluginError::invalid_input(
                    "give `handler.draft_model` or `handler.draft_model_path`, not both",
                ))
            }
            (a, b) => a.or(b),
        };
        let draft_rel =
            match (config.get("speculative").is_some(), draft_rel) {
                (false, rel) => rel,
                (true, rel) => match (settings::boolean(config, "speculative", false)?, rel) {
                    (true, None) => return Err(PluginError::invalid_input(
                        "`handler.speculative` is true but no `draft_model_path` names the draft",
                    )),
                    (true, rel) => rel,
                    (false, _) => None,
                },
            };
        if settings::boolean(config, "compile", false)? {
            tracing::info!(
                "`handler.compile` (GPT-fast's torch.compile) has no effect: the decoder runs on \
                 libtorch's kernels as it is"
            );
        }
        let sampling = SamplingDefaults {
            temperature: match config.get("temperature") {
                None => None,
                Some(v) => Some(
                    v.as_f64()
                        .filter(|t| (0.0..=100.0).contains(t))
                        .ok_or_else(|| {
                            PluginError::invalid_input(format!(
                                "`handler.temperature` must be a number from 0 to 100. Given: {v}"
                            ))
                        })?,
                ),
            },
            top_k: config
                .get("top_k")
                .map(|_| settings::integer(config, "top_k", 1, 1 << 20).map(|k| k as u64))
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
                let k = settings::integer(config, "speculate_k", 4, 16)?;
                Some(DraftSettings { dir, file, k })
            }
        };
        // Accelerate's `max_length` (prompt and generated tokens) is this handler's
        // `max_seq_len`; an explicit `max_seq_len` wins.
        let length_key = match (config.get("max_seq_len"), config.get("max_length")) {
            (None, Some(_)) => "max_length",
            _ => "max_seq_len",
        };
        let model_file = match (settings::string(config, "model_file")?, named_file) {
            (Some(_), Some(_)) => {
                return Err(PluginError::invalid_input(
                    "`handler.model_path` names a file: give no `handler.model_file` with it",
                ))
            }
            (a, b) => a.map(str::to_owned).or(b),
        };
        let tokenizer = match settings::string(config, "tokenizer_path")? {
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
        let quantize = Quantization::read(config)?;
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
        let kind = dtype.resolve(device, quantized);
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
            chat_template: settings::string(config, "chat_template")?.map(str::to_owned),
            draft,
            max_new_tokens: settings::integer(config, "max_new_tokens", 256, 1 << 20)?,
            prefill_budget: settings::integer(config, "prefill_tokens_per_step", 512, 1 << 20)?,
            slots: ctx
                .model_config
                .get("batch_size")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 256) as usize,
            quantize,
            sampling,
            plain_text: match settings::string(config, "response_format")? {
                None | Some("cresset") => false,
                Some("torchserve") => true,
                Some(other) => {
                    return Err(PluginError::invalid_input(format!(
                        "`handler.response_format` must be \"cresset\" or \"torchserve\". Given: {other:?}"
                    )))
                }
            },
            length_key,
        })
    }

    /// Positions per KV-cache slot, prompt and generated tokens together: at most `context`
    /// (what the model and its draft can hold), min(`context`, 2048) by default.
    pub fn max_seq_len(&self, ctx: &InitContext, context: usize) -> Result<usize, PluginError> {
        settings::integer(
            &ctx.handler_config,
            self.length_key,
            context.min(2048),
            context,
        )
    }
}
