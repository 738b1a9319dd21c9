//! `cresset serve --model PATH`: serve a model as it lies on disk, without `cresset archive`:
//! what KServe's storage initializer leaves in `/mnt/models`, and what users of other servers
//! expect (`vllm serve MODEL`).
//!
//! PATH is an archive (a `.tar.gz`, `.zip` or `.mar`, or a folder with a `MANIFEST.toml` or
//! TorchServe's `MAR-INF/MANIFEST.json`), used as it is; or a bare model, for which the handler
//! is picked from what is there:
//!
//! | PATH | handler |
//! | --- | --- |
//! | a `.gguf` file, or a folder holding one | `gpt` |
//! | a folder whose `config.json` names a causal LM (`*ForCausalLM`, `GPT2LMHeadModel`) | `gpt` |
//! | a folder whose `config.json` names another architecture (BERT family) | `nlp` (its mode from the architecture) |
//! | a TorchScript file (`.pt`, `.pth`, `.jit`, `.torchscript`), or a folder holding one `model.pt` | `torchscript` |
//! | an ONNX model (`.onnx`) or an AOTInductor package (`.pt2`), or a folder holding one | `vision` |
//!
//! A bare model gets an archive folder of its own in the server's scratch space: a manifest,
//! a model config with the handler's serving defaults, and a link to each of the model's
//! files (nothing is copied).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{validate_name, ModelSource, MANIFEST_FILE};

/// How a bare model is served: the handler, and its model config.
struct Choice {
    handler: &'static str,
    config: &'static str,
}

/// Causal LMs decode several sequences together (one KV-cache slot each) in one instance.
const GPT: Choice = Choice {
    handler: "gpt",
    config: "min_workers = 1\nmax_workers = 1\nbatch_size = 8\nmax_batch_delay_ms = 5\n",
};
const NLP: Choice = Choice {
    handler: "nlp",
    config: "batch_size = 8\nmax_batch_delay_ms = 5\n",
};
const TORCHSCRIPT: Choice = Choice {
    handler: "torchscript",
    config: "batch_size = 8\nmax_batch_delay_ms = 5\n",
};
const VISION: Choice = Choice {
    handler: "vision",
    config: "",
};

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn is_archive_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    [".tar.gz", ".tgz", ".zip", ".mar"]
        .iter()
        .any(|e| name.ends_with(e))
}

/// The handler for a model file.
fn file_choice(path: &Path) -> Option<Choice> {
    match extension(path).as_str() {
        "gguf" => Some(GPT),
        "pt" | "pth" | "jit" | "torchscript" => Some(TORCHSCRIPT),
        "onnx" | "pt2" => Some(VISION),
        _ => None,
    }
}

/// The handler for a model folder, from its `config.json` or the one model file it holds (and
/// that file, which the handler is told to load).
fn folder_choice(dir: &Path) -> anyhow::Result<(Choice, Option<PathBuf>)> {
    let config = dir.join("config.json");
    if config.is_file() {
        let text =
            std::fs::read(&config).with_context(|| format!("cannot read {}", config.display()))?;
        if text.len() > 1 << 20 {
            bail!("{} is over 1 MiB: not a model config", config.display());
        }
        let value: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not JSON", config.display()))?;
        let architecture = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        let causal = architecture.ends_with("ForCausalLM") || architecture == "GPT2LMHeadModel";
        return Ok((if causal { GPT } else { NLP }, None));
    }
    let mut found: Vec<(PathBuf, &'static str)> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if let Some(choice) = path.is_file().then(|| file_choice(&path)).flatten() {
            found.push((path, choice.handler));
        }
        if found.len() > 16 {
            break;
        }
    }
    let handlers: std::collections::BTreeSet<&str> = found.iter().map(|(_, h)| *h).collect();
    let only = || found.first().map(|(p, _)| p.clone());
    match (handlers.len(), handlers.first()) {
        (1, Some(&"gpt")) if found.len() == 1 => Ok((GPT, None)),
        (1, Some(&"vision")) if found.len() == 1 => Ok((VISION, only())),
        (1, Some(&"torchscript")) if found.len() == 1 => Ok((TORCHSCRIPT, only())),
        (0, _) => bail!(
            "{} holds no model Cresset can serve directly: a config.json (a HuggingFace \
             checkpoint), a .gguf, a TorchScript .pt, an .onnx or a .pt2, or an archive's \
             MANIFEST.toml",
            dir.display()
        ),
        _ => bail!(
            "{} holds several model files ({}): serve one of them (`--model FILE`), or make an \
             archive that says which (`cresset archive`)",
            dir.display(),
            found
                .iter()
                .map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A model name from a path: its file stem or folder name, with anything but letters, digits,
/// `_`, `-` and `.` made `_`.
fn name_of(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = [
        ".tar.gz", ".tgz", ".zip", ".mar", ".gguf", ".onnx", ".pt2", ".pt",
    ]
    .iter()
    .find_map(|e| stem.strip_suffix(e))
    .unwrap_or(&stem)
    .to_owned();
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    match cleaned.trim_start_matches('.') {
        "" => "model".into(),
        name => name.to_owned(),
    }
}

/// The registration for `--model PATH` (and `--model-name`): the archive as it is, or an
/// archive folder made under `scratch` for a bare model.
pub fn prepare(path: &Path, name: Option<&str>, scratch: &Path) -> anyhow::Result<ModelSource> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("`--model` {}: no such file or folder", path.display()))?;
    let path =
        std::fs::canonicalize(path).with_context(|| format!("`--model` {}", path.display()))?;
    let name = match name {
        Some(n) => {
            validate_name("model_name", n).map_err(anyhow::Error::msg)?;
            n.to_owned()
        }
        None => name_of(&path),
    };
    let is_archive = if meta.is_dir() {
        path.join(MANIFEST_FILE).is_file()
            || path.join(super::torchserve::MAR_MANIFEST_FILE).is_file()
    } else {
        is_archive_file(&path)
    };
    if is_archive {
        return Ok(ModelSource {
            name: Some(name),
            archive: path.to_string_lossy().into_owned(),
        });
    }
    let (choice, model_file) = if meta.is_dir() {
        folder_choice(&path)?
    } else {
        let choice = file_choice(&path).with_context(|| {
            format!(
                "`--model` {}: not a model file Cresset serves directly (.gguf, a TorchScript \
                 .pt, .onnx, .pt2) nor an archive (.tar.gz, .zip, .mar)",
                path.display()
            )
        })?;
        (choice, Some(path.clone()))
    };
    let dir = scratch.join("direct").join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let link = |target: &Path| -> anyhow::Result<()> {
        let file = target.file_name().context("a file without a name")?;
        let at = dir.join(file);
        std::os::unix::fs::symlink(target, &at)
            .with_context(|| format!("cannot link {} at {}", target.display(), at.display()))
    };
    if meta.is_dir() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?.path();
            let file = entry.file_name().unwrap_or_default();
            if file != MANIFEST_FILE && file != super::MODEL_CONFIG_FILE {
                link(&entry)?;
            }
        }
    } else {
        link(&path)?;
    }
    let mut manifest = format!(
        "manifest_version = 1\ncreated_by = \"cresset {} (--model)\"\n\n[model]\nname = {}\n\
         version = \"1.0\"\nhandler = \"{}\"\ndescription = {}\n",
        env!("CARGO_PKG_VERSION"),
        toml_string(&name),
        choice.handler,
        toml_string(&format!("served directly from {}", path.display())),
    );
    // The model file the handler loads (its default is `model.pt`).
    if let Some(file) = model_file.as_deref().and_then(Path::file_name) {
        manifest += &format!(
            "serialized_file = {}\n",
            toml_string(&file.to_string_lossy())
        );
    }
    std::fs::write(dir.join(MANIFEST_FILE), manifest)?;
    std::fs::write(dir.join(super::MODEL_CONFIG_FILE), choice.config)?;
    tracing::info!(model = %name, handler = choice.handler, path = %path.display(), "serving a model directly");
    Ok(ModelSource {
        name: Some(name),
        archive: dir.to_string_lossy().into_owned(),
    })
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handler_follows_what_is_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let make = |name: &str, files: &[(&str, &str)]| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).expect("mkdir");
            for (f, text) in files {
                std::fs::write(d.join(f), text).expect("write");
            }
            d
        };
        let llama = make(
            "llama",
            &[("config.json", r#"{"architectures": ["LlamaForCausalLM"]}"#)],
        );
        let bert = make(
            "bert",
            &[(
                "config.json",
                r#"{"architectures": ["BertForSequenceClassification"]}"#,
            )],
        );
        let gguf = make("g", &[("m.Q4_1.gguf", "")]);
        let two = make("two", &[("a.onnx", ""), ("b.onnx", "")]);
        let empty = make("empty", &[("README", "")]);
        assert_eq!(folder_choice(&llama).expect("llama").0.handler, "gpt");
        assert_eq!(folder_choice(&bert).expect("bert").0.handler, "nlp");
        assert_eq!(folder_choice(&gguf).expect("gguf").0.handler, "gpt");
        let one = make("one", &[("resnet.onnx", "")]);
        let (choice, file) = folder_choice(&one).expect("one");
        assert_eq!(choice.handler, "vision");
        assert_eq!(file.as_deref(), Some(one.join("resnet.onnx").as_path()));
        let source = prepare(&one, None, &dir.path().join("s1")).expect("prepared");
        let manifest = std::fs::read_to_string(Path::new(&source.archive).join(MANIFEST_FILE))
            .expect("manifest");
        assert!(
            manifest.contains("serialized_file = \"resnet.onnx\""),
            "{manifest}"
        );
        let err = folder_choice(&two).err().expect("two").to_string();
        assert!(err.contains("several model files"), "{err}");
        let err = folder_choice(&empty).err().expect("none").to_string();
        assert!(err.contains("holds no model"), "{err}");
        assert_eq!(
            file_choice(Path::new("x.pt2")).map(|c| c.handler),
            Some("vision")
        );
        assert!(file_choice(Path::new("x.bin")).is_none());
        assert_eq!(
            name_of(Path::new("/m/SmolLM2 135M.Q4_1.gguf")),
            "SmolLM2_135M.Q4_1"
        );
        assert_eq!(name_of(Path::new("/mnt/models")), "models");
        assert_eq!(name_of(Path::new("/x/.hidden.onnx")), "hidden");

        // A bare folder becomes an archive folder of links; an archive is used as it is.
        let scratch = dir.path().join("scratch");
        let source = prepare(&bert, Some("clf"), &scratch).expect("prepared");
        assert_eq!(source.name.as_deref(), Some("clf"));
        let made = Path::new(&source.archive);
        assert!(made.join("config.json").is_symlink());
        let manifest = std::fs::read_to_string(made.join(MANIFEST_FILE)).expect("manifest");
        assert!(manifest.contains("handler = \"nlp\""), "{manifest}");
        std::fs::write(bert.join(MANIFEST_FILE), "").expect("write");
        let as_is = prepare(&bert, None, &scratch).expect("archive");
        assert_eq!(
            Path::new(&as_is.archive),
            bert.canonicalize().expect("canon")
        );
        assert!(prepare(&bert, Some("bad name"), &scratch).is_err());
        assert!(prepare(&dir.path().join("missing"), None, &scratch).is_err());
    }
}
