//! The device-mapped handler (TorchServe's Hugging Face Accelerate example, in Rust on
//! libtorch): causal LMs larger than one device, each decoder layer placed on a GPU, the CPU or
//! disk under per-device budgets.
//!
//! It serves the decoders `cresset-torch` has: Llama (safetensors or GGUF), GPT-2 and BLOOM
//! (`BloomForCausalLM`, the reference handler's model, with ALiBi). Generation, request
//! formats (TorchServe's and OpenAI's), streaming and continuous batching are the `gpt`
//! handler's; this handler reads the reference handler's settings and maps them onto it.
//!
//! Settings come from `[handler]` in `model-config.toml` and, for archives made for TorchServe,
//! from `setup_config.json` in the archive (a key in `[handler]` wins):
//!
//! - `device_map`: `"auto"`, `"balanced"`, `"sequential"`, or a table of module → device
//!   (transformers' module names: `model.layers.3`, `transformer.h.3`, ...; devices `0`,
//!   `"cuda:0"`, `"cpu"`, `"disk"`);
//! - `max_memory`: per device, `{"0" = "10GiB", "cpu" = "30GiB"}`;
//! - `offload_folder`: where disk-offloaded layers are written (inside the archive folder);
//! - `low_cpu_mem_usage` (default true) and `offload_state_dict`: read the checkpoint layer by
//!   layer, placing or offloading each layer before the next is read;
//! - `torch_dtype`: `float16`, `bfloat16` or `float32` (default `float32`);
//! - `revision`: must be the archive's version (or `"main"`, which TorchServe's example uses
//!   for "the weights as packaged");
//! - `max_length`: tokens per sequence, prompt and generated together (default 2048, at most
//!   the model's context); also the length the planner reserves KV-cache room for;
//! - `model_path`: the checkpoint folder in the archive (default `model` when the archive has
//!   one, as in the reference, else the archive root); `model_file`, `max_new_tokens`,
//!   `chat_template` and the other `gpt` keys pass through.

use std::path::Path;

use cresset_llm::GptHandler;
use cresset_plugin_api::sdk::{settings, InitContext, StepContext, StepHandler};
use cresset_plugin_api::{Capabilities, PluginError, Request};
use cresset_torch::decoder::Decoder;
use serde_json::{Map, Value};

/// The reference handler's own keys, besides the `gpt` handler's ([`cresset_llm::HandlerKeys`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnKeys {
    /// Must be the archive's version, or `"main"`.
    revision: Option<String>,
    /// The weights' dtype, in transformers' words.
    torch_dtype: Option<TorchDtype>,
}

/// The weight dtypes `torch_dtype` may name.
#[derive(Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum TorchDtype {
    Float16,
    Bfloat16,
    Float32,
    Float64,
}

impl TorchDtype {
    fn name(self) -> &'static str {
        match self {
            Self::Float16 => "float16",
            Self::Bfloat16 => "bfloat16",
            Self::Float32 => "float32",
            Self::Float64 => "float64",
        }
    }
}

/// The device-mapped handler.
pub struct AccelerateHandler {
    inner: GptHandler,
}

impl AccelerateHandler {
    /// The model (for tests and diagnostics: where its layers are).
    pub fn model(&self) -> &Decoder {
        self.inner.model()
    }
}

/// `[handler]` over `setup_config.json` (when the archive has one).
fn merged_settings(ctx: &InitContext) -> Result<Map<String, Value>, PluginError> {
    match settings::merged_with_file(
        &ctx.model_dir,
        "setup_config.json",
        &ctx.handler_config,
        &["max_length"],
    )? {
        Value::Object(map) => Ok(map),
        _ => Ok(Map::new()),
    }
}

/// The reference handler's settings mapped onto the `gpt` handler's. Unknown keys are refused
/// here, naming the closest known one; the `gpt` handler checks the values of its own keys.
fn gpt_settings(ctx: &InitContext) -> Result<Value, PluginError> {
    let mut config = merged_settings(ctx)?;
    let known = [
        settings::known_keys::<cresset_llm::HandlerKeys>(),
        settings::known_keys::<OwnKeys>(),
    ]
    .concat();
    settings::only(&Value::Object(config.clone()), &known)?;
    let own: Map<String, Value> = settings::known_keys::<OwnKeys>()
        .iter()
        .filter_map(|k| config.remove_entry(*k))
        .collect();
    let own: OwnKeys = settings::parse(&Value::Object(own))?;
    if let Some(revision) = &own.revision {
        if *revision != ctx.model_version && revision != "main" {
            return Err(PluginError::invalid_input(format!(
                "`handler.revision` is {revision:?} but the archive holds version {:?}",
                ctx.model_version
            )));
        }
    }
    // `torch_dtype` (the reference's key) becomes the `gpt` handler's `dtype`; a `dtype` of
    // its own is taken as it is when `torch_dtype` is absent. The reference's default is
    // float32.
    match (own.torch_dtype, config.contains_key("dtype")) {
        (Some(_), true) => {
            return Err(PluginError::invalid_input(
                "give `handler.torch_dtype` or `handler.dtype`, not both",
            ))
        }
        (Some(dtype), false) => {
            config.insert("dtype".into(), Value::from(dtype.name()));
        }
        (None, true) => {}
        (None, false) => {
            config.insert("dtype".into(), Value::from("float32"));
        }
    }
    // Layer-by-layer loading is this handler's default (transformers turns it on whenever a
    // device map is given, which is this handler's purpose).
    if !config.contains_key("low_cpu_mem_usage") {
        config.insert("low_cpu_mem_usage".into(), Value::Bool(true));
    }
    if !config.contains_key("model_path") && is_checkpoint(&ctx.model_dir.join("model")) {
        config.insert("model_path".into(), Value::from("model"));
    }
    Ok(Value::Object(config))
}

fn is_checkpoint(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "gguf"))
        })
}

impl StepHandler for AccelerateHandler {
    const NAME: &'static str = "accelerate";
    const SUMMARY: &'static str =
        "Device-mapped causal LMs (Llama, GPT-2, BLOOM): layers on GPUs, CPU and disk under max_memory, streaming, OpenAI-compatible";
    const CAPABILITIES: Capabilities = GptHandler::CAPABILITIES;
    type Model = ();

    fn initialize(model: &std::sync::Arc<()>, ctx: &InitContext) -> Result<Self, PluginError> {
        let mut ctx = ctx.clone();
        ctx.handler_config = gpt_settings(&ctx)?;
        let inner = GptHandler::initialize(model, &ctx)?;
        tracing::info!(
            model = %ctx.model_name,
            offloaded = inner.model().offloaded_layers().len(),
            resident_bytes = inner.model().resident_bytes(),
            "accelerate model placed"
        );
        Ok(Self { inner })
    }

    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        self.inner.step(new, first_index, ctx)
    }
}

cresset_plugin_api::export_step_handler!(AccelerateHandler);
