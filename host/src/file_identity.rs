//! Hashes of large files remembered against the files' identity, so that a restart does not
//! read a multi-hundred-megabyte archive or plugin library again to learn what it already knew.
//!
//! A file's identity is its device, inode, size, modification time and change time (as git's
//! index keeps them). Writing to a file or replacing it changes its change time, which no
//! user can set back, so a remembered hash is used only while the file is provably the one
//! that was hashed. A hash is remembered only when the file's identity after reading it equals
//! its identity before (it did not change while it was read).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A file's identity: what changes when it is replaced or written to.
pub fn identity(meta: &std::fs::Metadata) -> String {
    format!(
        "{} {} {} {}.{} {}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the file at `path`, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Remembered hashes in a folder: one small file per path.
#[derive(Debug, Clone)]
pub struct HashMemo {
    dir: PathBuf,
}

impl HashMemo {
    /// Memos in `dir` (created when the first is written).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn memo_path(&self, canonical: &Path) -> PathBuf {
        self.dir.join(hex(&Sha256::digest(
            canonical.as_os_str().as_encoded_bytes(),
        )))
    }

    /// The hash remembered for the file at `canonical` if its identity is still `id`.
    pub fn recall(&self, canonical: &Path, id: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.memo_path(canonical)).ok()?;
        let (remembered, hash) = text.trim_end().split_once('\n')?;
        let well_formed = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        (remembered == id && well_formed).then(|| hash.to_owned())
    }

    /// Remember `hash` for the file at `canonical` with identity `id`, if the file still has
    /// that identity.
    pub fn remember(&self, canonical: &Path, id: &str, hash: &str) -> std::io::Result<()> {
        if identity(&std::fs::metadata(canonical)?) != id {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        writeln!(tmp, "{id}\n{hash}")?;
        tmp.persist(self.memo_path(canonical))
            .map_err(|e| e.error)?;
        Ok(())
    }
}
