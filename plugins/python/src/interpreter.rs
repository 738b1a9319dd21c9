//! Starting the embedded CPython, once per worker process, as the operator's Python.
//!
//! The operator names a Python (`[handler] python`, else `CRESSET_PYTHON`, else `python3` on
//! `PATH`): usually a virtual environment's interpreter, which must have `torch` and whatever
//! the handler imports; nothing is installed at run time. The plugin asks that interpreter for
//! its version, home and module path, starts the embedded interpreter with the same home
//! (`[handler] python_home` overrides it) and path, and refuses a Python whose version differs
//! from the libpython the plugin was built against. The `ts` compatibility package and the
//! runtime bridge ship inside the plugin and are written once, to a folder named by a hash of
//! their contents in the temporary folder, which leads the path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cresset_plugin_api::PluginError;
use pyo3::prelude::*;
use serde_json::Value;

/// The Python files the plugin ships: the `ts` package and the bridge.
const FILES: [(&str, &str); 13] = [
    (
        "cresset_runtime.py",
        include_str!("../python/cresset_runtime.py"),
    ),
    ("ts/__init__.py", include_str!("../python/ts/__init__.py")),
    ("ts/context.py", include_str!("../python/ts/context.py")),
    (
        "ts/utils/__init__.py",
        include_str!("../python/ts/utils/__init__.py"),
    ),
    (
        "ts/utils/util.py",
        include_str!("../python/ts/utils/util.py"),
    ),
    (
        "ts/protocol/__init__.py",
        include_str!("../python/ts/protocol/__init__.py"),
    ),
    (
        "ts/protocol/otf_message_handler.py",
        include_str!("../python/ts/protocol/otf_message_handler.py"),
    ),
    (
        "ts/torch_handler/__init__.py",
        include_str!("../python/ts/torch_handler/__init__.py"),
    ),
    (
        "ts/torch_handler/base_handler.py",
        include_str!("../python/ts/torch_handler/base_handler.py"),
    ),
    (
        "ts/torch_handler/vision_handler.py",
        include_str!("../python/ts/torch_handler/vision_handler.py"),
    ),
    (
        "ts/torch_handler/image_classifier.py",
        include_str!("../python/ts/torch_handler/image_classifier.py"),
    ),
    (
        "ts/torch_handler/image_segmenter.py",
        include_str!("../python/ts/torch_handler/image_segmenter.py"),
    ),
    (
        "ts/torch_handler/object_detector.py",
        include_str!("../python/ts/torch_handler/object_detector.py"),
    ),
];

/// Asks the operator's Python what the embedded one needs to know.
const PROBE: &str = "import json, sys; print(json.dumps({'version': list(sys.version_info[:2]), \
                     'home': sys.base_prefix, 'path': [p for p in sys.path if p]}))";

/// Whether the interpreter started, or why not (every later model in this process gets the
/// same answer).
static STARTED: OnceLock<Result<(), String>> = OnceLock::new();

/// What the operator's Python reported.
struct Probe {
    version: (u64, u64),
    home: String,
    path: Vec<String>,
}

fn probe(python: &str) -> Result<Probe, String> {
    let out = Command::new(python)
        // Not isolated (`-I`): the operator's PYTHONPATH and user site belong to its path.
        .args(["-c", PROBE])
        .output()
        .map_err(|e| format!("cannot run the Python `{python}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the Python `{python}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("the Python `{python}` gave no answer the plugin reads: {e}"))?;
    let version = (v["version"][0].as_u64(), v["version"][1].as_u64());
    let (Some(major), Some(minor), Some(home)) = (version.0, version.1, v["home"].as_str()) else {
        return Err(format!("the Python `{python}` gave no version or home"));
    };
    let path = v["path"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Probe {
        version: (major, minor),
        home: home.to_owned(),
        path,
    })
}

/// Start the interpreter (once per process) as `python` (the operator's choice) with
/// `python_home` overriding its home.
pub fn start(python: &str, python_home: Option<&str>) -> Result<(), PluginError> {
    let started = STARTED.get_or_init(|| start_once(python, python_home));
    match started {
        Ok(_) => Ok(()),
        Err(e) => Err(PluginError::invalid_input(e.clone())),
    }
}

/// The shipped Python files, in a folder of the temporary folder named by a hash of them:
/// written once (by whichever worker comes first, renamed into place whole), then reused.
fn install_files() -> Result<PathBuf, String> {
    // FNV-1a over names and contents: a new plugin build with other files gets another folder.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in FILES {
        for byte in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let dir = std::env::temp_dir().join(format!("cresset-python-{hash:016x}"));
    if dir.join("cresset_runtime.py").is_file() {
        return Ok(dir);
    }
    let fail = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    let staging = tempfile::Builder::new()
        .prefix("cresset-python-staging-")
        .tempdir()
        .map_err(|e| format!("cannot make a folder for the ts package: {e}"))?;
    for (name, text) in FILES {
        let path = staging.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| fail(&path, e))?;
    }
    match std::fs::rename(staging.path(), &dir) {
        Ok(()) => Ok(dir),
        // Another worker put the same files there first.
        Err(_) if dir.join("cresset_runtime.py").is_file() => Ok(dir),
        Err(e) => Err(fail(&dir, e)),
    }
}

fn start_once(python: &str, python_home: Option<&str>) -> Result<(), String> {
    let probe = probe(python)?;
    let files = install_files()?;
    // Read by Py_Initialize; this worker process serves this one model, and no other thread
    // of it reads the environment while the interpreter starts.
    std::env::set_var("PYTHONHOME", python_home.unwrap_or(&probe.home));
    promote_libpython()?;
    pyo3::append_to_inittab!(bridge);
    Python::initialize();
    Python::attach(|py| -> Result<(), String> {
        let info = py.version_info();
        if (u64::from(info.major), u64::from(info.minor)) != probe.version {
            return Err(format!(
                "the Python `{python}` is {}.{}, but this plugin embeds CPython {}.{}: name a \
                 Python {}.{} (`[handler] python` or CRESSET_PYTHON)",
                probe.version.0, probe.version.1, info.major, info.minor, info.major, info.minor
            ));
        }
        let mut path = vec![files.to_string_lossy().into_owned()];
        path.extend(probe.path.iter().cloned());
        py.import("sys")
            .and_then(|sys| sys.setattr("path", path))
            .map_err(|e| format!("cannot set the module path: {e}"))
    })?;
    tracing::info!(python, home = %python_home.unwrap_or(&probe.home), "started the embedded Python");
    Ok(())
}

/// Make libpython's symbols global. It came in as this plugin's dependency, and the host opens
/// plugins with their symbols local, so the extension modules Python loads later (`_ctypes`,
/// torch's) could not find the interpreter's symbols. Reopening the same library with
/// `RTLD_GLOBAL | RTLD_NOLOAD` changes only its visibility.
fn promote_libpython() -> Result<(), String> {
    // SAFETY: dladdr reads the loader's tables for an address of this process (a function of
    // libpython), and fills `info` with pointers into them, which stay valid while the
    // library stays loaded (it is never unloaded).
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let symbol = pyo3::ffi::Py_IsInitialized as *const libc::c_void;
    if unsafe { libc::dladdr(symbol, &mut info) } == 0 || info.dli_fname.is_null() {
        return Err("cannot find the libpython this plugin is linked to".into());
    }
    // SAFETY: `dli_fname` is the loaded library's NUL-terminated path; RTLD_NOLOAD only
    // returns a handle to a library that is already loaded, and the handle is kept.
    let handle = unsafe {
        libc::dlopen(
            info.dli_fname,
            libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD,
        )
    };
    if handle.is_null() {
        return Err("cannot make libpython's symbols visible to extension modules".into());
    }
    Ok(())
}

/// The operator's Python: `[handler] python`, else `CRESSET_PYTHON`, else `python3`.
pub fn chosen_python(setting: Option<&str>) -> String {
    setting
        .map(str::to_owned)
        .or_else(|| std::env::var("CRESSET_PYTHON").ok())
        .unwrap_or_else(|| "python3".to_owned())
}

/// The manifest TorchServe's `Context` carries: the `.mar`'s own, or one in its shape for a
/// Cresset archive.
pub fn manifest(
    model_dir: &Path,
    name: &str,
    version: &str,
    serialized: Option<&str>,
    entry: &str,
) -> Value {
    let mar = model_dir.join("MAR-INF/MANIFEST.json");
    if let Some(v) = std::fs::read(&mar)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    {
        return v;
    }
    let mut model =
        serde_json::json!({"modelName": name, "modelVersion": version, "handler": entry});
    if let Some(file) = serialized {
        model["serializedFile"] = file.into();
    }
    serde_json::json!({"runtime": "python", "model": model, "archiverVersion": ""})
}

/// The handler's YAML config, if the archive has one: the file the manifest's `configFile`
/// names (torch-model-archiver's `--config-file`), else `model-config.yaml`. A name that
/// leaves the folder is not followed.
pub fn yaml_config(model_dir: &Path, manifest: &Value) -> Option<PathBuf> {
    let name = manifest["model"]["configFile"]
        .as_str()
        .unwrap_or("model-config.yaml");
    let relative = Path::new(name);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return None;
    }
    let path = model_dir.join(relative);
    path.is_file().then_some(path)
}

/// `_cresset`: what the bridge calls back.
#[pymodule]
#[pyo3(name = "_cresset")]
pub mod bridge {
    #[pymodule_export]
    use crate::{chunk, log, metric};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cresset_archive_gets_a_manifest_in_torchserves_shape_and_a_mar_keeps_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = manifest(dir.path(), "m", "2.0", Some("model.pt"), "h.py");
        assert_eq!(made["model"]["modelName"], "m");
        assert_eq!(made["model"]["serializedFile"], "model.pt");
        assert_eq!(made["model"]["handler"], "h.py");
        std::fs::create_dir_all(dir.path().join("MAR-INF")).expect("mkdir");
        let mar = serde_json::json!({"model": {"modelName": "x", "handler": "y.py", "configFile": "c.yaml"}});
        std::fs::write(dir.path().join("MAR-INF/MANIFEST.json"), mar.to_string()).expect("write");
        assert_eq!(manifest(dir.path(), "m", "2.0", None, "h.py"), mar);
    }

    #[test]
    fn the_yaml_config_is_the_manifests_file_inside_the_archive_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("c.yaml"), "handler: {}\n").expect("write");
        let named = |name: &str| serde_json::json!({"model": {"configFile": name}});
        assert_eq!(
            yaml_config(dir.path(), &named("c.yaml")),
            Some(dir.path().join("c.yaml"))
        );
        assert_eq!(yaml_config(dir.path(), &named("../c.yaml")), None);
        assert_eq!(yaml_config(dir.path(), &named("/etc/passwd")), None);
        assert_eq!(yaml_config(dir.path(), &named("missing.yaml")), None);
        assert_eq!(
            yaml_config(dir.path(), &serde_json::json!({})),
            None,
            "no model-config.yaml"
        );
    }
}
