//! `model-config.toml` (or `model-config.yaml`, read by [`super::torchserve`]): a model's
//! workers, batching, timeouts, devices and `[handler]` table; registration overrides; the
//! server's defaults for what a config leaves unset.

use serde::{Deserialize, Serialize};

/// `model-config.toml`: TorchServe's model-config.yaml keys in snake_case.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Workers started at load. Unset: chosen at load (see [`ModelConfig::worker_bounds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<u32>,
    /// The most workers scaling may start. Unset: chosen at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// The most requests one `execute` call receives.
    #[serde(default = "one")]
    pub batch_size: u32,
    /// How long a partial batch may wait while every instance is busy.
    #[serde(default = "default_batch_delay")]
    pub max_batch_delay_ms: u64,
    /// How long a client waits for a response before it gets a 504.
    #[serde(default = "default_response_timeout")]
    pub response_timeout_s: u64,
    /// `cpu` or `gpu`.
    #[serde(default)]
    pub device_type: DeviceKind,
    /// The GPUs to use (round-robin over instances, or all of them for tensor parallelism).
    #[serde(default)]
    pub device_ids: Vec<i32>,
    /// `""`, `pp` or `tp` (used by the LLM plugins).
    #[serde(default)]
    pub parallel_type: String,
    /// Requests the queue holds before answering 503.
    #[serde(default = "default_queue_size")]
    pub job_queue_size: u32,
    /// Where instances run: `thread` (default: threads of the server) or `process` (each in a
    /// worker process of its own, so that a crash in native code costs only that worker's
    /// requests; see `crate::isolation`).
    #[serde(default, skip_serializing_if = "Isolation::is_thread")]
    pub isolation: Isolation,
    /// Process isolation: this many worker-process deaths within `crash_window_s` turn the
    /// version `Failed` (and a first load gives up after this many tries).
    #[serde(default = "default_max_crashes")]
    pub max_crashes: u32,
    /// Process isolation: the window, in seconds, over which `max_crashes` is counted.
    #[serde(default = "default_crash_window")]
    pub crash_window_s: u64,
    /// A `.mar` naming one of TorchServe's built-in image handlers (`image_classifier`,
    /// `image_segmenter`, `object_detector`) runs TorchServe's own Python version of it (the
    /// python plugin's `ts` package) instead of Cresset's `vision` plugin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub python_builtin_handlers: bool,
    /// Free-form configuration passed to the plugin as JSON.
    #[serde(default)]
    pub handler: toml::Table,
    /// What was accepted without effect (TorchServe keys Cresset does not implement): logged at
    /// load and shown by describe.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

fn one() -> u32 {
    1
}
fn default_batch_delay() -> u64 {
    100
}
fn default_response_timeout() -> u64 {
    MODEL_DEFAULTS.get().map_or(120, |d| d.response_timeout_s)
}
fn default_max_crashes() -> u32 {
    5
}
fn default_crash_window() -> u64 {
    60
}
fn default_queue_size() -> u32 {
    MODEL_DEFAULTS.get().map_or(100, |d| d.job_queue_size)
}

/// The server's defaults for what a model config leaves unset (`job_queue_size`,
/// `default_response_timeout` in `cresset.toml` or TorchServe's `config.properties`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDefaults {
    /// `job_queue_size`.
    pub job_queue_size: u32,
    /// `response_timeout_s`.
    pub response_timeout_s: u64,
}

static MODEL_DEFAULTS: std::sync::OnceLock<ModelDefaults> = std::sync::OnceLock::new();

/// Set the server's model defaults, once, at start-up before any archive is read.
pub fn set_model_defaults(defaults: ModelDefaults) {
    let _ = MODEL_DEFAULTS.set(defaults);
}

impl Default for ModelConfig {
    fn default() -> Self {
        toml::from_str("").expect("an empty model config parses: this is a bug")
    }
}

/// Registration-time overrides of `model-config.toml`: the management API's parameters, and
/// what a snapshot restores.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigOverrides {
    /// `batch_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// `max_batch_delay_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_delay_ms: Option<u64>,
    /// `min_workers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<u32>,
    /// `max_workers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// `response_timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_s: Option<u64>,
}

impl ModelConfig {
    /// `(min_workers, max_workers)` once the plugin is known, `auto` being the workers chosen
    /// for it (`registry::pool::auto_workers`): an unset minimum is `auto` (within a set
    /// maximum), an unset maximum the larger of `auto` and the minimum.
    pub fn worker_bounds(&self, auto: u32) -> (u32, u32) {
        match (self.min_workers, self.max_workers) {
            (Some(min), Some(max)) => (min, max),
            (Some(min), None) => (min, auto.max(min)),
            (None, Some(max)) => (auto.min(max), max),
            (None, None) => (auto, auto),
        }
    }

    /// This config with `overrides` applied and checked. Raising `min_workers` above
    /// `max_workers` raises `max_workers` too, as TorchServe's `initial_workers` does.
    pub fn with_overrides(mut self, overrides: &ConfigOverrides) -> Result<Self, String> {
        if let Some(v) = overrides.batch_size {
            self.batch_size = v;
        }
        if let Some(v) = overrides.max_batch_delay_ms {
            self.max_batch_delay_ms = v;
        }
        if let Some(v) = overrides.response_timeout_s {
            self.response_timeout_s = v;
        }
        if let Some(v) = overrides.max_workers {
            self.max_workers = Some(v);
        }
        if let Some(v) = overrides.min_workers {
            self.min_workers = Some(v);
            if overrides.max_workers.is_none() {
                self.max_workers = self.max_workers.map(|max| max.max(v));
            }
        }
        self.validate()?;
        Ok(self)
    }
}

/// Where a model's instances run (`isolation` in `model-config.toml`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Threads of the server process (the fastest; a crash in native code ends the server).
    #[default]
    Thread,
    /// One worker process per instance: a crash ends that process only.
    Process,
}

impl Isolation {
    fn is_thread(&self) -> bool {
        *self == Self::Thread
    }

    /// The name in `model-config.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Thread => "thread",
            Self::Process => "process",
        }
    }
}

/// The device kind of `model-config.toml`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CPU.
    #[default]
    Cpu,
    /// CUDA GPUs.
    Gpu,
}

impl ModelConfig {
    /// Check values that parse but make no sense, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        // Upper bounds keep a typo (or a hostile archive) from allocating a huge queue,
        // starting thousands of threads or overflowing a deadline.
        let bounded = |field: &str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(format!(
                    "`{field}` must be between {min} and {max}. Given: {value}"
                ))
            } else {
                Ok(())
            }
        };
        if let Some(min) = self.min_workers {
            bounded("min_workers", min.into(), 0, 1024)?;
        }
        if let Some(max) = self.max_workers {
            bounded("max_workers", max.into(), 0, 1024)?;
        }
        bounded("batch_size", self.batch_size.into(), 1, 4096)?;
        bounded("max_batch_delay_ms", self.max_batch_delay_ms, 0, 3_600_000)?;
        bounded("response_timeout_s", self.response_timeout_s, 1, 31_536_000)?;
        bounded("job_queue_size", self.job_queue_size.into(), 1, 1_000_000)?;
        bounded("max_crashes", self.max_crashes.into(), 1, 1000)?;
        bounded("crash_window_s", self.crash_window_s, 1, 86_400)?;
        if let (Some(min), Some(max)) = (self.min_workers, self.max_workers) {
            if max < min {
                return Err(format!(
                    "`max_workers` must be >= `min_workers` ({min}). Given: {max}"
                ));
            }
        }
        if !["", "pp", "tp", "pptp"].contains(&self.parallel_type.as_str()) {
            return Err(format!(
                "`parallel_type` must be one of \"\", \"pp\", \"tp\", \"pptp\". Given: {:?}",
                self.parallel_type
            ));
        }
        Ok(())
    }
}
