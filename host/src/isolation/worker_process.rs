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

use super::wire::{FrameReader, Init, ToHost, ToWorker};

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
            std::process::exit(HOST_GONE);
        }
    }
}

/// Run the worker on the socket at [`SOCKET_FD`]; returns the process's exit status.
pub fn run() -> i32 {
    use std::os::fd::FromRawFd;
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

    let cancelled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let seen = cancelled.clone();
    let spawned = std::thread::Builder::new()
        .name("cresset-worker-cancels".into())
        .spawn(move || {
            let mut frames = FrameReader::default();
            while let Ok(Some(frame)) = frames.next(&mut cancels) {
                if let Ok(ToWorker::Cancel(index)) = ToWorker::decode(&frame) {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).insert(index);
                }
            }
            // The host closed its end: it stopped this worker (which then ends on its own, once
            // its call returns) or it died. Either way, no worker outlives it for long, even one
            // stuck in a plugin call.
            std::thread::sleep(ORPHAN_GRACE);
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        eprintln!("cresset worker: cannot start the cancellation thread: {e}");
        return 2;
    }
    while let Some(ToWorker::Execute { explain, requests }) = next_call() {
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
    cancelled: Arc<Mutex<HashSet<u64>>>,
    finals: Vec<u8>,
}

impl WorkerSink {
    fn is_cancelled_now(&self, index: usize) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(index as u64))
    }
}

impl ResponseSink for WorkerSink {
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        if self.is_cancelled_now(index) {
            return false;
        }
        self.finals
            .extend(ToHost::Chunk(index as u64, chunk).encode());
        self.writer.write(&std::mem::take(&mut self.finals));
        true
    }

    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(index as u64));
        self.finals
            .extend(ToHost::Final(index as u64, result.into()).encode());
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
