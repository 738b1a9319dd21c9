//! The worker process (`cresset worker`): loads one plugin instance and serves its host's proxy
//! over the socket it inherits, until the host closes it.
//!
//! Two sockets: calls and everything the worker reports on [`SOCKET_FD`], cancellations on
//! [`CANCEL_FD`]. The main thread reads its calls straight from the first and runs the plugin
//! (`load_model`, `new_instance`, then one `execute`/`explain` per call), so that a call costs
//! one wake-up on each side; a second thread records cancellations as they come, so that a
//! plugin that polls `is_cancelled` in the middle of a call sees them. Everything the plugin
//! reports (chunks, final responses, logs, metrics) is written to the socket as it happens.

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RResult, RSlice, RStr};
use cresset_plugin_api::{
    HostHandle, HostServices, KeyValue, LogLevel, MetricKind, PluginError, Response, ResponseSink,
    SinkRef,
};

use super::wire::{FrameReader, Init, ToHost, ToWorker, CONTINUOUS, MAX_FRAME};

/// The file descriptor the host passes the calls socket on.
pub const SOCKET_FD: i32 = 3;
/// The file descriptor the host passes the cancellations socket on.
pub const CANCEL_FD: i32 = 4;

/// How long a worker whose host closed its sockets may take to finish before it exits.
const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Exit status when the host's end of the socket failed (the host is gone).
const HOST_GONE: i32 = 3;

/// The socket's writing end, shared by the plugin's threads (logs may come from any).
#[derive(Clone)]
struct Writer(Arc<Mutex<UnixStream>>);

impl Writer {
    fn send(&self, message: &ToHost) {
        self.write(&message.encode());
    }

    /// Write whole frames in one call.
    fn write(&self, frames: &[u8]) {
        use std::io::Write;
        let mut stream = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if stream.write_all(frames).is_err() {
            // Nobody is listening any more: there is nothing left to serve.
            leave(HOST_GONE);
        }
    }
}

/// End this process now, from any thread: no exit handlers or static destructors (libtorch's,
/// CUDA's) run under a plugin call that may still be going on another thread.
fn leave(status: i32) -> ! {
    // SAFETY: _exit ends the process; nothing is left to observe a broken invariant.
    unsafe { libc::_exit(status) }
}

/// The cancelled requests, by call key and number (see [`ToWorker::Execute`]).
#[derive(Default)]
struct Cancelled {
    /// The running call's key.
    key: u64,
    set: HashSet<(u64, u64)>,
}

impl Cancelled {
    /// A new call: cancellations of earlier batches no longer apply (their numbers are
    /// reused); those of continuous batching stay while their requests are open.
    fn begin(&mut self, key: u64) {
        self.key = key;
        self.set.retain(|(k, _)| *k == CONTINUOUS || *k >= key);
    }

    fn contains(&self, index: usize) -> bool {
        self.set.contains(&(self.key, index as u64))
    }

    fn finish(&mut self, index: usize) {
        self.set.remove(&(self.key, index as u64));
    }
}

/// Run the worker on the socket at [`SOCKET_FD`]; returns the process's exit status.
pub fn run() -> i32 {
    use std::os::fd::FromRawFd;
    // Not inherited by what a plugin starts (a forked helper holding the calls socket would
    // hide this worker's death from the host).
    for fd in [SOCKET_FD, CANCEL_FD] {
        // SAFETY: fcntl on descriptors this process was started with.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    // SAFETY: the host starts this mode with its sockets on SOCKET_FD and CANCEL_FD, and
    // nothing else in this process owns those descriptors.
    let (stream, mut cancels) = unsafe {
        (
            UnixStream::from_raw_fd(SOCKET_FD),
            UnixStream::from_raw_fd(CANCEL_FD),
        )
    };
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(e) => {
            eprintln!("cresset worker: descriptor {SOCKET_FD} is not the host's socket: {e}");
            return 2;
        }
    };
    let mut frames = FrameReader::default();
    let mut next_call = move || -> Option<ToWorker> {
        match frames.next(&mut reader) {
            Ok(Some(frame)) => match ToWorker::decode(&frame) {
                Ok(message) => Some(message),
                Err(e) => {
                    eprintln!("cresset worker: {e}");
                    None
                }
            },
            // The host closed the socket (or it failed): nothing more to serve.
            _ => None,
        }
    };
    let writer = Writer(Arc::new(Mutex::new(stream)));
    let init = match next_call() {
        Some(ToWorker::Init(init)) => init,
        None => return 0,
        Some(other) => {
            eprintln!("cresset worker: expected the host's init message, got {other:?}");
            return 2;
        }
    };
    let services = WorkerServices {
        writer: writer.clone(),
        log_level: init.log_level,
    };
    let (model, mut instance) = match load(&init, services) {
        Ok(loaded) => loaded,
        Err(error) => {
            writer.send(&ToHost::InitFailed(error));
            return 0;
        }
    };
    writer.send(&ToHost::Ready(model.metadata_json().into()));

    let cancelled: Arc<Mutex<Cancelled>> = Arc::default();
    let seen = cancelled.clone();
    let spawned = std::thread::Builder::new()
        .name("cresset-worker-cancels".into())
        .spawn(move || {
            let mut frames = FrameReader::default();
            while let Ok(Some(frame)) = frames.next(&mut cancels) {
                if let Ok(ToWorker::Cancel { key, index }) = ToWorker::decode(&frame) {
                    let mut cancelled = seen.lock().unwrap_or_else(|p| p.into_inner());
                    // A late one for a batch that already ended is dropped.
                    if key == CONTINUOUS || key >= cancelled.key {
                        cancelled.set.insert((key, index));
                    }
                }
            }
            // The host closed its end: it stopped this worker (which then ends on its own, once
            // its call returns) or it died. Either way, no worker outlives it for long, even one
            // stuck in a plugin call.
            std::thread::sleep(ORPHAN_GRACE);
            leave(0);
        });
    if let Err(e) = spawned {
        eprintln!("cresset worker: cannot start the cancellation thread: {e}");
        return 2;
    }
    while let Some(ToWorker::Execute {
        explain,
        key,
        requests,
    }) = next_call()
    {
        cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .begin(key);
        let mut sink = WorkerSink {
            writer: writer.clone(),
            cancelled: cancelled.clone(),
            finals: Vec::new(),
        };
        let outcome = {
            let sink_ref: SinkRef<'_> = SinkRef::from_ptr(&mut sink, TD_Opaque);
            let requests = RSlice::from_slice(&requests);
            if explain {
                instance.explain(requests, sink_ref)
            } else {
                instance.execute(requests, sink_ref)
            }
        };
        // The call's last final responses and its end in one write: the host answers them
        // with one wake-up.
        let mut frames = std::mem::take(&mut sink.finals);
        frames.extend(ToHost::Done(outcome.into()).encode());
        writer.write(&frames);
    }
    // Finalisation in the plugin's order: the instance, then the model.
    drop(instance);
    drop(model);
    0
}

/// `load_model` and `new_instance`, in this process.
fn load(
    init: &Init,
    services: WorkerServices,
) -> Result<
    (
        cresset_plugin_api::ModelBox,
        cresset_plugin_api::InstanceBox,
    ),
    PluginError,
> {
    let module = crate::loader::open_staged(std::path::Path::new(&init.library))
        .map_err(|e| PluginError::internal(e.to_string()))?;
    let host = HostHandle::from_ptr(RArc::new(services), TD_Opaque);
    let model = match (module.load_model())(&init.spec, host) {
        RResult::ROk(model) => model,
        RResult::RErr(e) => return Err(e),
    };
    let instance = match model.new_instance(&init.assignment) {
        RResult::ROk(instance) => instance,
        RResult::RErr(e) => return Err(e),
    };
    Ok((model, instance))
}

/// The sink of one call. Chunks go to the host at once; final responses go with the next
/// chunk or with the call's end (plugins send them at the end of a batch or of a step, and one
/// write for them all and the end saves the host a wake-up per call).
struct WorkerSink {
    writer: Writer,
    cancelled: Arc<Mutex<Cancelled>>,
    finals: Vec<u8>,
}

impl WorkerSink {
    fn is_cancelled_now(&self, index: usize) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(index)
    }
}

/// A message's frame, or, past the frame limit, the frame of an error in its place (a chunk
/// becomes the request's failure), so that an answer too large fails its request, not the
/// worker.
fn bounded(index: usize, message: ToHost) -> Vec<u8> {
    let frame = message.encode();
    if (frame.len() as u64) <= MAX_FRAME + 8 {
        return frame;
    }
    ToHost::Final(
        index as u64,
        Err(PluginError::internal(format!(
            "the answer is {} bytes, over the {MAX_FRAME} a worker process may send",
            frame.len()
        ))),
    )
    .encode()
}

impl ResponseSink for WorkerSink {
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        if self.is_cancelled_now(index) {
            return false;
        }
        self.finals
            .extend(bounded(index, ToHost::Chunk(index as u64, chunk)));
        self.writer.write(&std::mem::take(&mut self.finals));
        true
    }

    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish(index);
        self.finals
            .extend(bounded(index, ToHost::Final(index as u64, result.into())));
    }

    fn is_cancelled(&self, index: usize) -> bool {
        self.is_cancelled_now(index)
    }
}

/// The host services a plugin gets in a worker process: logs and metrics cross to the host,
/// which records them as it records an in-process plugin's.
#[derive(Clone)]
struct WorkerServices {
    writer: Writer,
    log_level: u8,
}

fn pairs(items: RSlice<'_, KeyValue>) -> Vec<KeyValue> {
    items.iter().cloned().collect()
}

impl HostServices for WorkerServices {
    fn log_enabled(&self, level: LogLevel) -> bool {
        level.0 >= self.log_level
    }

    fn log(
        &self,
        level: LogLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RSlice<'_, KeyValue>,
    ) {
        if !self.log_enabled(level) {
            return;
        }
        self.writer.send(&ToHost::Log {
            level: level.0,
            target: target.to_string(),
            message: message.to_string(),
            fields: pairs(fields),
        });
    }

    fn metric(
        &self,
        kind: MetricKind,
        name: RStr<'_>,
        help: RStr<'_>,
        labels: RSlice<'_, KeyValue>,
        value: f64,
    ) {
        self.writer.send(&ToHost::Metric {
            kind: kind.0,
            name: name.to_string(),
            help: help.to_string(),
            labels: pairs(labels),
            value,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batchs_cancellations_end_with_it_and_continuous_ones_stay() {
        let mut c = Cancelled::default();
        c.begin(5);
        c.set.insert((5, 0));
        c.set.insert((CONTINUOUS, 7));
        assert!(c.contains(0));
        // The next batch numbers its requests from 0 again: request 0 is someone else now.
        c.begin(6);
        assert!(!c.contains(0));
        // A late cancellation of batch 5 arrives after batch 6 began: dropped by the reader
        // (its key is older), and gone at the next begin in any case.
        c.set.insert((5, 1));
        c.begin(7);
        assert!(!c.set.contains(&(5, 1)));
        // Continuous batching numbers across calls: its cancellations stay until finished.
        c.begin(CONTINUOUS);
        assert!(c.contains(7));
        c.finish(7);
        assert!(!c.contains(7));
    }
}
