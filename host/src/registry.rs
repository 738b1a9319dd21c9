//! The model registry: model name → versions (each with its plugin, queue and workers) and the
//! default version.
//!
//! A version's life: `Loading` → `Ready` (or `Failed`) → `Draining` → gone. Unregistering a
//! version takes it out of the registry at once (no new request can reach it), lets every
//! request that already holds it finish, then stops its workers, which drops its instances and
//! its model, freeing their weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use abi_stable::std_types::RResult;
use cresset_plugin_api::{plugin_file_name, DeviceType, InstanceAssignment, ModelBox, ModelSpec};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::watch;

use crate::archive::{
    resolve_in_store, ConfigOverrides, DeviceKind, ExtractLimits, HandlerRef, ModelConfig,
    ModelSource, OpenedArchive,
};
use crate::loader::{PluginLibrary, PluginLoader};
use crate::metrics::Metrics;
use crate::services::PluginServices;
use crate::worker::{self, Job, StatusCell, WorkerSpec, WorkerStatus};

/// The life of a model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// The plugin and workers are starting.
    Loading,
    /// Every `min_workers` instance is up.
    Ready,
    /// Unregistered: finishing the requests it already has, then freeing its instances.
    Draining,
    /// Loading failed; the message says why.
    Failed(String),
}

impl ModelState {
    /// A short name for describe output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Draining => "Draining",
            Self::Failed(_) => "Failed",
        }
    }
}

/// Where a version comes from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// What the user gave (a store name, a URL, an upload's file name).
    pub url: String,
    /// The archive to reload it from (a name in the store, or a path).
    pub archive_file: String,
    /// Whether it was loaded at start-up.
    pub at_startup: bool,
    /// The overrides it was registered with.
    pub overrides: ConfigOverrides,
}

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
    /// Intra-op threads per instance; 0 = cores / instances.
    pub intra_op_threads: u32,
}

/// One worker thread of a version.
pub struct WorkerHandle {
    /// Its id within the version (also its instance index).
    pub id: u32,
    /// What it is doing.
    pub status: StatusCell,
    /// When it started.
    pub started: SystemTime,
    stop: Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WorkerPool {
    workers: Vec<WorkerHandle>,
}

/// One model version.
pub struct ModelVersion {
    /// The model name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its `model-config.toml`, with any registration overrides applied.
    pub config: ModelConfig,
    /// The handler the manifest names.
    pub handler: String,
    /// Where it was registered from (a store name, a URL, or an upload's file).
    pub url: String,
    /// The archive to load it from again (a name in the model store, or a path): for a URL or
    /// an upload, the copy kept in the store.
    pub archive_file: String,
    /// Whether it was loaded at start-up.
    pub loaded_at_startup: bool,
    /// The overrides it was registered with (what a snapshot keeps for a version whose archive
    /// failed to open).
    pub registered_overrides: ConfigOverrides,
    state: watch::Sender<ModelState>,
    /// `min_workers` and `max_workers` as last set (the config's, or the scale API's), packed.
    worker_bounds: AtomicU64,
    /// `None` once the version stopped taking requests: its workers then finish and exit.
    queue_tx: RwLock<Option<Sender<Job>>>,
    queue_rx: Receiver<Job>,
    pool: Mutex<WorkerPool>,
    /// Serialises scaling through the API, so the recorded worker counts match the workers.
    pub scale_lock: tokio::sync::Mutex<()>,
    plugin: Mutex<Option<Arc<PluginLibrary>>>,
    model: Mutex<Option<Arc<ModelBox>>>,
    archive: Option<OpenedArchive>,
}

/// Why a request could not be queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The version is not ready (loading, failed or draining); the message says which.
    NotReady(String),
    /// The queue is full.
    QueueFull(usize),
}

impl ModelVersion {
    /// A version for an opened archive, in state `Loading`. `name` overrides the manifest's.
    pub fn from_archive(
        archive: OpenedArchive,
        name: Option<String>,
        config: ModelConfig,
        origin: Origin,
    ) -> Self {
        let name = name.unwrap_or_else(|| archive.manifest.model.name.clone());
        let version = archive.manifest.model.version.clone();
        let handler = archive.manifest.model.handler.clone();
        Self::new(
            name,
            version,
            config,
            handler,
            origin,
            ModelState::Loading,
            Some(archive),
        )
    }

    fn new(
        name: String,
        version: String,
        config: ModelConfig,
        handler: String,
        origin: Origin,
        state: ModelState,
        archive: Option<OpenedArchive>,
    ) -> Self {
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(config.job_queue_size as usize);
        let worker_bounds = AtomicU64::new(pack(config.min_workers, config.max_workers));
        Self {
            name,
            version,
            config,
            handler,
            url: origin.url,
            archive_file: origin.archive_file,
            loaded_at_startup: origin.at_startup,
            registered_overrides: origin.overrides,
            worker_bounds,
            state: watch::Sender::new(state),
            queue_tx: RwLock::new(Some(queue_tx)),
            queue_rx,
            pool: Mutex::new(WorkerPool::default()),
            scale_lock: tokio::sync::Mutex::new(()),
            plugin: Mutex::new(None),
            model: Mutex::new(None),
            archive,
        }
    }

    /// The current state.
    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    fn set_state(&self, state: ModelState) {
        self.state.send_replace(state);
    }

    /// Leave `Loading` for `state`, unless something else (an unregister) moved the version on.
    fn finish_loading(&self, state: ModelState) -> bool {
        self.state.send_if_modified(|current| {
            let loading = *current == ModelState::Loading;
            if loading {
                *current = state;
            }
            loading
        })
    }

    /// Wait until the version is no longer `Loading`, and return its state.
    pub async fn settled(&self) -> ModelState {
        let mut rx = self.state.subscribe();
        let result = rx.wait_for(|s| *s != ModelState::Loading).await;
        match result {
            Ok(state) => state.clone(),
            Err(_) => self.state(),
        }
    }

    /// `(min_workers, max_workers)` as last set.
    pub fn worker_bounds(&self) -> (u32, u32) {
        let packed = self.worker_bounds.load(Ordering::Relaxed);
        ((packed >> 32) as u32, packed as u32)
    }

    /// Record new worker bounds (the scale API).
    pub fn set_worker_bounds(&self, min: u32, max: u32) {
        self.worker_bounds.store(pack(min, max), Ordering::Relaxed);
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue_rx.len()
    }

    /// The plugin, once loaded.
    pub fn plugin(&self) -> Option<Arc<PluginLibrary>> {
        self.plugin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The workers: id, status, start time.
    pub fn workers(&self) -> Vec<(u32, WorkerStatus, SystemTime)> {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.workers
            .iter()
            .map(|w| (w.id, w.status.get(), w.started))
            .collect()
    }

    /// Live workers (not stopped).
    pub fn live_workers(&self) -> usize {
        self.workers()
            .iter()
            .filter(|(_, s, _)| *s != WorkerStatus::Stopped)
            .count()
    }

    /// Queue a job, or say why not. A `Draining` version still takes jobs from requests that
    /// looked it up before it was unregistered, so that a swap fails no request.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        match self.state() {
            ModelState::Ready | ModelState::Draining => {}
            ModelState::Loading => {
                return Err(SubmitError::NotReady(format!(
                    "model `{}` version `{}` is still loading",
                    self.name, self.version
                )))
            }
            ModelState::Failed(why) => {
                return Err(SubmitError::NotReady(format!(
                    "model `{}` version `{}` failed to load: {why}",
                    self.name, self.version
                )))
            }
        }
        if self.live_workers() == 0 {
            return Err(SubmitError::NotReady(format!(
                "model `{}` version `{}` has no workers; scale it up with PUT /models/{}",
                self.name, self.version, self.name
            )));
        }
        let queue = self.queue_tx.read().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queue.as_ref() else {
            return Err(SubmitError::NotReady(format!(
                "model `{}` is shutting down",
                self.name
            )));
        };
        queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull(self.config.job_queue_size as usize),
            TrySendError::Disconnected(_) => {
                SubmitError::NotReady(format!("model `{}` is shutting down", self.name))
            }
        })
    }

    /// Stop taking requests; workers finish what is queued, drop their instances and exit.
    fn close_queue(&self) {
        self.queue_tx
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Load the plugin, the model and `min_workers` instances. Sets the state to `Ready` or
    /// `Failed`. Runs on a loader thread.
    pub fn start(&self, ctx: &LoadContext) {
        let began = Instant::now();
        let result = self
            .load(ctx)
            .and_then(|()| self.scale(ctx, self.config.min_workers));
        match result {
            Ok(()) => {
                ctx.metrics
                    .model_load_seconds
                    .with_label_values(&[&self.name, &self.version])
                    .observe(began.elapsed().as_secs_f64());
                tracing::info!(model = %self.name, version = %self.version, workers = self.config.min_workers, seconds = began.elapsed().as_secs_f64(), "model ready");
                self.finish_loading(ModelState::Ready);
            }
            Err(why) => {
                tracing::error!(model = %self.name, version = %self.version, "model failed to load: {why}");
                self.finish_loading(ModelState::Failed(why));
                // Workers that did start must not hold their instances (and weights) forever.
                self.stop_all();
            }
        }
    }

    fn load(&self, ctx: &LoadContext) -> Result<(), String> {
        let archive = self
            .archive
            .as_ref()
            .ok_or("the archive is not open: this is a bug")?;
        let plugin_path = match archive.handler().map_err(|e| e.to_string())? {
            HandlerRef::BuiltIn(name) => {
                let path = ctx.plugin_dir.join(plugin_file_name(&name));
                if !path.is_file() {
                    return Err(format!(
                        "unknown handler `{name}`: there is no built-in plugin `{}` in the plugin directory `{}`",
                        plugin_file_name(&name),
                        ctx.plugin_dir.display()
                    ));
                }
                path
            }
            HandlerRef::Bundled(path) => path,
        };
        let library = ctx.loader.load(&plugin_path).map_err(|e| e.to_string())?;
        *self.plugin.lock().unwrap_or_else(|p| p.into_inner()) = Some(library.clone());
        let config = &self.config;
        let spec = ModelSpec {
            name: self.name.as_str().into(),
            version: self.version.as_str().into(),
            model_dir: archive.dir.to_string_lossy().into_owned().into(),
            handler_config_json: serde_json::to_string(&config.handler)
                .unwrap_or_else(|_| "{}".into())
                .into(),
            model_config_json: serde_json::to_string(&config)
                .unwrap_or_else(|_| "{}".into())
                .into(),
        };
        let host = PluginServices::handle(&self.name, &self.version, ctx.metrics.clone());
        match (library.module.load_model())(&spec, host) {
            RResult::ROk(model) => {
                *self.model.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(model));
                Ok(())
            }
            RResult::RErr(e) => Err(format!(
                "plugin `{}` could not load the model: {e}",
                library.description.name
            )),
        }
    }

    /// Start or stop workers until `target` are live. New workers are waited for; a worker
    /// that fails to start is an error. Stopped workers finish their current batch first.
    pub fn scale(&self, ctx: &LoadContext, target: u32) -> Result<(), String> {
        let model = self
            .model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                format!(
                    "model `{}` version `{}` is not loaded",
                    self.name, self.version
                )
            })?;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.workers
            .retain(|w| w.status.get() != WorkerStatus::Stopped);
        let live = pool.workers.len() as u32;
        if target < live {
            for worker in pool.workers.drain(target as usize..) {
                let _ = worker.stop.send(());
            }
            return Ok(());
        }
        let threads = match ctx.intra_op_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .div_euclid(target.max(1))
                .max(1),
            n => n,
        };
        let continuous = self
            .plugin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|l| {
                l.description
                    .capabilities
                    .contains(cresset_plugin_api::Capabilities::CONTINUOUS_BATCHING)
            });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for _ in live..target {
            // The lowest index no live worker has: indices pick devices, so they are reused.
            let id = (0..)
                .find(|i| pool.workers.iter().all(|w| w.id != *i))
                .unwrap_or(0);
            let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
            let status = StatusCell::default();
            let spec = WorkerSpec {
                model: self.name.clone(),
                version: self.version.clone(),
                plugin_model: model.clone(),
                assignment: self.assignment(id, threads),
                queue: self.queue_rx.clone(),
                stop: stop_rx,
                status: status.clone(),
                batch_size: self.config.batch_size as usize,
                metrics: ctx.metrics.clone(),
                reply_timeout: Duration::from_secs(self.config.response_timeout_s),
                continuous,
            };
            let thread = worker::spawn(spec, ready_tx.clone())
                .map_err(|e| format!("cannot start a worker thread: {e}"))?;
            pool.workers.push(WorkerHandle {
                id,
                status,
                started: SystemTime::now(),
                stop: stop_tx,
                thread: Some(thread),
            });
        }
        drop(pool);
        drop(ready_tx);
        for _ in live..target {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("a worker failed to start: {e}")),
                Err(_) => return Err("a worker thread ended before it was ready".into()),
            }
        }
        Ok(())
    }

    /// Stop every worker and drop the model (after the workers drop their instances).
    fn stop_all(&self) {
        self.close_queue();
        let workers =
            std::mem::take(&mut self.pool.lock().unwrap_or_else(|p| p.into_inner()).workers);
        for mut worker in workers {
            let _ = worker.stop.send(());
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
        self.model.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Which device instance `index` gets: GPUs round-robin over `device_ids` (all of them for
    /// tensor parallelism), else the CPU.
    fn assignment(&self, index: u32, threads: u32) -> InstanceAssignment {
        let c = &self.config;
        let (device_type, device_ids) = match c.device_type {
            DeviceKind::Cpu => (DeviceType::CPU, Vec::new()),
            DeviceKind::Gpu if c.parallel_type.contains("tp") && !c.device_ids.is_empty() => {
                (DeviceType::GPU, c.device_ids.clone())
            }
            DeviceKind::Gpu => {
                let id = if c.device_ids.is_empty() {
                    index as i32
                } else {
                    c.device_ids[index as usize % c.device_ids.len()]
                };
                (DeviceType::GPU, vec![id])
            }
        };
        InstanceAssignment {
            index,
            device_type,
            device_ids: device_ids.into(),
            intra_op_threads: threads,
        }
    }
}

fn pack(min: u32, max: u32) -> u64 {
    (u64::from(min) << 32) | u64::from(max)
}

/// Drain an unregistered version on a thread of its own: wait until no request holds it any
/// more (each in-flight request holds an `Arc`), then stop its workers, which drops its
/// instances and its model. Returns at once.
pub fn drain(version: Arc<ModelVersion>) {
    version.set_state(ModelState::Draining);
    let name = format!("cresset-drain-{}", version.name);
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let began = Instant::now();
        while Arc::strong_count(&version) > 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
        version.stop_all();
        tracing::info!(
            model = %version.name,
            version = %version.version,
            seconds = began.elapsed().as_secs_f64(),
            "version drained; its instances and model were dropped"
        );
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start a drain thread: {e}");
    }
}

/// A model: its versions and which one answers by default.
pub struct ModelEntry {
    /// Versions by version string.
    pub versions: BTreeMap<String, Arc<ModelVersion>>,
    /// The default version.
    pub default_version: String,
}

/// Why a registry operation failed.
#[derive(Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// No such model.
    NoModel(String),
    /// No such version.
    NoVersion(String, String),
    /// The version is already registered.
    Exists(String, String),
    /// The operation conflicts with the version's state (message says why).
    Conflict(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoModel(m) => write!(f, "Model not found: {m}"),
            Self::NoVersion(m, v) => write!(f, "Model version {v} does not exist for model {m}"),
            Self::Exists(m, v) => {
                write!(f, "Model version {v} for model {m} is already registered")
            }
            Self::Conflict(why) => f.write_str(why),
        }
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
            return Err(RegistryError::Conflict(format!(
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

    /// Versions of `name` that were unregistered and are still draining.
    pub fn draining(&self, name: &str) -> Vec<Arc<ModelVersion>> {
        let draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        draining
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|v| v.name == name)
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

    /// Ready when every version that should have workers has them all up. The map gives the
    /// state of each version that is not ready.
    pub fn readiness(&self) -> (bool, BTreeMap<String, String>) {
        let mut not_ready = BTreeMap::new();
        for v in self.all_versions() {
            let state = v.state();
            if v.config.min_workers > 0 && state != ModelState::Ready {
                // States only: health routes need no token, so they must not leak error text
                // (which can hold host paths). The describe API gives the reason.
                not_ready.insert(format!("{}/{}", v.name, v.version), state.name().to_owned());
            }
        }
        (not_ready.is_empty(), not_ready)
    }
}

/// A registration from the model store: at start-up from `--models`, or restored from a
/// snapshot (with the overrides, URL and version it had).
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
}

/// A version that could not even be opened, kept so that its error is visible to clients and
/// its registration is not lost from the snapshot.
pub fn failed_version(
    name: String,
    version: String,
    origin: Origin,
    why: String,
) -> Arc<ModelVersion> {
    Arc::new(ModelVersion::new(
        name,
        version,
        ModelConfig::default(),
        String::new(),
        origin,
        ModelState::Failed(why),
        None,
    ))
}

/// Open a store registration, register it as `Loading`, and load it on a thread of its own.
/// A version that cannot even be opened is registered as `Failed`, so that its error is
/// visible to clients instead of only in the log.
pub fn register_from_store(
    ctx: &Arc<LoadContext>,
    registry: &Arc<ModelRegistry>,
    store: &Path,
    registration: &StoreRegistration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let source = &registration.source;
    let opened = resolve_in_store(store, &source.archive)
        .and_then(|path| OpenedArchive::open(&path, &ctx.extract_dir, &ctx.limits))
        .map_err(|e| e.to_string())
        .and_then(|archive| {
            let config = archive
                .config
                .clone()
                .with_overrides(&registration.overrides)?;
            Ok((archive, config))
        });
    let origin = Origin {
        url: registration
            .url
            .clone()
            .unwrap_or_else(|| source.archive.clone()),
        archive_file: source.archive.clone(),
        at_startup: true,
        overrides: registration.overrides.clone(),
    };
    let version = match opened {
        Ok((archive, config)) => Arc::new(ModelVersion::from_archive(
            archive,
            source.name.clone(),
            config,
            origin,
        )),
        Err(e) => {
            let name = source
                .name
                .clone()
                .unwrap_or_else(|| source.archive.clone());
            tracing::error!(model = %name, "model failed to load: {e}");
            let version = registration
                .version
                .clone()
                .unwrap_or_else(|| "unknown".into());
            failed_version(name, version, origin, e)
        }
    };
    if let Err(e) = registry.insert(version.clone()) {
        tracing::warn!("not loading {}: {e}", source.archive);
        return std::thread::Builder::new().spawn(|| {});
    }
    let ctx = ctx.clone();
    std::thread::Builder::new()
        .name("cresset-loader".into())
        .spawn(move || {
            if version.state() == ModelState::Loading {
                version.start(&ctx);
            }
        })
}
