//! Registrations that survive restarts.
//!
//! Every change the management API acknowledges (register, scale, set-default, unregister) is
//! written to the snapshot file *before* the response goes out: a new file beside the old one,
//! fsynced, renamed over it, and the folder fsynced. A SIGKILL at any moment therefore leaves
//! either the old or the new snapshot, never half of one, and never loses an acknowledged change.
//! At start-up the snapshot is restored (default versions first) unless `--no-config-snapshot`.
//!
//! A registration is *pending* until its first successful load. A start-up that finds one still
//! pending knows that the process loading it died (an `abort()`, a segfault, an OOM kill in the
//! plugin), and restores it as `Failed` instead of loading it again: a load that kills the
//! server is never replayed into a crash loop. A clean exit marks loads it cut short as
//! `queued`, which are loaded again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{FailureKind, ModelRegistry, ModelState};
use crate::archive::ConfigOverrides;

/// Where a registration stands, as the snapshot keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RegistrationStatus {
    /// It has loaded successfully before: load it again at start-up. (Snapshots from before
    /// this field existed hold only such registrations.)
    #[default]
    Loaded,
    /// Registered, never loaded, and no load was under way when the server last stopped
    /// cleanly: load it at start-up.
    Queued,
    /// Its first load was under way in process `pid`: if that process is gone, the load may
    /// have killed it.
    Pending {
        /// The process that was loading it.
        pid: u32,
        /// When that process started (RFC 3339).
        since: String,
    },
    /// Its first load was cut short by the death of the server; it stays `Failed` with this
    /// reason until it is unregistered.
    Crashed {
        /// What describe shows.
        reason: String,
    },
}

/// One registered version as the snapshot keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotModel {
    /// The model name.
    pub name: String,
    /// The version (as the archive's manifest said).
    pub version: String,
    /// The archive to load (a name in the model store, or a path).
    pub archive: String,
    /// Where it was registered from, for the describe API.
    pub url: String,
    /// Whether it is the model's default version.
    pub default: bool,
    /// Registration overrides and scaling.
    pub overrides: ConfigOverrides,
    /// Loaded before, pending, queued or crashed.
    #[serde(default)]
    pub status: RegistrationStatus,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    format: u32,
    models: Vec<SnapshotModel>,
}

/// Writes the registry to the snapshot file.
pub struct Snapshotter {
    path: PathBuf,
    // Serialises writers, and each writes the registry as it is when it holds the lock, so the
    // last write always has the latest state.
    lock: Mutex<()>,
    /// When this process started, for pending registrations.
    since: String,
}

impl Snapshotter {
    /// A snapshotter for `path`.
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            path,
            lock: Mutex::new(()),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        })
    }

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the registry's registrations (every version with an archive that is not draining,
    /// and whose first load did not fail). `exiting`: the server stops cleanly, so loads under
    /// way are written as `queued` rather than pending.
    pub fn save(&self, registry: &ModelRegistry, exiting: bool) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let models = registry
            .versions_with_default()
            .into_iter()
            .filter(|(v, _)| !v.origin.archive_file.is_empty())
            .filter_map(|(v, default)| {
                let state = v.state();
                let status = match &state {
                    ModelState::Draining => return None,
                    // A version that failed to open at restore stays: its archive may be back
                    // next time.
                    _ if v.loaded_before() => RegistrationStatus::Loaded,
                    ModelState::Failed(f) if f.kind == FailureKind::Crashed => {
                        RegistrationStatus::Crashed {
                            reason: f.message.clone(),
                        }
                    }
                    // An operator's `--models` entry (or a registration restored at start-up)
                    // whose first load failed is tried again at the next start; one registered
                    // through the API whose first load failed is not kept (its client was told).
                    ModelState::Failed(_) if v.origin.at_startup => RegistrationStatus::Queued,
                    ModelState::Failed(_) => return None,
                    _ if exiting => RegistrationStatus::Queued,
                    _ => RegistrationStatus::Pending {
                        pid: std::process::id(),
                        since: self.since.clone(),
                    },
                };
                let (min_workers, max_workers) = v.recorded_worker_bounds();
                // A placeholder for an archive that failed to open has no config of its own: it
                // keeps the overrides it was registered with.
                let overrides = if v.handler.is_empty() {
                    v.origin.overrides.clone()
                } else {
                    ConfigOverrides {
                        batch_size: Some(v.config.batch_size),
                        max_batch_delay_ms: Some(v.config.max_batch_delay_ms),
                        min_workers,
                        max_workers,
                        response_timeout_s: Some(v.config.response_timeout_s),
                    }
                };
                Some(SnapshotModel {
                    name: v.name.clone(),
                    version: v.version.clone(),
                    archive: v.origin.archive_file.clone(),
                    url: v.origin.url.clone(),
                    default,
                    overrides,
                    status,
                })
            })
            .collect();
        let text = serde_json::to_vec_pretty(&SnapshotFile { format: 1, models })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp =
            crate::locked_file::locked_temp(dir, crate::locked_file::SNAPSHOT_TMP_PREFIX)?;
        tmp.write_all(&text)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// The registrations to restore, default versions first (the first version registered
    /// becomes a model's default). A missing file is an empty snapshot.
    pub fn load(&self) -> anyhow::Result<Vec<SnapshotModel>> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the snapshot {}: {e}",
                    self.path.display()
                ))
            }
        };
        let file: SnapshotFile = serde_json::from_slice(&text).map_err(|e| {
            anyhow::anyhow!(
                "the snapshot {} is not valid ({e}); move it away or start with --no-config-snapshot",
                self.path.display()
            )
        })?;
        let mut models = file.models;
        models.sort_by_key(|m| !m.default);
        Ok(models)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_snapshot_is_empty_and_a_corrupt_one_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snap = Snapshotter::new(dir.path().join("snapshot.json"));
        assert!(snap.load().expect("empty").is_empty());
        std::fs::write(snap.path(), b"{ half a fi").expect("write");
        let err = snap.load().expect_err("corrupt").to_string();
        assert!(err.contains("--no-config-snapshot"), "{err}");
    }

    #[test]
    fn saving_an_empty_registry_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snap = Snapshotter::new(dir.path().join("nested/snapshot.json"));
        snap.save(&ModelRegistry::default(), false).expect("save");
        assert!(snap.load().expect("load").is_empty());
    }

    fn origin(archive: &str, at_startup: bool, loaded_before: bool) -> crate::registry::Origin {
        crate::registry::Origin {
            url: archive.into(),
            archive_file: archive.into(),
            at_startup,
            overrides: ConfigOverrides::default(),
            loaded_before,
        }
    }

    fn failed(
        name: &str,
        origin: crate::registry::Origin,
        kind: FailureKind,
    ) -> Arc<crate::registry::ModelVersion> {
        Arc::new(crate::registry::ModelVersion::failed(
            name.into(),
            "1.0".into(),
            origin,
            crate::registry::LoadFailure::new(kind, "why"),
        ))
    }

    /// A version in `Loading`, from a directory archive.
    fn loading(
        dir: &Path,
        name: &str,
        origin: crate::registry::Origin,
    ) -> Arc<crate::registry::ModelVersion> {
        let archive_dir = dir.join(name);
        std::fs::create_dir_all(&archive_dir).expect("mkdir");
        std::fs::write(
            archive_dir.join("MANIFEST.toml"),
            format!("[model]\nname = \"{name}\"\nversion = \"1.0\"\nhandler = \"echo\"\n"),
        )
        .expect("manifest");
        let archive = crate::archive::OpenedArchive::open(
            &archive_dir,
            &dir.join("work"),
            &crate::archive::ExtractLimits::default(),
            None,
        )
        .expect("open");
        let config = archive.config.clone();
        Arc::new(crate::registry::ModelVersion::from_archive(
            archive, None, config, origin,
        ))
    }

    fn status_of(models: &[SnapshotModel], name: &str) -> Option<RegistrationStatus> {
        models
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.status.clone())
    }

    #[test]
    fn registrations_are_pending_until_loaded_and_failed_first_loads_are_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = ModelRegistry::default();
        registry
            .insert(loading(
                dir.path(),
                "new",
                origin("new.tar.gz", false, false),
            ))
            .expect("insert");
        registry
            .insert(loading(
                dir.path(),
                "known",
                origin("known.tar.gz", true, true),
            ))
            .expect("insert");
        registry
            .insert(failed(
                "refused",
                origin("r.tar.gz", false, false),
                FailureKind::BadModel,
            ))
            .expect("insert");
        registry
            .insert(failed(
                "operators",
                origin("o.tar.gz", true, false),
                FailureKind::BadModel,
            ))
            .expect("insert");
        registry
            .insert(failed(
                "crashed",
                origin("c.tar.gz", true, false),
                FailureKind::Crashed,
            ))
            .expect("insert");
        registry
            .insert(failed(
                "missing",
                origin("m.tar.gz", true, true),
                FailureKind::NotFound,
            ))
            .expect("insert");
        let snap = Snapshotter::new(dir.path().join("snapshot.json"));

        snap.save(&registry, false).expect("save");
        let models = snap.load().expect("load");
        assert!(matches!(
            status_of(&models, "new"),
            Some(RegistrationStatus::Pending { pid, .. }) if pid == std::process::id()
        ));
        assert_eq!(
            status_of(&models, "known"),
            Some(RegistrationStatus::Loaded)
        );
        assert_eq!(status_of(&models, "refused"), None, "its client was told");
        assert_eq!(
            status_of(&models, "operators"),
            Some(RegistrationStatus::Queued)
        );
        assert_eq!(
            status_of(&models, "crashed"),
            Some(RegistrationStatus::Crashed {
                reason: "why".into()
            })
        );
        assert_eq!(
            status_of(&models, "missing"),
            Some(RegistrationStatus::Loaded),
            "its archive may be back next time"
        );

        // A clean exit: the load under way was not the cause.
        snap.save(&registry, true).expect("save");
        let models = snap.load().expect("load");
        assert_eq!(status_of(&models, "new"), Some(RegistrationStatus::Queued));
    }

    #[test]
    fn snapshots_from_before_the_status_field_hold_loaded_registrations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snap = Snapshotter::new(dir.path().join("snapshot.json"));
        std::fs::write(
            snap.path(),
            br#"{"format":1,"models":[{"name":"a","version":"1.0","archive":"a.tar.gz","url":"a.tar.gz","default":true,"overrides":{}}]}"#,
        )
        .expect("write");
        let models = snap.load().expect("load");
        assert_eq!(models[0].status, RegistrationStatus::Loaded);
        // And an unknown status is an error, not silently a default.
        std::fs::write(
            snap.path(),
            br#"{"format":1,"models":[{"name":"a","version":"1.0","archive":"a","url":"a","default":true,"overrides":{},"status":"maybe"}]}"#,
        )
        .expect("write");
        assert!(snap.load().is_err());
    }
}
