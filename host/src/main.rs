use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cresset::archive::{create_archive, ArchiveOptions, ConfigOverrides, ModelSource};
use cresset::config::{ArchiveArgs, Cli, Command, LogFormat, ServeArgs, ServerConfig};
use cresset::http::{self, AppState};
use cresset::loader::PluginLoader;
use cresset::metrics::Metrics;
use cresset::registry::snapshot::{RegistrationStatus, Snapshotter};
use cresset::registry::{store, LoadContext, ModelRegistry, Registrar, StoreRegistration};

fn main() -> std::process::ExitCode {
    // How libtorch's OpenMP threads wait between parallel regions; set before any thread exists
    // and before a plugin loads libgomp (see `cresset::config::openmp_wait`).
    cresset::config::set_openmp_wait_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Archive(args) => archive(args),
        Command::Plan(args) => cresset::plan::run(args),
        Command::Worker { describe } => {
            // The plugin's libraries, as `serve` finds them.
            preload_distribution_libraries();
            let status = match describe {
                Some(library) => cresset::isolation::probe::run(&library),
                None => cresset::isolation::worker_process::run(),
            };
            return std::process::ExitCode::from(u8::try_from(status).unwrap_or(2));
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cresset: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The libraries of a distribution's `lib/` folder (`make dist`: `bin/cresset` beside `lib/`,
/// under a folder marked by a `CRESSET-DIST` file) that plugins need, loaded before any plugin.
/// Plugins are opened from staged copies in the work folder, where their `$ORIGIN/../lib` run
/// path leads nowhere; a library already loaded satisfies their dependency on it by name.
/// Without the marker (a build tree, an install beside other libraries), nothing is loaded.
fn preload_distribution_libraries() {
    let Some(home) = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_owned()))
    else {
        return;
    };
    if !home.join("CRESSET-DIST").is_file() {
        return;
    }
    let lib = home.join("lib");
    for name in ["libtorch_cpu.so", "libonnxruntime.so.1"] {
        let path = lib.join(name);
        if !path.is_file() {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a NUL-terminated path; the handle is kept for the process's life.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            eprintln!("cresset: cannot load {}", path.display());
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    preload_distribution_libraries();
    let config = Arc::new(ServerConfig::resolve(args)?);
    cresset::archive::set_model_defaults(config.model_defaults);
    // The server divides the cores: a batch runs with the cores the busy workers leave it
    // (cresset_torch::threads). Set before any plugin loads.
    if config.intra_op_threads == 0 {
        std::env::set_var("CRESSET_DYNAMIC_THREADS", "1");
    }
    init_logging(config.log_format, &config.log);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        plugin_abi = cresset_plugin_api::ABI_VERSION,
        model_store = %config.model_store.display(),
        plugin_dir = %config.plugin_dir.display(),
        "starting cresset"
    );
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    cresset::http::error::redact_paths(&config.work_dir, &config.model_store, &config.plugin_dir);
    // What processes that died left behind: half-written uploads, snapshots and staged
    // plugins, and their scratch folders.
    let staged_plugins = config.work_dir.join("plugins");
    let mut swept = store::Swept::default();
    store::sweep_temp_files(&[&config.model_store, &staged_plugins], &mut swept);
    if let Some(dir) = config.snapshot_file.as_ref().and_then(|f| f.parent()) {
        if dir != config.model_store.as_path() && !dir.as_os_str().is_empty() {
            store::sweep_temp_files(&[dir], &mut swept);
        }
    }
    store::sweep_scratch(&config.work_dir, &mut swept);
    if swept != store::Swept::default() {
        tracing::info!(
            files = swept.files,
            folders = swept.folders,
            bytes = swept.bytes,
            "removed what processes that died left behind"
        );
    }
    // Each server process stages and extracts in its own folder, removed when it exits (and
    // by the next start-up's sweep if it is killed).
    let scratch = store::ScratchDir::create(&config.work_dir).with_context(|| {
        format!(
            "cannot create a scratch folder in `work_dir` {}",
            config.work_dir.display()
        )
    })?;
    let archive_cache = match config.archive_cache_size {
        0 => None,
        size => {
            let root = config.work_dir.join("archive-cache");
            match cresset::archive::cache::ArchiveCache::open(&root, size) {
                Ok(cache) => Some(Arc::new(cache)),
                Err(e) => {
                    tracing::warn!(folder = %root.display(), "cannot open the archive cache ({e}); archives are unpacked on every registration");
                    None
                }
            }
        }
    };
    let ctx = Arc::new(LoadContext {
        loader: PluginLoader::new(staged_plugins),
        metrics: Arc::new(Metrics::new()),
        plugin_dir: config.plugin_dir.clone(),
        extract_dir: scratch.path().join("models"),
        limits: config.extract_limits,
        archive_cache,
        intra_op_threads: config.intra_op_threads,
        default_workers: config.default_workers_per_model,
    });
    // An existing snapshot is the server's state: it is restored (default versions first) and
    // `--models` is ignored, so that a model unregistered at run time stays unregistered. On a
    // first start (no snapshot yet, or --no-config-snapshot), `--models` is loaded.
    let snapshot = config.snapshot_file.clone().map(Snapshotter::new);
    let restored = match &snapshot {
        Some(snapshot) if snapshot.path().exists() => Some(snapshot.load()?),
        _ => None,
    };
    let registrations: Vec<StoreRegistration> = match restored {
        Some(models) => {
            tracing::info!(
                models = models.len(),
                "restoring registrations from the snapshot"
            );
            if !config.models.is_empty() {
                tracing::info!("the snapshot takes precedence over --models; start with --no-config-snapshot to use them");
            }
            models
                .into_iter()
                .map(|m| StoreRegistration {
                    source: ModelSource {
                        name: Some(m.name),
                        archive: m.archive,
                    },
                    overrides: m.overrides,
                    url: Some(m.url),
                    version: Some(m.version),
                    status: m.status,
                })
                .collect()
        }
        None => {
            let sources = match &config.direct_model {
                Some((path, name)) => vec![cresset::archive::direct::prepare(
                    path,
                    name.as_deref(),
                    scratch.path(),
                )?],
                None => config.models.clone(),
            };
            sources
                .into_iter()
                .map(|source| StoreRegistration {
                    source,
                    overrides: ConfigOverrides::default(),
                    url: None,
                    version: None,
                    status: RegistrationStatus::Queued,
                })
                .collect()
        }
    };
    let registrar = Arc::new(Registrar {
        registry: Arc::new(ModelRegistry::default()),
        ctx,
        snapshot,
        store: config.model_store.clone(),
    });
    registrar
        .start(&registrations)
        .context("cannot record the registrations and start loading them")?;

    let keys = match &config.key_file {
        Some(path) => Some(cresset::http::ApiKeys::load_or_create(path)?),
        None => {
            tracing::warn!("token authorization is off (--disable-token-auth)");
            None
        }
    };
    let state = Arc::new(AppState::new(config.clone(), registrar.clone(), keys));
    actix_web::rt::System::new().block_on(async move {
        let grpc_state = state.clone();
        let (server, mut addresses) =
            http::bind(state).context("cannot bind the HTTP listeners")?;
        let mut grpc = Vec::new();
        if let Some(address) = config.grpc_address {
            let listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot bind the gRPC listener on {address}"))?;
            addresses.push(("grpc", listener.local_addr()?));
            let (state, stopped) = (grpc_state.clone(), grpc_state.stopped());
            grpc.push(actix_web::rt::spawn(async move {
                if let Err(e) = cresset::grpc::serve(state, listener, stopped).await {
                    tracing::error!("the gRPC server failed: {e:#}");
                }
            }));
        }
        if let Some(address) = config.grpc_management_address {
            let listener = std::net::TcpListener::bind(address).with_context(|| {
                format!("cannot bind the gRPC management listener on {address}")
            })?;
            addresses.push(("grpc_management", listener.local_addr()?));
            let (state, stopped) = (grpc_state.clone(), grpc_state.stopped());
            grpc.push(actix_web::rt::spawn(async move {
                if let Err(e) = cresset::grpc::serve_management(state, listener, stopped).await {
                    tracing::error!("the gRPC management server failed: {e:#}");
                }
            }));
        }
        for (api, address) in &addresses {
            tracing::info!(%api, %address, "listening");
        }
        if let Some(path) = &config.key_file {
            let bound = |api: &str| {
                addresses
                    .iter()
                    .find(|(a, _)| *a == api)
                    .map(|(_, address)| address.to_string())
                    .unwrap_or_default()
            };
            announce_keys(&config, path, &bound("management"), &bound("inference"));
        }
        for (api, address) in &addresses {
            // One machine-readable line on stdout per listener, for scripts and tests that
            // ask for port 0.
            println!("{}", serde_json::json!({ "event": "listening", "api": api, "address": address.to_string() }));
        }
        let served = server.await.context("the HTTP server failed");
        // The gRPC server stops with the HTTP ones: let it finish writing its last answers.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            futures_util::future::join_all(grpc),
        )
        .await;
        served
    })?;
    // A clean stop: loads still under way were not the cause, and are loaded again next time.
    registrar.persist_on_exit();
    drop(scratch);
    Ok(())
}

/// Say where the keys are and how to use them, without printing a key.
fn announce_keys(config: &ServerConfig, path: &std::path::Path, management: &str, inference: &str) {
    let file = path.display();
    let extract =
        |api: &str| format!("$(sed -n 's/.*\"{api}\": *\"\\([0-9a-f]*\\)\".*/\\1/p' {file})");
    tracing::info!(
        key_file = %file,
        "the management API needs its key; try: curl -H \"Authorization: Bearer {}\" http://{}/models",
        extract("management"),
        management
    );
    if config.inference_token_auth {
        tracing::info!(
            "the inference API needs its key too: curl -H \"Authorization: Bearer {}\" http://{}/ping",
            extract("inference"),
            inference
        );
    } else {
        tracing::warn!("the inference API is open (--disable-inference-token-auth); the management API keeps its key");
    }
}

fn archive(args: ArchiveArgs) -> anyhow::Result<()> {
    if let Some(code) = &args.model_file {
        anyhow::bail!(
            "`--model-file` {}: Cresset does not run Python model code; export the model to \
             TorchScript (torch.jit.save) or a safetensors checkpoint and pass it as \
             --serialized-file",
            code.display()
        );
    }
    if let Some(requirements) = &args.requirements_file {
        anyhow::bail!(
            "`--requirements-file` {}: Cresset installs nothing at run time; put what the \
             handler needs into the server's image",
            requirements.display()
        );
    }
    let path = create_archive(&ArchiveOptions {
        model_name: args.model_name,
        version: args.version,
        handler: args.handler,
        serialized_file: args.serialized_file,
        extra_files: args.extra_files,
        config_file: args.config_file,
        description: args.description,
        format: args.archive_format,
        export_path: args.export_path,
        force: args.force,
        runtime: args.runtime,
    })?;
    println!("{}", path.display());
    Ok(())
}
