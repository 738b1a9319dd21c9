//! A persistent cache of unpacked archives: a restart, or a second registration of the same
//! archive, reuses the files instead of unpacking the archive again (most of a large model's
//! cold start).
//!
//! - An entry is named by the SHA-256 of the archive's bytes. Hashing a large archive on every
//!   start would cost much of what the cache saves, so the hash of a file is remembered against
//!   its identity (device, inode, size, modification and change times, as git's index does): a
//!   file that is replaced or written to has a new change time and is hashed again.
//! - An entry is unpacked into a temporary folder, under the same caps as any extraction, with
//!   a listing of every file and its size, then renamed into place: a folder with an entry's
//!   name is complete. On reuse the listing is checked against the folder (each file present,
//!   a regular file of its size); a damaged entry is unpacked afresh.
//! - Unpacked files are read-only (0444): models share them.
//! - While a model uses an entry, its process holds a shared `flock` on the entry's listing.
//!   The cache keeps under its size cap by removing the least recently used entries that no
//!   process holds (an exclusive lock that can be taken); an entry in use is never removed.
//! - Temporary folders left by processes that died are removed when the cache opens.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::extract::{extract, ExtractLimits};
use super::{ArchiveError, ArchiveFormat};
use crate::file_identity::{identity, sha256_file, HashMemo};
use crate::locked_file::try_lock;

/// Where an entry's files are, inside its folder.
const FILES: &str = "files";
/// An entry's listing, inside its folder.
const LISTING: &str = "listing.json";
/// Folders being unpacked.
const UNPACKING_PREFIX: &str = ".unpacking-";
/// Folders being removed.
const EVICTING_PREFIX: &str = ".evicting-";
/// The lock of a folder being unpacked, inside it.
const UNPACKING_LOCK: &str = ".lock";
/// Remembered hashes, one file per archive path.
const HASHES: &str = "hashes";
/// The largest listing read back (a listing of `max_entries` long names is far below this).
const MAX_LISTING_BYTES: u64 = 64 << 20;

/// An entry's listing.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Listing {
    /// The format of this listing (1).
    version: u32,
    /// Every file under `files/`, as a path relative to it and its size in bytes.
    files: Vec<(String, u64)>,
}

impl Listing {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, size)| size).sum()
    }
}

/// The cache, at `root` (`<work_dir>/archive-cache`).
#[derive(Debug)]
pub struct ArchiveCache {
    root: PathBuf,
    max_bytes: u64,
}

/// Unpacked files in use: a cache entry held with a shared lock, or a private folder removed
/// when this value is dropped.
#[derive(Debug)]
pub enum Unpacked {
    /// A cache entry's files.
    Cached {
        /// The folder with the archive's files.
        dir: PathBuf,
        /// The listing, locked shared while the files are in use.
        _lock: File,
    },
    /// A folder of this process alone.
    Private {
        /// The folder with the archive's files.
        dir: PathBuf,
        /// Owns the folder.
        _tmp: tempfile::TempDir,
        /// Held while the folder is in use, when it is in the cache's folder (so that a sweep
        /// by another process leaves it alone).
        _lock: Option<File>,
    },
}

impl Unpacked {
    /// The folder with the archive's files.
    pub fn dir(&self) -> &Path {
        match self {
            Self::Cached { dir, .. } => dir,
            Self::Private { dir, .. } => dir,
        }
    }

    /// Whether the files are a shared cache entry (read-only).
    pub fn is_cached(&self) -> bool {
        matches!(self, Self::Cached { .. })
    }
}

fn flock(file: &File, operation: i32) -> io::Result<()> {
    // SAFETY: flock on a descriptor this `File` owns; it has no memory effects.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_entry_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Every file under `dir`, relative, with its size; folders made traversable and files
/// read-only on the way. Extraction admits only folders and regular files.
fn list_and_seal(dir: &Path) -> io::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let path = entry.path();
            let meta = entry.metadata()?;
            if meta.is_dir() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
                stack.push(path);
            } else if meta.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))?;
                let rel = path
                    .strip_prefix(dir)
                    .map_err(io::Error::other)?
                    .to_str()
                    .ok_or_else(|| io::Error::other("a file name that is not UTF-8"))?
                    .to_owned();
                files.push((rel, meta.len()));
            } else {
                return Err(io::Error::other(format!(
                    "`{}` is neither a file nor a folder",
                    path.display()
                )));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Flush every file and folder under `dir` (and `dir`) to disk.
fn sync_tree(dir: &Path) -> io::Result<()> {
    let mut stack = vec![dir.to_owned()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        File::open(&folder)?.sync_all()?;
    }
    Ok(())
}

/// Remove a folder whose files may be read-only.
fn remove_folder(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

impl ArchiveCache {
    /// The cache at `root`, created if absent (private to this user), with what processes
    /// that died left half-done removed. `max_bytes` caps the unpacked bytes it keeps.
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(root.join(HASHES))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        let cache = Self {
            root: root.to_owned(),
            max_bytes,
        };
        cache.sweep();
        Ok(cache)
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(EVICTING_PREFIX) {
                remove_folder(&path);
            } else if name.starts_with(UNPACKING_PREFIX) {
                // Dead when it is over a minute old and its lock can be taken (or it has none):
                // its maker creates and locks the lock right after the folder, and holds it
                // until the folder is renamed into place or removed.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 60);
                let dead = old
                    && match File::open(path.join(UNPACKING_LOCK)) {
                        Ok(lock) => matches!(try_lock(&lock), Ok(true)),
                        Err(_) => true,
                    };
                if dead {
                    tracing::info!(folder = %path.display(), "removed an archive a process that died was unpacking");
                    remove_folder(&path);
                }
            }
        }
    }

    /// The SHA-256 of `source`'s bytes, remembered against the file's identity.
    pub fn content_hash(&self, source: &Path) -> io::Result<String> {
        let canonical = std::fs::canonicalize(source)?;
        let id = identity(&std::fs::metadata(&canonical)?);
        self.hash_of(&canonical, &id)
    }

    /// The SHA-256 of the file at `canonical`, whose identity was `id` before it is read.
    fn hash_of(&self, canonical: &Path, id: &str) -> io::Result<String> {
        let memo = HashMemo::new(self.root.join(HASHES));
        if let Some(hash) = memo.recall(canonical, id) {
            return Ok(hash);
        }
        let hash = sha256_file(canonical)?;
        memo.remember(canonical, id, &hash)?;
        Ok(hash)
    }

    /// The entry `hash`, locked shared, if it is there and whole. A damaged one is removed
    /// when no process holds it.
    fn reuse(&self, hash: &str) -> io::Result<Option<Unpacked>> {
        let entry = self.root.join(hash);
        let listing_path = entry.join(LISTING);
        let file = match File::options().read(true).write(true).open(&listing_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        flock(&file, libc::LOCK_SH)?;
        // Removal renames the folder away under an exclusive lock: the listing locked must
        // still be the one at the entry's path.
        match std::fs::metadata(&listing_path) {
            Ok(meta) if meta.ino() == file.metadata()?.ino() => {}
            _ => return Ok(None),
        }
        let mut text = String::new();
        // A listing that cannot be read as text is damaged, as one that does not parse.
        let readable = (&file)
            .take(MAX_LISTING_BYTES)
            .read_to_string(&mut text)
            .is_ok();
        let files = entry.join(FILES);
        let whole = readable
            && serde_json::from_str::<Listing>(&text).is_ok_and(|listing| {
                listing.version == 1
                    && listing.files.iter().all(|(rel, size)| {
                        super::is_plain_relative(Path::new(rel))
                            && std::fs::symlink_metadata(files.join(rel))
                                .is_ok_and(|m| m.is_file() && m.len() == *size)
                    })
            });
        if !whole {
            tracing::warn!(entry = %entry.display(), "a cached archive's files do not match their listing; unpacking it again");
            drop(file);
            self.remove_entry(hash);
            return Ok(None);
        }
        // The listing's modification time is the entry's last use.
        let _ = file.set_modified(std::time::SystemTime::now());
        Ok(Some(Unpacked::Cached {
            dir: files,
            _lock: file,
        }))
    }

    /// Remove entry `hash` if no process holds it. Whether it is gone.
    fn remove_entry(&self, hash: &str) -> bool {
        let entry = self.root.join(hash);
        let Ok(file) = File::open(entry.join(LISTING)) else {
            // No listing: not an entry this cache made whole; leave it alone unless it is one
            // of ours (a folder named as an entry always has a listing).
            return !entry.exists();
        };
        if !matches!(try_lock(&file), Ok(true)) {
            return false;
        }
        let Ok(away) = tempfile::Builder::new()
            .prefix(EVICTING_PREFIX)
            .tempdir_in(&self.root)
        else {
            return false;
        };
        let away = away.keep();
        let target = away.join(hash);
        let moved = std::fs::rename(&entry, &target).is_ok();
        drop(file);
        remove_folder(&away);
        moved
    }

    /// The files of `source` (a `.tar.gz` or `.zip` of format `format`): a cache entry, unpacked
    /// now if it is not there yet. `prepare` runs on a fresh unpacking before it is listed
    /// (TorchServe's `model.zip` is unpacked there). When the entry cannot be used (another
    /// process holds a damaged one), the files are unpacked into a folder of this process.
    pub fn unpack(
        &self,
        source: &Path,
        format: ArchiveFormat,
        limits: &ExtractLimits,
        prepare: impl Fn(&Path) -> Result<(), ArchiveError>,
    ) -> Result<Unpacked, ArchiveError> {
        let io = |source: io::Error| ArchiveError::Io {
            path: self.root.clone(),
            source,
        };
        let at_source = |e: io::Error| ArchiveError::Io {
            path: source.to_owned(),
            source: e,
        };
        // One path for hashing and unpacking, and the file's identity before either: an
        // archive that changes in between (rewritten, replaced, a link retargeted) is noticed
        // after unpacking and never cached under the other content's hash.
        let canonical = std::fs::canonicalize(source).map_err(at_source)?;
        let id = identity(&std::fs::metadata(&canonical).map_err(at_source)?);
        let hash = self.hash_of(&canonical, &id).map_err(at_source)?;
        if let Some(found) = self.reuse(&hash).map_err(io)? {
            return Ok(found);
        }
        let tmp = tempfile::Builder::new()
            .prefix(UNPACKING_PREFIX)
            .tempdir_in(&self.root)
            .map_err(io)?;
        let lock = File::create(tmp.path().join(UNPACKING_LOCK)).map_err(io)?;
        flock(&lock, libc::LOCK_EX).map_err(io)?;
        let files = tmp.path().join(FILES);
        std::fs::create_dir(&files).map_err(io)?;
        extract(&canonical, format, &files, limits).map_err(|e| ArchiveError::Extract {
            path: source.to_owned(),
            source: e,
        })?;
        if identity(&std::fs::metadata(&canonical).map_err(at_source)?) != id {
            return Err(at_source(io::Error::other(
                "the archive changed while it was unpacked; register it again",
            )));
        }
        prepare(&files)?;
        let listing = Listing {
            version: 1,
            files: list_and_seal(&files).map_err(io)?,
        };
        let bytes = listing.bytes();
        let text = serde_json::to_vec(&listing).map_err(|e| io(io::Error::other(e)))?;
        std::fs::write(tmp.path().join(LISTING), text).map_err(io)?;
        // On disk before the entry is published: after a power loss an entry is whole or
        // absent (reuse checks sizes only).
        sync_tree(tmp.path()).map_err(io)?;
        let entry = self.root.join(&hash);
        if entry.exists() {
            // A damaged entry that another process holds, or one that another process made
            // whole meanwhile.
            if let Some(found) = self.reuse(&hash).map_err(io)? {
                return Ok(found);
            }
            tracing::warn!(archive = %source.display(), "the cache entry of this archive is in use and damaged; its files are unpacked for this model alone");
            // The folder keeps its lock while the model uses it: a sweep leaves it alone.
            return Ok(Unpacked::Private {
                dir: files,
                _tmp: tmp,
                _lock: Some(lock),
            });
        }
        // Renamed with its lock held (a sweep never sees it unlocked), which then goes.
        let tmp_path = tmp.keep();
        let renamed = std::fs::rename(&tmp_path, &entry);
        if renamed.is_ok() {
            let _ = std::fs::remove_file(entry.join(UNPACKING_LOCK));
        }
        drop(lock);
        if let Err(e) = renamed {
            remove_folder(&tmp_path);
            // Another process made the entry meanwhile.
            return match self.reuse(&hash).map_err(io)? {
                Some(found) => Ok(found),
                None => Err(io(e)),
            };
        }
        tracing::info!(archive = %source.display(), entry = %entry.display(), bytes, "unpacked an archive into the cache");
        let found = self.reuse(&hash).map_err(io)?.ok_or_else(|| {
            io(io::Error::other(
                "the archive's cache entry was removed as it was made",
            ))
        })?;
        self.keep_under_cap(&hash);
        Ok(found)
    }

    /// Remove the least recently used entries that no process holds until the entries fit
    /// the cap (`keep` stays).
    fn keep_under_cap(&self, keep: &str) {
        let Ok(read) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, u64, String)> = Vec::new();
        for entry in read.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_entry_name(&name) {
                continue;
            }
            let listing = entry.path().join(LISTING);
            let Ok(meta) = std::fs::metadata(&listing) else {
                continue;
            };
            let bytes = std::fs::read(&listing)
                .ok()
                .and_then(|text| serde_json::from_slice::<Listing>(&text).ok())
                .map_or(0, |l| l.bytes());
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            entries.push((used, bytes, name));
        }
        let mut total: u64 = entries.iter().map(|(_, bytes, _)| bytes).sum();
        if total <= self.max_bytes {
            return;
        }
        entries.sort();
        let mut removed = Vec::new();
        for (_, bytes, name) in &entries {
            if total <= self.max_bytes {
                break;
            }
            if name != keep && self.remove_entry(name) {
                tracing::info!(entry = %name, bytes, "removed a cached archive to keep the cache under its size");
                total -= bytes;
                removed.push(name.clone());
            }
        }
        // Remembered hashes of removed entries go too.
        if let Ok(memos) = std::fs::read_dir(self.root.join(HASHES)) {
            for memo in memos.filter_map(Result::ok) {
                let gone = std::fs::read_to_string(memo.path()).is_ok_and(|text| {
                    text.lines()
                        .nth(1)
                        .is_some_and(|h| removed.iter().any(|r| r == h))
                });
                if gone {
                    let _ = std::fs::remove_file(memo.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::archive::{create_archive, ArchiveOptions};

    /// A `.tar.gz` archive in `dir` of an echo model with one data file holding `data`.
    fn archive(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let src = dir.join(format!("{name}-src"));
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("weights.bin"), data).expect("write");
        create_archive(&ArchiveOptions {
            model_name: name.into(),
            version: "1.0".into(),
            handler: "echo".into(),
            serialized_file: None,
            extra_files: vec![src.join("weights.bin")],
            config_file: None,
            description: String::new(),
            format: ArchiveFormat::Tgz,
            export_path: dir.to_owned(),
            force: true,
            runtime: None,
        })
        .expect("archive")
    }

    fn unpack(cache: &ArchiveCache, source: &Path) -> Unpacked {
        cache
            .unpack(
                source,
                ArchiveFormat::Tgz,
                &ExtractLimits::default(),
                |_| Ok(()),
            )
            .expect("unpack")
    }

    fn entries(cache: &ArchiveCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.root())
            .expect("read")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_entry_name(n))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_archive_is_unpacked_once_and_reused_by_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ArchiveCache::open(&dir.path().join("cache"), 1 << 30).expect("cache");
        let a = archive(dir.path(), "a", b"weights of a");
        let first = unpack(&cache, &a);
        assert!(first.is_cached());
        let file = first.dir().join("weights.bin");
        assert_eq!(std::fs::read(&file).expect("read"), b"weights of a");
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o444, "cached files are read-only");
        // The same bytes under another path are the same entry; the hash is remembered.
        let copy = dir.path().join("copy.tar.gz");
        std::fs::copy(&a, &copy).expect("copy");
        let second = unpack(&cache, &copy);
        assert_eq!(second.dir(), first.dir());
        assert_eq!(entries(&cache).len(), 1);
        let memo_count = std::fs::read_dir(cache.root().join(HASHES))
            .expect("read")
            .count();
        assert_eq!(memo_count, 2, "one remembered hash per path");
        // A file replaced at the same path is hashed again: a new entry.
        drop((first, second));
        std::fs::remove_file(&copy).expect("rm");
        let b = archive(dir.path(), "b", b"weights of b");
        std::fs::rename(&b, &copy).expect("mv");
        let third = unpack(&cache, &copy);
        assert_eq!(
            std::fs::read(third.dir().join("weights.bin")).expect("read"),
            b"weights of b"
        );
        assert_eq!(entries(&cache).len(), 2);
        // A cache opened again (a restart) finds both, and unpacks nothing.
        drop(third);
        let reopened = ArchiveCache::open(cache.root(), 1 << 30).expect("cache");
        let again = unpack(&reopened, &a);
        assert!(again.is_cached() && again.dir().starts_with(cache.root()));
        assert_eq!(
            std::fs::read(again.dir().join("weights.bin")).expect("read"),
            b"weights of a"
        );
        assert_eq!(entries(&reopened).len(), 2);
    }

    #[test]
    fn a_damaged_entry_is_unpacked_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ArchiveCache::open(&dir.path().join("cache"), 1 << 30).expect("cache");
        let a = archive(dir.path(), "a", &[7u8; 5000]);
        let dir_a = unpack(&cache, &a).dir().to_owned();
        // A truncated file, then a missing one: each is noticed on reuse.
        let file = dir_a.join("weights.bin");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(&file, [7u8; 10]).expect("truncate");
        let again = unpack(&cache, &a);
        assert_eq!(
            std::fs::read(again.dir().join("weights.bin")).expect("read"),
            [7u8; 5000]
        );
        drop(again);
        std::fs::remove_file(dir_a.join("weights.bin")).expect("rm");
        let again = unpack(&cache, &a);
        assert_eq!(
            std::fs::read(again.dir().join("weights.bin")).expect("read"),
            [7u8; 5000]
        );
        // A damaged entry that someone holds is left alone: this model gets a private copy.
        let held = again;
        let held_file = held.dir().join("weights.bin");
        std::fs::set_permissions(&held_file, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        std::fs::write(&held_file, [1u8; 3]).expect("damage");
        let private = unpack(&cache, &a);
        assert!(!private.is_cached());
        assert_eq!(
            std::fs::read(private.dir().join("weights.bin")).expect("read"),
            [7u8; 5000]
        );
        let private_dir = private.dir().to_owned();
        drop(private);
        assert!(!private_dir.exists(), "a private copy goes with its model");
        drop(held);
    }

    #[test]
    fn the_cap_removes_the_least_recently_used_entries_no_one_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Room for two of the three 40 kB entries.
        let cache = ArchiveCache::open(&dir.path().join("cache"), 90_000).expect("cache");
        let archives: Vec<PathBuf> = (0..3u8)
            .map(|i| archive(dir.path(), &format!("m{i}"), &vec![i; 40_000]))
            .collect();
        let held = unpack(&cache, &archives[0]);
        std::thread::sleep(Duration::from_millis(20));
        drop(unpack(&cache, &archives[1]));
        std::thread::sleep(Duration::from_millis(20));
        // The third pushes the cache over its cap: the oldest, m0, is held, so m1 goes.
        drop(unpack(&cache, &archives[2]));
        assert_eq!(entries(&cache).len(), 2);
        assert!(
            held.dir().join("weights.bin").is_file(),
            "an entry in use stays"
        );
        let memos = std::fs::read_dir(cache.root().join(HASHES))
            .expect("read")
            .count();
        assert_eq!(memos, 2, "the removed entry's remembered hash goes with it");
        // Released, m0 is now the least recently used unheld entry.
        drop(held);
        drop(unpack(&cache, &archives[1]));
        let names = entries(&cache);
        assert_eq!(names.len(), 2);
        let m0 = cache.content_hash(&archives[0]).expect("hash");
        assert!(!names.contains(&m0), "{names:?}");
    }

    #[test]
    fn unpacking_left_by_a_dead_process_is_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cache");
        std::fs::create_dir_all(root.join(".unpacking-dead/files")).expect("mkdir");
        File::create(root.join(".unpacking-dead").join(UNPACKING_LOCK)).expect("lock file");
        std::fs::create_dir_all(root.join(".unpacking-live/files")).expect("mkdir");
        let live = File::create(root.join(".unpacking-live").join(UNPACKING_LOCK)).expect("lock");
        flock(&live, libc::LOCK_EX).expect("lock");
        std::fs::create_dir_all(root.join(".unpacking-young/files")).expect("mkdir");
        std::fs::create_dir_all(root.join(".evicting-x/abc")).expect("mkdir");
        // Two minutes old but for the young one (its maker may not have locked it yet).
        let then = std::time::SystemTime::now() - Duration::from_secs(120);
        for name in [".unpacking-dead", ".unpacking-live"] {
            File::open(root.join(name))
                .and_then(|d| d.set_modified(then))
                .expect("age");
        }
        let _cache = ArchiveCache::open(&root, 1 << 30).expect("cache");
        assert!(!root.join(".unpacking-dead").exists());
        assert!(
            root.join(".unpacking-live").exists(),
            "a folder still being unpacked stays"
        );
        assert!(
            root.join(".unpacking-young").exists(),
            "a folder just made stays"
        );
        assert!(!root.join(".evicting-x").exists());
    }
}
