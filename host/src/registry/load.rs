//! Loading a version's plugin and model: what it needs from the server, and its typed errors.
//!
//! A load failure keeps its kind from the loader and the plugin, so that the management API can
//! tell a bad archive (the client's 400) from a plugin that failed or panicked, or a built-in
//! plugin this server lacks (the server's 500).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use abi_stable::std_types::RResult;
use cresset_plugin_api::{
    plugin_file_name, Capabilities, ErrorCode, ModelBox, ModelSpec, PluginError,
};

use super::state::{FailureKind, LoadFailure};
use crate::archive::{ArchiveError, ExtractLimits, HandlerRef, ModelConfig, OpenedArchive};
use crate::isolation::proxy::ProcessSettings;
use crate::loader::{self, PluginLibrary, PluginLoader};
use crate::metrics::Metrics;
use crate::services::PluginServices;

/// What loading needs from the server.
pub struct LoadContext {
    /// Loads plugin libraries.
    pub loader: PluginLoader,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Where built-in plugins are.
    pub plugin_dir: PathBuf,
    /// Where archives are extracted.
    pub extract_dir: PathBuf,
    /// Caps for extraction.
    pub limits: ExtractLimits,
    /// Where unpacked archives are kept across restarts (`None`: each registration unpacks
    /// into `extract_dir`).
    pub archive_cache: Option<Arc<crate::archive::cache::ArchiveCache>>,
    /// Intra-op threads per instance; 0 = cores / instances.
    pub intra_op_threads: u32,
    /// Workers for a model whose config leaves the counts unset (`None`: chosen per plugin).
    pub default_workers: Option<u32>,
}

/// Why a version could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The archive could not be opened.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Registration overrides that do not fit the archive's config.
    #[error("{0}")]
    Config(String),
    /// The manifest names a built-in plugin that is not installed.
    #[error("unknown handler `{name}`: there is no built-in plugin `{file}` in the plugin directory `{}`", dir.display())]
    MissingBuiltIn {
        /// The handler name.
        name: String,
        /// The library file looked for.
        file: String,
        /// The plugin directory.
        dir: PathBuf,
    },
    /// The plugin library could not be loaded.
    #[error(transparent)]
    Library {
        /// The loader's error.
        #[from]
        source: loader::LoadError,
    },
    /// The plugin's `load_model` refused or failed.
    #[error("plugin `{plugin}` could not load the model: {error}")]
    Model {
        /// The plugin's name.
        plugin: String,
        /// Its error.
        error: PluginError,
    },
    /// An instance failed to start.
    #[error("a worker failed to start: {0}")]
    Instance(PluginError),
    /// The host failed (a thread, a file).
    #[error("{0}")]
    Host(String),
    /// A worker process failed to open the library or died opening it (process isolation).
    #[error("{}", .0.message)]
    Worker(LoadFailure),
}

fn plugin_kind(code: ErrorCode) -> FailureKind {
    match code {
        ErrorCode::INVALID_INPUT | ErrorCode::NOT_FOUND | ErrorCode::UNSUPPORTED => {
            FailureKind::BadModel
        }
        _ => FailureKind::PluginFault,
    }
}

impl LoadError {
    /// The kind of failure, for the client's status.
    pub fn kind(&self) -> FailureKind {
        use loader::LoadError as L;
        match self {
            Self::Archive(ArchiveError::NotFound(_)) => FailureKind::NotFound,
            Self::Archive(ArchiveError::Io { .. }) => FailureKind::Internal,
            Self::Archive(_) | Self::Config(_) => FailureKind::BadArchive,
            Self::MissingBuiltIn { .. } => FailureKind::MissingPlugin,
            Self::Library { source } => match source {
                // A library the archive bundles that is not a plugin for this host.
                L::Missing { .. }
                | L::NotALibrary { .. }
                | L::NotAPlugin { .. }
                | L::AbiMismatch { .. }
                | L::LayoutMismatch { .. } => FailureKind::BadArchive,
                L::InitError { .. } | L::InitPanic { .. } => FailureKind::PluginFault,
                L::Io { .. } => FailureKind::Internal,
            },
            Self::Model { error, .. } | Self::Instance(error) => plugin_kind(error.code),
            Self::Host(_) => FailureKind::Internal,
            Self::Worker(failure) => failure.kind,
        }
    }

    /// As the state machine keeps it.
    pub fn into_failure(self) -> LoadFailure {
        LoadFailure::new(self.kind(), self.to_string())
    }
}

/// The plugin library a version's manifest names: a built-in one from the plugin directory, or
/// the one bundled in the archive.
pub fn plugin_path(ctx: &LoadContext, archive: &OpenedArchive) -> Result<PathBuf, LoadError> {
    Ok(match archive.handler()? {
        HandlerRef::BuiltIn(name) => {
            let file = plugin_file_name(&name);
            let path = ctx.plugin_dir.join(&file);
            if !path.is_file() {
                return Err(LoadError::MissingBuiltIn {
                    name,
                    file,
                    dir: ctx.plugin_dir.clone(),
                });
            }
            path
        }
        HandlerRef::Bundled(path) => path,
    })
}

/// What `load_model` is given: the model's identity and folder, its `[handler]` table, and its
/// whole config with the manifest's main model file.
pub fn model_spec(
    name: &str,
    version: &str,
    model_dir: &Path,
    config: &ModelConfig,
    serialized_file: Option<&str>,
) -> ModelSpec {
    let mut model_config = serde_json::to_value(config).unwrap_or_default();
    if let (Some(file), Some(object)) = (serialized_file, model_config.as_object_mut()) {
        object.insert("serialized_file".into(), file.into());
    }
    ModelSpec {
        name: name.into(),
        version: version.into(),
        model_dir: model_dir.to_string_lossy().into_owned().into(),
        handler_config_json: serde_json::to_string(&config.handler)
            .unwrap_or_else(|_| "{}".into())
            .into(),
        model_config_json: model_config.to_string().into(),
    }
}

/// Load the plugin library at `path` and, through it, the model `spec` names.
pub fn load_model(
    ctx: &LoadContext,
    path: &Path,
    spec: &ModelSpec,
) -> Result<(Arc<PluginLibrary>, ModelBox), LoadError> {
    let library = ctx.loader.load(path)?;
    let host = PluginServices::handle(&spec.name, &spec.version, ctx.metrics.clone());
    let Some(module) = library.module else {
        return Err(LoadError::Host(
            "the plugin library was opened only in worker processes: this is a bug".into(),
        ));
    };
    match (module.load_model())(spec, host) {
        RResult::ROk(model) => Ok((library, model)),
        RResult::RErr(error) => Err(LoadError::Model {
            plugin: library.description.name.to_string(),
            error,
        }),
    }
}

/// Process isolation: the library's description from a worker process that opens it (no
/// plugin code runs in the server), and what the version's worker processes share.
pub fn isolated(
    ctx: &LoadContext,
    path: &Path,
    spec: ModelSpec,
    config: &ModelConfig,
) -> Result<(Arc<PluginLibrary>, ProcessSettings), LoadError> {
    let exe = std::env::current_exe().map_err(|e| {
        LoadError::Host(format!("cannot find the server's binary for workers: {e}"))
    })?;
    let (sha256, runtime_path) = ctx.loader.stage_only(path)?;
    let description = crate::isolation::probe::describe(&exe, &runtime_path, path)?;
    tracing::info!(
        plugin = %description.name,
        plugin_version = %description.plugin_version,
        plugin_abi = %description.abi_version,
        capabilities = ?description.capabilities.names(),
        source = %path.display(),
        "plugin library opened in a worker process"
    );
    let services = PluginServices::handle(&spec.name, &spec.version, ctx.metrics.clone());
    let settings = ProcessSettings {
        exe,
        library: runtime_path.clone(),
        spec,
        continuous: description
            .capabilities
            .contains(Capabilities::CONTINUOUS_BATCHING),
        max_crashes: config.max_crashes,
        crash_window: Duration::from_secs(config.crash_window_s),
        metrics: ctx.metrics.clone(),
        services,
    };
    let library = Arc::new(PluginLibrary {
        source: path.to_owned(),
        runtime_path,
        sha256,
        module: None,
        description,
    });
    Ok((library, settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_errors_keep_whose_fault_they_are() {
        let refused = LoadError::Model {
            plugin: "gpt".into(),
            error: PluginError::invalid_input("`max_length` must be >= 1. Given: 0"),
        };
        assert_eq!(refused.kind(), FailureKind::BadModel);
        let failed = LoadError::Model {
            plugin: "gpt".into(),
            error: PluginError::internal("the plugin panicked in load_model"),
        };
        assert_eq!(failed.kind(), FailureKind::PluginFault);
        let missing = LoadError::MissingBuiltIn {
            name: "vision".into(),
            file: "libcresset_plugin_vision.so".into(),
            dir: PathBuf::from("plugins"),
        };
        assert_eq!(missing.kind(), FailureKind::MissingPlugin);
        assert!(missing.to_string().contains("libcresset_plugin_vision.so"));
        let not_plugin = LoadError::from(loader::LoadError::NotAPlugin {
            path: PathBuf::from("handler/lib.so"),
            host_abi: "1.0.0",
        });
        assert_eq!(not_plugin.kind(), FailureKind::BadArchive);
        let panicked = LoadError::from(loader::LoadError::InitPanic {
            path: PathBuf::from("handler/lib.so"),
            plugin_abi: "1.0.0".into(),
            host_abi: "1.0.0",
        });
        assert_eq!(panicked.kind(), FailureKind::PluginFault);
    }
}
