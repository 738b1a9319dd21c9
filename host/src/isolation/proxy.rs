//! The host's side of process isolation: a model whose instances are worker processes.
//!
//! [`ProcessModel`] and [`ProcessInstance`] implement the plugin contract, so the registry,
//! the worker threads, batching, hot swap and drain drive them exactly as they drive an
//! in-process plugin. Each instance owns one worker process (`cresset worker`) and speaks to it
//! over a Unix socket ([`super::wire`]), reading the worker's messages itself (a call costs one
//! wake-up each way), and records the plugin's logs and metrics as they come. Cancellations go
//! on a second socket, which the worker reads while the plugin runs.
//!
//! A worker process that dies costs the requests of the call it was running (a 500 naming the
//! signal or exit status). A new one starts at once after a first death, then after a back-off
//! that doubles (0.5 s, 1 s, ... at most 10 s), which the next call waits out. A process that
//! cannot be restarted fails the call with a 503. `max_crashes` deaths within
//! `crash_window_s` turn the version `Failed`, and a first load gives up after as many tries.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use cresset_plugin_api::{
    ErrorCode, HostHandle, InstanceAssignment, InstanceBox, LogLevel, MetricKind, ModelSpec,
    PluginError, PluginInstance, PluginModel, Request, SinkRef,
};
use std::io::Write;

use super::wire::{self, FrameReader, Init, ToHost, ToWorker, WireError};
use super::worker_process::{CANCEL_FD, SOCKET_FD};
use crate::metrics::Metrics;

/// How often a call checks whether the clients of its open requests went away.
const CANCEL_POLL: Duration = Duration::from_millis(20);
/// How long a worker process that was asked to stop may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest back-off between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What a version's worker processes share.
pub struct ProcessSettings {
    /// The `cresset` binary (started as `cresset worker`).
    pub exe: PathBuf,
    /// The plugin library's staged copy.
    pub library: PathBuf,
    /// The model, as `load_model` takes it.
    pub spec: ModelSpec,
    /// The plugin does continuous batching (request indices count across calls).
    pub continuous: bool,
    /// Deaths within `crash_window` that fail the version.
    pub max_crashes: u32,
    /// The window over which deaths are counted.
    pub crash_window: Duration,
    /// For the restart counter.
    pub metrics: Arc<Metrics>,
    /// Where the plugins' logs and metrics go (the version's host services).
    pub services: HostHandle,
}

/// A worker process, as describe and metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerProcess {
    /// Its process id, while it runs.
    pub pid: Option<u32>,
    /// How many times this worker's process died and was started again.
    pub restarts: u32,
    /// How the last one ended.
    pub last_exit: Option<String>,
}

/// Called once when the version gives up on its workers (the reason).
pub type OnFail = Box<dyn Fn(String) + Send + Sync>;

/// The state every worker process of one version shares.
pub struct ProcessShared {
    settings: ProcessSettings,
    crashes: Mutex<VecDeque<Instant>>,
    failure: Mutex<Option<String>>,
    on_fail: OnFail,
    processes: Mutex<BTreeMap<u32, WorkerProcess>>,
    metadata: Mutex<String>,
}

enum Verdict {
    Restart(Duration),
    GiveUp(String),
}

impl ProcessShared {
    /// Shared state for a version's workers; `on_fail` runs if they crash too often.
    pub fn new(settings: ProcessSettings, on_fail: OnFail) -> Arc<Self> {
        Arc::new(Self {
            settings,
            crashes: Mutex::default(),
            failure: Mutex::default(),
            on_fail,
            processes: Mutex::default(),
            metadata: Mutex::new("{}".into()),
        })
    }

    /// The workers' processes, by worker index.
    pub fn processes(&self) -> BTreeMap<u32, WorkerProcess> {
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, index: u32, f: impl FnOnce(&mut WorkerProcess)) {
        let mut table = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        f(table.entry(index).or_default());
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Count a death; say when to restart, or that the version gives up.
    fn record_crash(&self, what: &str) -> Verdict {
        let settings = &self.settings;
        let now = Instant::now();
        let count = {
            let mut crashes = self.crashes.lock().unwrap_or_else(|p| p.into_inner());
            while crashes
                .front()
                .is_some_and(|t| now.duration_since(*t) > settings.crash_window)
            {
                crashes.pop_front();
            }
            crashes.push_back(now);
            crashes.len() as u32
        };
        if count >= settings.max_crashes {
            let reason = format!(
                "its worker processes died {count} times within {} s (`max_crashes` = {}); the last {what}",
                settings.crash_window.as_secs(),
                settings.max_crashes
            );
            let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if failure.is_none() {
                *failure = Some(reason.clone());
                drop(failure);
                (self.on_fail)(reason.clone());
            }
            return Verdict::GiveUp(reason);
        }
        settings
            .metrics
            .worker_restarts
            .with_label_values(&[&settings.spec.name, &settings.spec.version])
            .inc();
        // At once after a first death; then 0.5 s, doubling, at most MAX_BACKOFF.
        let backoff = match count {
            0 | 1 => Duration::ZERO,
            n => (Duration::from_millis(500) * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
        };
        Verdict::Restart(backoff)
    }

    /// The most verbose level the host records from plugins (5: none).
    fn log_level(&self) -> u8 {
        (0..5)
            .find(|l| self.settings.services.log_enabled(LogLevel(*l)))
            .unwrap_or(5)
    }
}

/// A model whose instances are worker processes.
pub struct ProcessModel(pub Arc<ProcessShared>);

impl PluginModel for ProcessModel {
    fn new_instance(&self, assignment: &InstanceAssignment) -> RResult<InstanceBox, PluginError> {
        match ProcessInstance::start(self.0.clone(), assignment.clone()) {
            Ok(instance) => RResult::ROk(InstanceBox::from_value(instance, TD_Opaque)),
            Err(e) => RResult::RErr(e),
        }
    }

    fn metadata_json(&self) -> RString {
        self.0
            .metadata
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_str()
            .into()
    }
}

/// What a read from a worker process gives.
enum Event {
    Message(ToHost),
    /// Nothing within [`CANCEL_POLL`].
    Quiet,
    /// The socket closed, or carried something that is not a message (the reason).
    Closed(Option<String>),
}

/// One running worker process.
struct Child {
    process: std::process::Child,
    socket: UnixStream,
    /// The same socket, read with a timeout of [`CANCEL_POLL`].
    reader: UnixStream,
    frames: FrameReader,
    /// Where cancellations go.
    cancels: UnixStream,
    ready: bool,
    /// The host's index of the worker's request 0 (continuous batching: the worker numbers
    /// its requests from 0, the host's worker thread across every process it has had); set
    /// when its first requests go to it.
    base: Option<usize>,
}

impl Child {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.socket.write_all(frame)
    }

    fn cancel(&mut self, key: u64, index: u64) {
        // A worker that is gone shows on the calls socket.
        let _ = self
            .cancels
            .write_all(&ToWorker::Cancel { key, index }.encode());
    }

    /// The next message; a log record or metric is recorded and counts as quiet (so that a
    /// chatty plugin does not hold off the cancellation poll). A process that has ended is
    /// closed even if something it started still holds its socket open.
    fn next(&mut self, services: &HostHandle) -> Event {
        let message = match self.frames.next(&mut self.reader) {
            Ok(Some(frame)) => ToHost::decode(&frame),
            Ok(None) => {
                return match self.process.try_wait() {
                    Ok(Some(_)) => Event::Closed(None),
                    _ => Event::Quiet,
                }
            }
            Err(WireError::Closed) => return Event::Closed(None),
            Err(e) => return Event::Closed(Some(e.to_string())),
        };
        match message {
            Ok(ToHost::Log {
                level,
                target,
                message,
                fields,
            }) => {
                services.log(
                    LogLevel(level),
                    RStr::from(target.as_str()),
                    RStr::from(message.as_str()),
                    RSlice::from_slice(&fields),
                );
                Event::Quiet
            }
            Ok(ToHost::Metric {
                kind,
                name,
                help,
                labels,
                value,
            }) => {
                services.metric(
                    MetricKind(kind),
                    RStr::from(name.as_str()),
                    RStr::from(help.as_str()),
                    RSlice::from_slice(&labels),
                    value,
                );
                Event::Quiet
            }
            Ok(other) => Event::Message(other),
            // A worker that writes garbage is treated as dead; its instance kills it.
            Err(e) => Event::Closed(Some(e.to_string())),
        }
    }

    /// Wait (a bounded time) for the process to end after its socket closed; kill it if it
    /// does not. How it ended, in words.
    fn reap(mut self, why: Option<String>) -> String {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let status = wait_for_exit(&mut self.process, Duration::from_secs(2));
        let mut what = match status {
            Some(status) => describe_exit(status),
            None => {
                let _ = self.process.kill();
                let _ = self.process.wait();
                "stopped answering and was killed".to_owned()
            }
        };
        if let Some(why) = why {
            what = format!("{what} ({why})");
        }
        what
    }
}

fn wait_for_exit(process: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match process.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

/// "was killed by signal 11 (SIGSEGV)", "exited with status 1".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        let name = match signal {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGKILL => "SIGKILL",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            _ => "another signal",
        };
        format!("was killed by signal {signal} ({name})")
    } else {
        format!("exited with status {}", status.code().unwrap_or(-1))
    }
}

/// Why a worker process did not become ready.
enum NotReady {
    /// The plugin refused (its error): trying again would not help.
    Refused(PluginError),
    /// The process died (how).
    Died(String),
}

/// An instance that runs in a worker process.
pub struct ProcessInstance {
    shared: Arc<ProcessShared>,
    assignment: InstanceAssignment,
    child: Option<Child>,
    /// After a death under back-off: no new process before this.
    restart_at: Option<Instant>,
    /// Continuous batching: the host's index for the next request, the open ones, and those
    /// whose cancellation the worker was told of.
    next_index: usize,
    open: BTreeSet<usize>,
    told: HashSet<usize>,
    /// Calls so far: a batch's key for its cancellations.
    calls: u64,
    /// The process this instance started last (its entry in the shared table).
    pid: Option<u32>,
}

impl ProcessInstance {
    /// Start the worker process and wait until it has loaded the model and its instance. A
    /// process that dies while loading is started again (with back-off) until the version's
    /// crash limit; a plugin that refuses is an error at once.
    fn start(
        shared: Arc<ProcessShared>,
        assignment: InstanceAssignment,
    ) -> Result<Self, PluginError> {
        let mut instance = Self {
            shared,
            assignment,
            child: None,
            restart_at: None,
            next_index: 0,
            open: BTreeSet::new(),
            told: HashSet::new(),
            calls: 0,
            pid: None,
        };
        loop {
            let mut child = instance.spawn()?;
            match instance.wait_ready(&mut child) {
                Ok(()) => {
                    instance.child = Some(child);
                    return Ok(instance);
                }
                Err(NotReady::Refused(e)) => {
                    child.reap(None);
                    return Err(e);
                }
                Err(NotReady::Died(why)) => {
                    let why = Some(why).filter(|w| !w.is_empty());
                    let what = format!("{} while loading", child.reap(why));
                    match instance.died(&what) {
                        Verdict::Restart(pause) => std::thread::sleep(pause),
                        Verdict::GiveUp(reason) => {
                            return Err(PluginError::internal(format!(
                                "the model could not be loaded: {reason}"
                            )))
                        }
                    }
                }
            }
        }
    }

    /// Start a worker process and send it what to load (it is not ready yet).
    fn spawn(&mut self) -> Result<Child, PluginError> {
        let settings = &self.shared.settings;
        let failed = |e: std::io::Error| {
            PluginError::internal(format!("cannot start a worker process: {e}"))
        };
        let (host_end, worker_end) = UnixStream::pair().map_err(failed)?;
        let (cancels, worker_cancels) = UnixStream::pair().map_err(failed)?;
        let fds = [worker_end.as_raw_fd(), worker_cancels.as_raw_fd()];
        let mut command = Command::new(&settings.exe);
        command.arg("worker").stdin(Stdio::null());
        // SAFETY: between fork and exec, only async-signal-safe calls (fcntl, dup2) on
        // descriptors this process owns.
        unsafe {
            command.pre_exec(move || {
                // Out of the way first (either could sit on the other's target), then into
                // place: dup2's copies stay open across exec, the others close.
                let mut high = [0; 2];
                for (i, fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (fd, target) in high.iter().zip([SOCKET_FD, CANCEL_FD]) {
                    if libc::dup2(*fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut process = command.spawn().map_err(failed)?;
        drop((worker_end, worker_cancels));
        let pid = process.id();
        let reader = match host_end
            .try_clone()
            .and_then(|r| r.set_read_timeout(Some(CANCEL_POLL)).map(|()| r))
        {
            Ok(reader) => reader,
            Err(e) => {
                let _ = process.kill();
                let _ = process.wait();
                return Err(failed(e));
            }
        };
        self.pid = Some(pid);
        let mut child = Child {
            process,
            socket: host_end,
            reader,
            frames: FrameReader::default(),
            cancels,
            ready: false,
            base: None,
        };
        let init = ToWorker::Init(Init {
            library: settings.library.to_string_lossy().into_owned(),
            spec: settings.spec.clone(),
            assignment: self.assignment.clone(),
            log_level: self.shared.log_level(),
        });
        // A failed send shows as the process's death while it loads.
        let _ = child.send(&init.encode());
        self.shared
            .update(self.assignment.index, |p| p.pid = Some(pid));
        tracing::debug!(index = self.assignment.index, pid, "worker process started");
        Ok(child)
    }

    fn wait_ready(&self, child: &mut Child) -> Result<(), NotReady> {
        loop {
            match child.next(&self.shared.settings.services) {
                Event::Message(ToHost::Ready(metadata)) => {
                    *self
                        .shared
                        .metadata
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = metadata;
                    child.ready = true;
                    return Ok(());
                }
                Event::Message(ToHost::InitFailed(e)) => return Err(NotReady::Refused(e)),
                Event::Message(other) => {
                    let _ = child.process.kill();
                    return Err(NotReady::Died(format!(
                        "it sent {} before it was ready",
                        message_name(&other)
                    )));
                }
                Event::Closed(why) => return Err(NotReady::Died(why.unwrap_or_default())),
                // Loading can take minutes: only the process's end stops the wait.
                Event::Quiet => {}
            }
        }
    }

    /// A death, as the log, the describe table and the crash count see it: what to do next.
    fn died(&self, what: &str) -> Verdict {
        tracing::error!(index = self.assignment.index, "a worker process {what}");
        self.shared.update(self.assignment.index, |p| {
            p.pid = None;
            p.last_exit = Some(what.to_owned());
        });
        self.shared.record_crash(what)
    }

    /// The worker process is gone (`child` taken out): count it, and start the next one now,
    /// or note when. Returns how it ended.
    fn lost(&mut self, child: Child, why: Option<String>) -> String {
        let pid = child.process.id();
        let what = child.reap(why.filter(|w| !w.is_empty()));
        let what = format!("(pid {pid}) {what}");
        self.open.clear();
        self.told.clear();
        match self.died(&what) {
            Verdict::Restart(pause) if pause.is_zero() => {
                self.shared
                    .update(self.assignment.index, |p| p.restarts += 1);
                // Started now, so that it loads while the failed call is answered.
                match self.spawn() {
                    Ok(child) => self.child = Some(child),
                    Err(e) => tracing::error!("cannot restart a worker process: {e}"),
                }
            }
            Verdict::Restart(pause) => self.restart_at = Some(Instant::now() + pause),
            Verdict::GiveUp(reason) => {
                tracing::error!(index = self.assignment.index, "giving up: {reason}");
            }
        }
        what
    }

    /// A running, ready worker process, or why there is none now.
    /// Returns whether the process died since the last call (and was replaced).
    fn ensure_child(&mut self) -> Result<bool, PluginError> {
        // Killed between calls: start another before this call.
        let exited = match self.child.as_mut() {
            Some(child) => matches!(child.process.try_wait(), Ok(Some(_))),
            None => false,
        };
        if exited {
            if let Some(child) = self.child.take() {
                self.lost(child, None);
            }
        }
        if let Some(reason) = self.shared.failure() {
            return Err(PluginError::new(
                ErrorCode::UNAVAILABLE,
                format!("the model's workers are stopped: {reason}"),
            ));
        }
        if self.child.is_none() {
            // Under back-off the call waits it out: the queue holds the requests meanwhile
            // (and other workers take them), and the client's timeout bounds the wait.
            if let Some(at) = self.restart_at {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            self.restart_at = None;
            self.shared
                .update(self.assignment.index, |p| p.restarts += 1);
            self.child = Some(self.spawn()?);
        }
        let Some(mut child) = self.child.take() else {
            return Err(PluginError::internal("no worker process: this is a bug"));
        };
        if child.ready {
            self.child = Some(child);
            return Ok(exited);
        }
        match self.wait_ready(&mut child) {
            Ok(()) => {
                self.child = Some(child);
                Ok(exited)
            }
            Err(NotReady::Refused(e)) => {
                let what = self.lost(child, Some(format!("its plugin refused to load: {e}")));
                Err(PluginError::new(
                    ErrorCode::UNAVAILABLE,
                    format!("the worker process could not be restarted: it {what}"),
                ))
            }
            Err(NotReady::Died(why)) => {
                let what = self.lost(child, Some(why));
                Err(PluginError::new(
                    ErrorCode::UNAVAILABLE,
                    format!("the worker process died while restarting: it {what} while loading"),
                ))
            }
        }
    }

    fn call(
        &mut self,
        explain: bool,
        requests: RSlice<'_, Request>,
        mut sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        let continuous = self.shared.settings.continuous && !explain;
        let n = requests.len();
        self.calls += 1;
        let key = if continuous {
            wire::CONTINUOUS
        } else {
            self.calls
        };
        // The host's worker thread numbers a continuous call's requests whatever happens to
        // it: so does this, and a call that fails fails every open request (the host answers
        // them all with its error).
        let first = self.next_index;
        if continuous {
            self.next_index += n;
        }
        let fail_open = |this: &mut Self, e: PluginError| {
            if continuous {
                this.open.clear();
                this.told.clear();
            }
            RResult::RErr(e)
        };
        let had_open = continuous && !self.open.is_empty();
        match self.ensure_child() {
            Err(e) => return fail_open(self, e),
            // Open sequences died with their process: the host must fail them.
            Ok(true) if had_open => {
                let e = PluginError::internal(format!(
                    "the worker process running model `{}` died between steps; its open requests are lost",
                    self.shared.settings.spec.name
                ));
                return fail_open(self, e);
            }
            Ok(_) => {}
        }
        let mut call_open: BTreeSet<usize> = (0..n).collect();
        if continuous {
            self.open.extend(first..first + n);
            call_open.clear();
        }
        let Some(mut child) = self.child.take() else {
            return RResult::RErr(PluginError::internal("no worker process: this is a bug"));
        };
        let message = wire::encode_execute(explain, key, requests.as_slice());
        if message.len() as u64 > wire::MAX_FRAME + 8 {
            // The worker never sees these requests: its numbers skip none of them, so the
            // host's, which do, move its base on.
            if let (true, Some(base)) = (continuous, child.base.as_mut()) {
                *base += n;
            }
            self.child = Some(child);
            let e = PluginError::invalid_input(format!(
                "the batch is {} bytes, over the {} a worker process takes",
                message.len(),
                wire::MAX_FRAME
            ));
            return fail_open(self, e);
        }
        let base = if continuous {
            *child.base.get_or_insert(first)
        } else {
            0
        };
        let to_host = |index: u64| usize::try_from(index).ok()?.checked_add(base);
        let mut closed: Option<Option<String>> = None;
        let mut outcome = None;
        if let Err(e) = child.send(&message) {
            closed = Some(Some(format!("the host could not write to it: {e}")));
        }
        let mut last_poll = Instant::now();
        while closed.is_none() && outcome.is_none() {
            match child.next(&self.shared.settings.services) {
                Event::Message(ToHost::Chunk(index, chunk)) => {
                    let Some(host_index) = to_host(index) else {
                        continue;
                    };
                    if !sink.send_chunk(host_index, chunk) && self.told.insert(host_index) {
                        child.cancel(key, index);
                    }
                }
                Event::Message(ToHost::Final(index, result)) => {
                    let Some(host_index) = to_host(index) else {
                        continue;
                    };
                    sink.send_final(host_index, result.into());
                    call_open.remove(&host_index);
                    self.open.remove(&host_index);
                    self.told.remove(&host_index);
                }
                Event::Message(ToHost::Done(result)) => outcome = Some(result),
                Event::Message(other) => {
                    let _ = child.process.kill();
                    closed = Some(Some(format!(
                        "it sent {} in the middle of a call",
                        message_name(&other)
                    )));
                }
                Event::Closed(why) => closed = Some(why),
                Event::Quiet => {}
            }
            if last_poll.elapsed() >= CANCEL_POLL {
                last_poll = Instant::now();
                let open = if continuous { &self.open } else { &call_open };
                let gone: Vec<usize> = open
                    .iter()
                    .copied()
                    .filter(|i| !self.told.contains(i) && sink.is_cancelled(*i))
                    .collect();
                for index in gone {
                    self.told.insert(index);
                    if let Some(worker_index) = index.checked_sub(base) {
                        child.cancel(key, worker_index as u64);
                    }
                }
            }
        }
        if !continuous {
            self.told.clear();
        }
        match (outcome, closed) {
            (Some(result), _) => {
                self.child = Some(child);
                result.into()
            }
            (None, why) => {
                let what = self.lost(child, why.flatten());
                RResult::RErr(PluginError::internal(format!(
                    "the worker process running model `{}` {what} during this call; it is being restarted",
                    self.shared.settings.spec.name
                )))
            }
        }
    }
}

impl PluginInstance for ProcessInstance {
    fn execute(
        &mut self,
        requests: RSlice<'_, Request>,
        sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        self.call(false, requests, sink)
    }

    fn explain(
        &mut self,
        requests: RSlice<'_, Request>,
        sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        self.call(true, requests, sink)
    }
}

impl Drop for ProcessInstance {
    /// Close the socket (the worker drops its instance and model and exits), and wait for it;
    /// kill it past [`STOP_GRACE`].
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.socket.shutdown(std::net::Shutdown::Both);
            if wait_for_exit(&mut child.process, STOP_GRACE).is_none() {
                tracing::warn!(
                    pid = child.process.id(),
                    "a worker process did not stop in time; killing it"
                );
                let _ = child.process.kill();
                let _ = child.process.wait();
            }
        }
        // Only its own entry: a new instance may have the same index already.
        let mut table = self
            .shared
            .processes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ours = table
            .get(&self.assignment.index)
            .is_some_and(|p| p.pid.is_none() || p.pid == self.pid);
        if ours {
            table.remove(&self.assignment.index);
        }
    }
}

fn message_name(message: &ToHost) -> &'static str {
    match message {
        ToHost::Ready(_) => "a second ready message",
        ToHost::InitFailed(_) => "a load failure",
        ToHost::Chunk(..) => "a chunk",
        ToHost::Final(..) => "a final response",
        ToHost::Done(_) => "a call's end",
        ToHost::Log { .. } => "a log record",
        ToHost::Metric { .. } => "a metric",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(max_crashes: u32) -> (Arc<ProcessShared>, Arc<Mutex<Vec<String>>>) {
        let failed = Arc::new(Mutex::new(Vec::new()));
        let seen = failed.clone();
        let metrics = Arc::new(Metrics::new());
        let settings = ProcessSettings {
            exe: PathBuf::from("cresset"),
            library: PathBuf::from("lib.so"),
            spec: ModelSpec {
                name: "m".into(),
                version: "1".into(),
                model_dir: "".into(),
                handler_config_json: "{}".into(),
                model_config_json: "{}".into(),
            },
            continuous: false,
            max_crashes,
            crash_window: Duration::from_secs(60),
            services: crate::services::PluginServices::handle("m", "1", metrics.clone()),
            metrics,
        };
        let on_fail: OnFail = Box::new(move |reason| {
            seen.lock().expect("lock").push(reason);
        });
        (ProcessShared::new(settings, on_fail), failed)
    }

    #[test]
    fn deaths_back_off_and_the_limit_fails_the_version_once() {
        let (shared, failed) = shared(4);
        let pauses: Vec<Duration> = (0..3)
            .map(|_| match shared.record_crash("was killed") {
                Verdict::Restart(pause) => pause,
                Verdict::GiveUp(reason) => panic!("gave up early: {reason}"),
            })
            .collect();
        assert_eq!(
            pauses,
            [
                Duration::ZERO,
                Duration::from_millis(500),
                Duration::from_secs(1)
            ]
        );
        let Verdict::GiveUp(reason) = shared.record_crash("was killed by signal 11 (SIGSEGV)")
        else {
            panic!("the fourth death fails the version");
        };
        assert!(reason.contains("4 times within 60 s"), "{reason}");
        assert!(reason.contains("SIGSEGV"), "{reason}");
        assert!(matches!(shared.record_crash("again"), Verdict::GiveUp(_)));
        assert_eq!(failed.lock().expect("lock").len(), 1, "told once");
        assert_eq!(shared.failure(), Some(reason));
    }

    #[test]
    fn exits_are_described_by_signal_or_status() {
        let killed = ExitStatus::from_raw(libc::SIGSEGV);
        assert_eq!(describe_exit(killed), "was killed by signal 11 (SIGSEGV)");
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_exit(exited), "exited with status 3");
    }
}
