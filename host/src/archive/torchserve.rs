//! TorchServe's artifacts, read as Cresset's: a `.mar` (`MAR-INF/MANIFEST.json`, as
//! `torch-model-archiver` 0.12 writes it in its `default`, `zip-store`, `tgz` and `no-archive`
//! formats) and `model-config.yaml` (TorchServe's keys in their own spelling).
//!
//! What maps onto a Cresset feature is taken; what TorchServe has and Cresset does not do is
//! accepted with a warning (logged, and shown by describe) when it changes nothing a client
//! sees, and refused, naming the file, when the model could not work without it (a Python
//! handler, Python model code, packages to install). Anything else is an error naming the key,
//! as for `model-config.toml`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{Manifest, ManifestModel, ModelConfig};

/// Where a `.mar` keeps its manifest.
pub const MAR_MANIFEST_FILE: &str = "MAR-INF/MANIFEST.json";
/// The built-in plugin that runs Python handlers.
pub const PYTHON_PLUGIN: &str = "python";
/// The model config a `.mar` (or a Cresset archive without `model-config.toml`) may carry.
pub const MODEL_CONFIG_YAML: &str = "model-config.yaml";
/// The most bytes of a manifest or config read (real ones are a few hundred).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// `MAR-INF/MANIFEST.json`. Unknown fields are tolerated: the format is TorchServe's.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarManifest {
    /// `python` (or `python3`) for Python handlers, `LSP` for TorchServe's C++ backend.
    #[serde(default)]
    pub runtime: String,
    /// The model.
    pub model: MarModel,
    /// The `torch-model-archiver` version that wrote it.
    #[serde(default)]
    pub archiver_version: String,
}

/// `model` of `MAR-INF/MANIFEST.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarModel {
    /// `--model-name`.
    pub model_name: String,
    /// `--version` (TorchServe's default is `1.0`).
    #[serde(default)]
    pub model_version: Option<String>,
    /// `--handler`: a built-in name, `file.py`, `module:function`, or for `LSP` a library.
    pub handler: String,
    /// `--serialized-file`, kept at the archive root.
    #[serde(default)]
    pub serialized_file: Option<String>,
    /// `--model-file`: Python model code.
    #[serde(default)]
    pub model_file: Option<String>,
    /// `--requirements-file`.
    #[serde(default)]
    pub requirements_file: Option<String>,
    /// `--config-file`, kept at the archive root.
    #[serde(default)]
    pub config_file: Option<String>,
}

/// TorchServe's built-in Python handlers, and the Cresset plugin each maps to once it exists.
const TORCHSERVE_BUILT_INS: [(&str, Option<&str>); 8] = [
    ("image_classifier", Some("vision")),
    ("image_segmenter", Some("vision")),
    ("object_detector", Some("vision")),
    ("text_classifier", Some("text")),
    ("base_handler", Some(PYTHON_PLUGIN)),
    ("dali_image_classifier", None),
    ("vllm_handler", None),
    ("trt_llm_handler", None),
];

/// A `.mar`'s manifest as a Cresset manifest, for the archive unpacked in `dir`.
/// The built-in handlers whose Python versions the python plugin's `ts` package has: a `.mar`
/// naming one runs that version with `python_builtin_handlers` (else Cresset's own plugin).
const PYTHON_BUILT_INS: [&str; 3] = ["image_classifier", "image_segmenter", "object_detector"];

pub fn manifest(mar: &MarManifest, dir: &Path, python_builtins: bool) -> Result<Manifest, String> {
    let model = &mar.model;
    if let Some(req) = model.requirements_file.as_deref() {
        return Err(format!(
            "`requirementsFile` ({req}): Cresset installs nothing at run time; put what the \
             handler needs into the server's image and archive the model without it"
        ));
    }
    let named = model.handler.trim();
    let handler = if python_builtins && PYTHON_BUILT_INS.contains(&named) {
        PYTHON_PLUGIN.to_owned()
    } else if python_builtins && TORCHSERVE_BUILT_INS.iter().any(|(b, _)| *b == named) {
        return Err(format!(
            "`python_builtin_handlers`: the python plugin has no Python version of `{named}`; \
             it has {}",
            PYTHON_BUILT_INS.join(", ")
        ));
    } else {
        handler(&mar.runtime, named, dir)?
    };
    if let (Some(code), false) = (model.model_file.as_deref(), handler == PYTHON_PLUGIN) {
        return Err(format!(
            "`modelFile` ({code}) is Python model code, which only a Python handler runs: \
             archive it with a `.py` handler, or export the model to TorchScript \
             (torch.jit.save) or a safetensors checkpoint"
        ));
    }
    let version = model
        .model_version
        .clone()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "1.0".to_owned());
    Ok(Manifest {
        manifest_version: 1,
        created_by: format!("torch-model-archiver {}", mar.archiver_version),
        model: ManifestModel {
            name: model.model_name.clone(),
            version,
            handler,
            abi_version: String::new(),
            description: String::new(),
            serialized_file: model.serialized_file.clone(),
        },
    })
}

/// The Cresset handler for a `.mar`'s `handler` and `runtime`.
fn handler(runtime: &str, handler: &str, dir: &Path) -> Result<String, String> {
    // `module:function` names a function of a Python module (or a class of a C++ library).
    let base = handler.split(':').next().unwrap_or(handler);
    if runtime.eq_ignore_ascii_case("LSP") {
        return match base {
            "TorchScriptHandler" => Ok("torchscript".into()),
            "BaseHandler" => Err(
                "TorchServe's C++ `BaseHandler` has no Cresset counterpart; use \
                 `TorchScriptHandler` (served by Cresset's `torchscript` plugin) or a Cresset \
                 plugin library"
                    .into(),
            ),
            lib => {
                let file = if lib.ends_with(std::env::consts::DLL_SUFFIX) {
                    lib.to_owned()
                } else {
                    format!("{lib}{}", std::env::consts::DLL_SUFFIX)
                };
                let file = Path::new(&file)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if dir.join(&file).is_file() {
                    Ok(file)
                } else {
                    Err(format!(
                        "handler `{handler}` (runtime LSP): the archive holds no `{file}`"
                    ))
                }
            }
        };
    }
    if let Some((_, maps_to)) = TORCHSERVE_BUILT_INS.iter().find(|(name, _)| *name == base) {
        return match maps_to {
            Some(plugin) => Ok((*plugin).to_owned()),
            None => Err(format!(
                "TorchServe's built-in handler `{base}` has no Cresset counterpart yet; the \
                 built-in plugins are torchscript, vision, text, nlp, gpt and accelerate (see README, \"Coming \
                 from TorchServe\")"
            )),
        };
    }
    let python_file = if base.ends_with(".py") {
        base.to_owned()
    } else {
        format!("{base}.py")
    };
    if base.ends_with(".py") || dir.join(&python_file).is_file() {
        // TorchServe's own kind of handler: the python plugin runs it (it reads the entry
        // point from MAR-INF/MANIFEST.json).
        if !dir.join(&python_file).is_file() {
            return Err(format!(
                "handler `{handler}`: the archive holds no `{python_file}`"
            ));
        }
        return Ok(PYTHON_PLUGIN.to_owned());
    }
    if base.is_empty() || base.contains('/') {
        return Err(format!("`handler` {handler:?} names no handler"));
    }
    // A Cresset built-in plugin named as the handler.
    Ok(base.to_owned())
}

/// `MAR-INF/MANIFEST.json` for a Cresset archive written as a `.mar`, in the fields
/// `torch-model-archiver` 0.12 writes. The `torchscript` plugin is TorchServe's C++
/// `TorchScriptHandler` under the `LSP` runtime.
pub fn mar_manifest_json(model: &ManifestModel, runtime: &str, has_config: bool) -> String {
    let handler = match (model.handler.as_str(), runtime) {
        ("torchscript", "LSP") => "TorchScriptHandler".to_owned(),
        (h, _) => Path::new(h)
            .file_name()
            .map_or_else(|| h.to_owned(), |f| f.to_string_lossy().into_owned()),
    };
    let mut entry = serde_json::Map::new();
    entry.insert("modelName".into(), model.name.clone().into());
    if let Some(file) = &model.serialized_file {
        entry.insert("serializedFile".into(), file.clone().into());
    }
    entry.insert("handler".into(), handler.into());
    entry.insert("modelVersion".into(), model.version.clone().into());
    if has_config {
        entry.insert("configFile".into(), MODEL_CONFIG_YAML.into());
    }
    let manifest = serde_json::json!({
        // Fixed, so that the same inputs give the same bytes (archives are reproducible).
        "createdOn": "01/01/1970 00:00:00",
        "runtime": runtime,
        "model": entry,
        "archiverVersion": format!("cresset {}", env!("CARGO_PKG_VERSION")),
    });
    serde_json::to_string_pretty(&manifest).unwrap_or_default()
}

/// A model config as `model-config.yaml` in TorchServe's keys (written as JSON, which YAML
/// reads), for a `.mar` that TorchServe may read too.
pub fn model_config_to_yaml(config: &ModelConfig) -> anyhow::Result<String> {
    let mut out = serde_json::Map::new();
    if let Some(n) = config.min_workers {
        out.insert("minWorkers".into(), n.into());
    }
    if let Some(n) = config.max_workers {
        out.insert("maxWorkers".into(), n.into());
    }
    out.insert("batchSize".into(), config.batch_size.into());
    out.insert("maxBatchDelay".into(), config.max_batch_delay_ms.into());
    out.insert("responseTimeout".into(), config.response_timeout_s.into());
    out.insert("jobQueueSize".into(), config.job_queue_size.into());
    out.insert(
        "deviceType".into(),
        serde_json::to_value(config.device_type)?,
    );
    if !config.device_ids.is_empty() {
        out.insert(
            "deviceIds".into(),
            serde_json::to_value(&config.device_ids)?,
        );
    }
    if !config.parallel_type.is_empty() {
        out.insert("parallelType".into(), config.parallel_type.clone().into());
    }
    if !config.handler.is_empty() {
        out.insert("handler".into(), serde_json::to_value(&config.handler)?);
    }
    Ok(format!(
        "# TorchServe's keys, written by cresset archive (JSON is YAML)\n{}\n",
        serde_json::to_string_pretty(&Value::Object(out))?
    ))
}

/// The frontend keys of TorchServe's `model-config.yaml` that Cresset does not implement, and
/// backend sections its Python handlers read: accepted with a warning.
const ACCEPTED_WITHOUT_EFFECT: [&str; 18] = [
    "startupTimeout",
    "parallelLevel",
    "torchrun",
    "maxRetryTimeoutInSec",
    "clientTimeoutInMills",
    "useJobTicket",
    "sequenceMaxIdleMSec",
    "sequenceTimeoutMSec",
    "maxSequenceJobQueueSize",
    "maxNumSequence",
    "continuousBatching",
    "sequenceBatching",
    "asyncCommunication",
    "useVenv",
    "pt2",
    "deepspeed",
    "pippy",
    "micro_batching",
];

/// TorchServe's key for each `model-config.toml` key (Cresset's own spelling is accepted too).
const KEYS: [(&str, &str); 10] = [
    ("minWorkers", "min_workers"),
    ("maxWorkers", "max_workers"),
    ("batchSize", "batch_size"),
    ("maxBatchDelay", "max_batch_delay_ms"),
    ("responseTimeout", "response_timeout_s"),
    ("deviceType", "device_type"),
    ("deviceIds", "device_ids"),
    ("parallelType", "parallel_type"),
    ("jobQueueSize", "job_queue_size"),
    ("handler", "handler"),
];

/// Parse YAML from an archive: bounded in size, nesting and alias expansion (serde-saphyr's
/// budget), into JSON values.
pub fn parse_yaml(text: &str) -> Result<Value, String> {
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_saphyr::from_str::<Value>(text).map_err(|e| e.to_string())
}

/// `model-config.yaml`: TorchServe's keys (or Cresset's), checked as `model-config.toml` is.
/// Keys Cresset does not implement but TorchServe has are accepted with a warning each in
/// [`ModelConfig::warnings`].
pub fn model_config_from_yaml(text: &str) -> Result<ModelConfig, String> {
    let value = parse_yaml(text)?;
    let Value::Object(entries) = value else {
        return Err("the document must be a mapping of keys to values".into());
    };
    let mut ours = serde_json::Map::new();
    let mut warnings = Vec::new();
    for (key, value) in entries {
        if let Some((_, snake)) = KEYS.iter().find(|(camel, _)| *camel == key) {
            let value = match *snake {
                "parallel_type" => parallel_type(&value, &mut warnings)?,
                "device_type" => device_type(&value)?,
                _ => value,
            };
            if ours.insert((*snake).to_owned(), value).is_some() {
                return Err(format!("`{key}` is given twice (as `{key}` and `{snake}`)"));
            }
        } else if ACCEPTED_WITHOUT_EFFECT.contains(&key.as_str()) {
            warnings.push(format!(
                "`{key}` (TorchServe) is accepted and has no effect in Cresset"
            ));
        } else {
            // Cresset's own spelling, or an unknown key: the typed read below names it.
            let value = match key.as_str() {
                "parallel_type" => parallel_type(&value, &mut warnings)?,
                _ => value,
            };
            if ours.insert(key.clone(), value).is_some() {
                return Err(format!("`{key}` is given twice"));
            }
        }
    }
    if let Some(key) = first_null(&ours, "") {
        return Err(format!(
            "`{key}` has no value (null): give one, or leave the key out"
        ));
    }
    let mut config: ModelConfig = serde_json::from_value(Value::Object(ours)).map_err(|e| {
        // serde names the field: "unknown field `x`, expected one of ...".
        e.to_string()
    })?;
    config.validate()?;
    config.warnings = warnings;
    Ok(config)
}

/// The dotted path of the first null value under `map` (TOML has no null).
fn first_null(map: &serde_json::Map<String, Value>, prefix: &str) -> Option<String> {
    map.iter().find_map(|(key, value)| {
        let path = format!("{prefix}{key}");
        match value {
            Value::Null => Some(path),
            Value::Object(inner) => first_null(inner, &format!("{path}.")),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| match item {
                Value::Null => Some(format!("{path}[{i}]")),
                Value::Object(inner) => first_null(inner, &format!("{path}[{i}].")),
                _ => None,
            }),
            _ => None,
        }
    })
}

/// `parallelType`: TorchServe's `custom` (the handler manages its own parallelism) has no
/// Cresset meaning.
fn parallel_type(value: &Value, warnings: &mut Vec<String>) -> Result<Value, String> {
    match value.as_str() {
        Some("custom") => {
            warnings.push(
                "`parallelType: custom` (TorchServe) is accepted and has no effect in Cresset"
                    .into(),
            );
            Ok(Value::String(String::new()))
        }
        Some(s) => Ok(Value::String(s.to_ascii_lowercase())),
        None => Err(format!("`parallelType` must be a string. Given: {value}")),
    }
}

/// `deviceType`: `cpu` or `gpu` (TorchServe's `neuron` and `mps` have no Cresset backend).
fn device_type(value: &Value) -> Result<Value, String> {
    match value.as_str().map(str::to_ascii_lowercase).as_deref() {
        Some("cpu") => Ok(Value::String("cpu".into())),
        Some("gpu") => Ok(Value::String("gpu".into())),
        _ => Err(format!(
            "`deviceType` must be \"cpu\" or \"gpu\" (Cresset has no neuron or mps backend). Given: {value}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::DeviceKind;
    use super::*;

    #[test]
    fn torchserve_keys_map_onto_ours_and_unimplemented_ones_warn() {
        let config = model_config_from_yaml(
            "minWorkers: 2\nmaxWorkers: 3\nbatchSize: 4\nmaxBatchDelay: 50\nresponseTimeout: 30\n\
             deviceType: GPU\ndeviceIds: [0, 1]\nparallelType: custom\njobQueueSize: 7\n\
             startupTimeout: 600\ntorchrun:\n  nproc-per-node: 2\n\
             handler:\n  topk: 3\n  labels:\n    - a\n    - b\n",
        )
        .expect("parses");
        assert_eq!(config.min_workers, Some(2));
        assert_eq!(config.max_workers, Some(3));
        assert_eq!(config.batch_size, 4);
        assert_eq!(config.max_batch_delay_ms, 50);
        assert_eq!(config.response_timeout_s, 30);
        assert_eq!(config.device_type, DeviceKind::Gpu);
        assert_eq!(config.device_ids, [0, 1]);
        assert_eq!(config.parallel_type, "");
        assert_eq!(config.job_queue_size, 7);
        assert_eq!(config.handler["topk"].as_integer(), Some(3));
        assert_eq!(
            config.handler["labels"].as_array().map(Vec::len),
            Some(2),
            "{:?}",
            config.handler
        );
        let warned: Vec<&str> = config.warnings.iter().map(String::as_str).collect();
        assert_eq!(warned.len(), 3, "{warned:?}");
        assert!(warned.iter().any(|w| w.contains("`parallelType: custom`")));
        assert!(warned.iter().any(|w| w.contains("`startupTimeout`")));
        assert!(warned.iter().any(|w| w.contains("`torchrun`")));
        // Cresset's own spelling works in YAML too.
        let ours = model_config_from_yaml("batch_size: 2\nmin_workers: 0\n").expect("parses");
        assert_eq!((ours.batch_size, ours.min_workers), (2, Some(0)));
    }

    #[test]
    fn bad_yaml_configs_are_errors_naming_the_key() {
        for (text, says) in [
            ("minWorker: 1\n", "minWorker"),
            ("batchSize: 0\n", "batch_size"),
            ("batchSize: two\n", "invalid type"),
            ("deviceType: neuron\n", "deviceType"),
            ("batchSize: 2\nbatch_size: 3\n", "twice"),
            ("- a\n- b\n", "mapping"),
            ("handler:\n  key: null\n", "`handler.key` has no value"),
            ("minWorkers: [\n", ""),
        ] {
            let err = model_config_from_yaml(text).expect_err(text);
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn an_alias_bomb_is_refused_without_expanding_it() {
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let mut prev = "a";
        for name in names {
            text.push_str(&format!(
                "{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
            ));
            prev = name;
        }
        let started = std::time::Instant::now();
        assert!(parse_yaml(&text).is_err(), "nine levels of nine aliases");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(parse_yaml(&"x".repeat(2 << 20)).is_err(), "too large");
    }

    #[test]
    fn mar_handlers_map_to_plugins_or_say_why_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("my_handler.py"), "class H: pass\n").expect("write");
        std::fs::write(dir.path().join("libmine.so"), b"").expect("write");
        let h = |runtime: &str, name: &str| handler(runtime, name, dir.path());
        assert_eq!(h("LSP", "TorchScriptHandler").as_deref(), Ok("torchscript"));
        assert_eq!(h("python", "torchscript").as_deref(), Ok("torchscript"));
        assert_eq!(h("python", "nlp").as_deref(), Ok("nlp"));
        assert_eq!(h("python", "image_classifier").as_deref(), Ok("vision"));
        assert_eq!(h("python", "image_segmenter").as_deref(), Ok("vision"));
        assert_eq!(h("python", "object_detector").as_deref(), Ok("vision"));
        assert_eq!(h("python", "text_classifier").as_deref(), Ok("text"));
        // A handler of the archive's own Python: the python plugin, in each of its spellings.
        assert_eq!(h("python", "base_handler").as_deref(), Ok(PYTHON_PLUGIN));
        for name in ["my_handler", "my_handler.py", "my_handler:handle"] {
            assert_eq!(h("python", name).as_deref(), Ok(PYTHON_PLUGIN), "{name}");
        }
        assert_eq!(h("LSP", "libmine").as_deref(), Ok("libmine.so"));
        assert_eq!(h("LSP", "libmine:Handler").as_deref(), Ok("libmine.so"));
        for (runtime, name, says) in [
            (
                "python",
                "vllm_handler",
                "`vllm_handler` has no Cresset counterpart",
            ),
            ("python", "other.py", "the archive holds no `other.py`"),
            ("LSP", "BaseHandler", "BaseHandler"),
            ("LSP", "libother", "no `libother.so`"),
        ] {
            let err = h(runtime, name).expect_err(name);
            assert!(err.contains(says), "{name}: {err}");
        }
    }

    #[test]
    fn mar_manifests_map_name_version_and_files_and_refuse_what_needs_python() {
        let dir = tempfile::tempdir().expect("tempdir");
        let read_with = |json: &str, python_builtins: bool| {
            let mar: MarManifest = serde_json::from_str(json).expect("json");
            manifest(&mar, dir.path(), python_builtins)
        };
        let read = |json: &str| read_with(json, false);
        let m = read(
            r#"{"createdOn": "01/01/2026 00:00:00", "runtime": "LSP", "archiverVersion": "0.12.0",
                "model": {"modelName": "iris", "serializedFile": "iris.pt",
                          "handler": "TorchScriptHandler", "modelVersion": "2.0",
                          "configFile": "model-config.yaml"}, "somethingNew": 1}"#,
        )
        .expect("maps");
        assert_eq!(
            (m.model.name.as_str(), m.model.version.as_str()),
            ("iris", "2.0")
        );
        assert_eq!(m.model.handler, "torchscript");
        assert_eq!(m.model.serialized_file.as_deref(), Some("iris.pt"));
        assert_eq!(m.created_by, "torch-model-archiver 0.12.0");
        let unversioned =
            read(r#"{"runtime": "python", "model": {"modelName": "m", "handler": "nlp"}}"#)
                .expect("maps");
        assert_eq!(unversioned.model.version, "1.0");
        let err = read(
            r#"{"runtime": "python", "model": {"modelName": "m", "handler": "nlp",
                "requirementsFile": "requirements.txt"}}"#,
        )
        .expect_err("requirements");
        assert!(err.contains("requirements.txt") && err.contains("installs nothing"));
        let err = read(
            r#"{"runtime": "python", "model": {"modelName": "m", "handler": "nlp",
                "modelFile": "model.py"}}"#,
        )
        .expect_err("model code");
        assert!(err.contains("model.py"), "{err}");
        // A built-in image handler's Python version, when the config asks for it; a built-in
        // without one is refused then, naming those there are.
        let classifier =
            r#"{"runtime": "python", "model": {"modelName": "m", "handler": "image_classifier"}}"#;
        assert_eq!(read(classifier).expect("maps").model.handler, "vision");
        assert_eq!(
            read_with(classifier, true).expect("maps").model.handler,
            PYTHON_PLUGIN
        );
        let text =
            r#"{"runtime": "python", "model": {"modelName": "m", "handler": "text_classifier"}}"#;
        let err = read_with(text, true).expect_err("no Python text_classifier");
        assert!(err.contains("image_classifier"), "{err}");
    }
}
