//! Extraction that is safe against hostile archives.
//!
//! Every entry is checked before anything is written: no absolute paths, no `..`, no links
//! (a link could point outside the folder, or let a later entry write through it), no device
//! files. The number of entries and the bytes written are capped while streaming (sizes in
//! headers are not trusted), and so is the ratio of unpacked to packed bytes, which stops
//! decompression bombs early.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use super::ArchiveFormat;

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
    /// Writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
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
        ArchiveFormat::Zip => extract_zip(archive, dest, &mut budget),
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
        let mut out = File::create(path)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ExtractError::Corrupt(e.to_string())),
            };
            self.wrote(n as u64)?;
            out.write_all(&buf[..n])?;
        }
        out.flush()?;
        Ok(())
    }
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

fn extract_tgz(archive: &Path, dest: &Path, budget: &mut Budget) -> Result<(), ExtractError> {
    let file = File::open(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    let entries = tar
        .entries()
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ExtractError::Corrupt(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| ExtractError::Corrupt(e.to_string()))?
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        budget.entry()?;
        let target = safe_target(dest, &raw)?;
        if kind.is_symlink() || kind.is_hard_link() {
            let link = entry
                .link_name()
                .ok()
                .flatten()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            return Err(refuse_link(&raw, &link));
        }
        let Some(target) = target else { continue };
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            budget.copy(&mut entry, &target)?;
        } else {
            return Err(ExtractError::Unsupported {
                entry: raw.to_string_lossy().into_owned(),
                kind: format!("{kind:?}").to_lowercase(),
            });
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
