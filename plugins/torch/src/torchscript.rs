//! What the handlers that serve a TorchScript file share: finding and loading the module, and
//! the archive's class names.

use std::ffi::{c_char, c_void, CStr};
use std::path::Path;

use cresset_plugin_api::sdk::{settings, InitContext};

use crate::model_file::{format_of, model_path, Format};
use cresset_plugin_api::PluginError;
use tch::{CModule, Device};

/// Make torchvision's `nms` and `roi_align` operators available to TorchScript modules and
/// AOTInductor packages in this process (torchvision's detectors call them: SSD and RetinaNet
/// `nms`, the R-CNNs both), each unless something registered it already. Idempotent.
pub fn register_torchvision_ops() {
    // SAFETY: takes no arguments; registers once per process behind a std::call_once.
    let result = unsafe { cresset_register_torchvision_ops() };
    if result < 0 {
        tracing::warn!(
            "torchvision::nms could not be registered: models that call it will not load"
        );
    }
}

/// The archive's TorchScript module, on the instance's device in eval mode, with that device.
/// `model_file` (the `[handler]` setting) names it; by default it is the archive's serialized
/// file (`--serialized-file`, a `.mar`'s `serializedFile`), else `model.pt`.
pub fn load_module(
    ctx: &InitContext,
    model_file: Option<&str>,
) -> Result<(CModule, Device), PluginError> {
    let path = model_path(ctx, model_file)?;
    if let Some(other) = not_torchscript(&path) {
        return Err(PluginError::invalid_input(format!(
            "{} is {other}, not TorchScript: this handler serves TorchScript files \
             (torch.jit.script or torch.jit.trace, then torch.jit.save)",
            path.display()
        )));
    }
    load_path(ctx, &path)
}

/// The TorchScript module at `path` (a file of the archive), as [`load_module`] loads it.
pub fn load_path(ctx: &InitContext, path: &Path) -> Result<(CModule, Device), PluginError> {
    let device = crate::instance_device(ctx);
    register_torchvision_ops();
    let mut module = CModule::load_on_device(path, device).map_err(|e| {
        PluginError::invalid_input(format!(
            "cannot load {} as TorchScript: {e}",
            path.display()
        ))
    })?;
    module.set_eval();
    Ok((module, device))
}

/// What a model file is when it is not TorchScript (see [`format_of`]). `None` for
/// TorchScript or anything unknown (libtorch then says what it can).
pub fn not_torchscript(path: &Path) -> Option<&'static str> {
    match format_of(path) {
        Ok(Format::TorchScript) => None,
        Ok(Format::Aoti) => Some("an AOTInductor package (the vision handlers serve these)"),
        Ok(Format::Onnx) => Some("an ONNX model (the vision handlers serve these)"),
        Err(what) => Some(what),
    }
}

/// The archive's class names, from `labels_file` (the `[handler]` setting, default
/// `index_to_name.json`) when the archive has it.
pub fn archive_labels(
    ctx: &InitContext,
    labels_file: Option<&str>,
) -> Result<Option<Vec<String>>, PluginError> {
    let path = settings::path_inside(
        &ctx.model_dir,
        "labels_file",
        labels_file.unwrap_or("index_to_name.json"),
    )?;
    if path.is_file() {
        read_labels(&path).map(Some)
    } else {
        Ok(None)
    }
}

/// Read an `index_to_name.json` (see [`crate::read_index_to_name`]).
pub fn read_labels(path: &Path) -> Result<Vec<String>, PluginError> {
    crate::read_index_to_name(path).map_err(|e| match e {
        crate::ModelError::Checkpoint(m) => PluginError::internal(m),
        other => PluginError::invalid_input(other.to_string()),
    })
}

/// Class `index`'s name in `labels`, or the index itself when it has none.
pub fn label_name(labels: &[String], index: i64) -> String {
    usize::try_from(index)
        .ok()
        .and_then(|i| labels.get(i))
        .filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| index.to_string())
}

/// The top `k` classes of one row of class scores (`[C]`) with their softmax probabilities,
/// highest first: `{"tabby": 0.41, ...}`, TorchServe's classifier answer for one input.
pub fn top_classes(
    scores: &tch::Tensor,
    k: i64,
    labels: &[String],
) -> Result<serde_json::Value, PluginError> {
    let probs = scores.softmax(-1, tch::Kind::Float).unsqueeze(0);
    let mut rows = top_labels(&probs, k, labels)?;
    Ok(rows.pop().unwrap_or(serde_json::Value::Null))
}

/// The top `k` of each row of `probs` (`[N, C]`), highest first, as `{label: probability}`
/// per row: TorchServe's classifier answer. A class without a name in `labels` is named by its
/// index.
pub fn top_labels(
    probs: &tch::Tensor,
    k: i64,
    labels: &[String],
) -> Result<Vec<serde_json::Value>, PluginError> {
    let internal = |e: tch::TchError| PluginError::internal(e.to_string());
    let k = k.min(*probs.size().last().unwrap_or(&0));
    let (values, indices) = probs.topk(k, -1, true, true);
    let values = Vec::<Vec<f32>>::try_from(&values).map_err(internal)?;
    let indices = Vec::<Vec<i64>>::try_from(&indices).map_err(internal)?;
    Ok(values
        .into_iter()
        .zip(indices)
        .map(|(vals, idxs)| {
            let mut row = serde_json::Map::new();
            for (v, i) in vals.into_iter().zip(idxs) {
                row.insert(label_name(labels, i), serde_json::json!(v));
            }
            serde_json::Value::Object(row)
        })
        .collect())
}

extern "C" {
    fn cresset_register_torchvision_ops() -> i32;
    fn cresset_jit_optimize_for_inference(
        module: *mut c_void,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn cresset_free_c_string(s: *mut c_char);
}

// tch's `CModule` is one pointer to the C++ module (`torch::jit::Module*`, freed with `delete`
// on drop); the shim reads and makes it through that pointer.
const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut c_void>());

/// libtorch's `torch.jit.optimize_for_inference` on a loaded module in eval mode: frozen
/// (parameters inlined, conv + batch norm folded) and optimized for the CPU (oneDNN weight
/// layouts, fused conv + add + relu). A new module; `module` is left as it was. The outputs
/// differ from the original's by float rounding only (about 1e-6 on resnet18's logits).
pub fn optimize_for_inference(module: &CModule) -> Result<CModule, String> {
    // SAFETY: `CModule` is a single `*mut CModule_` field (checked above), which the shim
    // only reads for the duration of the call.
    let raw = unsafe { *(module as *const CModule).cast::<*mut c_void>() };
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: `raw` is a live module; the shim returns a new heap module or sets `error`.
    let optimized = unsafe { cresset_jit_optimize_for_inference(raw, &mut error) };
    if optimized.is_null() {
        let message = if error.is_null() {
            "optimize_for_inference failed".to_owned()
        } else {
            // SAFETY: a NUL-terminated string the shim made with strdup, freed once here.
            let text = unsafe { CStr::from_ptr(error) }
                .to_string_lossy()
                .into_owned();
            unsafe { cresset_free_c_string(error) };
            text
        };
        return Err(message);
    }
    // SAFETY: `optimized` is a `new torch::jit::Module`, which the returned `CModule` owns and
    // frees with `delete`, as it frees the modules tch loads.
    Ok(unsafe { std::mem::transmute::<*mut c_void, CModule>(optimized) })
}
