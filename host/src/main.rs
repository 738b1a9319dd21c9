use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cresset::archive::{create_archive, ArchiveOptions, ConfigOverrides, ModelSource};
use cresset::config::{ArchiveArgs, Cli, Command, LogFormat, ServeArgs, ServerConfig};
use cresset::http::{self, AppState};
use cresset::loader::PluginLoader;
use cresset::metrics::Metrics;
use cresset::registry::{register_from_store, LoadContext, ModelRegistry, StoreRegistration};
use cresset::snapshot::Snapshotter;

fn main() -> std::process::ExitCode {
    // A server shares its cores between HTTP threads and libtorch's OpenMP pool. libgomp's
    // default is to spin between parallel regions, which starves the HTTP threads on small
    // machines and stalls whole matmuls when a spinning thread is descheduled (measured on
    // 2 cores: batched throughput 71% of in-process with spinning, 94% without; BENCHMARKS.md).
    // Set before any thread exists and before a plugin loads libgomp; an operator's own
    // setting wins.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Archive(args) => archive(args),
        Command::Plan(args) => cresset::plan::run(args),
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

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Arc::new(ServerConfig::resolve(args)?);
    init_logging(config.log_format, &config.log);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        plugin_abi = cresset_plugin_api::ABI_VERSION,
        model_store = %config.model_store.display(),
        plugin_dir = %config.plugin_dir.display(),
        "starting cresset"
    );
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ModelRegistry::default());
    // Each server process stages and extracts in its own folder, removed when it exits.
    let scratch = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&config.work_dir)
        .with_context(|| {
            format!(
                "cannot create a scratch folder in `work_dir` {}",
                config.work_dir.display()
            )
        })?;
    let ctx = Arc::new(LoadContext {
        loader: PluginLoader::new(config.work_dir.join("plugins")),
        metrics: metrics.clone(),
        plugin_dir: config.plugin_dir.clone(),
        extract_dir: scratch.path().join("models"),
        limits: config.extract_limits,
        intra_op_threads: config.intra_op_threads,
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
                })
                .collect()
        }
        None => config
            .models
            .iter()
            .map(|source| StoreRegistration {
                source: source.clone(),
                overrides: ConfigOverrides::default(),
                url: None,
                version: None,
            })
            .collect(),
    };
    for registration in &registrations {
        register_from_store(&ctx, &registry, &config.model_store, registration)
            .context("cannot start a loader thread")?;
    }
    if let Some(snapshot) = &snapshot {
        snapshot
            .save(&registry)
            .with_context(|| format!("cannot write the snapshot {}", snapshot.path().display()))?;
    }

    let keys = match &config.key_file {
        Some(path) => Some(cresset::http::ApiKeys::load_or_create(path)?),
        None => {
            tracing::warn!("token authorization is off (--disable-token-auth)");
            None
        }
    };
    let state = Arc::new(AppState {
        registry,
        metrics,
        config: config.clone(),
        ctx,
        snapshot,
        keys,
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
    });
    actix_web::rt::System::new().block_on(async move {
        let (server, addresses) = http::bind(state).context("cannot bind the HTTP listeners")?;
        for (api, address) in &addresses {
            tracing::info!(%api, %address, "listening");
            // One machine-readable line on stdout per listener, for scripts and tests that
            // ask for port 0.
            println!("{}", serde_json::json!({ "event": "listening", "api": api, "address": address.to_string() }));
        }
        server.await.context("the HTTP server failed")
    })?;
    drop(scratch);
    Ok(())
}

fn archive(args: ArchiveArgs) -> anyhow::Result<()> {
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
    })?;
    println!("{}", path.display());
    Ok(())
}
