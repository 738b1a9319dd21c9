//! Command line, `cresset.toml` and `CRESSET_*` variables, merged into one validated
//! [`ServerConfig`]. Precedence: flag or variable, then the file, then the default.

mod properties;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::archive::{ArchiveFormat, ExtractLimits, ModelSource};

/// Cresset: a model server with handler plugins.
#[derive(Debug, Parser)]
#[command(name = "cresset", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
// Parsed once at start-up: the size of `ServeArgs` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Build a model archive (the torch-model-archiver of Cresset).
    Archive(ArchiveArgs),
    /// Show where a large model's modules would go (GPUs, CPU, disk) under a device map, as a
    /// dry run: per-device map, bytes per device, and whether it fits.
    Plan(crate::plan::PlanArgs),
    /// A worker process of process isolation: started by the server, never by hand (it serves
    /// one plugin instance over the socket it inherits).
    #[command(hide = true)]
    Worker {
        /// Only open this (staged) plugin library and print its description as JSON.
        #[arg(long)]
        describe: Option<std::path::PathBuf>,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `cresset serve` flags. Each has a `CRESSET_*` variable and a `cresset.toml` key of the same
/// name in snake_case.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// A `cresset.toml` to read.
    #[arg(long, env = "CRESSET_CONFIG")]
    pub config: Option<PathBuf>,
    /// A TorchServe `config.properties` to read instead of a `cresset.toml` (the keys with a
    /// meaning here; others are logged; TLS keys are refused).
    #[arg(long, env = "CRESSET_TS_CONFIG")]
    pub ts_config: Option<PathBuf>,
    /// Workers for a model whose config leaves `min_workers`/`max_workers` unset. [default:
    /// chosen per model: one per core (at most 4) for plugins that share weights, else 1]
    #[arg(long, env = "CRESSET_DEFAULT_WORKERS_PER_MODEL")]
    pub default_workers_per_model: Option<u32>,
    /// Queued requests per model before 503, where its config leaves `job_queue_size` unset.
    /// [default: 100]
    #[arg(long, env = "CRESSET_JOB_QUEUE_SIZE")]
    pub job_queue_size: Option<u32>,
    /// Seconds a client waits for a model whose config leaves `response_timeout_s` unset.
    /// [default: 120]
    #[arg(long, env = "CRESSET_DEFAULT_RESPONSE_TIMEOUT")]
    pub default_response_timeout: Option<u64>,
    /// The folder holding model archives. [default: ./model_store]
    #[arg(long, env = "CRESSET_MODEL_STORE")]
    pub model_store: Option<PathBuf>,
    /// Models to load at start-up: `name=archive` or `archive` (a name in the model store or a
    /// path), or `all` for every archive in the store.
    #[arg(long, env = "CRESSET_MODELS", value_delimiter = ',', num_args = 1..)]
    pub models: Vec<String>,
    /// Serve this one model as it lies on disk: a HuggingFace checkpoint folder, a `.gguf`, a
    /// TorchScript, ONNX or AOTInductor file, or an archive; the handler is picked from what is
    /// there. No snapshot is read or written.
    #[arg(long, env = "CRESSET_MODEL", conflicts_with = "models")]
    pub model: Option<PathBuf>,
    /// The name to serve `--model` under. [default: its file stem or folder name]
    #[arg(long, env = "CRESSET_MODEL_NAME", requires = "model")]
    pub model_name: Option<String>,
    /// Inference API address. [default: 127.0.0.1:8080]
    #[arg(long, env = "CRESSET_INFERENCE_ADDRESS")]
    pub inference_address: Option<String>,
    /// Management API address. [default: 127.0.0.1:8081]
    #[arg(long, env = "CRESSET_MANAGEMENT_ADDRESS")]
    pub management_address: Option<String>,
    /// Metrics API address (`/metrics`). [default: 127.0.0.1:8082]
    #[arg(long, env = "CRESSET_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// gRPC inference address: the Open Inference Protocol's `inference.GRPCInferenceService`
    /// and TorchServe's `InferenceAPIsService`. [default: off]
    #[arg(long, env = "CRESSET_GRPC_ADDRESS")]
    pub grpc_address: Option<String>,
    /// gRPC management address: TorchServe's `ManagementAPIsService`. [default: off]
    #[arg(long, env = "CRESSET_GRPC_MANAGEMENT_ADDRESS")]
    pub grpc_management_address: Option<String>,
    /// Seconds that in-flight requests (streams included) get to finish after SIGTERM or
    /// SIGINT, while new ones are refused and readiness says not ready; then the server exits.
    /// [default: 30]
    #[arg(long, env = "CRESSET_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,
    /// The http(s) URLs models may be registered from, comma-separated, each
    /// `scheme://host[:port][/path]` with every part a regular expression matched against that
    /// part of the parsed, normalised URL (see README "Security"). [default: none: only
    /// archives in the model store]
    #[arg(long, env = "CRESSET_ALLOWED_URLS", value_delimiter = ',')]
    pub allowed_urls: Vec<String>,
    /// Let hosts of `allowed_urls` given by name resolve to loopback, private or link-local
    /// addresses (refused by default).
    #[arg(long, env = "CRESSET_ALLOW_PRIVATE_URL_HOSTS")]
    pub allow_private_url_hosts: bool,
    /// Host names, comma-separated, that the management API answers to besides its bound
    /// address and `localhost` (a `Host` header naming anything else gets 403, which stops DNS
    /// rebinding). [default: none]
    #[arg(long, env = "CRESSET_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Largest archive a registration may upload or download, in bytes. [default: 4294967296]
    #[arg(long, env = "CRESSET_MAX_UPLOAD_SIZE")]
    pub max_upload_size: Option<u64>,
    /// Where built-in plugins (`libcresset_plugin_<name>.so`) are. [default: the folder of the
    /// cresset executable]
    #[arg(long, env = "CRESSET_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Scratch space: staged plugin libraries and extracted archives. [default: <tmp>/cresset-<uid>]
    #[arg(long, env = "CRESSET_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Most bytes of unpacked archives kept in `<work_dir>/archive-cache` across restarts
    /// (least recently used first out; never one in use); 0 turns the cache off and every
    /// registration unpacks its archive again. [default: 17179869184]
    #[arg(long, env = "CRESSET_ARCHIVE_CACHE_SIZE")]
    pub archive_cache_size: Option<u64>,
    /// Largest request body, in bytes; larger ones get 413. [default: 6553500]
    #[arg(long, env = "CRESSET_MAX_REQUEST_SIZE")]
    pub max_request_size: Option<usize>,
    /// Largest request header (each one), in bytes; larger ones get 431. [default: 8192]
    #[arg(long, env = "CRESSET_MAX_HEADER_SIZE")]
    pub max_header_size: Option<usize>,
    /// Most inference requests in flight at once (bodies read, waiting for or running in a
    /// model), over all models; more get 429. [default: a quarter of the memory divided
    /// among in-flight and arriving bodies of `max_request_size`, 8-10000]
    #[arg(long, env = "CRESSET_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Most inference request bodies arriving at once; more get 429. [default: twice the
    /// default of `max_concurrent_requests`]
    #[arg(long, env = "CRESSET_MAX_BODIES_IN_TRANSIT")]
    pub max_bodies_in_transit: Option<usize>,
    /// Seconds a request body (or an upload) may go without a byte before it is refused with
    /// 408. [default: 10]
    #[arg(long, env = "CRESSET_BODY_IDLE_TIMEOUT")]
    pub body_idle_timeout: Option<u64>,
    /// Intra-op threads per instance; 0 divides the cores among a model's instances. [default: 0]
    #[arg(long, env = "CRESSET_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<u32>,
    /// HTTP worker threads. [default: 2]
    #[arg(long, env = "CRESSET_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    /// Most entries an archive may hold. [default: 10000]
    #[arg(long, env = "CRESSET_MAX_ARCHIVE_ENTRIES")]
    pub max_archive_entries: Option<u64>,
    /// Most bytes an archive may unpack to. [default: 68719476736]
    #[arg(long, env = "CRESSET_MAX_ARCHIVE_UNPACKED_BYTES")]
    pub max_archive_unpacked_bytes: Option<u64>,
    /// Most unpacked bytes per packed byte (past 16 MiB). [default: 100]
    #[arg(long, env = "CRESSET_MAX_ARCHIVE_RATIO")]
    pub max_archive_ratio: Option<u64>,
    /// The API key file (created with mode 0600 at first start).
    /// [default: <model_store>/.cresset-keys.json]
    #[arg(long, env = "CRESSET_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Serve without token authorization on any API (every listener stays on loopback unless
    /// configured). Browser-made cross-origin requests to the management API are refused
    /// either way.
    #[arg(long, env = "CRESSET_DISABLE_TOKEN_AUTH")]
    pub disable_token_auth: bool,
    /// Leave the inference API open while the management and metrics APIs keep their token
    /// (the quick start's setting).
    #[arg(long, env = "CRESSET_DISABLE_INFERENCE_TOKEN_AUTH")]
    pub disable_inference_token_auth: bool,
    /// Where registrations are saved across restarts. [default: <model_store>/.cresset-snapshot.json]
    #[arg(long, env = "CRESSET_SNAPSHOT_FILE")]
    pub snapshot_file: Option<PathBuf>,
    /// Neither restore nor save the snapshot.
    #[arg(long, env = "CRESSET_NO_CONFIG_SNAPSHOT")]
    pub no_config_snapshot: bool,
    /// Log format. [default: text]
    #[arg(long, env = "CRESSET_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,cresset::access=warn`). [default: info]
    #[arg(long, env = "CRESSET_LOG")]
    pub log: Option<String>,
}

/// `cresset.toml`: the same keys as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model_store: Option<PathBuf>,
    default_workers_per_model: Option<u32>,
    job_queue_size: Option<u32>,
    default_response_timeout: Option<u64>,
    #[serde(default)]
    models: Vec<String>,
    inference_address: Option<String>,
    management_address: Option<String>,
    metrics_address: Option<String>,
    grpc_address: Option<String>,
    grpc_management_address: Option<String>,
    shutdown_grace: Option<u64>,
    #[serde(default)]
    allowed_urls: Vec<String>,
    #[serde(default)]
    allow_private_url_hosts: bool,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    max_upload_size: Option<u64>,
    plugin_dir: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    archive_cache_size: Option<u64>,
    max_request_size: Option<usize>,
    max_header_size: Option<usize>,
    max_concurrent_requests: Option<usize>,
    max_bodies_in_transit: Option<usize>,
    body_idle_timeout: Option<u64>,
    intra_op_threads: Option<u32>,
    http_workers: Option<usize>,
    max_archive_entries: Option<u64>,
    max_archive_unpacked_bytes: Option<u64>,
    max_archive_ratio: Option<u64>,
    snapshot_file: Option<PathBuf>,
    #[serde(default)]
    no_config_snapshot: bool,
    key_file: Option<PathBuf>,
    #[serde(default)]
    disable_token_auth: bool,
    #[serde(default)]
    disable_inference_token_auth: bool,
    log_format: Option<LogFormat>,
    log: Option<String>,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model store.
    pub model_store: PathBuf,
    /// Models to load at start-up.
    pub models: Vec<ModelSource>,
    /// Inference API address.
    pub inference_address: SocketAddr,
    /// `--model` and `--model-name`: one model served from where it lies.
    pub direct_model: Option<(PathBuf, Option<String>)>,
    /// The gRPC inference address (the Open Inference Protocol's and TorchServe's), if served.
    pub grpc_address: Option<SocketAddr>,
    /// TorchServe's gRPC management address, if it is served.
    pub grpc_management_address: Option<SocketAddr>,
    /// How long in-flight requests get to finish after SIGTERM or SIGINT.
    pub shutdown_grace: std::time::Duration,
    /// Management API address.
    pub management_address: SocketAddr,
    /// Metrics API address.
    pub metrics_address: SocketAddr,
    /// URLs models may be registered from.
    pub allowed_urls: crate::remote::UrlPolicy,
    /// Host names the management API answers to besides its address and `localhost`
    /// (lower-case).
    pub allowed_hosts: Vec<String>,
    /// Largest archive a registration may upload or download.
    pub max_upload_size: u64,
    /// Built-in plugin folder.
    pub plugin_dir: PathBuf,
    /// Scratch space.
    pub work_dir: PathBuf,
    /// The cap of the unpacked-archive cache in `work_dir` (0: no cache).
    pub archive_cache_size: u64,
    /// Largest request body.
    pub max_request_size: usize,
    /// Largest request header.
    pub max_header_size: usize,
    /// Most inference requests in flight at once (429 beyond).
    pub max_concurrent_requests: usize,
    /// Most inference request bodies arriving at once (429 beyond).
    pub max_bodies_in_transit: usize,
    /// How long a body may go without progress.
    pub body_idle_timeout: std::time::Duration,
    /// Intra-op threads per instance (0 = auto).
    pub intra_op_threads: u32,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// Archive extraction caps.
    pub extract_limits: ExtractLimits,
    /// The key file, unless token auth is off.
    pub key_file: Option<PathBuf>,
    /// Whether the inference API needs its token (when there is a key file).
    pub inference_token_auth: bool,
    /// Settings that are allowed but unwise, or without effect, logged at start-up.
    pub warnings: Vec<String>,
    /// Workers for models whose config leaves the counts unset (`None`: chosen per model).
    pub default_workers_per_model: Option<u32>,
    /// Defaults for what model configs leave unset.
    pub model_defaults: crate::archive::ModelDefaults,
    /// The snapshot file, unless snapshots are off.
    pub snapshot_file: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log: String,
}

fn parse_address(field: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value.parse().map_err(|_| {
        anyhow::anyhow!(
            "`{field}` must be an IP address and port such as 127.0.0.1:8080. Given: {value:?}"
        )
    })
}

impl ServerConfig {
    /// Merge flags, variables and the file, and validate the result.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Self> {
        let (file, file_warnings): (FileConfig, Vec<String>) = match (&args.config, &args.ts_config)
        {
            (Some(_), Some(_)) => bail!(
                "give `config` (a cresset.toml) or `ts_config` (TorchServe's config.properties), not both"
            ),
            (Some(path), None) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read `config` {}", path.display()))?;
                let file = toml::from_str(&text).with_context(|| {
                    format!("`config` {} is not a valid cresset.toml", path.display())
                })?;
                (file, Vec::new())
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read `ts_config` {}", path.display()))?;
                properties::read(&text)
                    .map_err(|m| anyhow::anyhow!("`ts_config` {}: {m}", path.display()))?
            }
            (None, None) => (FileConfig::default(), Vec::new()),
        };
        let default_workers_per_model = args
            .default_workers_per_model
            .or(file.default_workers_per_model);
        if let Some(n) = default_workers_per_model.filter(|n| *n > 1024) {
            bail!("`default_workers_per_model` must be between 0 and 1024. Given: {n}");
        }
        let job_queue_size = args.job_queue_size.or(file.job_queue_size).unwrap_or(100);
        if !(1..=1_000_000).contains(&job_queue_size) {
            bail!("`job_queue_size` must be between 1 and 1000000. Given: {job_queue_size}");
        }
        let default_response_timeout = args
            .default_response_timeout
            .or(file.default_response_timeout)
            .unwrap_or(120);
        if !(1..=31_536_000).contains(&default_response_timeout) {
            bail!("`default_response_timeout` must be between 1 and 31536000 seconds. Given: {default_response_timeout}");
        }
        let direct_model = args.model.clone().map(|p| (p, args.model_name.clone()));
        let store_given = args.model_store.is_some() || file.model_store.is_some();
        let mut model_store = args
            .model_store
            .or(file.model_store)
            .unwrap_or_else(|| PathBuf::from("model_store"));
        // `--model` needs no store: without one, the server keeps a private one (keys) in its
        // work folder, below.
        let store_later = direct_model.is_some() && !store_given && !model_store.is_dir();
        if !model_store.is_dir() && !store_later {
            bail!(
                "`model_store` must be an existing folder. Given: {}",
                model_store.display()
            );
        }
        let models_raw = if args.models.is_empty() {
            file.models
        } else {
            args.models
        };
        if direct_model.is_some() && !models_raw.is_empty() {
            bail!("`models` and `--model` cannot be combined: `--model` serves one model");
        }
        let models = if store_later {
            Vec::new()
        } else {
            expand_models(&model_store, &models_raw)?
        };

        let inference_address = parse_address(
            "inference_address",
            &args
                .inference_address
                .or(file.inference_address)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
        )?;
        let grpc_address = args
            .grpc_address
            .or(file.grpc_address)
            .map(|a| parse_address("grpc_address", &a))
            .transpose()?;
        let grpc_management_address = args
            .grpc_management_address
            .or(file.grpc_management_address)
            .map(|a| parse_address("grpc_management_address", &a))
            .transpose()?;
        let shutdown_grace = args.shutdown_grace.or(file.shutdown_grace).unwrap_or(30);
        if shutdown_grace > 86_400 {
            bail!("`shutdown_grace` must be between 0 and 86400 seconds. Given: {shutdown_grace}");
        }
        let management_address = parse_address(
            "management_address",
            &args
                .management_address
                .or(file.management_address)
                .unwrap_or_else(|| "127.0.0.1:8081".into()),
        )?;
        let allowed_raw = if args.allowed_urls.is_empty() {
            file.allowed_urls
        } else {
            args.allowed_urls
        };
        let allowed_urls = crate::remote::UrlPolicy::parse(
            &allowed_raw,
            args.allow_private_url_hosts || file.allow_private_url_hosts,
        )
        .map_err(anyhow::Error::msg)?;
        let allowed_hosts_raw = if args.allowed_hosts.is_empty() {
            file.allowed_hosts
        } else {
            args.allowed_hosts
        };
        let allowed_hosts = allowed_hosts_raw
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect::<Vec<_>>();
        if let Some(bad) = allowed_hosts
            .iter()
            .find(|h| h.contains(['/', ':', '@', ' ']))
        {
            bail!(
                "`allowed_hosts` entries must be host names without port or scheme. Given: {bad:?}"
            );
        }
        let max_upload_size = args
            .max_upload_size
            .or(file.max_upload_size)
            .unwrap_or(4 << 30);
        if max_upload_size == 0 {
            bail!("`max_upload_size` must be >= 1. Given: 0");
        }
        let metrics_address = parse_address(
            "metrics_address",
            &args
                .metrics_address
                .or(file.metrics_address)
                .unwrap_or_else(|| "127.0.0.1:8082".into()),
        )?;

        let plugin_dir = match args.plugin_dir.or(file.plugin_dir) {
            Some(dir) => dir,
            None => std::env::current_exe()
                .context("cannot find the cresset executable to locate built-in plugins; set `plugin_dir`")?
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        if !plugin_dir.is_dir() {
            bail!(
                "`plugin_dir` must be an existing folder. Given: {}",
                plugin_dir.display()
            );
        }
        let work_dir = args
            .work_dir
            .or(file.work_dir)
            .unwrap_or_else(|| std::env::temp_dir().join(format!("cresset-{}", effective_uid())));
        private_dir(&work_dir)?;
        if store_later {
            model_store = work_dir.join("model-store");
            std::fs::create_dir_all(&model_store).with_context(|| {
                format!("cannot create the model store {}", model_store.display())
            })?;
        }

        let max_request_size = args
            .max_request_size
            .or(file.max_request_size)
            .unwrap_or(6_553_500);
        if max_request_size == 0 {
            bail!("`max_request_size` must be >= 1. Given: 0");
        }
        let max_header_size = args
            .max_header_size
            .or(file.max_header_size)
            .unwrap_or(8192);
        if !(1024..=65536).contains(&max_header_size) {
            bail!("`max_header_size` must be between 1024 and 65536. Given: {max_header_size}");
        }
        let memory = memory_bytes();
        let (default_in_flight, default_transit) = body_caps(memory, max_request_size);
        let max_concurrent_requests = args
            .max_concurrent_requests
            .or(file.max_concurrent_requests)
            .unwrap_or(default_in_flight);
        if !(1..=1_000_000).contains(&max_concurrent_requests) {
            bail!("`max_concurrent_requests` must be between 1 and 1000000. Given: {max_concurrent_requests}");
        }
        let max_bodies_in_transit = args
            .max_bodies_in_transit
            .or(file.max_bodies_in_transit)
            .unwrap_or(default_transit);
        if !(1..=1_000_000).contains(&max_bodies_in_transit) {
            bail!("`max_bodies_in_transit` must be between 1 and 1000000. Given: {max_bodies_in_transit}");
        }
        let worst_case = (max_concurrent_requests as u128 + max_bodies_in_transit as u128)
            * max_request_size as u128;
        let mut warnings = file_warnings;
        if let Some(memory) = memory.filter(|&m| worst_case > u128::from(m)) {
            warnings.push(format!(
                "request bodies at their caps ((`max_concurrent_requests` {max_concurrent_requests} + `max_bodies_in_transit` {max_bodies_in_transit}) x `max_request_size` {max_request_size} bytes) would take more than this machine's {memory} bytes of memory"
            ));
        }
        let body_idle_timeout = args
            .body_idle_timeout
            .or(file.body_idle_timeout)
            .unwrap_or(10);
        if !(1..=3600).contains(&body_idle_timeout) {
            bail!("`body_idle_timeout` must be between 1 and 3600 seconds. Given: {body_idle_timeout}");
        }
        let http_workers = args.http_workers.or(file.http_workers).unwrap_or(2);
        if http_workers == 0 {
            bail!("`http_workers` must be >= 1. Given: 0");
        }
        let defaults = ExtractLimits::default();
        let extract_limits = ExtractLimits {
            max_entries: args
                .max_archive_entries
                .or(file.max_archive_entries)
                .unwrap_or(defaults.max_entries),
            max_unpacked_bytes: args
                .max_archive_unpacked_bytes
                .or(file.max_archive_unpacked_bytes)
                .unwrap_or(defaults.max_unpacked_bytes),
            max_ratio: args
                .max_archive_ratio
                .or(file.max_archive_ratio)
                .unwrap_or(defaults.max_ratio),
            ratio_floor_bytes: defaults.ratio_floor_bytes,
        };
        let log = args.log.or(file.log).unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log)
            .map_err(|e| anyhow::anyhow!("`log` is not a valid filter. Given: {log:?} ({e})"))?;
        let inference_token_auth =
            !(args.disable_inference_token_auth || file.disable_inference_token_auth);
        let key_file = if args.disable_token_auth || file.disable_token_auth {
            None
        } else {
            Some(
                args.key_file
                    .or(file.key_file)
                    .unwrap_or_else(|| model_store.join(".cresset-keys.json")),
            )
        };
        // `--model` is the whole registration: nothing to save or restore.
        let snapshot_file =
            if args.no_config_snapshot || file.no_config_snapshot || direct_model.is_some() {
                None
            } else {
                Some(
                    args.snapshot_file
                        .or(file.snapshot_file)
                        .unwrap_or_else(|| model_store.join(".cresset-snapshot.json")),
                )
            };
        Ok(Self {
            model_store,
            models,
            inference_address,
            direct_model,
            grpc_address,
            grpc_management_address,
            shutdown_grace: std::time::Duration::from_secs(shutdown_grace),
            management_address,
            metrics_address,
            allowed_urls,
            allowed_hosts,
            max_upload_size,
            plugin_dir,
            archive_cache_size: args
                .archive_cache_size
                .or(file.archive_cache_size)
                .unwrap_or(16 << 30),
            work_dir,
            max_request_size,
            max_header_size,
            max_concurrent_requests,
            max_bodies_in_transit,
            body_idle_timeout: std::time::Duration::from_secs(body_idle_timeout),
            intra_op_threads: args.intra_op_threads.or(file.intra_op_threads).unwrap_or(0),
            http_workers,
            extract_limits,
            snapshot_file,
            key_file,
            inference_token_auth,
            warnings,
            default_workers_per_model,
            model_defaults: crate::archive::ModelDefaults {
                job_queue_size,
                response_timeout_s: default_response_timeout,
            },
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log,
        })
    }
}

/// The memory this process may use: the machine's, or its cgroup's limit if lower.
fn memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let total = total_kib * 1024;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |limit| limit.min(total)))
}

/// Default caps on inference bodies in flight and in transit, so that both at their caps with
/// bodies of `max_request_size` take at most a quarter of the memory: a third of that for
/// bodies in flight, two thirds for bodies arriving (slow clients wait there, not in flight).
fn body_caps(memory: Option<u64>, max_request_size: usize) -> (usize, usize) {
    let budget = memory.unwrap_or(4 << 30) / 4;
    let per_third = budget / 3 / (max_request_size.max(1) as u64);
    let in_flight = per_third.clamp(8, 10_000) as usize;
    let transit = (2 * per_third).clamp(16, 20_000) as usize;
    (in_flight, transit)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Create `dir` if needed and make sure it is ours alone: plugin libraries staged there are
/// loaded into this process, so another user who could write there could run code in it.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create `work_dir` {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot read `work_dir` {}", dir.display()))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        bail!(
            "`work_dir` must be a folder, not a link or a file. Given: {}",
            dir.display()
        );
    }
    if meta.uid() != effective_uid() {
        bail!(
            "`work_dir` {} belongs to another user (uid {}); plugins staged there would run in this server. Choose a folder of your own",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make `work_dir` {} private", dir.display()))?;
    }
    Ok(())
}

fn expand_models(store: &Path, raw: &[String]) -> anyhow::Result<Vec<ModelSource>> {
    let mut out = Vec::new();
    for item in raw.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if item == "all" {
            for (name, path) in crate::archive::list_store(store)? {
                // Relative to the store, as every other entry is.
                let archive = path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| name.clone());
                out.push(ModelSource {
                    name: Some(name),
                    archive,
                });
            }
        } else {
            out.push(item.parse::<ModelSource>().map_err(anyhow::Error::msg)?);
        }
    }
    Ok(out)
}

/// `cresset archive` flags, in the spirit of torch-model-archiver.
#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// The model name.
    #[arg(long)]
    pub model_name: String,
    /// The model version.
    #[arg(short = 'v', long, default_value = "1.0")]
    pub version: String,
    /// A built-in plugin name (`echo`, `torchscript`, ...) or the path of a plugin library to
    /// bundle.
    #[arg(long)]
    pub handler: String,
    /// The main model file (e.g. `model.pt`), stored at the archive root.
    #[arg(long)]
    pub serialized_file: Option<PathBuf>,
    /// More files or folders, comma-separated, stored at the root under their own names.
    #[arg(long, value_delimiter = ',')]
    pub extra_files: Vec<PathBuf>,
    /// A `model-config.toml`, or a `model-config.yaml` in TorchServe's keys, to include.
    #[arg(short = 'c', long)]
    pub config_file: Option<PathBuf>,
    /// TorchServe's `--model-file` (Python model code): refused, as Cresset does not run it.
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    /// TorchServe's `--requirements-file`: refused, as Cresset installs nothing at run time.
    #[arg(short = 'r', long)]
    pub requirements_file: Option<PathBuf>,
    /// TorchServe's runtime for a `.mar`'s manifest: python, python3 or LSP. [default: LSP for
    /// the torchscript plugin, else python]
    #[arg(long)]
    pub runtime: Option<String>,
    /// One line describing the model.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Output format: tgz, zip, no-archive, or TorchServe's default (a .mar) and zip-store.
    #[arg(long, value_enum, default_value = "tgz")]
    pub archive_format: ArchiveFormat,
    /// Folder to write the archive to.
    #[arg(long, default_value = ".")]
    pub export_path: PathBuf,
    /// Overwrite an existing archive.
    #[arg(short = 'f', long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_caps_fit_a_quarter_of_the_memory_and_transit_is_the_larger() {
        let memory = 24u64 << 30;
        let size = 6_553_500;
        let (in_flight, transit) = body_caps(Some(memory), size);
        assert!(transit > in_flight);
        assert!(((in_flight + transit) as u64) * size as u64 <= memory / 4);
        assert_eq!(
            body_caps(Some(1 << 20), size),
            (8, 16),
            "a floor on tiny machines"
        );
        let (in_flight, transit) = body_caps(Some(1 << 50), 1024);
        assert_eq!(
            (in_flight, transit),
            (10_000, 20_000),
            "a ceiling on huge ones"
        );
    }

    #[test]
    fn the_work_dir_is_made_private_and_another_users_folder_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        private_dir(&open).expect("ours");
        let mode = std::fs::metadata(&open).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        if effective_uid() == 0 {
            let theirs = root.path().join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            let err = private_dir(&theirs).expect_err("refused").to_string();
            assert!(err.contains("belongs to another user"), "{err}");
        }
    }
}

/// The spin count the server gives libgomp when the operator sets neither `OMP_WAIT_POLICY`
/// nor `GOMP_SPINCOUNT`.
pub const DEFAULT_GOMP_SPINCOUNT: &str = "30000";

/// A server shares its cores between HTTP threads and libtorch's OpenMP team. Between parallel
/// regions libgomp's threads wait: spinning (its default, about 300,000 iterations, which starved
/// the HTTP threads on 2 cores) or sleeping (`OMP_WAIT_POLICY=PASSIVE`, this server's choice
/// until issue 13, which costs a thread wake-up per op: 2-3x on small models with two threads).
/// The default now is a bounded spin, `GOMP_SPINCOUNT=30000` (tens of microseconds, enough to
/// bridge the gap between one op and the next, then sleep): measured within 10% of the best
/// setting at 1 and 32 clients and with a busy co-tenant (BENCHMARKS.md, `nlp`). An operator's
/// own `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` wins. Call before any thread exists.
pub fn set_openmp_wait_default() {
    if std::env::var_os("OMP_WAIT_POLICY").is_none() && std::env::var_os("GOMP_SPINCOUNT").is_none()
    {
        std::env::set_var("GOMP_SPINCOUNT", DEFAULT_GOMP_SPINCOUNT);
    }
}

/// How OpenMP threads wait in this process, as describe reports it.
pub fn openmp_wait() -> serde_json::Value {
    let var = |k: &str| std::env::var(k).ok();
    serde_json::json!({
        "OMP_WAIT_POLICY": var("OMP_WAIT_POLICY"),
        "GOMP_SPINCOUNT": var("GOMP_SPINCOUNT"),
    })
}
