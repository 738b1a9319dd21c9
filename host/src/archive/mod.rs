//! Model archives: `MANIFEST.toml` + `model-config.toml` + model files, as a `.tar.gz`, a
//! `.zip` or a plain directory.

pub mod cache;
mod create;
pub mod direct;
mod extract;
mod model_config;
pub mod tar;
pub mod torchserve;

pub use create::{create_archive, ArchiveFormat, ArchiveOptions};
pub use extract::{extract, ExtractError, ExtractLimits, EXTENSION_LIMIT};
pub use model_config::{
    set_model_defaults, ConfigOverrides, DeviceKind, Isolation, ModelConfig, ModelDefaults,
};

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest's file name at the archive root.
pub const MANIFEST_FILE: &str = "MANIFEST.toml";
/// The model configuration's file name at the archive root.
pub const MODEL_CONFIG_FILE: &str = "model-config.toml";
/// A zipped checkpoint folder at the archive root, unpacked as `model/` (TorchServe's
/// large-model examples).
pub const MODEL_ZIP: &str = "model.zip";

/// `MANIFEST.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version of this manifest (1).
    #[serde(default = "default_manifest_version")]
    pub manifest_version: u32,
    /// Who wrote the archive, e.g. `cresset 0.1.0`.
    #[serde(default)]
    pub created_by: String,
    /// The model this archive holds.
    pub model: ManifestModel,
}

fn default_manifest_version() -> u32 {
    1
}

/// `[model]` of `MANIFEST.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestModel {
    /// The model name.
    pub name: String,
    /// The model version.
    pub version: String,
    /// A built-in plugin name (`echo`, `torchscript`, ...) or the path, inside the archive, of
    /// a bundled plugin library (`handler/libmy_plugin.so`).
    pub handler: String,
    /// The `cresset-plugin-api` version the handler was built against.
    #[serde(default)]
    pub abi_version: String,
    /// One line for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The main model file at the archive root (`--serialized-file`, TorchServe's
    /// `serializedFile`), given to the plugin as `serialized_file` in its model config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialized_file: Option<String>,
}

/// Where a model's plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerRef {
    /// A plugin that ships with the server, found in the plugin directory.
    BuiltIn(String),
    /// A library bundled in the archive (absolute path after extraction).
    Bundled(PathBuf),
}

/// Errors opening an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive does not exist.
    #[error("model archive `{0}` does not exist")]
    NotFound(PathBuf),
    /// The file is neither a `.tar.gz`, a `.zip` (or `.mar`) nor a directory.
    #[error(
        "`{0}` is not a model archive: expected a .tar.gz/.tgz, a .zip, a .mar or a directory"
    )]
    UnknownFormat(PathBuf),
    /// Extraction refused or failed.
    #[error("cannot extract `{path}`: {source}")]
    Extract {
        /// The archive.
        path: PathBuf,
        /// Why.
        source: ExtractError,
    },
    /// `MANIFEST.toml` or `model-config.toml` is missing or malformed.
    #[error("bad `{file}` in `{archive}`: {message}")]
    BadFile {
        /// The archive.
        archive: PathBuf,
        /// The file inside it.
        file: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Reading failed.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An archive opened for loading: its files are in `dir` for as long as this value lives.
#[derive(Debug)]
pub struct OpenedArchive {
    /// The archive it came from.
    pub source: PathBuf,
    /// The folder with the model files.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// The model configuration (defaults when the file is absent).
    pub config: ModelConfig,
    /// Owns the unpacked files (None for a directory archive used in place).
    unpacked: Option<cache::Unpacked>,
}

impl OpenedArchive {
    /// Open `source`, unpacking it when it is a file: into `cache` when there is one (and
    /// its config does not write into the archive's folder), else into a folder under
    /// `work_dir` of this value alone.
    pub fn open(
        source: &Path,
        work_dir: &Path,
        limits: &ExtractLimits,
        cache: Option<&cache::ArchiveCache>,
    ) -> Result<Self, ArchiveError> {
        let opened = Self::open_with(source, work_dir, limits, cache)?;
        // Disk offload writes its files into the archive's folder, which a cache entry shares.
        if opened.writes_into_folder() && opened.unpacked.as_ref().is_some_and(|u| u.is_cached()) {
            return Self::open_with(source, work_dir, limits, None);
        }
        Ok(opened)
    }

    /// Whether the model writes files into its folder (`offload_folder`).
    fn writes_into_folder(&self) -> bool {
        self.config.handler.contains_key("offload_folder")
    }

    fn open_with(
        source: &Path,
        work_dir: &Path,
        limits: &ExtractLimits,
        cache: Option<&cache::ArchiveCache>,
    ) -> Result<Self, ArchiveError> {
        let io = |source: std::io::Error| ArchiveError::Io {
            path: work_dir.to_owned(),
            source,
        };
        let meta =
            std::fs::metadata(source).map_err(|_| ArchiveError::NotFound(source.to_owned()))?;
        let (dir, unpacked) = if meta.is_dir() {
            (source.to_owned(), None)
        } else {
            let format = ArchiveFormat::of_file(source)
                .ok_or_else(|| ArchiveError::UnknownFormat(source.to_owned()))?;
            let prepare = |files: &Path| unpack_model_zip(source, &model_root(files), limits);
            let unpacked = match cache {
                Some(cache) => cache.unpack(source, format, limits, prepare)?,
                None => {
                    std::fs::create_dir_all(work_dir).map_err(io)?;
                    let tmp = tempfile::Builder::new()
                        .prefix("model-")
                        .tempdir_in(work_dir)
                        .map_err(io)?;
                    extract::extract(source, format, tmp.path(), limits).map_err(|e| {
                        ArchiveError::Extract {
                            path: source.to_owned(),
                            source: e,
                        }
                    })?;
                    prepare(tmp.path())?;
                    cache::Unpacked::Private {
                        dir: tmp.path().to_owned(),
                        _tmp: tmp,
                        _lock: None,
                    }
                }
            };
            (unpacked.dir().to_owned(), Some(unpacked))
        };
        let dir = model_root(&dir);
        let bad = |file, message: String| ArchiveError::BadFile {
            archive: source.to_owned(),
            file,
            message,
        };
        let (manifest, config_file) = match read_toml(source, &dir, MANIFEST_FILE)? {
            Some(manifest) => (manifest, None),
            None => {
                let Some(text) = read_small(&dir.join(torchserve::MAR_MANIFEST_FILE))? else {
                    return Err(bad(
                        MANIFEST_FILE,
                        format!(
                            "the archive has neither a MANIFEST.toml (Cresset) nor a {}                              (TorchServe) at its root",
                            torchserve::MAR_MANIFEST_FILE
                        ),
                    ));
                };
                let mar: torchserve::MarManifest = serde_json::from_str(&text)
                    .map_err(|e| bad(torchserve::MAR_MANIFEST_FILE, e.to_string()))?;
                // The config says whether a built-in handler's name means its Python version.
                let config = read_config(source, &dir, mar.model.config_file.as_deref())?;
                let manifest = torchserve::manifest(&mar, &dir, config.python_builtin_handlers)
                    .map_err(|m| bad(torchserve::MAR_MANIFEST_FILE, m))?;
                (manifest, mar.model.config_file)
            }
        };
        let config = read_config(source, &dir, config_file.as_deref())?;
        for warning in &config.warnings {
            tracing::warn!(archive = %source.display(), "{warning}");
        }
        validate_name("model.name", &manifest.model.name).map_err(|m| bad(MANIFEST_FILE, m))?;
        validate_version(&manifest.model.version).map_err(|m| bad(MANIFEST_FILE, m))?;
        if manifest.model.handler.trim().is_empty() {
            return Err(bad(
                MANIFEST_FILE,
                "`model.handler` must not be empty".into(),
            ));
        }
        config.validate().map_err(|m| bad(MODEL_CONFIG_FILE, m))?;
        Ok(Self {
            source: source.to_owned(),
            dir,
            manifest,
            config,
            unpacked,
        })
    }

    /// Where the plugin comes from. A bundled path must stay inside the archive.
    pub fn handler(&self) -> Result<HandlerRef, ArchiveError> {
        let handler = self.manifest.model.handler.trim();
        if !handler.contains('/') && !handler.ends_with(std::env::consts::DLL_SUFFIX) {
            return Ok(HandlerRef::BuiltIn(handler.to_owned()));
        }
        let rel = Path::new(handler);
        if !is_plain_relative(rel) {
            return Err(ArchiveError::BadFile {
                archive: self.source.clone(),
                file: MANIFEST_FILE,
                message: format!("`model.handler` must be a built-in name or a relative path inside the archive. Given: {handler:?}"),
            });
        }
        Ok(HandlerRef::Bundled(self.dir.join(rel)))
    }
}

/// TorchServe's large-model examples ship the checkpoint folder as `model.zip`, which their
/// handler unzips as `model/`: unpacked here, with the same caps, in a freshly unpacked archive
/// (a folder archive in the store is never written).
fn unpack_model_zip(
    archive: &Path,
    dir: &Path,
    limits: &ExtractLimits,
) -> Result<(), ArchiveError> {
    let zipped = dir.join(MODEL_ZIP);
    if !zipped.is_file() || dir.join("model").exists() {
        return Ok(());
    }
    let model = dir.join("model");
    std::fs::create_dir_all(&model).map_err(|source| ArchiveError::Io {
        path: model.clone(),
        source,
    })?;
    extract::extract(&zipped, ArchiveFormat::Zip, &model, limits).map_err(|e| {
        ArchiveError::Extract {
            path: archive.to_owned(),
            source: e,
        }
    })?;
    let _ = std::fs::remove_file(&zipped);
    Ok(())
}

/// Where the model files are in an unpacked archive: its root, or the one folder it holds when
/// that folder has the manifest (TorchServe's `tgz` format puts everything under
/// `<model-name>/`).
fn model_root(dir: &Path) -> PathBuf {
    let has_manifest = |d: &Path| {
        d.join(MANIFEST_FILE).is_file() || d.join(torchserve::MAR_MANIFEST_FILE).is_file()
    };
    if has_manifest(dir) {
        return dir.to_owned();
    }
    let entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .take(2)
            .collect(),
        Err(_) => return dir.to_owned(),
    };
    match entries.as_slice() {
        [only] if only.is_dir() && !only.is_symlink() && has_manifest(only) => only.clone(),
        _ => dir.to_owned(),
    }
}

/// A small text file of an archive, or `None` when it is absent; over
/// [`torchserve::MAX_CONFIG_BYTES`] is an error.
fn read_small(path: &Path) -> Result<Option<String>, ArchiveError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ArchiveError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut text = String::new();
    file.take(torchserve::MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| ArchiveError::Io {
            path: path.to_owned(),
            source,
        })?;
    if text.len() as u64 > torchserve::MAX_CONFIG_BYTES {
        return Err(ArchiveError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(format!(
                "larger than {} bytes",
                torchserve::MAX_CONFIG_BYTES
            )),
        });
    }
    Ok(Some(text))
}

/// The model config: `model-config.toml`, else a YAML config (the `.mar` manifest's
/// `configFile`, or `model-config.yaml`) in TorchServe's keys or ours, else the defaults.
fn read_config(
    archive: &Path,
    dir: &Path,
    named: Option<&str>,
) -> Result<ModelConfig, ArchiveError> {
    if let Some(config) = read_toml(archive, dir, MODEL_CONFIG_FILE)? {
        return Ok(config);
    }
    let bad = |message: String| ArchiveError::BadFile {
        archive: archive.to_owned(),
        file: torchserve::MODEL_CONFIG_YAML,
        message,
    };
    let name = named.unwrap_or(torchserve::MODEL_CONFIG_YAML);
    if !is_plain_relative(Path::new(name)) {
        return Err(bad(format!("`configFile` {name:?} is not a file name")));
    }
    let Some(text) = read_small(&dir.join(name))? else {
        return match named {
            Some(name) => Err(bad(format!(
                "the manifest names `{name}`, which is missing"
            ))),
            None => Ok(ModelConfig::default()),
        };
    };
    let suffix = if name == torchserve::MODEL_CONFIG_YAML {
        String::new()
    } else {
        format!(" (`{name}`)")
    };
    torchserve::model_config_from_yaml(&text).map_err(|m| bad(format!("{m}{suffix}")))
}

fn read_toml<T: serde::de::DeserializeOwned>(
    archive: &Path,
    dir: &Path,
    file: &'static str,
) -> Result<Option<T>, ArchiveError> {
    let path = dir.join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ArchiveError::Io { path, source }),
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| ArchiveError::BadFile {
            archive: archive.to_owned(),
            file,
            message: e.to_string(),
        })
}

/// A path made only of normal components (no root, no `..`, no `.` only).
pub(crate) fn is_plain_relative(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().any(|c| matches!(c, Component::Normal(_)))
}

/// Model names go into URLs and file names: letters, digits, `_`, `-` and `.`, not starting
/// with `.`.
pub fn validate_name(field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{field}` must be 1-128 characters of letters, digits, `_`, `-` and `.`, not starting with `.`. Given: {name:?}"
        ))
    }
}

fn validate_version(version: &str) -> Result<(), String> {
    validate_name("model.version", version)
}

/// The archive formats, for reading and writing.
impl ArchiveFormat {
    /// The format a file's name says it is.
    pub fn of_file(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Some(Self::Tgz)
        } else if name.ends_with(".zip") || name.ends_with(".mar") {
            // TorchServe's `.mar` (`default` and `zip-store` formats) is a zip.
            Some(Self::Zip)
        } else {
            None
        }
    }
}

/// Model specs on the command line: `name=archive`, or just `archive` (the name comes from
/// the manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// The name to register under, overriding the manifest's.
    pub name: Option<String>,
    /// The archive: a name in the model store, or a path.
    pub archive: String,
}

impl std::str::FromStr for ModelSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, archive)) => {
                validate_name("models", name)?;
                if archive.is_empty() {
                    return Err(format!("`models` entry {s:?} has an empty archive"));
                }
                Ok(Self {
                    name: Some(name.to_owned()),
                    archive: archive.to_owned(),
                })
            }
            None if s.is_empty() => Err("`models` entries must not be empty".into()),
            None => Ok(Self {
                name: None,
                archive: s.to_owned(),
            }),
        }
    }
}

/// Find an archive named `archive` in the model store: the path itself, or with one of the
/// archive extensions. Absolute paths are taken as they are.
pub fn resolve_in_store(store: &Path, archive: &str) -> Result<PathBuf, ArchiveError> {
    let base = Path::new(archive);
    if base.is_absolute() {
        return if base.exists() {
            Ok(base.to_owned())
        } else {
            Err(ArchiveError::NotFound(base.to_owned()))
        };
    }
    if !is_plain_relative(base) {
        return Err(ArchiveError::NotFound(base.to_owned()));
    }
    let direct = store.join(base);
    let candidates = [
        direct.clone(),
        store.join(format!("{archive}.tar.gz")),
        store.join(format!("{archive}.tgz")),
        store.join(format!("{archive}.zip")),
        store.join(format!("{archive}.mar")),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .ok_or(ArchiveError::NotFound(direct))
}

/// Every archive in the store (for `--models all`): directories with a manifest, and archive
/// files.
pub fn list_store(store: &Path) -> Result<BTreeMap<String, PathBuf>, ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: store.to_owned(),
        source,
    };
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(store).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        let manifest = |p: &Path| {
            p.join(MANIFEST_FILE).exists() || p.join(torchserve::MAR_MANIFEST_FILE).exists()
        };
        if path.is_dir() && manifest(&path) {
            found.insert(name, path);
        } else if ArchiveFormat::of_file(&path).is_some() {
            let lower = name.to_ascii_lowercase();
            let suffix = [".tar.gz", ".tgz", ".zip", ".mar"]
                .into_iter()
                .find(|s| lower.ends_with(s))
                .map_or(0, str::len);
            found.insert(name[..name.len() - suffix].to_owned(), path);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_config_defaults_match_torchserve() {
        let c = ModelConfig::default();
        assert_eq!(
            (c.min_workers, c.max_workers, c.batch_size),
            (None, None, 1)
        );
        // Unset worker counts follow what the host chooses for the plugin.
        assert_eq!(c.worker_bounds(1), (1, 1));
        assert_eq!(c.worker_bounds(2), (2, 2));
        let pinned = |min, max| ModelConfig {
            min_workers: min,
            max_workers: max,
            ..ModelConfig::default()
        };
        assert_eq!(pinned(Some(1), None).worker_bounds(4), (1, 4));
        assert_eq!(pinned(Some(6), None).worker_bounds(4), (6, 6));
        assert_eq!(pinned(None, Some(1)).worker_bounds(4), (1, 1));
        assert_eq!(pinned(Some(0), Some(3)).worker_bounds(4), (0, 3));
        assert_eq!(c.max_batch_delay_ms, 100);
        assert_eq!(c.response_timeout_s, 120);
        assert_eq!(c.device_type, DeviceKind::Cpu);
    }

    #[test]
    fn model_config_rejects_unknown_keys_and_bad_values() {
        let err = toml::from_str::<ModelConfig>("minWorkers = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("minWorkers"), "{err}");
        let c: ModelConfig = toml::from_str("batch_size = 0").expect("parses");
        assert_eq!(
            c.validate().unwrap_err(),
            "`batch_size` must be between 1 and 4096. Given: 0"
        );
        let c: ModelConfig = toml::from_str("job_queue_size = 4000000000").expect("parses");
        assert!(c
            .validate()
            .unwrap_err()
            .contains("`job_queue_size` must be between 1 and 1000000"));
        let c: ModelConfig =
            toml::from_str("response_timeout_s = 9223372036854775807").expect("parses");
        assert!(c.validate().unwrap_err().contains("`response_timeout_s`"));
    }

    #[test]
    fn model_sources_parse_names_and_paths() {
        let s: ModelSource = "a=b.tar.gz".parse().expect("parses");
        assert_eq!(
            s,
            ModelSource {
                name: Some("a".into()),
                archive: "b.tar.gz".into()
            }
        );
        assert!("../x=y".parse::<ModelSource>().is_err());
        assert_eq!("echo".parse::<ModelSource>().expect("parses").name, None);
    }

    #[test]
    fn names_that_would_escape_a_folder_are_refused() {
        assert!(validate_name("n", "..").is_err());
        assert!(validate_name("n", "a/b").is_err());
        assert!(validate_name("n", "resnet-18_v1.0").is_ok());
    }

    #[test]
    fn hostile_torchserve_manifests_and_configs_are_clear_errors() {
        let open = |files: &[(&str, Vec<u8>)]| {
            let dir = tempfile::tempdir().expect("tempdir");
            for (name, bytes) in files {
                let path = dir.path().join(name);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                std::fs::write(path, bytes).expect("write");
            }
            let work = tempfile::tempdir().expect("tempdir");
            OpenedArchive::open(dir.path(), work.path(), &ExtractLimits::default(), None)
                .map(|a| (a.manifest, a.config))
                .map_err(|e| e.to_string())
        };
        let mar = |model: &str| {
            (
                torchserve::MAR_MANIFEST_FILE,
                format!(r#"{{"runtime": "python", "model": {model}}}"#).into_bytes(),
            )
        };
        let good = r#"{"modelName": "m", "handler": "torchscript", "configFile": "c.yaml"}"#;
        for (files, says) in [
            (
                vec![(torchserve::MAR_MANIFEST_FILE, b"{".to_vec())],
                "MAR-INF/MANIFEST.json",
            ),
            (
                vec![(torchserve::MAR_MANIFEST_FILE, vec![b' '; 2 << 20])],
                "larger than",
            ),
            (vec![mar(good)], "names `c.yaml`, which is missing"),
            (
                vec![
                    mar(good),
                    (
                        "c.yaml",
                        b"batchSize: -1
"
                        .to_vec(),
                    ),
                ],
                "`c.yaml`",
            ),
            (
                vec![mar(r#"{"modelName": "../x", "handler": "torchscript"}"#)],
                "model.name",
            ),
            (
                vec![mar(
                    r#"{"modelName": "m", "handler": "nlp", "configFile": "../c.yaml"}"#,
                )],
                "not a file name",
            ),
            (
                vec![("other.txt", b"x".to_vec())],
                "neither a MANIFEST.toml",
            ),
        ] {
            let err = open(&files).expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
        // A well-formed one opens, its YAML config read, its serialized file recorded.
        let (manifest, config) = open(&[
            mar(r#"{"modelName": "m", "handler": "torchscript", "serializedFile": "m.pt", "configFile": "c.yaml"}"#),
            ("c.yaml", b"batchSize: 3
useVenv: true
".to_vec()),
        ])
        .expect("opens");
        assert_eq!(manifest.model.serialized_file.as_deref(), Some("m.pt"));
        assert_eq!(config.batch_size, 3);
        assert_eq!(config.warnings.len(), 1);
    }
}
