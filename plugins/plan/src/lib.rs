//! The device-map planner of Cresset's large-model handler (Accelerate's `device_map`), with
//! no libtorch: it reads tensor sizes from checkpoint headers, groups them into modules (each
//! decoder layer is one module, never split), and places the modules in order on GPUs, then
//! the CPU, then disk, under per-device budgets (`max_memory`), keeping headroom for the KV
//! cache and activations at `max_length`. An explicit map is validated instead. `cresset plan`
//! prints the result as a dry run.

#[cfg(test)]
mod counting_alloc;
pub mod gguf;
pub mod pickle;
pub mod quantized;
pub mod safetensors;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

pub use quantized::Quantization;

/// Whether this CPU does bf16 arithmetic natively (x86 AVX512-BF16 or AMX-BF16, as the kernel
/// reports them in `/proc/cpuinfo`): what `dtype = "auto"` runs in on the CPU depends on it.
/// `CRESSET_CPU_BF16=0|1` overrides the answer.
pub fn cpu_has_native_bf16() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        if let Ok(v) = std::env::var("CRESSET_CPU_BF16") {
            return v == "1";
        }
        cpu_flags()
            .iter()
            .any(|f| f == "avx512_bf16" || f == "amx_bf16")
    })
}

/// Whether this CPU runs `cresset-torch`'s block kernel vectorized (x86 AVX2 with FMA and
/// F16C): where it does, a GGUF's Q4_0/Q4_1/Q4_K/Q5_K/Q8_0 tensors stay in their blocks of 32
/// (see [`Quantization::GgufKept`]). `CRESSET_BLOCK_KERNEL=0` says no (libtorch's kernels).
pub fn cpu_runs_block_kernel() -> bool {
    if std::env::var("CRESSET_BLOCK_KERNEL").is_ok_and(|v| v == "0") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// This CPU's feature flags, as `/proc/cpuinfo` lists them (empty where it cannot be read).
pub fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}

/// Where a module's weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    /// A CUDA device.
    Gpu(u32),
    /// Main memory.
    Cpu,
    /// Memory-mapped from the checkpoint on disk, read on demand.
    Disk,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gpu(i) => write!(f, "cuda:{i}"),
            Self::Cpu => f.write_str("cpu"),
            Self::Disk => f.write_str("disk"),
        }
    }
}

impl Placement {
    /// Parse `0`, `cuda:0`, `gpu:0`, `cpu` or `disk`.
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        let s = s.trim();
        let gpu = s
            .strip_prefix("cuda:")
            .or_else(|| s.strip_prefix("gpu:"))
            .unwrap_or(s);
        match s {
            "cpu" => Ok(Self::Cpu),
            "disk" => Ok(Self::Disk),
            _ => gpu.parse().map(Self::Gpu).map_err(|_| {
                PlanError::Invalid(format!("device {s:?} is not a GPU index, `cpu` or `disk`"))
            }),
        }
    }
}

/// What can go wrong, with messages for operators.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A setting does not parse.
    #[error("{0}")]
    Invalid(String),
    /// An explicit map names modules the model does not have.
    #[error("the device map names modules the model does not have: {}", .0.join(", "))]
    Unknown(Vec<String>),
    /// An explicit map leaves modules out.
    #[error("the device map does not place these modules: {}", .0.join(", "))]
    Missing(Vec<String>),
    /// The model does not fit the budgets.
    #[error("the model does not fit: it needs {} ({} of weights and {} of headroom) but the budgets hold {}; {}{}", human(*.needed), human(*.weights), human(*.headroom), human(*.available), shortfall(*.needed, *.available, .module), .hint)]
    DoesNotFit {
        /// The first module that found no room.
        module: String,
        /// Bytes needed, weights and headroom.
        needed: u64,
        /// Of which weights.
        weights: u64,
        /// Of which headroom.
        headroom: u64,
        /// Bytes the budgets hold.
        available: u64,
        /// What would help.
        hint: String,
    },
    /// A device in an explicit map is over its budget.
    #[error("{device} would hold {} but its budget is {}", human(*.needed), human(*.budget))]
    OverBudget {
        /// The device.
        device: Placement,
        /// What the map puts there.
        needed: u64,
        /// Its budget.
        budget: u64,
    },
    /// The checkpoint cannot be read.
    #[error("{0}")]
    Checkpoint(String),
}

impl From<safetensors::CheckpointError> for PlanError {
    fn from(e: safetensors::CheckpointError) -> Self {
        Self::Checkpoint(e.0)
    }
}

fn shortfall(needed: u64, available: u64, module: &str) -> String {
    if needed > available {
        format!("{} short", human(needed - available))
    } else {
        format!("whole layers do not pack into them: no device has room left for `{module}`")
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.2} GiB", b / 1_073_741_824.0),
    }
}

/// Parse a size as Accelerate's `max_memory` writes them: `10GiB`, `512MiB`, `1.5GB`, `300MB`,
/// or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, PlanError> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim().to_ascii_lowercase());
    let value: f64 = number
        .parse()
        .map_err(|_| PlanError::Invalid(format!("size {s:?}: {number:?} is not a number")))?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(PlanError::Invalid(format!(
                "size {s:?}: unknown unit {other:?}"
            )))
        }
    };
    if !(value.is_finite() && value >= 0.0) {
        return Err(PlanError::Invalid(format!("size {s:?} must be positive")));
    }
    Ok((value * scale) as u64)
}

/// One unit the planner places whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Its name (`model.layers.3`, `model.embed_tokens`, …).
    pub name: String,
    /// Bytes of its weights (in the target dtype).
    pub bytes: u64,
    /// The decoder layer index, for layers.
    pub layer: Option<usize>,
}

/// The decoder layer a tensor belongs to, and that layer's module name.
fn layer_of(name: &str) -> Option<(usize, String)> {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 0..parts.len().saturating_sub(1) {
        if matches!(parts[i], "layers" | "h" | "layer" | "blocks") {
            if let Ok(n) = parts[i + 1].parse::<usize>() {
                return Some((n, parts[..=i + 1].join(".")));
            }
        }
    }
    None
}

/// Group tensors (name, bytes) into modules, in execution order: embeddings first, then the
/// layers by index, then the rest (final norm, output head) in first-seen order. A tensor
/// outside the layers belongs to the module named by its path without the last component.
pub fn modules_from_tensors(tensors: &[(String, u64)]) -> Vec<Module> {
    let mut layers: BTreeMap<usize, Module> = BTreeMap::new();
    let mut others: Vec<Module> = Vec::new();
    for (name, bytes) in tensors {
        if let Some((index, module)) = layer_of(name) {
            let entry = layers.entry(index).or_insert(Module {
                name: module,
                bytes: 0,
                layer: Some(index),
            });
            entry.bytes += bytes;
            continue;
        }
        let module = name
            .rsplit_once('.')
            .map(|(m, _)| m)
            .unwrap_or(name)
            .to_owned();
        match others.iter_mut().find(|m| m.name == module) {
            Some(m) => m.bytes += bytes,
            None => others.push(Module {
                name: module,
                bytes: *bytes,
                layer: None,
            }),
        }
    }
    let is_embedding = |m: &Module| {
        let n = m.name.as_str();
        n.contains("embed")
            || n.ends_with("wte")
            || n.ends_with("wpe")
            || n.contains("word_embeddings")
    };
    let (head, tail): (Vec<Module>, Vec<Module>) = others.into_iter().partition(is_embedding);
    // After the layers: the final norm, then the output head (headers list names sorted).
    let is_output = |m: &Module| {
        let n = m.name.as_str();
        n == "lm_head" || n == "output" || n.ends_with("classifier") || n.ends_with("score")
    };
    let (outputs, rest): (Vec<Module>, Vec<Module>) = tail.into_iter().partition(is_output);
    head.into_iter()
        .chain(layers.into_values())
        .chain(rest)
        .chain(outputs)
        .collect()
}

/// The modules of a safetensors checkpoint folder, read from the headers only. Floating
/// tensors are counted at `dtype_bytes` per element when given (the dtype they will be
/// converted to), integer buffers as stored.
pub fn modules_from_checkpoint(
    dir: &Path,
    dtype_bytes: Option<u64>,
) -> Result<Vec<Module>, PlanError> {
    modules_from_checkpoint_as(dir, dtype_bytes, Quantization::None)
}

/// [`modules_from_checkpoint`] with the linear layers (the 2-D weights of the decoder layers,
/// and the output head) quantized at load as `q` says; a tied head that is quantized is a copy
/// of the word embeddings of its own.
pub fn modules_from_checkpoint_as(
    dir: &Path,
    dtype_bytes: Option<u64>,
    q: Quantization,
) -> Result<Vec<Module>, PlanError> {
    let quantizes = matches!(q, Quantization::Int8 | Quantization::Int4 { .. });
    let mut tensors = Vec::new();
    let mut head = false;
    let mut word_embeddings: Option<gguf::TensorInfo> = None;
    for file in safetensors::checkpoint_files(dir)? {
        let header = safetensors::read_any_header(&file)?;
        for (name, info) in header.tensors {
            let stored = info.data_offsets[1] - info.data_offsets[0];
            let floating = matches!(info.dtype.as_str(), "F64" | "F32" | "F16" | "BF16");
            let size = safetensors::dtype_size(&info.dtype);
            let dense = match (dtype_bytes, size) {
                (Some(target), Some(_)) if floating => target,
                _ => size.unwrap_or(1) as u64,
            };
            let as_info = || gguf::TensorInfo {
                shape: info.shape.clone(),
                ggml_type: gguf::GgmlType::F32,
                offset: 0,
                size: stored,
            };
            let is_head = name == "lm_head.weight";
            head |= is_head;
            if name.ends_with("embed_tokens.weight")
                || name.ends_with("wte.weight")
                || name.ends_with("word_embeddings.weight")
            {
                word_embeddings = Some(as_info());
            }
            let linear = floating
                && info.shape.len() == 2
                && name.ends_with(".weight")
                && (is_head || layer_of(&name).is_some());
            let bytes = match (dtype_bytes, size) {
                _ if quantizes && linear => quantized::linear_bytes(&as_info(), q, None, dense),
                (Some(target), Some(size)) if floating => stored / size as u64 * target,
                _ => stored,
            };
            tensors.push((name, bytes));
        }
    }
    if quantizes && !head {
        if let Some(embed) = &word_embeddings {
            let dense = dtype_bytes.unwrap_or(4);
            tensors.push((
                "lm_head.weight".into(),
                quantized::linear_bytes(embed, q, None, dense),
            ));
        }
    }
    Ok(modules_from_tensors(&tensors))
}

/// The modules of a (Llama) GGUF file, named as the `accelerate` and `gpt` handlers name them
/// (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`), each tensor counted at
/// `dtype_bytes` per element (GGUF tensors are dequantized at load), read from the header only.
/// Also a `config.json`-like object of the sizes the headroom estimate needs.
pub fn modules_from_gguf(path: &Path, dtype_bytes: u64) -> Result<(Vec<Module>, Value), PlanError> {
    modules_from_gguf_as(path, dtype_bytes, Quantization::None)
}

/// [`modules_from_gguf`] with the linear layers held as `q` says (and, for
/// [`Quantization::GgufKept`], quantized word embeddings as stored); other tensors at
/// `dtype_bytes` per element. A tied head that is quantized is a copy of its own, unless it
/// keeps the file's blocks of 32 (then it serves as the embeddings too).
pub fn modules_from_gguf_as(
    path: &Path,
    dtype_bytes: u64,
    q: Quantization,
) -> Result<(Vec<Module>, Value), PlanError> {
    let header = gguf::read(path)?;
    // How each fused layer loads when the file's quantization is kept.
    let mut fused: BTreeMap<String, Vec<&gguf::TensorInfo>> = BTreeMap::new();
    for (name, info) in &header.tensors {
        if let Some(layer) = quantized::fused_layer(name) {
            fused.entry(layer).or_default().push(info);
        }
    }
    let kept = |name: &str| {
        quantized::fused_layer(name)
            .and_then(|l| fused.get(&l))
            .and_then(|pieces| quantized::kept_as(pieces))
    };
    let tied = !header.tensors.contains_key("output.weight");
    let mut tensors = Vec::new();
    for (name, info) in &header.tensors {
        let numel: u64 = info.shape.iter().map(|&d| d.max(0) as u64).product();
        let module = match name.split('.').collect::<Vec<_>>().as_slice() {
            ["blk", n, rest @ ..] => format!("model.layers.{n}.{}", rest.join(".")),
            ["token_embd", ..] => "model.embed_tokens.weight".into(),
            ["output_norm", ..] => "model.norm.weight".into(),
            ["output", ..] => "lm_head.weight".into(),
            _ => name.clone(),
        };
        let bytes = if quantized::fused_layer(name).is_some() {
            quantized::linear_bytes(info, q, kept(name), dtype_bytes)
        } else if name == "output.weight" {
            quantized::linear_bytes(info, q, quantized::kept_as(&[info]), dtype_bytes)
        } else if name == "token_embd.weight" {
            quantized::embedding_bytes(info, q, tied, dtype_bytes)
        } else {
            numel * dtype_bytes
        };
        tensors.push((module, bytes));
    }
    if tied {
        // Tied: the head is the embedding matrix, or a quantized copy of it.
        let head = match header.tensors.get("token_embd.weight") {
            Some(embed) => {
                let kept = quantized::kept_as(&[embed]);
                match (q, kept) {
                    // Dense, or blocks that serve as the embeddings too (counted there).
                    (Quantization::None, _)
                    | (Quantization::GgufKept, None | Some(quantized::Kept::Blocks { .. })) => 0,
                    _ => quantized::linear_bytes(embed, q, kept, dtype_bytes),
                }
            }
            None => 0,
        };
        tensors.push(("lm_head.weight".into(), head));
    }
    let arch = header
        .metadata
        .get("general.architecture")
        .and_then(gguf::Value::as_str)
        .unwrap_or("llama")
        .to_owned();
    let size = |key: &str| {
        header
            .metadata
            .get(&format!("{arch}.{key}"))
            .and_then(gguf::Value::as_u64)
    };
    let mut config = serde_json::Map::new();
    for (hf, key) in [
        ("hidden_size", "embedding_length"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
        ("intermediate_size", "feed_forward_length"),
    ] {
        if let Some(v) = size(key) {
            config.insert(hf.into(), Value::from(v));
        }
    }
    Ok((modules_from_tensors(&tensors), Value::Object(config)))
}

/// How `auto`/`balanced`/`sequential` spread layers over several GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Fill each device before the next, in order (GPUs, CPU, disk).
    Sequential,
    /// Spread the layers evenly over the GPUs, then as `Sequential` (Accelerate's `auto` and
    /// `balanced`).
    Balanced,
}

impl Strategy {
    /// Parse a `device_map` string.
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s {
            "sequential" => Ok(Self::Sequential),
            "auto" | "balanced" => Ok(Self::Balanced),
            other => Err(PlanError::Invalid(format!(
                "`device_map` {other:?} must be \"auto\", \"balanced\", \"sequential\" or a table of module → device"
            ))),
        }
    }
}

/// What the planner is given.
#[derive(Debug, Clone)]
pub struct Budgets {
    /// GPU index → bytes, in the order to fill.
    pub gpus: Vec<(u32, u64)>,
    /// Main memory for weights.
    pub cpu: u64,
    /// Whether modules may go to disk (an `offload_folder` is set).
    pub disk: bool,
}

impl Budgets {
    /// From `max_memory` (`{"0": "10GiB", "cpu": "30GiB"}`; a `disk` key is ignored: disk is
    /// unbounded). Without a `cpu` entry, `default_cpu` applies.
    pub fn from_max_memory(
        max_memory: &Value,
        default_cpu: u64,
        disk: bool,
    ) -> Result<Self, PlanError> {
        let mut gpus = Vec::new();
        let mut cpu = default_cpu;
        if let Some(map) = max_memory.as_object() {
            for (key, value) in map {
                let size = match value {
                    Value::String(s) => parse_size(s)?,
                    Value::Number(n) => n.as_u64().ok_or_else(|| {
                        PlanError::Invalid(format!("`max_memory.{key}` must be a size"))
                    })?,
                    _ => {
                        return Err(PlanError::Invalid(format!(
                            "`max_memory.{key}` must be a size"
                        )))
                    }
                };
                match Placement::parse(key)? {
                    Placement::Gpu(i) => gpus.push((i, size)),
                    Placement::Cpu => cpu = size,
                    Placement::Disk => {}
                }
            }
        } else if !max_memory.is_null() {
            return Err(PlanError::Invalid(
                "`max_memory` must be a table of device → size".into(),
            ));
        }
        gpus.sort();
        Ok(Self { gpus, cpu, disk })
    }
}

/// Memory kept free on a device for what is not weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headroom {
    /// KV cache per decoder layer at `max_length`, on the layer's device.
    pub per_layer: u64,
    /// Activations, on every device that runs layers.
    pub activations: u64,
}

impl Headroom {
    /// Estimate from a `config.json` (sizes as HF names them) for `max_length` positions and
    /// `dtype_bytes`-byte values: the K and V caches of one sequence per layer, and activations
    /// of a full-length prefill (hidden and feed-forward rows).
    pub fn estimate(config: &Value, max_length: u64, dtype_bytes: u64) -> Self {
        let get = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| config.get(*k).and_then(Value::as_u64))
        };
        let hidden = get(&["hidden_size", "n_embd", "dim"]).unwrap_or(0);
        let heads = get(&["num_attention_heads", "n_head"]).unwrap_or(1).max(1);
        let kv_heads = get(&["num_key_value_heads"]).unwrap_or(heads);
        let head_dim = get(&["head_dim"]).unwrap_or(hidden / heads);
        let ffn = get(&["intermediate_size", "n_inner", "ffn_dim"]).unwrap_or(4 * hidden);
        Self::for_sizes(kv_heads * head_dim, hidden, ffn, max_length, dtype_bytes)
    }

    /// From the sizes themselves: `kv_width` key (and value) values per position and layer
    /// (key/value heads × head size), the hidden and feed-forward sizes.
    pub fn for_sizes(
        kv_width: u64,
        hidden: u64,
        ffn: u64,
        max_length: u64,
        dtype_bytes: u64,
    ) -> Self {
        Self {
            per_layer: 2 * kv_width * max_length * dtype_bytes,
            activations: max_length * (2 * hidden + ffn) * dtype_bytes,
        }
    }
}

/// A plan: where each module goes, and the bytes per device.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Module → device, in execution order.
    pub placements: Vec<(String, Placement)>,
    /// Weights per device.
    pub weights: BTreeMap<Placement, u64>,
    /// Headroom per device.
    pub headroom: BTreeMap<Placement, u64>,
}

impl Plan {
    /// Where a module goes.
    pub fn placement(&self, module: &str) -> Option<Placement> {
        self.placements
            .iter()
            .find(|(m, _)| m == module)
            .map(|(_, p)| *p)
    }

    /// A table for people: the map (consecutive layers on one device collapsed), and bytes per
    /// device against its budget.
    pub fn render(&self, budgets: &Budgets) -> String {
        let mut out = String::from("module → device\n");
        let mut i = 0;
        while i < self.placements.len() {
            let (name, device) = &self.placements[i];
            let mut j = i;
            while j + 1 < self.placements.len()
                && self.placements[j + 1].1 == *device
                && layer_of(&format!("{}.w", self.placements[j + 1].0)).is_some()
                && layer_of(&format!("{name}.w")).is_some()
            {
                j += 1;
            }
            if j > i {
                out.push_str(&format!(
                    "  {name} … {}  →  {device}\n",
                    self.placements[j].0
                ));
            } else {
                out.push_str(&format!("  {name}  →  {device}\n"));
            }
            i = j + 1;
        }
        out.push_str("\ndevice      weights     headroom    budget\n");
        let devices: std::collections::BTreeSet<Placement> = self.weights.keys().copied().collect();
        for d in devices {
            let budget = match d {
                Placement::Gpu(g) => budgets
                    .gpus
                    .iter()
                    .find(|(i, _)| *i == g)
                    .map(|(_, b)| human(*b)),
                Placement::Cpu => Some(human(budgets.cpu)),
                Placement::Disk => None,
            }
            .unwrap_or_else(|| "unbounded".into());
            out.push_str(&format!(
                "{:<11} {:<11} {:<11} {budget}\n",
                d.to_string(),
                human(self.weights.get(&d).copied().unwrap_or(0)),
                human(self.headroom.get(&d).copied().unwrap_or(0)),
            ));
        }
        out
    }
}

/// Place `modules` in order under `budgets`. Layers are never split; a tied output head (a
/// module of no bytes) goes where the embeddings are; only decoder layers go to disk (a module
/// after them stays on the CPU).
pub fn plan(
    modules: &[Module],
    budgets: &Budgets,
    strategy: Strategy,
    headroom: Headroom,
) -> Result<Plan, PlanError> {
    let weights_total: u64 = modules.iter().map(|m| m.bytes).sum();
    let layers = modules.iter().filter(|m| m.layer.is_some()).count() as u64;
    // Devices in fill order, each with its capacity for this plan.
    let mut devices: Vec<(Placement, u64)> = budgets
        .gpus
        .iter()
        .map(|&(i, b)| (Placement::Gpu(i), b))
        .collect();
    if strategy == Strategy::Balanced && budgets.gpus.len() > 1 {
        // An even share of the layers (and their headroom) per GPU, within its budget.
        // The last GPU keeps its whole budget, so that rounding never pushes layers off them.
        let share = (weights_total + layers * headroom.per_layer)
            .div_ceil(budgets.gpus.len() as u64)
            + headroom.activations;
        let last = devices.len() - 1;
        for d in devices[..last].iter_mut() {
            d.1 = d.1.min(share);
        }
    }
    // With disk in play, room on the CPU is kept for the modules after the last layer (the
    // final norm, an untied head), which never go to disk.
    let last_layer = modules.iter().rposition(|m| m.layer.is_some());
    let trailing: u64 = match (budgets.disk, last_layer) {
        (true, Some(i)) => modules[i + 1..].iter().map(|m| m.bytes).sum(),
        _ => 0,
    };
    devices.push((Placement::Cpu, budgets.cpu.saturating_sub(trailing)));
    if budgets.disk {
        devices.push((Placement::Disk, u64::MAX));
    }
    let mut used: Vec<u64> = vec![0; devices.len()];
    let mut room: BTreeMap<Placement, u64> = BTreeMap::new();
    let mut weights: BTreeMap<Placement, u64> = BTreeMap::new();
    let mut placements = Vec::with_capacity(modules.len());
    let mut current = 0;
    let cpu = devices.len() - usize::from(budgets.disk) - 1;
    // Activations are charged once per device that holds weights (not disk).
    let mut acted = vec![false; devices.len()];
    // With disk in play, every layer that reaches the CPU runs there, whether its weights stay
    // or go to disk: the KV room of all of them is charged to the CPU when the first arrives.
    let mut kv_on_cpu = false;
    let does_not_fit = |module: &str, needed: u64, weights: u64, hint: &str| {
        let available = budgets.gpus.iter().map(|g| g.1).sum::<u64>() + budgets.cpu;
        PlanError::DoesNotFit {
            module: module.to_owned(),
            needed,
            weights,
            headroom: needed - weights,
            available,
            hint: hint.to_owned(),
        }
    };
    // What must be in memory even with every layer on disk: the modules that are not layers,
    // the KV cache of every layer and the activations.
    let resident: u64 = modules
        .iter()
        .filter(|m| m.layer.is_none())
        .map(|m| m.bytes)
        .sum();
    let resident_need = resident + layers * headroom.per_layer + headroom.activations;
    for (index, m) in modules.iter().enumerate() {
        // A module without bytes of its own (a tied head) is where the embeddings are.
        if m.bytes == 0 && m.layer.is_none() {
            if let Some(&(_, first)) = placements.first() {
                placements.push((m.name.clone(), first));
                continue;
            }
        }
        loop {
            // Only decoder layers are offloaded to disk: a module after them (the final norm,
            // an untied head) stays in memory, on the CPU.
            if m.layer.is_none() && devices.get(current).is_some_and(|d| d.0 == Placement::Disk) {
                let act = if acted[cpu] { 0 } else { headroom.activations };
                if used[cpu] + m.bytes + act > budgets.cpu {
                    return Err(does_not_fit(
                        &m.name,
                        resident_need,
                        resident,
                        " (only decoder layers go to disk)",
                    ));
                }
                acted[cpu] = true;
                *room.entry(Placement::Cpu).or_default() += act;
                used[cpu] += m.bytes + act;
                *weights.entry(Placement::Cpu).or_default() += m.bytes;
                placements.push((m.name.clone(), Placement::Cpu));
                break;
            }
            let Some(&(device, capacity)) = devices.get(current) else {
                let needed = weights_total + layers * headroom.per_layer + headroom.activations;
                let hint = if budgets.disk {
                    ""
                } else {
                    " (set `offload_folder` to offload the rest to disk)"
                };
                return Err(does_not_fit(&m.name, needed, weights_total, hint));
            };
            if budgets.disk && device == Placement::Cpu && m.layer.is_some() && !kv_on_cpu {
                let remaining = modules[index..]
                    .iter()
                    .filter(|m| m.layer.is_some())
                    .count() as u64;
                let reserve = remaining * headroom.per_layer
                    + if acted[cpu] { 0 } else { headroom.activations };
                if used[cpu] + reserve > budgets.cpu {
                    return Err(does_not_fit(
                        &m.name,
                        resident_need,
                        resident,
                        " (the KV cache of the layers left runs on the CPU even when their \
                          weights go to disk)",
                    ));
                }
                used[cpu] += reserve;
                acted[cpu] = true;
                *room.entry(Placement::Cpu).or_default() += reserve;
                kv_on_cpu = true;
            }
            // KV room: per layer on its GPU, or already charged to the CPU.
            let extra = match (m.layer, device) {
                (None, _) => 0,
                (Some(_), Placement::Gpu(_)) => headroom.per_layer,
                (Some(_), _) if kv_on_cpu => 0,
                (Some(_), _) => headroom.per_layer,
            };
            let act = if acted[current] || device == Placement::Disk {
                0
            } else {
                headroom.activations
            };
            let need = m.bytes + extra + act;
            if device == Placement::Disk || used[current] + need <= capacity {
                used[current] += need;
                acted[current] |= device != Placement::Disk;
                *weights.entry(device).or_default() += m.bytes;
                let host = if device == Placement::Disk {
                    Placement::Cpu
                } else {
                    device
                };
                *room.entry(host).or_default() += extra + act;
                placements.push((m.name.clone(), device));
                break;
            }
            current += 1;
        }
    }
    Ok(Plan {
        placements,
        weights,
        headroom: room,
    })
}

/// Plan as a `device_map` setting says: a table of module → device (checked by [`explicit`]),
/// or `"auto"`, `"balanced"` or `"sequential"` (placed by [`plan`]); absent means `"auto"`.
pub fn plan_from_setting(
    device_map: Option<&Value>,
    modules: &[Module],
    budgets: &Budgets,
    headroom: Headroom,
) -> Result<Plan, PlanError> {
    match device_map {
        Some(Value::Object(table)) => {
            let mut map = BTreeMap::new();
            for (module, device) in table {
                let device = match device {
                    Value::String(s) => Placement::parse(s)?,
                    Value::Number(n) => Placement::parse(&n.to_string())?,
                    other => {
                        return Err(PlanError::Invalid(format!(
                            "`device_map.{module}` = {other} is not a device"
                        )))
                    }
                };
                map.insert(module.clone(), device);
            }
            explicit(&map, modules, budgets, headroom)
        }
        None => plan(modules, budgets, Strategy::Balanced, headroom),
        Some(Value::String(name)) => plan(modules, budgets, Strategy::parse(name)?, headroom),
        Some(other) => Err(PlanError::Invalid(format!(
            "`device_map` must be \"auto\", \"balanced\", \"sequential\" or a table. Given: {other}"
        ))),
    }
}

/// Check an explicit `device_map` (module or module-prefix → device) against the modules and
/// budgets: every key must name something, every module must be placed, and no device may go
/// over its budget.
pub fn explicit(
    map: &BTreeMap<String, Placement>,
    modules: &[Module],
    budgets: &Budgets,
    headroom: Headroom,
) -> Result<Plan, PlanError> {
    let covers = |key: &str, module: &str| {
        key.is_empty() || module == key || module.starts_with(&format!("{key}."))
    };
    let unknown: Vec<String> = map
        .keys()
        .filter(|k| !modules.iter().any(|m| covers(k, &m.name)))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(PlanError::Unknown(unknown));
    }
    let mut placements = Vec::new();
    let mut missing = Vec::new();
    for m in modules {
        // The most specific key wins.
        match map
            .iter()
            .filter(|(k, _)| covers(k, &m.name))
            .max_by_key(|(k, _)| k.len())
        {
            Some((_, &device)) => placements.push((m.name.clone(), device)),
            None => missing.push(m.name.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(PlanError::Missing(missing));
    }
    let mut weights: BTreeMap<Placement, u64> = BTreeMap::new();
    let mut room: BTreeMap<Placement, u64> = BTreeMap::new();
    for (m, (_, device)) in modules.iter().zip(&placements) {
        *weights.entry(*device).or_default() += m.bytes;
        let host = if *device == Placement::Disk {
            Placement::Cpu
        } else {
            *device
        };
        let extra = if m.layer.is_some() {
            headroom.per_layer
        } else {
            0
        };
        let first = !room.contains_key(&host);
        *room.entry(host).or_default() += extra + if first { headroom.activations } else { 0 };
    }
    for (&device, &w) in &weights {
        let budget = match device {
            Placement::Gpu(g) => budgets
                .gpus
                .iter()
                .find(|(i, _)| *i == g)
                .map(|(_, b)| *b)
                .ok_or_else(|| {
                    PlanError::Invalid(format!(
                        "the device map uses {device}, which `max_memory` does not list"
                    ))
                })?,
            Placement::Cpu => budgets.cpu,
            Placement::Disk if !budgets.disk => {
                return Err(PlanError::Invalid(
                    "the device map offloads to disk but no `offload_folder` is set".into(),
                ))
            }
            Placement::Disk => continue,
        };
        let needed = w + room.get(&device).copied().unwrap_or(0);
        if needed > budget {
            return Err(PlanError::OverBudget {
                device,
                needed,
                budget,
            });
        }
    }
    Ok(Plan {
        placements,
        weights,
        headroom: room,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A Llama-like model: embeddings, `n` layers of `layer` bytes, a norm, and an untied head.
    fn model(n: usize, layer: u64) -> Vec<Module> {
        let mut tensors = vec![("model.embed_tokens.weight".to_owned(), 40 * MIB)];
        for l in 0..n {
            tensors.push((
                format!("model.layers.{l}.self_attn.q_proj.weight"),
                layer / 2,
            ));
            tensors.push((format!("model.layers.{l}.mlp.up_proj.weight"), layer / 2));
        }
        // In header (sorted) order, the head comes before the norm.
        tensors.push(("lm_head.weight".into(), 40 * MIB));
        tensors.push(("model.norm.weight".into(), 1024));
        modules_from_tensors(&tensors)
    }

    #[test]
    fn sizes_parse_as_accelerate_writes_them() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("ten GiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn tensors_group_into_whole_layers_in_order() {
        let modules = model(3, 10 * MIB);
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens",
                "model.layers.0",
                "model.layers.1",
                "model.layers.2",
                "model.norm",
                "lm_head"
            ]
        );
        assert_eq!(modules[1].bytes, 10 * MIB);
        // GPT-2 and BLOOM names too.
        let gpt2 = modules_from_tensors(&[
            ("transformer.wte.weight".into(), 1),
            ("transformer.h.0.attn.c_attn.weight".into(), 2),
            ("transformer.ln_f.weight".into(), 3),
        ]);
        assert_eq!(gpt2[1].layer, Some(0));
        assert_eq!(gpt2[1].name, "transformer.h.0");
    }

    #[test]
    fn budgets_are_respected_and_layers_go_in_order_gpu_cpu_disk() {
        let modules = model(8, 10 * MIB);
        let budgets = Budgets {
            gpus: vec![(0, 75 * MIB)],
            cpu: 91 * MIB,
            disk: true,
        };
        let headroom = Headroom {
            per_layer: MIB,
            activations: 2 * MIB,
        };
        let plan = plan(&modules, &budgets, Strategy::Sequential, headroom).expect("plan");
        let order: Vec<Placement> = plan
            .placements
            .iter()
            .zip(&modules)
            .filter(|(_, m)| m.layer.is_some())
            .map(|(p, _)| p.1)
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "layers never go back to an earlier device: {order:?}"
        );
        assert_eq!(order.last(), Some(&Placement::Disk), "{order:?}");
        assert_eq!(
            plan.placement("model.embed_tokens"),
            Some(Placement::Gpu(0))
        );
        // Only layers go to disk: the norm and the head after them stay on the CPU, in the
        // room kept for them.
        assert_eq!(plan.placement("model.norm"), Some(Placement::Cpu));
        assert_eq!(plan.placement("lm_head"), Some(Placement::Cpu));
        let on_gpu = plan.weights[&Placement::Gpu(0)] + plan.headroom[&Placement::Gpu(0)];
        assert!(on_gpu <= 75 * MIB, "{on_gpu}");
        let on_cpu = plan.weights[&Placement::Cpu] + plan.headroom[&Placement::Cpu];
        assert!(on_cpu <= 91 * MIB, "{on_cpu}");
        // The CPU keeps the KV room of every layer it runs, its own four and the one on disk,
        // and the activations.
        assert_eq!(plan.headroom[&Placement::Cpu], 5 * MIB + 2 * MIB);
        assert_eq!(
            plan.placements.len(),
            modules.len(),
            "every module placed once"
        );
    }

    #[test]
    fn a_tied_head_stays_with_the_embeddings() {
        // Tied: the head has no bytes of its own (the checkpoint has no lm_head tensor).
        let mut modules = model(4, 10 * MIB);
        let head = modules
            .iter_mut()
            .find(|m| m.name == "lm_head")
            .expect("head");
        head.bytes = 0;
        let budgets = Budgets {
            gpus: vec![(0, 60 * MIB), (1, 100 * MIB)],
            cpu: 0,
            disk: false,
        };
        let headroom = Headroom {
            per_layer: 0,
            activations: 0,
        };
        let plan = plan(&modules, &budgets, Strategy::Sequential, headroom).expect("plan");
        assert_eq!(plan.placement("model.layers.3"), Some(Placement::Gpu(1)));
        assert_eq!(plan.placement("model.norm"), Some(Placement::Gpu(1)));
        assert_eq!(
            plan.placement("lm_head"),
            plan.placement("model.embed_tokens"),
            "the tied head is where the embedding matrix is"
        );
    }

    #[test]
    fn balanced_spreads_layers_over_gpus() {
        let modules = model(8, 10 * MIB);
        let budgets = Budgets {
            gpus: vec![(0, 1 << 40), (1, 1 << 40)],
            cpu: 0,
            disk: false,
        };
        let plan = plan(&modules, &budgets, Strategy::Balanced, Headroom::default()).expect("plan");
        let on = |g| {
            plan.placements
                .iter()
                .filter(|(n, p)| n.contains("layers") && *p == Placement::Gpu(g))
                .count()
        };
        assert!(on(0) >= 3 && on(1) >= 3, "{:?}", plan.placements);
    }

    #[test]
    fn a_model_that_does_not_fit_is_a_clear_error_naming_the_shortfall() {
        let modules = model(8, 10 * MIB);
        let budgets = Budgets {
            gpus: vec![],
            cpu: 100 * MIB,
            disk: false,
        };
        let err = plan(
            &modules,
            &budgets,
            Strategy::Sequential,
            Headroom::default(),
        )
        .expect_err("too big");
        let message = err.to_string();
        assert!(
            message.contains("does not fit") && message.contains("short"),
            "{message}"
        );
        assert!(message.contains("offload_folder"), "{message}");
        match err {
            PlanError::DoesNotFit {
                needed, available, ..
            } => {
                assert_eq!(needed, 160 * MIB + 1024);
                assert_eq!(available, 100 * MIB);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn explicit_maps_are_validated() {
        let modules = model(4, 10 * MIB);
        let budgets = Budgets {
            gpus: vec![(0, 1 << 30)],
            cpu: 1 << 30,
            disk: true,
        };
        let mut map: BTreeMap<String, Placement> = BTreeMap::new();
        map.insert("model".into(), Placement::Cpu);
        map.insert("model.layers.3".into(), Placement::Disk);
        map.insert("lm_head".into(), Placement::Gpu(0));
        let ok = explicit(&map, &modules, &budgets, Headroom::default()).expect("valid");
        assert_eq!(ok.placement("model.layers.3"), Some(Placement::Disk));
        assert_eq!(ok.placement("model.layers.2"), Some(Placement::Cpu));
        // Unknown names are refused, by name.
        let mut bad = map.clone();
        bad.insert("model.layers.9".into(), Placement::Cpu);
        assert_eq!(
            explicit(&bad, &modules, &budgets, Headroom::default()),
            Err(PlanError::Unknown(vec!["model.layers.9".into()]))
        );
        // Missing layers are refused, by name.
        let mut partial: BTreeMap<String, Placement> = BTreeMap::new();
        partial.insert("model.embed_tokens".into(), Placement::Cpu);
        partial.insert("model.layers.0".into(), Placement::Cpu);
        partial.insert("model.norm".into(), Placement::Cpu);
        partial.insert("lm_head".into(), Placement::Cpu);
        let err = explicit(&partial, &modules, &budgets, Headroom::default()).expect_err("missing");
        assert_eq!(
            err,
            PlanError::Missing(vec![
                "model.layers.1".into(),
                "model.layers.2".into(),
                "model.layers.3".into()
            ])
        );
        // A device over its budget is named.
        let small = Budgets {
            gpus: vec![(0, MIB)],
            ..budgets
        };
        let err = explicit(&map, &modules, &small, Headroom::default()).expect_err("over");
        assert!(err.to_string().contains("cuda:0 would hold"), "{err}");
    }

    #[test]
    fn headroom_is_estimated_from_config() {
        let config = serde_json::json!({"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536});
        let h = Headroom::estimate(&config, 2048, 4);
        assert_eq!(h.per_layer, 2 * 3 * 64 * 2048 * 4);
        assert_eq!(h.activations, 2048 * (2 * 576 + 1536) * 4);
    }
}
