//! What Cresset's torch plugins share: device choice, libtorch threads, tensors to and from
//! JSON (TorchServe's `{"data": [[...]]}` and KServe v2's `inputs` lists), HuggingFace
//! checkpoints (safetensors, `config.json`, `tokenizer.json`), the model architectures
//! (BERT-family encoders, GPT-2) and token sampling.

pub mod aoti;
pub mod bloom;
pub mod cuda_graph;
pub mod decoder;
pub mod encoder;
pub mod generation;
pub mod gguf;
pub mod gpt2;
mod json;
pub mod layers;
pub mod model_file;
pub mod onnx;
pub mod quant;
pub mod sampling;
pub mod sentencepiece;
pub mod threads;
pub mod torchscript;
pub mod weights;

mod inference_mode {
    use std::ffi::c_void;

    extern "C" {
        fn cresset_inference_mode_enter() -> *mut c_void;
        fn cresset_inference_mode_exit(guard: *mut c_void);
    }

    /// libtorch's InferenceMode for the current scope and thread: no autograd, no version
    /// counters, no view tracking. Tensors made inside are inference tensors: they can be read
    /// anywhere but not modified in place or used for autograd outside the mode. Falls back to
    /// `no_grad` if the guard cannot be made. Not `Send`: the mode is per thread.
    pub struct InferenceMode {
        guard: *mut c_void,
        _fallback: Option<tch::NoGradGuard>,
    }

    impl InferenceMode {
        /// Enter inference mode until the value is dropped.
        pub fn enter() -> Self {
            // SAFETY: the shim allocates a guard (or returns null); we free it once, in Drop.
            let guard = unsafe { cresset_inference_mode_enter() };
            let fallback = guard.is_null().then(tch::no_grad_guard);
            Self {
                guard,
                _fallback: fallback,
            }
        }
    }

    impl Drop for InferenceMode {
        fn drop(&mut self) {
            if !self.guard.is_null() {
                // SAFETY: made by cresset_inference_mode_enter on this thread (the type is
                // !Send), freed exactly once.
                unsafe { cresset_inference_mode_exit(self.guard) };
            }
        }
    }
}

pub use inference_mode::InferenceMode;

pub use json::{
    json_type, tensor_from_nested, tensor_from_v2, tensor_to_nested, tensor_to_v2, V2Input,
    V2Output,
};

use std::sync::OnceLock;

pub use tch;
pub use tokenizers;

/// A model read by several threads at once: one copy of the weights serves every worker of a
/// model version (the SDK's `SharedModel`).
///
/// `tch::Tensor` is `Send` but not `Sync`, because a tensor can be written in place through
/// `&self`. libtorch itself allows any number of threads to read a tensor while none writes it,
/// and the models of this crate ([`encoder::Encoder`], [`decoder::Decoder`]) write their weights
/// at load only: their `&self` methods allocate new tensors for activations and caches and never
/// write to a weight, and their weights do not require gradients (integrated gradients take
/// them with respect to the embedded input), so autograd records nothing on them either. Wrap
/// only such values.
pub struct ReadOnly<T>(T);

// SAFETY: see the type's documentation: the wrapped value is only read after construction
// (`ReadOnly` hands out `&T` only), and libtorch supports concurrent reads of a tensor.
unsafe impl<T: Send> Sync for ReadOnly<T> {}

impl<T> ReadOnly<T> {
    /// Wrap a model whose `&self` methods never write to its tensors.
    pub fn new(value: T) -> Self {
        Self(value)
    }
}

impl<T> std::ops::Deref for ReadOnly<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Give freed heap memory back to the operating system (glibc's `malloc_trim`). Tensors of a
/// few MB come from malloc's heap once its dynamic mmap threshold has grown, and freeing them
/// does not shrink the resident set; loading a model layer by layer frees a layer's worth at a
/// time, so it trims as it goes. A no-op elsewhere than glibc.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of malloc's own arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Errors from this crate, with messages meant for clients.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    /// The input is malformed; the message names the field.
    #[error("{0}")]
    InvalidInput(String),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Errors loading or running a model architecture.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` (or a handler setting) is missing something or names what is not
    /// supported.
    #[error("{0}")]
    Config(String),
    /// The checkpoint files are missing, malformed, or disagree with the config.
    #[error("{0}")]
    Checkpoint(String),
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The input cannot be run (too long, empty, …); the message says why.
    #[error("{0}")]
    Invalid(String),
    /// The model cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Read `index_to_name.json`: `{"0": "cat"}` or TorchServe's ImageNet form
/// `{"0": ["n01440764", "tench"]}` (the last string is the name).
pub fn read_index_to_name(path: &std::path::Path) -> Result<Vec<String>, ModelError> {
    // A label file from an archive is small; a huge one is refused before it is read.
    const MAX_BYTES: u64 = 64 << 20;
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_BYTES) {
        return Err(ModelError::Config(format!(
            "{} is larger than {MAX_BYTES} bytes",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| {
            ModelError::Config(format!(
                "{} must be a JSON object of index → name: {e}",
                path.display()
            ))
        })?;
    // The generalized NLP handler's form for token classification:
    // `{"label_list": "[O, B-MISC, I-MISC, ...]"}` (or a JSON list), the labels in index order.
    if let (1, Some(list)) = (map.len(), map.get("label_list")) {
        let labels: Vec<String> = match list {
            serde_json::Value::String(text) => text
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|l| l.trim().trim_matches(['"', '\'']).to_owned())
                .filter(|l| !l.is_empty())
                .collect(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect(),
            other => {
                return Err(ModelError::Config(format!(
                    "{}: `label_list` must be a list or a \"[A, B, ...]\" string. Given: {other}",
                    path.display()
                )))
            }
        };
        if labels.is_empty() {
            return Err(ModelError::Config(format!(
                "{}: `label_list` is empty",
                path.display()
            )));
        }
        return Ok(labels);
    }
    let mut pairs = Vec::with_capacity(map.len());
    for (key, value) in map {
        let index: usize = key.parse().map_err(|_| {
            ModelError::Config(format!(
                "{}: key {key:?} is not a class index",
                path.display()
            ))
        })?;
        let name = match &value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(items) => items
                .iter()
                .rev()
                .find_map(|v| v.as_str())
                .unwrap_or_default()
                .to_owned(),
            other => other.to_string(),
        };
        pairs.push((index, name));
    }
    pairs.sort();
    // The label table is dense; refuse indices that would allocate absurd amounts.
    const MAX_CLASSES: usize = 1_000_000;
    if let Some((index, _)) = pairs.last().filter(|(i, _)| *i >= MAX_CLASSES) {
        return Err(ModelError::Config(format!(
            "{}: class index {index} is too large (the most is {})",
            path.display(),
            MAX_CLASSES - 1
        )));
    }
    let mut labels = vec![String::new(); pairs.last().map(|(i, _)| i + 1).unwrap_or(0)];
    for (i, name) in pairs {
        labels[i] = name;
    }
    Ok(labels)
}

impl From<ModelError> for cresset_plugin_api::PluginError {
    fn from(e: ModelError) -> Self {
        use cresset_plugin_api::PluginError;
        match e {
            // A bad config or checkpoint is the archive's fault: the client's 400, not a
            // server failure.
            ModelError::Invalid(m) | ModelError::Config(m) | ModelError::Checkpoint(m) => {
                PluginError::invalid_input(m)
            }
            ModelError::Unsupported(m) => PluginError::unsupported(m),
            other => PluginError::internal(other.to_string()),
        }
    }
}

/// The device an instance runs on ([`select_device`] from its assignment), with libtorch's
/// threads set from it; what falls back or is ignored is logged for the model.
pub fn instance_device(ctx: &cresset_plugin_api::sdk::InitContext) -> tch::Device {
    let (device, warning) = select_device(
        &ctx.assignment.device_ids,
        ctx.assignment.device_type == cresset_plugin_api::DeviceType::GPU,
    );
    if let Some(w) = warning {
        tracing::warn!(model = %ctx.model_name, "{w}");
    }
    if let Some(w) = configure_threads(ctx.assignment.intra_op_threads) {
        tracing::info!(model = %ctx.model_name, "{w}");
    }
    if let tch::Device::Cuda(index) = device {
        allow_tf32_on(index);
    }
    device
}

/// TF32 for f32 matmuls and convolutions on GPUs of compute capability 8.0 and later (Ampere
/// on), as TorchServe's BaseHandler sets it, when the operator asks for it with
/// `CRESSET_TF32=1`: process-wide, like torch.backends' switches. Off by default: TF32 keeps 10
/// bits of mantissa (errors near 1e-3 where f32's are 1e-7), so a model asked to run in f32
/// would no longer give the reference's outputs to 1e-4; the `gpt` handler's GPU default is
/// bf16 anyway.
fn allow_tf32_on(index: usize) {
    if std::env::var("CRESSET_TF32").as_deref() != Ok("1") {
        return;
    }
    match cuda_graph::capability(index) {
        Ok(c) if c >= 80 => match cuda_graph::allow_tf32(true) {
            Ok(()) => tracing::info!("TF32 on for f32 matmuls (compute capability {c})"),
            Err(why) => tracing::warn!("TF32 not set: {why}"),
        },
        Ok(c) => {
            tracing::info!("CRESSET_TF32=1: cuda:{index} (compute capability {c}) has no TF32")
        }
        Err(why) => tracing::warn!("cuda:{index}: no compute capability: {why}"),
    }
}

/// Load `tokenizer.json` from a checkpoint directory with its baked-in padding and truncation
/// removed: callers set their own (a batch is padded to its longest member, truncation follows
/// the handler's `max_length`).
pub fn load_tokenizer(dir: &std::path::Path) -> Result<tokenizers::Tokenizer, ModelError> {
    load_tokenizer_file(&dir.join("tokenizer.json"))
}

/// A `tokenizer.json` file, without padding or truncation.
pub fn load_tokenizer_file(path: &std::path::Path) -> Result<tokenizers::Tokenizer, ModelError> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| ModelError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// The device for an instance: `cuda:N` when a GPU is assigned and CUDA is available, else the
/// CPU (with a warning when a GPU was asked for but none is usable).
pub fn select_device(gpu_ids: &[i32], wants_gpu: bool) -> (tch::Device, Option<String>) {
    if !wants_gpu {
        return (tch::Device::Cpu, None);
    }
    let Some(&id) = gpu_ids.first() else {
        return (
            tch::Device::Cpu,
            Some("a GPU was asked for but no device id was assigned; using the CPU".into()),
        );
    };
    if !tch::Cuda::is_available() {
        return (
            tch::Device::Cpu,
            Some(format!(
                "GPU {id} was asked for but CUDA is not available; using the CPU"
            )),
        );
    }
    let count = tch::Cuda::device_count();
    if id < 0 || i64::from(id) >= count {
        return (
            tch::Device::Cpu,
            Some(format!(
                "GPU {id} was asked for but only {count} GPUs are visible; using the CPU"
            )),
        );
    }
    (tch::Device::Cuda(id as usize), None)
}

/// Set libtorch's intra-op thread count. libtorch has one pool per process, shared by every
/// torch plugin, so the first caller wins; later calls with another value are ignored and
/// reported.
pub fn configure_threads(intra_op_threads: u32) -> Option<String> {
    static SET: OnceLock<i32> = OnceLock::new();
    let wanted = intra_op_threads.max(1) as i32;
    let set = *SET.get_or_init(|| {
        tch::set_num_threads(wanted);
        wanted
    });
    (set != wanted).then(|| {
        format!(
            "libtorch already uses {set} intra-op threads in this process; {wanted} was asked for"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_mode_makes_inference_tensors_and_ends_with_its_scope() {
        let before = tch::Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu));
        let inside = {
            let _mode = InferenceMode::enter();
            &before * 2.0
        };
        assert!(inside.is_inference());
        assert!(!before.is_inference());
        let after = &before * 2.0;
        assert!(!after.is_inference(), "the mode ends with the guard");
        assert_eq!(Vec::<f32>::try_from(&inside).expect("read"), vec![2.0, 2.0]);
    }

    #[test]
    fn cpu_is_chosen_unless_a_usable_gpu_is_assigned() {
        assert_eq!(select_device(&[], false), (tch::Device::Cpu, None));
        let (device, warning) = select_device(&[], true);
        assert_eq!(device, tch::Device::Cpu);
        assert!(warning.is_some_and(|w| w.contains("no device id")));
        if !tch::Cuda::is_available() {
            let (device, warning) = select_device(&[0], true);
            assert_eq!(device, tch::Device::Cpu);
            assert!(warning.is_some_and(|w| w.contains("CUDA is not available")));
        } else {
            assert_eq!(select_device(&[0], true).0, tch::Device::Cuda(0));
            assert!(select_device(&[999], true)
                .1
                .is_some_and(|w| w.contains("GPUs are visible")));
        }
    }
}
