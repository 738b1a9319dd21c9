//! The worker process (`cresset worker`): loads one plugin instance and serves its host's proxy
//! over the socket it inherits, until the host closes it.
//!
//! Two threads: the main one runs the plugin (`load_model`, `new_instance`, then one
//! `execute`/`explain` call per message); a reader takes the host's messages, queues calls for
//! the main thread and records cancellations at once, so that a plugin that polls
//! `is_cancelled` in the middle of a call sees them. Everything the plugin reports (chunks,
//! final responses, logs, metrics) is written to the socket as it happens.

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RResult, RSlice, RStr};
use cresset_plugin_api::{
    HostHandle, HostServices, KeyValue, LogLevel, MetricKind, PluginError, Response, ResponseSink,
    SinkRef,
};

use super::wire::{read_frame, write_frame, Init, ToHost, ToWorker};

/// The file descriptor the host passes the socket on.
pub const SOCKET_FD: i32 = 3;

/// Exit status when the host's end of the socket failed (the host is gone).
const HOST_GONE: i32 = 3;

/// The socket's writing end, shared by the plugin's threads (logs may come from any).
#[derive(Clone)]
struct Writer(Arc<Mutex<UnixStream>>);

impl Writer {
    fn send(&self, message: &ToHost) {
        let payload = message.encode();
        let mut stream = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if write_frame(&mut *stream, &payload).is_err() {
            // Nobody is listening any more: there is nothing left to serve.
            std::process::exit(HOST_GONE);
        }
    }
}

/// Run the worker on the socket at [`SOCKET_FD`]; returns the process's exit status.
pub fn run() -> i32 {
    use std::os::fd::FromRawFd;
    // Ends this process when the thread that started it (the host's worker thread) ends, so
    // that no worker outlives a host that was killed.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no other effect.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // SAFETY: the host starts this mode with the socket on SOCKET_FD, and nothing else in this
    // process owns that descriptor.
    let stream = unsafe { UnixStream::from_raw_fd(SOCKET_FD) };
    let mut reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(e) => {
            eprintln!("cresset worker: descriptor {SOCKET_FD} is not the host's socket: {e}");
            return 2;
        }
    };
    let writer = Writer(Arc::new(Mutex::new(stream)));
    let init = match read_frame(&mut reader).map(|f| f.map(|f| ToWorker::decode(&f))) {
        Ok(Some(Ok(ToWorker::Init(init)))) => init,
        Ok(None) => return 0,
        other => {
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
    let (calls_tx, calls) = crossbeam_channel::unbounded();
    let seen = cancelled.clone();
    let spawned = std::thread::Builder::new()
        .name("cresset-worker-reader".into())
        .spawn(move || loop {
            let message = match read_frame(&mut reader) {
                Ok(Some(frame)) => ToWorker::decode(&frame),
                // The host closed the socket: stop after the current call.
                Ok(None) | Err(_) => return,
            };
            match message {
                Ok(ToWorker::Cancel(index)) => {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).insert(index);
                }
                Ok(call @ ToWorker::Execute { .. }) => {
                    if calls_tx.send(call).is_err() {
                        return;
                    }
                }
                Ok(ToWorker::Init(_)) | Err(_) => {
                    eprintln!("cresset worker: an unexpected message from the host");
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("cresset worker: cannot start the reader thread: {e}");
        return 2;
    }
    while let Ok(ToWorker::Execute { explain, requests }) = calls.recv() {
        let mut sink = WorkerSink {
            writer: writer.clone(),
            cancelled: cancelled.clone(),
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
        writer.send(&ToHost::Done(outcome.into()));
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

/// The sink of one call: everything goes to the host at once.
struct WorkerSink {
    writer: Writer,
    cancelled: Arc<Mutex<HashSet<u64>>>,
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
        self.writer.send(&ToHost::Chunk(index as u64, chunk));
        true
    }

    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(index as u64));
        self.writer
            .send(&ToHost::Final(index as u64, result.into()));
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
