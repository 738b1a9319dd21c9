//! Registering, restoring and unregistering versions, with the snapshot and the store kept in
//! step: every acknowledged change is persisted before it is answered, a registration is
//! pending until its first load succeeds, and archives the server kept are removed once nothing
//! uses them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::load::{LoadContext, LoadError};
use super::snapshot::{RegistrationStatus, Snapshotter};
use super::state::{FailureKind, LoadFailure, ModelState};
use super::version::{drain, ModelVersion, Origin};
use super::{store, ModelRegistry, RegistryError};
use crate::archive::{resolve_in_store, ConfigOverrides, ModelSource, OpenedArchive};

/// What [`Registrar::unregister`] did.
pub struct Unregistered {
    /// The model's name and the version taken out.
    pub which: (String, String),
    /// Whether the registrations snapshot was written.
    pub persisted: std::io::Result<()>,
    /// Fires when the version has drained (its workers stopped, its model dropped); present
    /// only when no request held the version as it was taken out, so that waiting is short.
    pub drained: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A registration from the model store: at start-up from `--models`, or restored from a
/// snapshot (with the overrides, URL, version and status it had).
#[derive(Debug, Clone)]
pub struct StoreRegistration {
    /// The archive and the name to register it under.
    pub source: ModelSource,
    /// Registration overrides and worker counts.
    pub overrides: ConfigOverrides,
    /// Where it was first registered from (for describe), if not the archive itself.
    pub url: Option<String>,
    /// The version the snapshot recorded (kept if the archive cannot be opened).
    pub version: Option<String>,
    /// Where it stood when the snapshot was written (`Queued` for `--models`).
    pub status: RegistrationStatus,
}

/// Registers, restores and unregisters versions.
pub struct Registrar {
    /// The models.
    pub registry: Arc<ModelRegistry>,
    /// What loading needs.
    pub ctx: Arc<LoadContext>,
    /// Where registrations are persisted (`None` with `--no-config-snapshot`).
    pub snapshot: Option<Arc<Snapshotter>>,
    /// The model store.
    pub store: PathBuf,
}

/// Why a registration was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The registry refused it (the version exists).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The snapshot could not be written, so the registration was withdrawn.
    #[error("cannot write the snapshot: {0}")]
    Snapshot(std::io::Error),
    /// No loader thread could be started.
    #[error("cannot start a loader thread: {0}")]
    Thread(std::io::Error),
}

impl Registrar {
    /// Write the snapshot (if snapshots are on).
    pub fn persist(&self) -> std::io::Result<()> {
        match &self.snapshot {
            Some(snapshot) => snapshot.save(&self.registry, false),
            None => Ok(()),
        }
    }

    fn persist_or_log(&self) {
        if let Err(e) = self.persist() {
            tracing::error!("cannot write the snapshot: {e}");
        }
    }

    /// A clean exit: loads still under way are written as queued, to be loaded next time.
    pub fn persist_on_exit(&self) {
        if let Some(snapshot) = &self.snapshot {
            if let Err(e) = snapshot.save(&self.registry, true) {
                tracing::error!("cannot write the snapshot at exit: {e}");
            }
        }
    }

    /// Start-up: open every registration, record them all (pending ones included) in the
    /// snapshot before any load begins, then load each on a thread of its own. A registration
    /// whose first load was under way when the server died is restored as `Failed`, not loaded.
    pub fn start(self: &Arc<Self>, registrations: &[StoreRegistration]) -> std::io::Result<()> {
        let mut to_load = Vec::new();
        for registration in registrations {
            let version = self.open_registration(registration);
            if let Err(e) = self.registry.insert(version.clone()) {
                tracing::warn!("not loading {}: {e}", registration.source.archive);
                continue;
            }
            if version.state() == ModelState::Loading {
                to_load.push(version);
            }
        }
        self.persist()?;
        for version in to_load {
            self.load_in_background(version)?;
        }
        Ok(())
    }

    fn open_registration(&self, registration: &StoreRegistration) -> Arc<ModelVersion> {
        let source = &registration.source;
        let mut origin = Origin {
            url: registration
                .url
                .clone()
                .unwrap_or_else(|| source.archive.clone()),
            archive_file: source.archive.clone(),
            at_startup: true,
            overrides: registration.overrides.clone(),
            loaded_before: registration.status == RegistrationStatus::Loaded,
        };
        let name = || {
            source
                .name
                .clone()
                .unwrap_or_else(|| source.archive.clone())
        };
        let version = || {
            registration
                .version
                .clone()
                .unwrap_or_else(|| "unknown".into())
        };
        let crashed = match &registration.status {
            RegistrationStatus::Pending { pid, since } => Some(format!(
                "the server (pid {pid}, started {since}) stopped while loading this version for the first time; the load may have crashed it, so it is not loaded again. Unregister it and register it again to retry"
            )),
            RegistrationStatus::Crashed { reason } => Some(reason.clone()),
            RegistrationStatus::Loaded | RegistrationStatus::Queued => None,
        };
        if let Some(reason) = crashed {
            tracing::error!(model = %name(), version = %version(), "{reason}");
            origin.loaded_before = false;
            return Arc::new(ModelVersion::failed(
                name(),
                version(),
                origin,
                LoadFailure::new(FailureKind::Crashed, reason),
            ));
        }
        let opened = resolve_in_store(&self.store, &source.archive)
            .and_then(|path| {
                OpenedArchive::open(
                    &path,
                    &self.ctx.extract_dir,
                    &self.ctx.limits,
                    self.ctx.archive_cache.as_deref(),
                )
            })
            .map_err(LoadError::from)
            .and_then(|archive| {
                let config = archive
                    .config
                    .clone()
                    .with_overrides(&registration.overrides)
                    .map_err(LoadError::Config)?;
                Ok((archive, config))
            });
        match opened {
            Ok((archive, config)) => Arc::new(ModelVersion::from_archive(
                archive,
                source.name.clone(),
                config,
                origin,
            )),
            Err(e) => {
                tracing::error!(model = %name(), "model failed to load: {e}");
                Arc::new(ModelVersion::failed(
                    name(),
                    version(),
                    origin,
                    e.into_failure(),
                ))
            }
        }
    }

    /// Register a new version: record it (pending) in the registry and the snapshot, then load
    /// it in the background.
    pub fn register(self: &Arc<Self>, version: Arc<ModelVersion>) -> Result<(), RegisterError> {
        self.registry.insert(version.clone())?;
        if let Err(e) = self.persist() {
            self.registry.withdraw(&version);
            return Err(RegisterError::Snapshot(e));
        }
        if let Err(e) = self.load_in_background(version.clone()) {
            self.withdraw_failed(&version);
            return Err(RegisterError::Thread(e));
        }
        Ok(())
    }

    fn load_in_background(
        self: &Arc<Self>,
        version: Arc<ModelVersion>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("cresset-loader".into())
            .spawn(move || {
                let state = version.start(&this.ctx, |_| this.persist_or_log());
                this.settled(&version, &state);
            })
    }

    /// After a load: the first failure of a registration made through the API is not kept in
    /// the snapshot, nor is its archive if the server kept it (a registration made at start-up
    /// is tried again next time). A success was recorded before the version turned `Ready`.
    fn settled(&self, version: &ModelVersion, state: &ModelState) {
        match state {
            ModelState::Ready => {}
            ModelState::Failed(_) if !version.loaded_before() => {
                self.persist_or_log();
                if !version.origin.at_startup {
                    self.forget_archive_if_unused(&version.origin.archive_file, Some(version));
                }
            }
            _ => {}
        }
    }

    /// Take out a registration whose load failed (a synchronous registration answers with the
    /// error instead of keeping it).
    pub fn withdraw_failed(&self, version: &ModelVersion) {
        if self.registry.withdraw(version) {
            self.persist_or_log();
        }
        self.ctx.metrics.forget(&version.name, &version.version);
        self.forget_archive_if_unused(&version.origin.archive_file, Some(version));
    }

    /// Unregister a version (the default one if `version` is `None`): it is out of the registry
    /// and the snapshot at once, and drains in the background; then its metric series and (if
    /// nothing else uses it) its kept archive go too.
    pub fn unregister(
        self: &Arc<Self>,
        name: &str,
        version: Option<&str>,
    ) -> Result<Unregistered, RegistryError> {
        let removed = self.registry.remove(name, version)?;
        let persisted = self.persist();
        let which = (removed.name.clone(), removed.version.clone());
        // Requests in flight hold the version; with none, the drain is only stopping its
        // workers, and the caller may wait for it.
        let idle = Arc::strong_count(&removed) == 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        drain(removed, move |v| {
            this.ctx.metrics.forget(&v.name, &v.version);
            this.forget_archive_if_unused(&v.origin.archive_file, Some(v));
            let _ = tx.send(());
        });
        Ok(Unregistered {
            which,
            persisted,
            drained: idle.then_some(rx),
        })
    }

    /// Remove an archive the server kept (an upload, a download) when no registered version
    /// other than `except` may load from it again.
    pub fn forget_archive_if_unused(&self, archive_file: &str, except: Option<&ModelVersion>) {
        if !store::is_kept_archive(archive_file) {
            return;
        }
        let in_use = self.registry.all_versions().iter().any(|v| {
            let other = except.is_none_or(|e| !std::ptr::eq(Arc::as_ptr(v), e));
            let may_load_again = match v.state() {
                ModelState::Failed(f) => {
                    v.loaded_before() || v.origin.at_startup || f.kind == FailureKind::Crashed
                }
                ModelState::Draining => false,
                ModelState::Loading | ModelState::Ready => true,
            };
            other && may_load_again && v.origin.archive_file == archive_file
        });
        if !in_use {
            store::forget_kept_archive(&self.store, archive_file);
        }
    }

    /// The store-relative name under which a registration refers to `path`.
    pub fn archive_name(&self, path: &Path) -> String {
        path.strip_prefix(&self.store)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| path.to_string_lossy().into_owned())
    }
}
