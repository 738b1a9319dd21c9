//! `cresset archive`: the torch-model-archiver of this project.
//!
//! Archives are reproducible: files are sorted and their times zeroed, so the same inputs give
//! the same bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    torchserve, validate_name, Manifest, ManifestModel, ModelConfig, MANIFEST_FILE,
    MODEL_CONFIG_FILE,
};

/// How the archive is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveFormat {
    /// A gzip-compressed tar file, `<name>.tar.gz`.
    Tgz,
    /// A zip file, `<name>.zip`.
    Zip,
    /// A plain directory, `<name>/`.
    NoArchive,
    /// TorchServe's `.mar` (`torch-model-archiver`'s `default`): a deflated zip that also
    /// carries `MAR-INF/MANIFEST.json` (and the model config as `model-config.yaml`).
    #[value(name = "default")]
    Mar,
    /// TorchServe's `.mar` stored without compression (`zip-store`).
    #[value(name = "zip-store")]
    MarStore,
}

impl ArchiveFormat {
    /// The file extension this format writes.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Tgz => ".tar.gz",
            Self::Zip => ".zip",
            Self::NoArchive => "",
            Self::Mar | Self::MarStore => ".mar",
        }
    }

    /// Whether TorchServe can read it (a `.mar`).
    fn torchserve(self) -> bool {
        matches!(self, Self::Mar | Self::MarStore)
    }
}

/// What to put in an archive.
#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    /// The model name.
    pub model_name: String,
    /// The model version.
    pub version: String,
    /// A built-in plugin name, or the path of a plugin library to bundle.
    pub handler: String,
    /// The main model file (for example `model.pt`), stored at the archive root.
    pub serialized_file: Option<PathBuf>,
    /// More files or folders, stored at the root under their own names.
    pub extra_files: Vec<PathBuf>,
    /// A `model-config.toml` to include (checked before it is written).
    pub config_file: Option<PathBuf>,
    /// One line for people.
    pub description: String,
    /// The output format.
    pub format: ArchiveFormat,
    /// The folder the archive is written to.
    pub export_path: PathBuf,
    /// Overwrite an existing archive.
    pub force: bool,
    /// TorchServe's `runtime` for a `.mar`'s manifest (`python`, `python3` or `LSP`; by default
    /// `LSP` for the `torchscript` plugin, which TorchServe's C++ `TorchScriptHandler` can
    /// serve, else `python`).
    pub runtime: Option<String>,
}

/// One file to store: where it is, and its path inside the archive.
struct Item {
    source: Source,
    name: String,
}

enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Item {
    fn len(&self) -> io::Result<u64> {
        match &self.source {
            Source::File(p) => Ok(std::fs::metadata(p)?.len()),
            Source::Bytes(b) => Ok(b.len() as u64),
        }
    }
    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        match &self.source {
            Source::File(p) => Ok(Box::new(File::open(p)?)),
            Source::Bytes(b) => Ok(Box::new(b.as_slice())),
        }
    }
}

/// Write the archive and return its path.
pub fn create_archive(opts: &ArchiveOptions) -> anyhow::Result<PathBuf> {
    validate_name("--model-name", &opts.model_name).map_err(anyhow::Error::msg)?;
    validate_name("--version", &opts.version).map_err(anyhow::Error::msg)?;

    let mut items: Vec<Item> = Vec::new();
    let handler_path = Path::new(&opts.handler);
    let handler =
        if opts.handler.contains('/') || opts.handler.ends_with(std::env::consts::DLL_SUFFIX) {
            if !handler_path.is_file() {
                bail!(
                "`--handler` {:?} is neither a built-in plugin name nor an existing library file",
                opts.handler
            );
            }
            let file = file_name(handler_path)?;
            let name = format!("handler/{file}");
            items.push(Item {
                source: Source::File(handler_path.to_owned()),
                name: name.clone(),
            });
            name
        } else {
            validate_name("--handler", &opts.handler).map_err(anyhow::Error::msg)?;
            opts.handler.clone()
        };

    let manifest = Manifest {
        manifest_version: 1,
        created_by: format!("cresset {}", env!("CARGO_PKG_VERSION")),
        model: ManifestModel {
            name: opts.model_name.clone(),
            version: opts.version.clone(),
            handler,
            abi_version: cresset_plugin_api::ABI_VERSION.to_owned(),
            description: opts.description.clone(),
            serialized_file: opts
                .serialized_file
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
        },
    };
    items.push(Item {
        source: Source::Bytes(toml::to_string(&manifest)?.into_bytes()),
        name: MANIFEST_FILE.into(),
    });

    let mut config_yaml = None;
    if let Some(config) = &opts.config_file {
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("cannot read `--config-file` {}", config.display()))?;
        let yaml = config
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        let bad = |m: String| anyhow::anyhow!("`--config-file` {}: {m}", config.display());
        // The YAML reader checks what it reads; a TOML config is checked here.
        let parsed: ModelConfig = if yaml {
            torchserve::model_config_from_yaml(&text).map_err(bad)?
        } else {
            let parsed: ModelConfig = toml::from_str(&text).with_context(|| {
                format!(
                    "`--config-file` {} is not a valid model-config.toml",
                    config.display()
                )
            })?;
            parsed.validate().map_err(bad)?;
            parsed
        };
        for warning in &parsed.warnings {
            eprintln!("cresset archive: warning: {warning}");
        }
        if yaml {
            config_yaml = Some(text.into_bytes());
        } else {
            // A .mar also carries the config in TorchServe's keys, for TorchServe to read.
            if opts.format.torchserve() {
                config_yaml = Some(torchserve::model_config_to_yaml(&parsed)?.into_bytes());
            }
            items.push(Item {
                source: Source::Bytes(text.into_bytes()),
                name: MODEL_CONFIG_FILE.into(),
            });
        }
    }
    if let Some(bytes) = config_yaml {
        items.push(Item {
            source: Source::Bytes(bytes),
            name: torchserve::MODEL_CONFIG_YAML.into(),
        });
    }
    if opts.format.torchserve() {
        let runtime = match opts.runtime.as_deref() {
            None if manifest.model.handler == "torchscript" => "LSP",
            None => "python",
            Some(r @ ("python" | "python3" | "LSP")) => r,
            Some(other) => {
                bail!("`--runtime` must be python, python3 or LSP. Given: {other:?}")
            }
        };
        let json =
            torchserve::mar_manifest_json(&manifest.model, runtime, opts.config_file.is_some());
        items.push(Item {
            source: Source::Bytes(json.into_bytes()),
            name: torchserve::MAR_MANIFEST_FILE.into(),
        });
    }
    for path in opts.serialized_file.iter().chain(&opts.extra_files) {
        add_path(&mut items, path)?;
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    for pair in items.windows(2) {
        if pair[0].name == pair[1].name {
            bail!(
                "two inputs would both be stored as `{}` in the archive",
                pair[0].name
            );
        }
    }

    std::fs::create_dir_all(&opts.export_path).with_context(|| {
        format!(
            "cannot create `--export-path` {}",
            opts.export_path.display()
        )
    })?;
    let out = opts
        .export_path
        .join(format!("{}{}", opts.model_name, opts.format.extension()));
    if out.exists() {
        if !opts.force {
            bail!(
                "{} already exists: pass --force to overwrite it",
                out.display()
            );
        }
        if out.is_dir() {
            std::fs::remove_dir_all(&out)?;
        } else {
            std::fs::remove_file(&out)?;
        }
    }

    let total: u64 = items.iter().map(Item::len).sum::<io::Result<u64>>()?;
    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message(format!("archiving {}", opts.model_name));

    // Write beside the target and rename, so a crash never leaves half an archive.
    match opts.format {
        ArchiveFormat::NoArchive => {
            let tmp = tempfile::Builder::new()
                .prefix(".archive-")
                .tempdir_in(&opts.export_path)?;
            for item in &items {
                let dest = tmp.path().join(&item.name);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let mut file = File::create(&dest)?;
                io::copy(&mut progress.wrap_read(item.open()?), &mut file)?;
            }
            let kept = tmp.keep();
            std::fs::rename(&kept, &out)?;
        }
        ArchiveFormat::Tgz => {
            let tmp = tempfile::NamedTempFile::new_in(&opts.export_path)?;
            let gz = flate2::write::GzEncoder::new(tmp.reopen()?, flate2::Compression::default());
            let mut tar = tar::Builder::new(gz);
            for item in &items {
                let mut header = tar::Header::new_gnu();
                header.set_size(item.len()?);
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut header, &item.name, progress.wrap_read(item.open()?))?;
            }
            tar.into_inner()?.finish()?.sync_all()?;
            tmp.persist(&out)?;
        }
        ArchiveFormat::Zip | ArchiveFormat::Mar | ArchiveFormat::MarStore => {
            let method = match opts.format {
                ArchiveFormat::MarStore => zip::CompressionMethod::Stored,
                _ => zip::CompressionMethod::Deflated,
            };
            let tmp = tempfile::NamedTempFile::new_in(&opts.export_path)?;
            let mut zip = zip::ZipWriter::new(tmp.reopen()?);
            for item in &items {
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(method)
                    .last_modified_time(zip::DateTime::default())
                    .unix_permissions(0o644)
                    .large_file(item.len()? > u32::MAX as u64);
                zip.start_file(item.name.as_str(), options)?;
                io::copy(&mut progress.wrap_read(item.open()?), &mut zip)?;
            }
            zip.finish()?.flush()?;
            tmp.persist(&out)?;
        }
    }
    progress.finish_and_clear();
    Ok(out)
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow::anyhow!("{} has no file name", path.display()))
}

/// Add a file, or a folder with everything under it, at the archive root.
fn add_path(items: &mut Vec<Item>, path: &Path) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let root = file_name(path)?;
    if meta.is_file() {
        items.push(Item {
            source: Source::File(path.to_owned()),
            name: root,
        });
        return Ok(());
    }
    let mut stack = vec![(path.to_owned(), root)];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = format!("{prefix}/{}", entry.file_name().to_string_lossy());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push((entry.path(), name));
            } else if kind.is_file() {
                items.push(Item {
                    source: Source::File(entry.path()),
                    name,
                });
            } else {
                bail!(
                    "{} is neither a file nor a folder (links are not archived)",
                    entry.path().display()
                );
            }
        }
    }
    Ok(())
}
