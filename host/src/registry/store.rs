//! The model store and the work folder on disk: archives arriving (uploads and downloads, kept
//! under their hash), archives forgotten when nothing uses them, and the debris a killed
//! process leaves (half-written files, scratch folders).
//!
//! Every file or folder that is only valid while its writer lives is held under an exclusive
//! `flock` for that time. A start-up sweep removes those whose lock it can take: their writer is
//! gone (the kernel drops a dead process's locks), so a sweep never touches the work of another
//! live server that shares the store.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::locked_file::{
    locked_temp, try_lock, INCOMING_PREFIX, LEGACY_TMP_AGE, LEGACY_TMP_PREFIX, SNAPSHOT_TMP_PREFIX,
    STAGING_PREFIX,
};

/// The prefix of a server process's scratch folder in the work folder.
const SCRATCH_PREFIX: &str = "run-";
/// The lock file inside a scratch folder.
const SCRATCH_LOCK: &str = ".lock";
/// Prefixes of the archives the server itself keeps in the store (uploads and downloads).
const KEPT_PREFIXES: [&str; 2] = ["upload-", "download-"];

/// This process's scratch folder in the work folder (`run-…`), locked while it lives and
/// removed when it is dropped.
pub struct ScratchDir {
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

impl ScratchDir {
    /// Create it in `work_dir`.
    pub fn create(work_dir: &Path) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in(work_dir)?;
        let lock = std::fs::File::create(dir.path().join(SCRATCH_LOCK))?;
        if !try_lock(&lock)? {
            return Err(std::io::Error::other(
                "a new scratch folder is locked: this is a bug",
            ));
        }
        Ok(Self { dir, _lock: lock })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Half-written files.
    pub files: usize,
    /// Scratch folders of processes that are gone.
    pub folders: usize,
    /// Bytes freed.
    pub bytes: u64,
}

/// Whether a file of this name is a temporary file of ours (and, for an older server's, old
/// enough to be debris).
fn is_temp(name: &str, meta: &std::fs::Metadata) -> bool {
    if [INCOMING_PREFIX, SNAPSHOT_TMP_PREFIX, STAGING_PREFIX]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return true;
    }
    name.starts_with(LEGACY_TMP_PREFIX)
        && meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > LEGACY_TMP_AGE)
}

fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Remove, from each of `dirs`, temporary files nobody holds (an upload, download, snapshot or
/// staged plugin cut short by a crash).
pub fn sweep_temp_files(dirs: &[&Path], swept: &mut Swept) {
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() || !is_temp(&name, &meta) {
                continue;
            }
            let path = entry.path();
            let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else {
                continue;
            };
            if !matches!(try_lock(&file), Ok(true)) {
                continue; // a live writer holds it
            }
            let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), bytes, "removed a temporary file left by a process that died");
                swept.files += 1;
                swept.bytes += bytes;
            }
        }
    }
}

/// Remove the scratch folders (`run-…`) in `work_dir` of processes that are gone.
pub fn sweep_scratch(work_dir: &Path, swept: &mut Swept) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !name.starts_with(SCRATCH_PREFIX) {
            continue;
        }
        let path = entry.path();
        // A folder without its lock file was made by an older server, or is being created right
        // now: only a folder whose lock can be taken is known to be dead.
        let Ok(lock) = std::fs::File::open(path.join(SCRATCH_LOCK)) else {
            continue;
        };
        if !matches!(try_lock(&lock), Ok(true)) {
            continue;
        }
        let bytes = folder_bytes(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            tracing::info!(folder = %path.display(), bytes, "removed the scratch folder of a process that died");
            swept.folders += 1;
            swept.bytes += bytes;
        }
    }
}

/// Whether `archive_file` (as a registration records it) is an archive the server itself keeps
/// in the store: an upload or a download, named by its hash.
pub fn is_kept_archive(archive_file: &str) -> bool {
    KEPT_PREFIXES.iter().any(|p| archive_file.starts_with(p))
        && !archive_file.contains('/')
        && !archive_file.starts_with('.')
}

/// Delete a kept archive (an upload or a download) from the store. Archives the operator put in
/// the store are never deleted.
pub fn forget_kept_archive(store: &Path, archive_file: &str) {
    if !is_kept_archive(archive_file) {
        return;
    }
    let path = store.join(archive_file);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(archive = %archive_file, "removed an archive nothing uses any more")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(archive = %archive_file, "cannot remove an unused archive: {e}"),
    }
}

/// An archive format from its first bytes.
fn sniff_extension(head: &[u8]) -> Option<&'static str> {
    match head {
        [0x1f, 0x8b, ..] => Some("tar.gz"),
        [b'P', b'K', 3, 4, ..] => Some("zip"),
        _ => None,
    }
}

/// Why an incoming archive was not kept.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// Over the size cap.
    #[error("the archive is larger than {0} bytes")]
    TooLarge(u64),
    /// Nothing arrived.
    #[error("the archive is empty")]
    Empty,
    /// Neither a gzip nor a zip.
    #[error("the archive must be a .tar.gz or a .zip (a TorchServe .mar is one; checked by its first bytes)")]
    UnknownFormat,
    /// The store could not be written.
    #[error("cannot write to the model store: {0}")]
    Io(#[from] std::io::Error),
}

/// An archive arriving into the model store: written to a locked temporary file as it comes
/// (never whole in memory), hashed on the way, capped at `max` bytes.
pub struct Incoming {
    file: tempfile::NamedTempFile,
    hasher: sha2::Sha256,
    head: Vec<u8>,
    len: u64,
    max: u64,
}

impl Incoming {
    /// Start receiving into `store`.
    pub fn new(store: &Path, max: u64) -> Result<Self, IncomingError> {
        Ok(Self {
            file: locked_temp(store, INCOMING_PREFIX)?,
            hasher: sha2::Sha256::new(),
            head: Vec::new(),
            len: 0,
            max,
        })
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append a chunk.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), IncomingError> {
        self.len += chunk.len() as u64;
        if self.len > self.max {
            return Err(IncomingError::TooLarge(self.max));
        }
        if self.head.len() < 8 {
            self.head.extend(chunk.iter().take(8 - self.head.len()));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk)?;
        Ok(())
    }

    /// Keep the archive in the store under a name made from its hash (the same archive twice is
    /// one file), atomically. Returns its path and whether it was already there.
    pub fn keep(self, store: &Path, prefix: &str) -> Result<(PathBuf, bool), IncomingError> {
        if self.len == 0 {
            return Err(IncomingError::Empty);
        }
        let ext = sniff_extension(&self.head).ok_or(IncomingError::UnknownFormat)?;
        let hash: String = self
            .hasher
            .finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = store.join(format!("{prefix}-{hash}.{ext}"));
        if path.is_file() {
            return Ok((path, true));
        }
        self.file.as_file().sync_all()?;
        self.file.persist(&path).map_err(|e| e.error)?;
        Ok((path, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_removes_unlocked_temp_files_and_dead_scratch_folders_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = root.path();
        // Debris of a dead writer: an unlocked temp file, and an older server's `.tmp` file
        // from long ago; a recent `.tmp` file may be `cresset archive` at work, and stays.
        std::fs::write(store.join(".incoming-dead.tmp"), vec![0u8; 1000]).expect("write");
        let old = std::fs::File::create(store.join(".tmpAbC123")).expect("create");
        old.set_len(1).expect("write");
        old.set_modified(std::time::SystemTime::now() - 2 * LEGACY_TMP_AGE)
            .expect("mtime");
        std::fs::write(store.join(".tmpRecent"), b"x").expect("write");
        // A live upload holds its lock.
        let mut live = Incoming::new(store, 1 << 20).expect("incoming");
        live.push(b"\x1f\x8b live").expect("push");
        // Files that are not temporary stay.
        std::fs::write(store.join("model.tar.gz"), b"keep").expect("write");
        // Scratch folders: one of a dead process (its lock file unlocked), one live.
        let dead = store.join("run-dead");
        std::fs::create_dir_all(dead.join("models")).expect("mkdir");
        std::fs::write(dead.join(SCRATCH_LOCK), b"").expect("lock file");
        std::fs::write(dead.join("models/weights"), vec![0u8; 4096]).expect("weights");
        let scratch = ScratchDir::create(store).expect("scratch");

        let mut swept = Swept::default();
        sweep_temp_files(&[store], &mut swept);
        sweep_scratch(store, &mut swept);
        assert_eq!((swept.files, swept.folders), (2, 1), "{swept:?}");
        assert_eq!(swept.bytes, 1000 + 1 + 4096);
        assert!(!store.join(".incoming-dead.tmp").exists());
        assert!(store.join(".tmpRecent").exists());
        assert!(!dead.exists());
        assert!(scratch.path().is_dir(), "the live scratch folder stays");
        assert!(store.join("model.tar.gz").exists());
        let (kept, existed) = live
            .keep(store, "upload")
            .expect("the live upload completes");
        assert!(!existed);
        assert!(kept.is_file());
    }

    #[test]
    fn only_archives_the_server_kept_are_ever_forgotten() {
        let store = tempfile::tempdir().expect("tempdir");
        std::fs::write(store.path().join("upload-ab12.tar.gz"), b"x").expect("write");
        std::fs::write(store.path().join("resnet.tar.gz"), b"x").expect("write");
        forget_kept_archive(store.path(), "upload-ab12.tar.gz");
        forget_kept_archive(store.path(), "resnet.tar.gz");
        forget_kept_archive(store.path(), "../upload-x.tar.gz");
        assert!(!store.path().join("upload-ab12.tar.gz").exists());
        assert!(store.path().join("resnet.tar.gz").exists());
    }

    #[test]
    fn incoming_archives_are_capped_and_sniffed() {
        let store = tempfile::tempdir().expect("tempdir");
        let mut small = Incoming::new(store.path(), 4).expect("incoming");
        assert!(matches!(
            small.push(b"12345"),
            Err(IncomingError::TooLarge(4))
        ));
        let mut text = Incoming::new(store.path(), 100).expect("incoming");
        text.push(b"hello").expect("push");
        assert!(matches!(
            text.keep(store.path(), "upload"),
            Err(IncomingError::UnknownFormat)
        ));
    }
}
