//! The model registry: model name → versions (each with its plugin, queue and workers) and the
//! default version.
//!
//! - [`state`]: a version's life as a state machine (`Loading` → `Ready`/`Failed`, → `Draining`).
//! - [`version`]: one version: its queue, plugin, model and workers.
//! - [`pool`]: a version's worker threads and the devices they get.
//! - [`load`]: loading a plugin and a model, with typed errors.
//! - [`store`]: the model store on disk: archives arriving, kept and forgotten; crash debris.
//! - [`snapshot`]: registrations that survive restarts (pending until their first load).
//! - [`registrar`]: registering, restoring and unregistering, with the snapshot kept in step.
//!
//! Unregistering a version takes it out of the registry at once (no new request can reach it),
//! lets every request that already holds it finish, then stops its workers, which drops its
//! instances and its model, freeing their weights.

pub mod load;
pub mod pool;
pub mod registrar;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod version;

pub use load::{LoadContext, LoadError};
pub use registrar::{Registrar, StoreRegistration, Unregistered};
pub use state::{FailureKind, LoadFailure, ModelState};
pub use version::{drain, ModelVersion, Origin, SubmitError};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::metrics::Metrics;
use crate::worker::WorkerStatus;

/// A model: its versions and which one answers by default.
pub struct ModelEntry {
    /// Versions by version string.
    pub versions: BTreeMap<String, Arc<ModelVersion>>,
    /// The default version.
    pub default_version: String,
}

/// Why a registry operation failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No such model.
    #[error("Model not found: {0}")]
    NoModel(String),
    /// No such version.
    #[error("Model version {1} does not exist for model {0}")]
    NoVersion(String, String),
    /// The version is already registered.
    #[error("Model version {1} for model {0} is already registered")]
    Exists(String, String),
    /// The operation conflicts with the version's state (message says why).
    #[error("{0}")]
    Conflict(String),
    /// The operation is not allowed (removing a default version that others depend on).
    #[error("{0}")]
    Forbidden(String),
}

/// What `/ping` and readiness report.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Versions that should have workers and do not yet (loading, or scaled short), with state.
    pub not_ready: BTreeMap<String, String>,
    /// Versions whose load failed. They do not hold the server's readiness (waiting will not
    /// make them load, and every other model would be out of service meanwhile); describe gives
    /// the reason.
    pub failed: Vec<String>,
}

impl Readiness {
    /// Ready when nothing is still coming up.
    pub fn ready(&self) -> bool {
        self.not_ready.is_empty()
    }
}

/// All models.
#[derive(Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, ModelEntry>>,
    /// Unregistered versions still draining, for describe output. Weak, so that they do not
    /// keep the drain waiting.
    draining: Mutex<Vec<std::sync::Weak<ModelVersion>>>,
}

impl ModelRegistry {
    /// Add a version; the first version of a model becomes its default.
    pub fn insert(&self, version: Arc<ModelVersion>) -> Result<(), RegistryError> {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .entry(version.name.clone())
            .or_insert_with(|| ModelEntry {
                versions: BTreeMap::new(),
                default_version: version.version.clone(),
            });
        if entry.versions.contains_key(&version.version) {
            return Err(RegistryError::Exists(
                version.name.clone(),
                version.version.clone(),
            ));
        }
        entry.versions.insert(version.version.clone(), version);
        Ok(())
    }

    /// The named version, or the default one.
    pub fn get(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .get(name)
            .ok_or_else(|| RegistryError::NoModel(name.to_owned()))?;
        let version = version.unwrap_or(&entry.default_version);
        entry
            .versions
            .get(version)
            .cloned()
            .ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version.to_owned()))
    }

    /// Every version of a model with the default one's version string.
    pub fn versions(&self, name: &str) -> Result<(Vec<Arc<ModelVersion>>, String), RegistryError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .get(name)
            .ok_or_else(|| RegistryError::NoModel(name.to_owned()))?;
        Ok((
            entry.versions.values().cloned().collect(),
            entry.default_version.clone(),
        ))
    }

    /// Model names with their default version, sorted, from `offset`, at most `limit`.
    pub fn list(&self, offset: usize, limit: usize) -> (Vec<Arc<ModelVersion>>, usize) {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let total = models.len();
        let page = models
            .values()
            .skip(offset)
            .take(limit)
            .filter_map(|e| e.versions.get(&e.default_version).cloned())
            .collect();
        (page, total)
    }

    /// Make `version` the default: new requests go to it from now on. Only a `Ready` version
    /// can be the default, so a swap never sends traffic to a version that cannot answer.
    pub fn set_default(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .get_mut(name)
            .ok_or_else(|| RegistryError::NoModel(name.to_owned()))?;
        let target = entry
            .versions
            .get(version)
            .ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version.to_owned()))?;
        let state = target.state();
        if state != ModelState::Ready {
            return Err(RegistryError::Conflict(format!(
                "model `{name}` version `{version}` is {}; only a Ready version can be the default",
                state.name()
            )));
        }
        if target.live_workers() == 0 {
            return Err(RegistryError::Conflict(format!(
                "model `{name}` version `{version}` has no workers; scale it up before making it the default"
            )));
        }
        entry.default_version = version.to_owned();
        Ok(())
    }

    /// Take a version out (the default one if `version` is `None`) and return it for draining.
    /// The default version cannot be removed while the model has others: set another default
    /// first.
    pub fn remove(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .get_mut(name)
            .ok_or_else(|| RegistryError::NoModel(name.to_owned()))?;
        let version = version.unwrap_or(&entry.default_version).to_owned();
        if !entry.versions.contains_key(&version) {
            return Err(RegistryError::NoVersion(name.to_owned(), version));
        }
        if version == entry.default_version && entry.versions.len() > 1 {
            // TorchServe's 403.
            return Err(RegistryError::Forbidden(format!(
                "version `{version}` is the default of model `{name}`, which has other versions; make another version the default first"
            )));
        }
        let removed = entry
            .versions
            .remove(&version)
            .ok_or_else(|| RegistryError::NoVersion(name.to_owned(), version.clone()))?;
        if entry.versions.is_empty() {
            models.remove(name);
        }
        let mut draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        draining.retain(|w| w.strong_count() > 0);
        draining.push(Arc::downgrade(&removed));
        Ok(removed)
    }

    /// Take out exactly this version (no default rule): a registration withdrawn because it
    /// failed. Returns whether it was there.
    pub fn withdraw(&self, version: &ModelVersion) -> bool {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = models.get_mut(&version.name) else {
            return false;
        };
        let same = entry
            .versions
            .get(&version.version)
            .is_some_and(|v| std::ptr::eq(Arc::as_ptr(v), version));
        if !same {
            return false;
        }
        entry.versions.remove(&version.version);
        if entry.versions.is_empty() {
            models.remove(&version.name);
        } else if entry.default_version == version.version {
            if let Some(other) = entry.versions.keys().next() {
                entry.default_version = other.clone();
            }
        }
        true
    }

    /// Versions of `name` that were unregistered and are still draining.
    pub fn draining(&self, name: &str) -> Vec<Arc<ModelVersion>> {
        self.all_draining()
            .into_iter()
            .filter(|v| v.name == name)
            .collect()
    }

    /// Every version still draining.
    pub fn all_draining(&self) -> Vec<Arc<ModelVersion>> {
        let draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        draining
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Every version with whether it is its model's default (for snapshots).
    pub fn versions_with_default(&self) -> Vec<(Arc<ModelVersion>, bool)> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .flat_map(|e| {
                e.versions
                    .values()
                    .map(|v| (v.clone(), v.version == e.default_version))
            })
            .collect()
    }

    /// Every version, for readiness, describe output and metrics.
    pub fn all_versions(&self) -> Vec<Arc<ModelVersion>> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .flat_map(|e| e.versions.values().cloned())
            .collect()
    }

    /// Ready when every version that should have workers has them all up; failed versions are
    /// listed but do not hold readiness.
    pub fn readiness(&self) -> Readiness {
        let mut readiness = Readiness::default();
        for v in self.all_versions() {
            let key = format!("{}/{}", v.name, v.version);
            match v.state() {
                ModelState::Failed(_) => readiness.failed.push(key),
                state if v.worker_bounds().0 > 0 && state != ModelState::Ready => {
                    readiness.not_ready.insert(key, state.name().to_owned());
                }
                _ => {}
            }
        }
        readiness
    }

    /// Set the gauges that describe the registry (queue depths, workers by state): the registry
    /// pushes to the metrics, which know nothing of it.
    pub fn publish_gauges(&self, metrics: &Metrics) {
        metrics.queue_depth.reset();
        metrics.workers.reset();
        metrics.worker_memory.reset();
        for v in self.all_versions() {
            let labels = [v.name.as_str(), v.version.as_str()];
            metrics
                .queue_depth
                .with_label_values(&labels)
                .set(v.queue_depth() as i64);
            for (id, process) in v.worker_processes().unwrap_or_default() {
                let bytes = process
                    .pid
                    .and_then(|pid| crate::isolation::resident_bytes(Some(pid)));
                if let Some(bytes) = bytes {
                    metrics
                        .worker_memory
                        .with_label_values(&[labels[0], labels[1], &id.to_string()])
                        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                }
            }
            let workers = v.workers();
            for status in WorkerStatus::ALL {
                let count = workers.iter().filter(|w| w.status == status).count();
                metrics
                    .workers
                    .with_label_values(&[labels[0], labels[1], status.name()])
                    .set(count as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            url: "x".into(),
            archive_file: "x".into(),
            at_startup: false,
            overrides: Default::default(),
            loaded_before: false,
        }
    }

    fn failed(name: &str, version: &str) -> Arc<ModelVersion> {
        Arc::new(ModelVersion::failed(
            name.into(),
            version.into(),
            origin(),
            LoadFailure::new(FailureKind::BadArchive, "broken"),
        ))
    }

    #[test]
    fn failed_versions_are_listed_but_do_not_hold_readiness() {
        let registry = ModelRegistry::default();
        registry.insert(failed("a", "1")).expect("insert");
        let readiness = registry.readiness();
        assert!(readiness.ready());
        assert_eq!(readiness.failed, ["a/1"]);
    }

    #[test]
    fn the_default_version_cannot_be_removed_while_others_remain_but_can_be_withdrawn() {
        let registry = ModelRegistry::default();
        let v1 = failed("a", "1");
        registry.insert(v1.clone()).expect("insert 1");
        registry.insert(failed("a", "2")).expect("insert 2");
        assert_eq!(
            registry.insert(failed("a", "2")).expect_err("twice"),
            RegistryError::Exists("a".into(), "2".into())
        );
        assert!(matches!(
            registry.remove("a", Some("1")),
            Err(RegistryError::Forbidden(_))
        ));
        assert!(registry.withdraw(&v1));
        assert_eq!(registry.get("a", None).expect("default").version, "2");
        assert!(!registry.withdraw(&v1), "only once");
        let removed = registry.remove("a", None).expect("remove the last");
        assert_eq!(removed.version, "2");
        assert_eq!(registry.draining("a").len(), 1);
        assert!(matches!(
            registry.get("a", None),
            Err(RegistryError::NoModel(_))
        ));
    }
}
