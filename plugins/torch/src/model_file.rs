//! A handler's model file: where it is in the archive and what format it is in (TorchScript,
//! an AOTInductor package, ONNX), told by its first bytes and, for a zip, its member names;
//! or `[handler] format`. Formats that no handler serves (an eager `torch.save` checkpoint,
//! safetensors, a legacy pickle) are named, so the error says what was given.

use std::path::{Path, PathBuf};

use cresset_plugin_api::sdk::{settings, InitContext};
use cresset_plugin_api::PluginError;
use tch::{CModule, Device, IValue, Tensor};

use crate::aoti::Package;
use crate::onnx::OnnxModel;

/// A model file format a handler can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.jit.save` (scripted or traced).
    TorchScript,
    /// `torch._inductor.aoti_compile_and_package`'s `.pt2`.
    Aoti,
    /// ONNX, run by ONNX Runtime.
    Onnx,
}

/// `[handler] format`: a format, or `auto` (from the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatKey {
    #[default]
    Auto,
    Torchscript,
    Aoti,
    Onnx,
}

impl FormatKey {
    /// The format of `path`: the one named, or the one its bytes show.
    pub fn resolve(self, path: &Path) -> Result<Format, PluginError> {
        match self {
            Self::Torchscript => Ok(Format::TorchScript),
            Self::Aoti => Ok(Format::Aoti),
            Self::Onnx => Ok(Format::Onnx),
            Self::Auto => format_of(path).map_err(|what| {
                PluginError::invalid_input(format!(
                    "{} is {what}, which no handler serves: give TorchScript (torch.jit.save), \
                     an AOTInductor package (.pt2) or ONNX",
                    path.display()
                ))
            }),
        }
    }
}

/// A loaded model file of any format: tensors in, tensors out.
pub enum Runner {
    /// A TorchScript module (on the instance's device, in eval mode).
    TorchScript(CModule),
    /// An AOTInductor package (CPU).
    Aoti(Package),
    /// An ONNX model in ONNX Runtime (CPU).
    Onnx(OnnxModel),
}

impl Runner {
    /// Load the model file at `path` in `format` for the instance `ctx` describes: its device
    /// (AOTInductor and ONNX run on the CPU here) and threads.
    pub fn load(
        ctx: &InitContext,
        path: &Path,
        format: Format,
    ) -> Result<(Self, Device), PluginError> {
        if format == Format::TorchScript {
            let (module, device) = crate::torchscript::load_path(ctx, path)?;
            return Ok((Self::TorchScript(module), device));
        }
        let device = crate::instance_device(ctx);
        if device != Device::Cpu {
            return Err(PluginError::invalid_input(format!(
                "{} is {format:?}, which this build runs on the CPU only: set \
                 `device_type = \"cpu\"` or give TorchScript",
                path.display()
            )));
        }
        let fail = |e: String| {
            PluginError::invalid_input(format!("cannot load {} as {format:?}: {e}", path.display()))
        };
        let runner = if format == Format::Aoti {
            Self::Aoti(Package::load(path, 1).map_err(fail)?)
        } else {
            let threads = ctx.assignment.intra_op_threads.max(1) as usize;
            Self::Onnx(OnnxModel::load(path, threads).map_err(fail)?)
        };
        Ok((runner, device))
    }

    /// The model on `inputs`: its output tensors in order (a TorchScript module's tensor, or
    /// the tensors of its tuple or list), on the CPU. TorchScript runs under InferenceMode.
    pub fn run(&mut self, inputs: &[&Tensor], device: Device) -> Result<Vec<Tensor>, PluginError> {
        let rejected =
            |e: String| PluginError::invalid_input(format!("the model rejected the input: {e}"));
        let outputs = match self {
            Self::TorchScript(module) => {
                let _inference = crate::InferenceMode::enter();
                let args: Vec<IValue> = inputs
                    .iter()
                    .map(|t| IValue::Tensor(t.to_device(device)))
                    .collect();
                match module
                    .forward_is(&args)
                    .map_err(|e| rejected(e.to_string()))?
                {
                    IValue::Tensor(t) => vec![t],
                    IValue::Tuple(items) | IValue::GenericList(items) => items
                        .into_iter()
                        .map(|v| match v {
                            IValue::Tensor(t) => Ok(t),
                            _ => Err(PluginError::internal(
                                "the model answered an item that is not a tensor",
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                    IValue::TensorList(ts) => ts,
                    _ => {
                        return Err(PluginError::internal(
                            "the model must answer a tensor or a tuple of tensors",
                        ))
                    }
                }
            }
            Self::Aoti(package) => package.run(inputs).map_err(rejected)?,
            Self::Onnx(onnx) => onnx.run(inputs).map_err(rejected)?,
        };
        Ok(outputs
            .into_iter()
            .map(|t| t.to_device(Device::Cpu))
            .collect())
    }
}

/// The archive's model file ([`model_path`]) and its format (`format`, or told by the file).
pub fn resolve(
    ctx: &InitContext,
    model_file: Option<&str>,
    format: Option<FormatKey>,
) -> Result<(PathBuf, Format), PluginError> {
    let path = model_path(ctx, model_file)?;
    let format = format.unwrap_or_default().resolve(&path)?;
    Ok((path, format))
}

/// The archive's model file: `model_file` (the `[handler]` setting) names it; by default it is
/// the archive's serialized file (`--serialized-file`, a `.mar`'s `serializedFile`), else
/// `model.pt`. It must exist.
pub fn model_path(ctx: &InitContext, model_file: Option<&str>) -> Result<PathBuf, PluginError> {
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
    Ok(path)
}

/// The format of a model file, or what it is when it is a known format no handler runs.
/// Anything unknown is taken for TorchScript (libtorch then says what it can).
pub fn format_of(path: &Path) -> Result<Format, &'static str> {
    use std::io::Read;
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        let names: Vec<String> = std::fs::File::open(path)
            .ok()
            .and_then(|f| zip::ZipArchive::new(f).ok())
            .map(|a| a.file_names().map(str::to_owned).collect())
            .unwrap_or_default();
        let has = |part: &str| names.iter().any(|n| n.contains(part));
        if has("/code/") || has("constants.pkl") {
            return Ok(Format::TorchScript);
        }
        if has("aotinductor") || has(".wrapper.so") || has("archive_format") {
            return Ok(Format::Aoti);
        }
        if has("data.pkl") {
            return Err(
                "an eager checkpoint saved with torch.save (weights without the model's code; \
                 HuggingFace folders with pytorch_model.bin are served by the nlp, gpt and \
                 accelerate handlers)",
            );
        }
        return Ok(Format::TorchScript);
    }
    match path.extension().and_then(|x| x.to_str()) {
        Some("onnx") => Ok(Format::Onnx),
        Some("safetensors") => Err("a safetensors checkpoint (weights without the model's code)"),
        // A pickle before torch 1.6's zip format starts with the pickle protocol opcode.
        Some("pt" | "pth" | "bin") if head.first() == Some(&0x80) => {
            Err("an eager checkpoint in torch.save's legacy pickle format")
        }
        // An ONNX ModelProto starts with its ir_version (field 1, a varint: byte 0x08).
        _ if head.first() == Some(&0x08) && n > 1 && head[1] < 0x80 && head[1] > 0 => {
            Ok(Format::Onnx)
        }
        _ => Ok(Format::TorchScript),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_with(dir: &Path, name: &str, members: &[&str]) -> PathBuf {
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
    fn formats_are_told_by_their_bytes() {
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
        assert_eq!(format_of(&scripted), Ok(Format::TorchScript));
        let eager = zip_with(
            dir.path(),
            "pytorch_model.bin",
            &["archive/data.pkl", "archive/data/0", "archive/version"],
        );
        assert!(format_of(&eager).is_err_and(|m| m.contains("torch.save")));
        let aoti = zip_with(
            dir.path(),
            "model.pt2",
            &[
                "model/archive_format",
                "model/data/aotinductor/model/x.wrapper.so",
            ],
        );
        assert_eq!(format_of(&aoti), Ok(Format::Aoti));
        let onnx = dir.path().join("model.onnx");
        std::fs::write(&onnx, [0x08, 0x07]).expect("write");
        assert_eq!(format_of(&onnx), Ok(Format::Onnx));
        let renamed = dir.path().join("model.bin");
        std::fs::write(&renamed, [0x08, 0x08, 0x12]).expect("write");
        assert_eq!(format_of(&renamed), Ok(Format::Onnx));
        let legacy = dir.path().join("old.pth");
        std::fs::write(&legacy, [0x80, 0x02, 0x8a]).expect("write");
        assert!(format_of(&legacy).is_err_and(|m| m.contains("legacy")));
        let st = dir.path().join("model.safetensors");
        std::fs::write(&st, [0x10, 0, 0, 0]).expect("write");
        assert!(format_of(&st).is_err_and(|m| m.contains("safetensors")));
    }
}
