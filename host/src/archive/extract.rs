//! Extraction that is safe against hostile archives.
//!
//! Every entry is checked before anything is written: no absolute paths, no `..`, no links
//! (a link could point outside the folder, or let a later entry write through it), no device
//! files. The number of entries is capped, and so are the bytes unpacked and their ratio to
//! the packed bytes, which stops decompression bombs early. For a `.tar.gz`, every byte that
//! leaves the decompressor counts (headers, extension records and skipped data included, not
//! only what is written), every gzip member is read, and the tar reader refuses extension
//! headers over [`EXTENSION_LIMIT`] before reading them (see `tar.rs`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use super::tar::{EntryKind, TarError, TarReader};
use super::ArchiveFormat;

/// The most bytes a tar extension header (a GNU long name or link, a set of pax records) may
/// hold: paths are at most 4 KiB on Linux, and pax records for one file are far below this.
pub const EXTENSION_LIMIT: u64 = 64 << 10;

/// Caps on what an archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct ExtractLimits {
    /// The most entries (files and folders).
    pub max_entries: u64,
    /// The most bytes written in all.
    pub max_unpacked_bytes: u64,
    /// The most unpacked bytes per packed byte, checked once `ratio_floor_bytes` are written.
    pub max_ratio: u64,
    /// Below this many unpacked bytes the ratio is not checked (tiny archives compress well).
    pub ratio_floor_bytes: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_unpacked_bytes: 64 << 30,
            max_ratio: 100,
            ratio_floor_bytes: 16 << 20,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// An entry with an absolute path.
    #[error("entry `{0}` has an absolute path")]
    AbsolutePath(String),
    /// An entry whose path climbs out with `..`.
    #[error("entry `{0}` has a `..` component, which would leave the archive folder")]
    ParentDir(String),
    /// A symbolic or hard link.
    #[error("entry `{entry}` is a link to `{target}`{}; archives may not contain links", if *.escapes { ", which leaves the archive folder" } else { "" })]
    Link {
        /// The entry.
        entry: String,
        /// Where it points.
        target: String,
        /// Whether the target is outside the folder.
        escapes: bool,
    },
    /// A device file, FIFO or other special entry.
    #[error("entry `{entry}` is a {kind}, which archives may not contain")]
    Unsupported {
        /// The entry.
        entry: String,
        /// Its kind.
        kind: String,
    },
    /// Too many entries.
    #[error("the archive has more than {limit} entries")]
    TooManyEntries {
        /// The cap.
        limit: u64,
    },
    /// Too many bytes.
    #[error("the archive unpacks to more than {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: u64,
    },
    /// A decompression bomb.
    #[error(
        "the archive unpacks to more than {limit} times its packed size (a decompression bomb?)"
    )]
    Bomb {
        /// The cap on the ratio.
        limit: u64,
    },
    /// The archive is malformed.
    #[error("the archive is corrupt: {0}")]
    Corrupt(String),
    /// A tar extension header over [`EXTENSION_LIMIT`].
    #[error("{0}")]
    Extension(String),
    /// Writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<TarError> for ExtractError {
    fn from(e: TarError) -> Self {
        match e {
            TarError::ExtensionTooLarge { .. } => Self::Extension(e.to_string()),
            TarError::Corrupt(why) => Self::Corrupt(why),
            TarError::Io(e) => budget_error(e),
        }
    }
}

/// An I/O error that carries an [`ExtractError`] from the budget gets it back; others are a
/// corrupt stream (the decompressor) or the disk.
fn budget_error(e: io::Error) -> ExtractError {
    if e.get_ref().is_some_and(|inner| inner.is::<ExtractError>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(extract) = inner.downcast::<ExtractError>() {
                return *extract;
            }
        }
        return ExtractError::Corrupt("the archive could not be read".into());
    }
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            ExtractError::Corrupt(e.to_string())
        }
        _ => ExtractError::Io(e),
    }
}

/// The decompressed stream, counted: each byte read is charged to the budget, and a read past
/// it fails with the budget's error.
struct Counted<'a, R> {
    inner: R,
    budget: &'a mut Budget,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.wrote(n as u64).map_err(io::Error::other)?;
        Ok(n)
    }
}

/// Extract `archive` into the empty folder `dest`.
pub fn extract(
    archive: &Path,
    format: ArchiveFormat,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<(), ExtractError> {
    let packed = std::fs::metadata(archive)?.len().max(1);
    let mut budget = Budget {
        limits: *limits,
        packed,
        written: 0,
        entries: 0,
    };
    match format {
        ArchiveFormat::Tgz => extract_tgz(archive, dest, &mut budget),
        ArchiveFormat::Zip | ArchiveFormat::Mar | ArchiveFormat::MarStore => {
            extract_zip(archive, dest, &mut budget)
        }
        ArchiveFormat::NoArchive => {
            Err(ExtractError::Corrupt("a directory is not extracted".into()))
        }
    }
}

struct Budget {
    limits: ExtractLimits,
    packed: u64,
    written: u64,
    entries: u64,
}

impl Budget {
    fn entry(&mut self) -> Result<(), ExtractError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn wrote(&mut self, n: u64) -> Result<(), ExtractError> {
        self.written += n;
        if self.written > self.limits.max_unpacked_bytes {
            return Err(ExtractError::TooLarge {
                limit: self.limits.max_unpacked_bytes,
            });
        }
        if self.written > self.limits.ratio_floor_bytes
            && self.written / self.packed > self.limits.max_ratio
        {
            return Err(ExtractError::Bomb {
                limit: self.limits.max_ratio,
            });
        }
        Ok(())
    }

    /// Copy `reader` into a new file at `path`, counting every byte against the budget.
    fn copy(&mut self, reader: &mut dyn Read, path: &Path) -> Result<(), ExtractError> {
        copy_file(reader, path, &mut |n| self.wrote(n))
    }
}

/// Copy `reader` into a new file at `path`, calling `count` with each chunk's size first.
fn copy_file(
    reader: &mut dyn Read,
    path: &Path,
    count: &mut dyn FnMut(u64) -> Result<(), ExtractError>,
) -> Result<(), ExtractError> {
    let mut out = File::create(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(budget_error(e)),
        };
        count(n as u64)?;
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    Ok(())
}

/// Check an entry's path and return where it goes under `dest` (None for the root itself).
fn safe_target(dest: &Path, raw: &Path) -> Result<Option<PathBuf>, ExtractError> {
    let shown = raw.to_string_lossy().into_owned();
    let mut rel = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(ExtractError::ParentDir(shown)),
            Component::RootDir | Component::Prefix(_) => {
                return Err(ExtractError::AbsolutePath(shown))
            }
        }
    }
    Ok(if rel.as_os_str().is_empty() {
        None
    } else {
        Some(dest.join(rel))
    })
}

/// Whether a link at `entry` pointing to `target` would resolve outside the folder.
fn link_escapes(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return true;
    }
    let mut depth: i64 = entry
        .parent()
        .map(|p| {
            p.components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .count() as i64
        })
        .unwrap_or(0);
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

fn refuse_link(entry: &Path, target: &Path) -> ExtractError {
    ExtractError::Link {
        entry: entry.to_string_lossy().into_owned(),
        target: target.to_string_lossy().into_owned(),
        escapes: link_escapes(entry, target),
    }
}

/// A tar entry's data, as a reader.
struct EntryData<'r, R>(&'r mut TarReader<R>);

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_data(buf)
    }
}

fn extract_tgz(archive: &Path, dest: &Path, budget: &mut Budget) -> Result<(), ExtractError> {
    let file = File::open(archive)?;
    // Every gzip member: parallel compressors (pigz) and `cat a.gz b.gz` make several.
    let decoder = flate2::read::MultiGzDecoder::new(io::BufReader::new(file));
    let max_entries = budget.limits.max_entries;
    let mut entries = 0u64;
    let mut tar = TarReader::new(
        Counted {
            inner: decoder,
            budget,
        },
        EXTENSION_LIMIT,
    );
    while let Some(entry) = tar.next_entry()? {
        entries += 1;
        if entries > max_entries {
            return Err(ExtractError::TooManyEntries { limit: max_entries });
        }
        let raw = entry.path_buf();
        let target = safe_target(dest, &raw)?;
        match entry.kind {
            EntryKind::Symlink | EntryKind::HardLink => {
                return Err(refuse_link(&raw, &entry.link_buf()));
            }
            EntryKind::Dir => {
                if let Some(target) = target {
                    std::fs::create_dir_all(&target)?;
                }
            }
            EntryKind::File => {
                let Some(target) = target else { continue };
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                // Already counted as it left the decompressor.
                copy_file(&mut EntryData(&mut tar), &target, &mut |_| Ok(()))?;
            }
            EntryKind::Other(_) => {
                return Err(ExtractError::Unsupported {
                    entry: raw.to_string_lossy().into_owned(),
                    kind: entry.kind.describe(),
                });
            }
        }
    }
    Ok(())
}

fn extract_zip(archive: &Path, dest: &Path, budget: &mut Budget) -> Result<(), ExtractError> {
    let file = File::open(archive)?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file))
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
    if zip.len() as u64 > budget.limits.max_entries {
        return Err(ExtractError::TooManyEntries {
            limit: budget.limits.max_entries,
        });
    }
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
        budget.entry()?;
        let raw = PathBuf::from(entry.name());
        // Windows-style absolute paths are absolute too.
        let name = entry.name().to_owned();
        if name.starts_with('\\') || name.get(1..3) == Some(":\\") || name.get(1..3) == Some(":/") {
            return Err(ExtractError::AbsolutePath(name));
        }
        let target = safe_target(dest, &raw)?;
        const S_IFMT: u32 = 0o170000;
        const S_IFLNK: u32 = 0o120000;
        if entry.unix_mode().is_some_and(|m| m & S_IFMT == S_IFLNK) {
            let mut link = String::new();
            let _ = entry.by_ref().take(4096).read_to_string(&mut link);
            return Err(refuse_link(&raw, Path::new(&link)));
        }
        let Some(target) = target else { continue };
        if entry.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            budget.copy(&mut entry, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_judged_relative_to_their_folder() {
        assert!(link_escapes(Path::new("a/link"), Path::new("../../etc")));
        assert!(link_escapes(Path::new("link"), Path::new("/etc/passwd")));
        assert!(!link_escapes(Path::new("a/link"), Path::new("../b")));
    }

    #[test]
    fn paths_are_checked_component_by_component() {
        let dest = Path::new("/d");
        assert!(matches!(
            safe_target(dest, Path::new("/etc/x")),
            Err(ExtractError::AbsolutePath(_))
        ));
        assert!(matches!(
            safe_target(dest, Path::new("a/../../x")),
            Err(ExtractError::ParentDir(_))
        ));
        assert_eq!(
            safe_target(dest, Path::new("./a/b")).ok().flatten(),
            Some(PathBuf::from("/d/a/b"))
        );
        assert_eq!(safe_target(dest, Path::new("./")).ok().flatten(), None);
    }
}
