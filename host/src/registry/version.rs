//! One model version: its identity and origin, its state, its queue, its plugin and model, and
//! its worker pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use cresset_plugin_api::{Capabilities, ModelBox};
use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::load::{self, LoadContext, LoadError};
use super::pool::{self, PoolSpec, WorkerInfo, WorkerPool};
use super::state::{FailureKind, LoadFailure, ModelState, StateCell};
use crate::archive::{ConfigOverrides, Isolation, ModelConfig, OpenedArchive};
use crate::isolation::proxy::{ProcessModel, ProcessShared, WorkerProcess};
use crate::loader::PluginLibrary;
use crate::worker::Job;

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
    /// Whether this registration has loaded successfully before (in this process or an
    /// earlier one). Until it has, a snapshot keeps it as pending, and a start-up that finds it
    /// pending does not load it again.
    pub loaded_before: bool,
}

/// One model version.
pub struct ModelVersion {
    /// The model name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its `model-config.toml`, with any registration overrides applied.
    pub config: ModelConfig,
    /// The handler the manifest names (empty for a version whose archive could not be opened).
    pub handler: String,
    /// Where it came from.
    pub origin: Origin,
    loaded_once: AtomicBool,
    state: Arc<StateCell>,
    /// `min_workers` and `max_workers` as last set (the config's, or the scale API's), packed.
    worker_bounds: AtomicU64,
    /// Whether the scale API set the bounds (then a snapshot keeps them as they are).
    scaled: AtomicBool,
    /// `None` once the version stopped taking requests: its workers then finish and exit.
    queue_tx: RwLock<Option<Sender<Job>>>,
    queue_rx: Receiver<Job>,
    pool: WorkerPool,
    /// Serialises scaling through the API, so the recorded worker counts match the workers.
    pub scale_lock: tokio::sync::Mutex<()>,
    plugin: Mutex<Option<Arc<PluginLibrary>>>,
    model: Mutex<Option<Arc<ModelBox>>>,
    /// Process isolation: what the worker processes share (their pids, restarts).
    processes: Mutex<Option<Arc<ProcessShared>>>,
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
        let mut config = config;
        if handler == crate::archive::torchserve::PYTHON_PLUGIN {
            // One interpreter per worker process: workers share no GIL, and a handler that
            // crashes its interpreter costs its own requests.
            config.isolation = Isolation::Process;
        }
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

    /// A version that will never load (its archive could not be opened, or loading it crashed
    /// the server), kept so that its error is visible and its registration is not lost.
    pub fn failed(name: String, version: String, origin: Origin, why: LoadFailure) -> Self {
        Self::new(
            name,
            version,
            ModelConfig::default(),
            String::new(),
            origin,
            ModelState::Failed(why),
            None,
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
        // Unset bounds are chosen once the plugin is loaded (`start`); until then, one.
        let (min, max) = config.worker_bounds(1);
        let worker_bounds = AtomicU64::new(pack(min, max));
        Self {
            name,
            version,
            config,
            handler,
            loaded_once: AtomicBool::new(origin.loaded_before),
            origin,
            worker_bounds,
            scaled: AtomicBool::new(false),
            state: Arc::new(StateCell::new(state)),
            queue_tx: RwLock::new(Some(queue_tx)),
            queue_rx,
            pool: WorkerPool::default(),
            scale_lock: tokio::sync::Mutex::new(()),
            plugin: Mutex::new(None),
            model: Mutex::new(None),
            processes: Mutex::new(None),
            archive,
        }
    }

    /// The current state.
    pub fn state(&self) -> ModelState {
        self.state.get()
    }

    /// Wait until the version is no longer `Loading`, and return its state.
    pub async fn settled(&self) -> ModelState {
        self.state.settled().await
    }

    /// Whether this registration has loaded successfully, now or in an earlier process.
    pub fn loaded_before(&self) -> bool {
        self.loaded_once.load(Ordering::Acquire)
    }

    /// `(min_workers, max_workers)` as last set.
    pub fn worker_bounds(&self) -> (u32, u32) {
        let packed = self.worker_bounds.load(Ordering::Relaxed);
        ((packed >> 32) as u32, packed as u32)
    }

    /// Record new worker bounds (the scale API).
    pub fn set_worker_bounds(&self, min: u32, max: u32) {
        self.worker_bounds.store(pack(min, max), Ordering::Relaxed);
        self.scaled.store(true, Ordering::Relaxed);
    }

    /// The worker bounds a snapshot records: the scale API's when it was used, else the
    /// config's (unset ones stay unset, to be chosen again at the next load).
    pub fn recorded_worker_bounds(&self) -> (Option<u32>, Option<u32>) {
        if self.scaled.load(Ordering::Relaxed) {
            let (min, max) = self.worker_bounds();
            (Some(min), Some(max))
        } else {
            (self.config.min_workers, self.config.max_workers)
        }
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

    /// The workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.pool.workers()
    }

    /// Process isolation: each worker's process (pid, restarts), by worker id; `None` in
    /// thread isolation.
    pub fn worker_processes(&self) -> Option<std::collections::BTreeMap<u32, WorkerProcess>> {
        let shared = self
            .processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        shared.map(|s| s.processes())
    }

    /// Live workers (not stopped).
    pub fn live_workers(&self) -> usize {
        self.pool.live()
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

    /// Load the plugin, the model and `min_workers` instances, and move to `Ready` or `Failed`.
    /// Runs on a loader thread. `record` runs once the version has loaded and before it is
    /// `Ready`, so that whoever waits for `Ready` (a synchronous registration) is answered only
    /// after the load is on record (the snapshot no longer has it pending). Returns the state
    /// it settled in.
    pub fn start(&self, ctx: &LoadContext, record: impl FnOnce(&Self)) -> ModelState {
        let began = Instant::now();
        let result = self.load(ctx).and_then(|()| {
            let min = self.choose_workers(ctx);
            self.scale(ctx, min).map(|()| min)
        });
        match result {
            Ok(workers) => {
                ctx.metrics
                    .model_load_seconds
                    .with_label_values(&[&self.name, &self.version])
                    .observe(began.elapsed().as_secs_f64());
                tracing::info!(model = %self.name, version = %self.version, workers, seconds = began.elapsed().as_secs_f64(), "model ready");
                self.loaded_once.store(true, Ordering::Release);
                record(self);
                self.state.finish_loading(Ok(()));
            }
            Err(e) => {
                tracing::error!(model = %self.name, version = %self.version, kind = e.kind().name(), "model failed to load: {e}");
                self.state.finish_loading(Err(e.into_failure()));
                // Workers that did start must not hold their instances (and weights) forever.
                self.stop_all();
            }
        }
        self.state()
    }

    /// Settle the worker bounds the config leaves unset, now that the plugin is known
    /// ([`pool::auto_workers`]), and return the workers to start. (The scale API waits for the
    /// load to settle, so nothing else sets the bounds meanwhile.)
    fn choose_workers(&self, ctx: &LoadContext) -> u32 {
        let caps = self
            .plugin()
            .map(|l| l.description.capabilities)
            .unwrap_or_default();
        // Worker processes share nothing: each holds its own copy of the weights.
        let caps = match self.config.isolation {
            Isolation::Thread => caps,
            Isolation::Process => Capabilities(caps.0 & !Capabilities::SHARED_WEIGHTS.0),
        };
        let auto = ctx
            .default_workers
            .unwrap_or_else(|| pool::auto_workers(&self.config, caps, ctx.intra_op_threads));
        let (min, max) = self.config.worker_bounds(auto);
        self.worker_bounds.store(pack(min, max), Ordering::Relaxed);
        min
    }

    /// Whether the config leaves a worker bound to the host (describe's `autoWorkers`).
    pub fn auto_workers(&self) -> bool {
        self.config.min_workers.is_none() || self.config.max_workers.is_none()
    }

    fn load(&self, ctx: &LoadContext) -> Result<(), LoadError> {
        let archive = self
            .archive
            .as_ref()
            .ok_or_else(|| LoadError::Host("the archive is not open: this is a bug".into()))?;
        let path = load::plugin_path(ctx, archive)?;
        let spec = load::model_spec(
            &self.name,
            &self.version,
            &archive.dir,
            &self.config,
            archive.manifest.model.serialized_file.as_deref(),
        );
        let (library, model) = match self.config.isolation {
            Isolation::Thread => load::load_model(ctx, &path, &spec)?,
            Isolation::Process => {
                let (library, settings) = load::isolated(ctx, &path, spec, &self.config)?;
                let state = self.state.clone();
                let (name, version) = (self.name.clone(), self.version.clone());
                let on_fail = Box::new(move |reason: String| {
                    tracing::error!(model = %name, version = %version, "the version failed: {reason}");
                    state.fail(LoadFailure::new(FailureKind::PluginFault, reason));
                });
                let shared = ProcessShared::new(settings, on_fail);
                *self.processes.lock().unwrap_or_else(|p| p.into_inner()) = Some(shared.clone());
                let model = ModelBox::from_value(ProcessModel(shared), TD_Opaque);
                (library, model)
            }
        };
        *self.plugin.lock().unwrap_or_else(|p| p.into_inner()) = Some(library);
        *self.model.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(model));
        Ok(())
    }

    /// Start or stop workers until `target` are live (see [`WorkerPool::scale`]).
    pub fn scale(&self, ctx: &LoadContext, target: u32) -> Result<(), LoadError> {
        let model = self
            .model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                LoadError::Host(format!(
                    "model `{}` version `{}` is not loaded",
                    self.name, self.version
                ))
            })?;
        let continuous = self.plugin().is_some_and(|l| {
            l.description
                .capabilities
                .contains(Capabilities::CONTINUOUS_BATCHING)
        });
        let spec = PoolSpec {
            model: self.name.clone(),
            version: self.version.clone(),
            config: self.config.clone(),
            queue: self.queue_rx.clone(),
            metrics: ctx.metrics.clone(),
            continuous,
            intra_op_threads: ctx.intra_op_threads,
        };
        self.pool.scale(&spec, &model, target)
    }

    /// Stop every worker and drop the model (after the workers drop their instances).
    fn stop_all(&self) {
        self.close_queue();
        self.pool.stop_all();
        self.model.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Unregistered: stop taking part in lookups' futures (requests that hold it still finish).
    pub(super) fn start_draining(&self) {
        self.state.start_draining();
    }
}

fn pack(min: u32, max: u32) -> u64 {
    (u64::from(min) << 32) | u64::from(max)
}

/// Drain an unregistered version on a thread of its own: wait until no request holds it any
/// more (each in-flight request holds an `Arc`), then stop its workers, which drops its
/// instances and its model, and call `done`. Returns at once.
pub fn drain(version: Arc<ModelVersion>, done: impl FnOnce(&ModelVersion) + Send + 'static) {
    version.start_draining();
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
        done(&version);
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start a drain thread: {e}");
    }
}
