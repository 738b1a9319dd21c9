//! Loading plugin libraries.
//!
//! * Every library is first copied to a content-addressed path (`<runtime>/<sha256>-<name>`),
//!   and only that copy is opened. Overwriting a mapped `.so` crashes the process, and
//!   `dlopen` of a path that is already loaded returns the old code; a path per content avoids
//!   both, so a new build of a plugin always loads beside the old one.
//! * `lib_header_from_path` + `init_root_module` are used, never `RootModule::load_from_file`,
//!   which caches one module per type and would hand back the first plugin for every file.
//! * Libraries are never unloaded (as in Triton): a swap leaks one mapping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use abi_stable::library::{lib_header_from_path, LibraryError, RootModuleError};
use cresset_plugin_api::{PluginDescription, PluginModRef, ABI_VERSION};

use crate::file_identity::{identity, sha256_file, HashMemo};

/// Why a plugin library could not be loaded. Every message names the file and, once it is
/// known, both ABI versions.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No file at the path.
    #[error("plugin library `{path}` does not exist (host plugin ABI {host_abi})")]
    Missing {
        /// The path.
        path: PathBuf,
        /// This host's ABI.
        host_abi: &'static str,
    },
    /// The file is not a loadable shared library.
    #[error("`{path}` is not a loadable shared library (host plugin ABI {host_abi}): {reason}")]
    NotALibrary {
        /// The path.
        path: PathBuf,
        /// This host's ABI.
        host_abi: &'static str,
        /// The loader's message.
        reason: String,
    },
    /// A shared library without a root module.
    #[error("`{path}` is a shared library but not a Cresset plugin: it exports no plugin root module (host plugin ABI {host_abi}; was it built with `cresset_plugin_api::export_handler!`?)")]
    NotAPlugin {
        /// The path.
        path: PathBuf,
        /// This host's ABI.
        host_abi: &'static str,
    },
    /// Built against an incompatible ABI version.
    #[error("`{path}` was built against plugin ABI {plugin_abi}, but this host speaks plugin ABI {host_abi}: rebuild the plugin against cresset-plugin-api {host_major}.x")]
    AbiMismatch {
        /// The path.
        path: PathBuf,
        /// The plugin's ABI.
        plugin_abi: String,
        /// This host's ABI.
        host_abi: &'static str,
        /// This host's major version.
        host_major: String,
    },
    /// Same version, but the types do not match.
    #[error("`{path}` (plugin ABI {plugin_abi}) has a root module layout that does not match this host's (plugin ABI {host_abi}): {detail}")]
    LayoutMismatch {
        /// The path.
        path: PathBuf,
        /// The plugin's ABI.
        plugin_abi: String,
        /// This host's ABI.
        host_abi: &'static str,
        /// abi_stable's report.
        detail: String,
    },
    /// The root module constructor returned an error.
    #[error("plugin `{path}` (plugin ABI {plugin_abi}, host plugin ABI {host_abi}) failed to initialise: {message}")]
    InitError {
        /// The path.
        path: PathBuf,
        /// The plugin's ABI.
        plugin_abi: String,
        /// This host's ABI.
        host_abi: &'static str,
        /// The plugin's message.
        message: String,
    },
    /// The root module constructor panicked.
    #[error("plugin `{path}` (plugin ABI {plugin_abi}, host plugin ABI {host_abi}) panicked while initialising")]
    InitPanic {
        /// The path.
        path: PathBuf,
        /// The plugin's ABI.
        plugin_abi: String,
        /// This host's ABI.
        host_abi: &'static str,
    },
    /// Copying to the runtime folder failed.
    #[error("cannot stage plugin `{path}` in the runtime folder: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A loaded plugin library.
pub struct PluginLibrary {
    /// Where the library was loaded from (the user's path).
    pub source: PathBuf,
    /// The content-addressed copy that was opened.
    pub runtime_path: PathBuf,
    /// The sha256 of the library, hex.
    pub sha256: String,
    /// The root module; `None` for a library only worker processes open (process isolation:
    /// the host has its description from a worker that opened it, see
    /// [`crate::isolation::probe`]).
    pub module: Option<PluginModRef>,
    /// What the plugin says about itself.
    pub description: PluginDescription,
}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .field("name", &self.description.name.as_str())
            .finish()
    }
}

/// Loads plugin libraries, once per content.
pub struct PluginLoader {
    runtime_dir: PathBuf,
    loaded: Mutex<HashMap<String, Arc<PluginLibrary>>>,
}

impl PluginLoader {
    /// A loader that stages libraries in `runtime_dir`.
    pub fn new(runtime_dir: PathBuf) -> Self {
        Self {
            runtime_dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// Load the plugin at `path` (or return it if the same bytes are already loaded).
    pub fn load(&self, path: &Path) -> Result<Arc<PluginLibrary>, LoadError> {
        let io = |source| LoadError::Io {
            path: path.to_owned(),
            source,
        };
        if !path.is_file() {
            return Err(LoadError::Missing {
                path: path.to_owned(),
                host_abi: ABI_VERSION,
            });
        }
        // Hold the lock across the load: two loads of the same bytes must not race.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let (sha256, runtime_path) = self.stage(path).map_err(io)?;
        if let Some(library) = loaded.get(&sha256) {
            return Ok(library.clone());
        }
        let module = open(path, &runtime_path)?;
        let description = (module.describe())();
        tracing::info!(
            plugin = %description.name,
            plugin_version = %description.plugin_version,
            plugin_abi = %description.abi_version,
            host_abi = ABI_VERSION,
            capabilities = ?description.capabilities.names(),
            source = %path.display(),
            sha256 = &sha256[..16],
            "loaded plugin library"
        );
        let library = Arc::new(PluginLibrary {
            source: path.to_owned(),
            runtime_path,
            sha256: sha256.clone(),
            module: Some(module),
            description,
        });
        loaded.insert(sha256, library.clone());
        Ok(library)
    }

    /// Stage `path` in the runtime folder without opening it: `(sha256, staged copy)`, for a
    /// library that worker processes open.
    pub fn stage_only(&self, path: &Path) -> Result<(String, PathBuf), LoadError> {
        if !path.is_file() {
            return Err(LoadError::Missing {
                path: path.to_owned(),
                host_abi: ABI_VERSION,
            });
        }
        let _serialised = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        self.stage(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Copy `path` into the runtime folder, hash the copy (not the source, which could change
    /// between hashing and copying), and move it to its content-addressed name. A file already
    /// there has the same bytes by construction (the folder is private to this user), so it is
    /// reused and never written over. The hash is remembered against the source's identity
    /// ([`crate::file_identity`]): a library staged before and unchanged since is neither
    /// copied nor read again (a plugin built with debug info is a hundred megabytes).
    fn stage(&self, path: &Path) -> std::io::Result<(String, PathBuf)> {
        std::fs::create_dir_all(&self.runtime_dir)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin.so".into());
        let memo = HashMemo::new(self.runtime_dir.join("hashes"));
        let canonical = std::fs::canonicalize(path)?;
        let id = identity(&std::fs::metadata(&canonical)?);
        if let Some(sha256) = memo.recall(&canonical, &id) {
            let target = self.runtime_dir.join(format!("{}-{name}", &sha256[..32]));
            if target.is_file() {
                return Ok((sha256, target));
            }
        }
        // Locked while it is written: a crash leaves it for the next start-up's sweep.
        let tmp =
            crate::locked_file::locked_temp(&self.runtime_dir, crate::locked_file::STAGING_PREFIX)?;
        std::fs::copy(&canonical, tmp.path())?;
        let sha256 = sha256_file(tmp.path())?;
        let target = self.runtime_dir.join(format!("{}-{name}", &sha256[..32]));
        if !target.is_file() {
            tmp.as_file().sync_all()?;
            match tmp.persist_noclobber(&target) {
                Ok(_) => {}
                // Another process staged the same bytes first: use its copy.
                Err(e) if target.is_file() => drop(e),
                Err(e) => return Err(e.error),
            }
        }
        // Remembered only if the source did not change since `id` (so not while it was copied).
        memo.remember(&canonical, &id, &sha256)?;
        Ok((sha256, target))
    }
}

/// Open a library the host already staged and checked (a worker process opens the host's
/// staged copy: no second copy, no second hash).
pub fn open_staged(runtime_path: &Path) -> Result<PluginModRef, LoadError> {
    open(runtime_path, runtime_path)
}

/// Open the staged copy and initialise its root module, mapping every failure to a
/// [`LoadError`] that names the user's path.
fn open(source: &Path, runtime_path: &Path) -> Result<PluginModRef, LoadError> {
    let path = source.to_owned();
    let header = lib_header_from_path(runtime_path).map_err(|e| match e {
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path: path.clone(),
            host_abi: ABI_VERSION,
        },
        other => LoadError::NotALibrary {
            path: path.clone(),
            host_abi: ABI_VERSION,
            reason: first_line(&other.to_string()),
        },
    })?;
    let plugin_abi = header.version_strings().version.to_string();
    let host_major = ABI_VERSION
        .split('.')
        .next()
        .unwrap_or(ABI_VERSION)
        .to_owned();
    header
        .init_root_module::<PluginModRef>()
        .map_err(|e| match e {
            LibraryError::IncompatibleVersionNumber { .. } | LibraryError::ParseVersionError(_) => {
                LoadError::AbiMismatch {
                    path: path.clone(),
                    plugin_abi: plugin_abi.clone(),
                    host_abi: ABI_VERSION,
                    host_major,
                }
            }
            LibraryError::RootModule {
                err: RootModuleError::Unwound,
                ..
            } => LoadError::InitPanic {
                path: path.clone(),
                plugin_abi: plugin_abi.clone(),
                host_abi: ABI_VERSION,
            },
            LibraryError::RootModule {
                err: RootModuleError::Returned(message),
                ..
            } => LoadError::InitError {
                path: path.clone(),
                plugin_abi: plugin_abi.clone(),
                host_abi: ABI_VERSION,
                message: message.to_string(),
            },
            other => LoadError::LayoutMismatch {
                path: path.clone(),
                plugin_abi: plugin_abi.clone(),
                host_abi: ABI_VERSION,
                detail: first_line(&other.to_string()),
            },
        })
}

fn first_line(text: &str) -> String {
    let trimmed = text.trim();
    let mut lines = trimmed.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or(trimmed).trim().to_owned();
    if lines.next().is_some() {
        format!("{first} …")
    } else {
        first
    }
}
