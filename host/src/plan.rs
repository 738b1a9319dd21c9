//! `cresset plan`: where a large model's modules would go under the `accelerate` handler's
//! device map, as a dry run. It reads tensor sizes from the checkpoint's headers only
//! (safetensors, or a GGUF file's tensor directory, counted at the dtype it is loaded in).

use std::path::PathBuf;

use anyhow::Context;
use cresset_plan::{human, Budgets, Headroom, Quantization};
use serde_json::Value;

use crate::archive::{ExtractLimits, OpenedArchive};

/// `cresset plan` flags; unset ones come from the archive's `[handler]` table.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// An archive (`.tar.gz`, `.zip`, or a folder with `MANIFEST.toml`) or a checkpoint folder.
    pub path: PathBuf,
    /// Budgets per device, e.g. `0=10GiB,cpu=30GiB` (GPU indices, `cpu`).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// `auto`, `balanced` or `sequential`.
    #[arg(long)]
    pub device_map: Option<String>,
    /// `float32`, `float16`, `bfloat16` or `auto`: the dtype the weights are loaded in.
    #[arg(long)]
    pub dtype: Option<String>,
    /// `auto`, `none`, `int8` or `int4`: how the `gpt` handler holds the linear layers (`auto`
    /// keeps a GGUF file's quantized blocks when the model runs wholly on the CPU).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Inputs per int4 group (32, 64, 128 or 256).
    #[arg(long)]
    pub group_size: Option<u64>,
    /// Positions of KV cache and activations to keep room for.
    #[arg(long)]
    pub max_length: Option<u64>,
    /// Allow offloading to disk (as an `offload_folder` does).
    #[arg(long)]
    pub offload: bool,
}

fn dtype_bytes(name: &str) -> anyhow::Result<u64> {
    Ok(match name {
        "float32" | "f32" => 4,
        "float16" | "f16" | "bfloat16" | "bf16" => 2,
        other => anyhow::bail!("dtype {other:?} must be float32, float16, bfloat16 or auto"),
    })
}

/// What `dtype = "auto"` means for a model `quantized` or not, placed on the CPU only or not:
/// as the handlers resolve it (`cresset_torch::layers::Dtype::resolve`).
fn auto_dtype(cpu_only: bool, quantized: bool) -> &'static str {
    if cpu_only && !quantized && cresset_plan::cpu_has_native_bf16() {
        "bfloat16"
    } else {
        "float32"
    }
}

/// Print the plan; an error (such as "does not fit") is the command's failure.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let work = tempfile::tempdir().context("cannot make a temporary folder")?;
    let is_archive = args.path.is_file() || args.path.join("MANIFEST.toml").is_file();
    let (opened, handler) = if is_archive {
        let archive =
            OpenedArchive::open(&args.path, work.path(), &ExtractLimits::default(), None)?;
        let handler = serde_json::to_value(&archive.config.handler)?;
        (Some(archive), handler)
    } else {
        (None, Value::Object(Default::default()))
    };
    let root = opened
        .as_ref()
        .map(|a| a.dir.clone())
        .unwrap_or_else(|| args.path.clone());
    use cresset_plugin_api::sdk::settings;
    let plugin_err = |e: cresset_plugin_api::PluginError| anyhow::anyhow!("{}", e.message);
    let model_dir = settings::folder_inside(&root, &handler, "model_path").map_err(plugin_err)?;
    let max_length = args
        .max_length
        .or_else(|| handler.get("max_length").and_then(Value::as_u64))
        .unwrap_or(2048);
    let offload = args.offload || handler.get("offload_folder").is_some();
    let max_memory: Value = match &args.max_memory {
        Some(list) => {
            let mut map = serde_json::Map::new();
            for item in list.split(',').filter(|s| !s.trim().is_empty()) {
                let (device, size) = item
                    .split_once('=')
                    .with_context(|| format!("--max-memory entry {item:?} is not DEVICE=SIZE"))?;
                map.insert(
                    device.trim().to_owned(),
                    Value::String(size.trim().to_owned()),
                );
            }
            Value::Object(map)
        }
        None => handler.get("max_memory").cloned().unwrap_or(Value::Null),
    };
    let budgets = Budgets::from_max_memory(&max_memory, u64::MAX / 4, offload)?;
    // A GGUF file (named by `model_file`, or the only one) or a safetensors checkpoint.
    let model_file = settings::string(&handler, "model_file").map_err(plugin_err)?;
    let gguf = settings::named_or_only_file(&model_dir, "model_file", model_file, "gguf")
        .map_err(plugin_err)?;
    // Quantized layers run on the CPU only: `auto` keeps a GGUF's blocks when nothing asks for
    // a GPU or disk, as the `gpt` handler does.
    let cpu_only = !offload
        && max_memory
            .as_object()
            .is_none_or(|m| m.keys().all(|k| k == "cpu"));
    let quantize = match &args.quantize {
        Some(q) => q.clone(),
        None => settings::string(&handler, "quantize")
            .map_err(plugin_err)?
            .unwrap_or("auto")
            .to_owned(),
    };
    let group = match args.group_size {
        Some(g) => g,
        None => handler
            .get("group_size")
            .and_then(Value::as_u64)
            .unwrap_or(32),
    };
    if ![32, 64, 128, 256].contains(&group) {
        anyhow::bail!("group_size must be 32, 64, 128 or 256. Given: {group}");
    }
    let quantization = match quantize.as_str() {
        "auto" if gguf.is_some() && cpu_only => Quantization::GgufKept,
        "auto" | "none" => Quantization::None,
        "int8" => Quantization::Int8,
        "int4" => Quantization::Int4 { group },
        other => anyhow::bail!("quantize {other:?} must be auto, none, int8 or int4"),
    };
    if quantization != Quantization::None && !cpu_only {
        anyhow::bail!(
            "quantized weights run on the CPU only: they cannot be placed on a GPU or offloaded to disk (quantize = {quantize:?})"
        );
    }
    // The `gpt` handler's `dtype` defaults to "auto"; the `accelerate` handler's `torch_dtype`
    // (and a bare checkpoint folder's) to float32.
    let gpt = opened
        .as_ref()
        .is_some_and(|a| a.manifest.model.handler == "gpt");
    let dtype = match args.dtype.as_deref().or_else(|| {
        ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| handler.get(*k).and_then(Value::as_str))
    }) {
        Some("auto") => auto_dtype(cpu_only, quantization != Quantization::None).to_owned(),
        Some(d) => d.to_owned(),
        None if gpt => auto_dtype(cpu_only, quantization != Quantization::None).to_owned(),
        None => "float32".to_owned(),
    };
    let bytes = dtype_bytes(&dtype)?;
    let (modules, config) = match &gguf {
        Some(path) => cresset_plan::modules_from_gguf_as(path, bytes, quantization)?,
        None => {
            let modules =
                cresset_plan::modules_from_checkpoint_as(&model_dir, Some(bytes), quantization)?;
            let config: Value = std::fs::read_to_string(model_dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null);
            (modules, config)
        }
    };
    let headroom = Headroom::estimate(&config, max_length, bytes);
    // A `--device-map` name overrides the archive's setting (a name or a table).
    let device_map = args.device_map.clone().map(Value::String);
    let device_map = device_map.as_ref().or_else(|| handler.get("device_map"));
    let plan = cresset_plan::plan_from_setting(device_map, &modules, &budgets, headroom)?;
    let total: u64 = modules.iter().map(|m| m.bytes).sum();
    let held = match quantization {
        Quantization::None => dtype.clone(),
        Quantization::Int8 => format!("int8 (linear layers) and {dtype}"),
        Quantization::Int4 { group } => format!("int4 group {group} (linear layers) and {dtype}"),
        Quantization::GgufKept => format!("the GGUF's quantized blocks (int4/int8) and {dtype}"),
    };
    println!(
        "{} modules, {} of weights in {held}; headroom for {max_length} positions: {} per layer, {} of activations\n",
        modules.len(),
        human(total),
        human(headroom.per_layer),
        human(headroom.activations)
    );
    print!("{}", plan.render(&budgets));
    println!("\nfits: yes");
    Ok(())
}
