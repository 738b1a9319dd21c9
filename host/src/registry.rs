//! The model registry: model name → versions (each with its plugin, queue and workers) and the
//! default version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use abi_stable::std_types::RResult;
use cresset_plugin_api::{plugin_file_name, DeviceType, InstanceAssignment, ModelSpec};
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::archive::{
    resolve_in_store, ExtractLimits, HandlerRef, ModelConfig, ModelSource, OpenedArchive,
};
use crate::loader::{PluginLibrary, PluginLoader};
use crate::metrics::Metrics;
use crate::services::PluginServices;
use crate::worker::{self, Job, WorkerSpec};

/// The life of a model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    /// The plugin and workers are starting.
    Loading,
    /// Every `min_workers` instance is up.
    Ready,
    /// Loading failed; the message says why.
    Failed(String),
}

impl ModelState {
    /// A short name for describe output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Failed(_) => "Failed",
        }
    }
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

/// One model version.
pub struct ModelVersion {
    /// The model name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its `model-config.toml`.
    pub config: ModelConfig,
    /// The handler the manifest names.
    pub handler: String,
    state: RwLock<ModelState>,
    /// `None` once the version stopped taking requests: its workers then finish and exit.
    queue_tx: RwLock<Option<Sender<Job>>>,
    queue_rx: Receiver<Job>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    plugin: Mutex<Option<Arc<PluginLibrary>>>,
    archive: Option<OpenedArchive>,
}

/// Why a request could not be queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The version is not ready (loading or failed); the message says which.
    NotReady(String),
    /// The queue is full.
    QueueFull(usize),
}

impl ModelVersion {
    fn new(
        name: String,
        version: String,
        config: ModelConfig,
        handler: String,
        state: ModelState,
        archive: Option<OpenedArchive>,
    ) -> Self {
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(config.job_queue_size as usize);
        Self {
            name,
            version,
            config,
            handler,
            state: RwLock::new(state),
            queue_tx: RwLock::new(Some(queue_tx)),
            queue_rx,
            workers: Mutex::new(Vec::new()),
            plugin: Mutex::new(None),
            archive,
        }
    }

    /// The current state.
    pub fn state(&self) -> ModelState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_state(&self, state: ModelState) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
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

    /// Queue a job, or say why not.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        match self.state() {
            ModelState::Ready => {}
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
    pub fn close_queue(&self) {
        self.queue_tx
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Load the plugin, the model and `min_workers` instances. Sets the state to `Ready` or
    /// `Failed`. Runs on a loader thread.
    fn start(&self, ctx: &LoadContext) {
        let began = Instant::now();
        match self.try_start(ctx) {
            Ok(()) => {
                ctx.metrics
                    .model_load_seconds
                    .with_label_values(&[&self.name, &self.version])
                    .observe(began.elapsed().as_secs_f64());
                tracing::info!(model = %self.name, version = %self.version, workers = self.config.min_workers, seconds = began.elapsed().as_secs_f64(), "model ready");
                self.set_state(ModelState::Ready);
            }
            Err(why) => {
                tracing::error!(model = %self.name, version = %self.version, "model failed to load: {why}");
                self.set_state(ModelState::Failed(why));
                // Workers that did start must not hold their instances (and weights) forever.
                self.close_queue();
            }
        }
    }

    fn try_start(&self, ctx: &LoadContext) -> Result<(), String> {
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

        let spec = ModelSpec {
            name: self.name.as_str().into(),
            version: self.version.as_str().into(),
            model_dir: archive.dir.to_string_lossy().into_owned().into(),
            handler_config_json: archive.handler_config_json().into(),
            model_config_json: archive.model_config_json().into(),
        };
        let host = PluginServices::handle(&self.name, &self.version, ctx.metrics.clone());
        let model = match (library.module.load_model())(&spec, host) {
            RResult::ROk(model) => Arc::new(model),
            RResult::RErr(e) => {
                return Err(format!(
                    "plugin `{}` could not load the model: {e}",
                    library.description.name
                ))
            }
        };

        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let count = self.config.min_workers;
        let threads = match ctx.intra_op_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .div_euclid(count.max(1))
                .max(1),
            n => n,
        };
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        for index in 0..count {
            let spec = WorkerSpec {
                model: self.name.clone(),
                version: self.version.clone(),
                plugin_model: model.clone(),
                assignment: self.assignment(index, threads),
                queue: self.queue_rx.clone(),
                batch_size: self.config.batch_size as usize,
                metrics: ctx.metrics.clone(),
                reply_timeout: std::time::Duration::from_secs(self.config.response_timeout_s),
            };
            let handle = worker::spawn(spec, ready_tx.clone())
                .map_err(|e| format!("cannot start a worker thread: {e}"))?;
            workers.push(handle);
        }
        drop(ready_tx);
        for _ in 0..count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("a worker failed to start: {e}")),
                Err(_) => return Err("a worker thread ended before it was ready".into()),
            }
        }
        Ok(())
    }

    /// Which device instance `index` gets: GPUs round-robin over `device_ids` (all of them for
    /// tensor parallelism), else the CPU.
    fn assignment(&self, index: u32, threads: u32) -> InstanceAssignment {
        let c = &self.config;
        let (device_type, device_ids) = match c.device_type {
            crate::archive::DeviceKind::Cpu => (DeviceType::CPU, Vec::new()),
            crate::archive::DeviceKind::Gpu
                if c.parallel_type.contains("tp") && !c.device_ids.is_empty() =>
            {
                (DeviceType::GPU, c.device_ids.clone())
            }
            crate::archive::DeviceKind::Gpu => {
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

/// A model: its versions and which one answers by default.
pub struct ModelEntry {
    /// Versions by version string.
    pub versions: BTreeMap<String, Arc<ModelVersion>>,
    /// The default version.
    pub default_version: String,
}

/// Why a lookup failed.
#[derive(Debug)]
pub enum LookupError {
    /// No such model.
    NoModel(String),
    /// No such version.
    NoVersion(String, String),
}

/// All models.
#[derive(Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, ModelEntry>>,
}

impl ModelRegistry {
    /// Add a version; the first version of a model becomes its default.
    pub fn insert(&self, version: Arc<ModelVersion>) -> Result<(), String> {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .entry(version.name.clone())
            .or_insert_with(|| ModelEntry {
                versions: BTreeMap::new(),
                default_version: version.version.clone(),
            });
        if entry.versions.contains_key(&version.version) {
            return Err(format!(
                "model `{}` version `{}` is already registered",
                version.name, version.version
            ));
        }
        entry.versions.insert(version.version.clone(), version);
        Ok(())
    }

    /// The named version, or the default one.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelVersion>, LookupError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .get(name)
            .ok_or_else(|| LookupError::NoModel(name.to_owned()))?;
        let version = version.unwrap_or(&entry.default_version);
        entry
            .versions
            .get(version)
            .cloned()
            .ok_or_else(|| LookupError::NoVersion(name.to_owned(), version.to_owned()))
    }

    /// Every version, for readiness and describe output.
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
                let detail = match &state {
                    ModelState::Failed(why) => format!("Failed: {why}"),
                    other => other.name().to_owned(),
                };
                not_ready.insert(format!("{}/{}", v.name, v.version), detail);
            }
        }
        (not_ready.is_empty(), not_ready)
    }
}

/// Open `source` from the store, register it as `Loading`, and load it on a thread of its own.
/// A version that cannot even be opened is registered as `Failed`, so that its error is
/// visible to clients instead of only in the log.
pub fn register_from_store(
    ctx: &Arc<LoadContext>,
    registry: &Arc<ModelRegistry>,
    store: &Path,
    source: &ModelSource,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let opened = resolve_in_store(store, &source.archive)
        .and_then(|path| OpenedArchive::open(&path, &ctx.extract_dir, &ctx.limits));
    let fallback_name = source
        .name
        .clone()
        .unwrap_or_else(|| source.archive.clone());
    let version = match opened {
        Ok(archive) => {
            let name = source
                .name
                .clone()
                .unwrap_or_else(|| archive.manifest.model.name.clone());
            Arc::new(ModelVersion::new(
                name,
                archive.manifest.model.version.clone(),
                archive.config.clone(),
                archive.manifest.model.handler.clone(),
                ModelState::Loading,
                Some(archive),
            ))
        }
        Err(e) => {
            tracing::error!(model = %fallback_name, "model failed to load: {e}");
            Arc::new(ModelVersion::new(
                fallback_name,
                "unknown".into(),
                ModelConfig::default(),
                String::new(),
                ModelState::Failed(e.to_string()),
                None,
            ))
        }
    };
    if let Err(e) = registry.insert(version.clone()) {
        tracing::error!("{e}");
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
