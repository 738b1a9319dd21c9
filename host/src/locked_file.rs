//! Files that are only valid while their writer lives (an upload arriving, a snapshot being
//! written, a plugin being staged), held under an exclusive `flock` for that time: the kernel
//! drops a dead process's locks, so a lock that can be taken marks a file left by a crash. The
//! start-up sweep (`registry::store`) removes those.

use std::os::fd::AsRawFd;
use std::path::Path;

/// The name prefix of an archive arriving in the store.
pub const INCOMING_PREFIX: &str = ".incoming-";
/// The name prefix of a snapshot being written.
pub const SNAPSHOT_TMP_PREFIX: &str = ".snapshot-";
/// The name prefix of a plugin library being staged.
pub const STAGING_PREFIX: &str = ".staging-";
/// What a `tempfile` with its default prefix is called: older servers wrote uploads, snapshots
/// and staged plugins so, without a lock. Such a file is only taken for debris once it has not
/// been written for [`LEGACY_TMP_AGE`] (`cresset archive` still writes one while it works).
pub const LEGACY_TMP_PREFIX: &str = ".tmp";
/// How old an unlocked `.tmp…` file must be to be removed.
pub const LEGACY_TMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Try to take an exclusive lock on `file` without waiting. `Ok(false)`: someone holds it.
pub fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this `File` owns; it has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A temporary file in `dir` named `<prefix>…`, locked for as long as it lives: a crash leaves
/// it unlocked, and the next start-up removes it.
pub fn locked_temp(dir: &Path, prefix: &str) -> std::io::Result<tempfile::NamedTempFile> {
    let file = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(".tmp")
        .tempfile_in(dir)?;
    if !try_lock(file.as_file())? {
        return Err(std::io::Error::other(
            "a new temporary file is locked: this is a bug",
        ));
    }
    Ok(file)
}
