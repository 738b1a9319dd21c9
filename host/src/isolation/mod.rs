//! Process isolation (`isolation = "process"` in `model-config.toml`): each instance of a model
//! runs in a worker process of its own (the same `cresset` binary, in `worker` mode), so that a
//! crash in native code (an abort, a segfault, an out-of-memory kill) costs that worker's
//! requests and nothing else.
//!
//! - [`wire`]: the frames the host and a worker exchange over their Unix socket.
//! - [`worker_process`]: the worker's side (`cresset worker`).
//! - [`probe`]: a worker that only opens a library, for its description.
//! - [`proxy`]: the host's side, a model and instances that implement the plugin contract, so
//!   that the registry and the worker threads drive them as they drive an in-process plugin.

pub mod probe;
pub mod proxy;
pub mod wire;
pub mod worker_process;

/// The resident memory of process `pid` (this process for `None`), in bytes, where `/proc`
/// tells it.
pub fn resident_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/statm"),
        None => "/proc/self/statm".to_owned(),
    };
    let statm = std::fs::read_to_string(path).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}
