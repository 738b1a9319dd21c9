//! What the handlers that serve a TorchScript file share: finding and loading the module, and
//! the archive's class names.

use std::ffi::{c_char, c_void, CStr};
use std::path::Path;

use cresset_plugin_api::sdk::{settings, InitContext};
use cresset_plugin_api::PluginError;
use tch::{CModule, Device};

/// Make torchvision's `nms` and `roi_align` operators available to TorchScript modules in this
/// process (scripted torchvision detectors call them: SSD and RetinaNet `nms`, the R-CNNs both),
/// each unless something registered it already. Idempotent.
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
    let serialized = ctx
        .model_config
        .get("serialized_file")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("model.pt");
    let path = settings::path_inside(
        &ctx.model_dir,
        "model_file",
        model_file.unwrap_or(serialized),
    )?;
    if !path.is_file() {
        return Err(PluginError::not_found(format!(
            "the archive has no model file `{}`",
            path.display()
        )));
    }
    if let Some(other) = not_torchscript(&path) {
        return Err(PluginError::invalid_input(format!(
            "{} is {other}, not TorchScript: this handler serves TorchScript files \
             (torch.jit.script or torch.jit.trace, then torch.jit.save)",
            path.display()
        )));
    }
    let device = crate::instance_device(ctx);
    register_torchvision_ops();
    let mut module = CModule::load_on_device(&path, device).map_err(|e| {
        PluginError::invalid_input(format!(
            "cannot load {} as TorchScript: {e}",
            path.display()
        ))
    })?;
    module.set_eval();
    Ok((module, device))
}

/// What a model file is when it is a known format other than TorchScript, from its first bytes
/// and, for a zip, its member names: an eager `torch.save` checkpoint, an AOTInductor package,
/// ONNX, safetensors. `None` for TorchScript or anything unknown (libtorch then says what it
/// can).
pub fn not_torchscript(path: &Path) -> Option<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .ok()?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        let file = std::fs::File::open(path).ok()?;
        let archive = zip::ZipArchive::new(file).ok()?;
        let names: Vec<&str> = archive.file_names().collect();
        let has = |suffix: &str| {
            names
                .iter()
                .any(|n| n.ends_with(suffix) || n.contains(suffix))
        };
        if has("/code/") || has("constants.pkl") {
            return None;
        }
        if has("aotinductor") || has(".wrapper.so") || has("archive_format") {
            return Some("an AOTInductor package (not served yet)");
        }
        if has("data.pkl") {
            return Some(
                "an eager checkpoint saved with torch.save (a pickle; not served yet: save the \
                 model with torch.jit.save, or its weights as safetensors)",
            );
        }
        return None;
    }
    match path.extension().and_then(|x| x.to_str()) {
        Some("onnx") => Some("an ONNX model (not served yet)"),
        Some("safetensors") => Some("a safetensors checkpoint (weights without the model's code)"),
        // A pickle before torch 1.6's zip format starts with the pickle protocol opcode.
        Some("pt" | "pth" | "bin") if head.first() == Some(&0x80) => Some(
            "an eager checkpoint in torch.save's legacy pickle format (not served: save the \
             model with torch.jit.save)",
        ),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_with(dir: &Path, name: &str, members: &[&str]) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&path).expect("create"));
        for member in members {
            writer
                .start_file(*member, zip::write::SimpleFileOptions::default())
                .expect("member");
            writer.write_all(b"x").expect("write");
        }
        writer.finish().expect("finish");
        path
    }

    #[test]
    fn other_model_formats_are_named_before_libtorch_reads_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let scripted = zip_with(
            dir.path(),
            "scripted.pt",
            &[
                "model/data.pkl",
                "model/code/__torch__.py",
                "model/constants.pkl",
            ],
        );
        assert_eq!(not_torchscript(&scripted), None);
        let eager = zip_with(
            dir.path(),
            "pytorch_model.bin",
            &["archive/data.pkl", "archive/data/0", "archive/version"],
        );
        assert!(not_torchscript(&eager).is_some_and(|m| m.contains("torch.save")));
        let aoti = zip_with(
            dir.path(),
            "model.pt2",
            &[
                "model/archive_format",
                "model/data/aotinductor/model/x.wrapper.so",
            ],
        );
        assert!(not_torchscript(&aoti).is_some_and(|m| m.contains("AOTInductor")));
        let onnx = dir.path().join("model.onnx");
        std::fs::write(&onnx, [0x08, 0x07]).expect("write");
        assert!(not_torchscript(&onnx).is_some_and(|m| m.contains("ONNX")));
        let legacy = dir.path().join("old.pth");
        std::fs::write(&legacy, [0x80, 0x02, 0x8a]).expect("write");
        assert!(not_torchscript(&legacy).is_some_and(|m| m.contains("legacy")));
    }
}
