//! Instance workers: one OS thread per plugin instance, fed by the model version's bounded
//! queue. HTTP threads never run plugin code.
//!
//! Scheduling: an idle worker takes whatever is queued, up to `batch_size`, at once; it never
//! waits for a batch to fill while it could be working (TorchServe does, and pays for it at
//! low concurrency).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice};
use cresset_plugin_api::{
    InstanceAssignment, ModelBox, PluginError, Request, Response, ResponseSink, SinkRef,
};
use crossbeam_channel::Receiver;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

pub mod idle;

/// What a worker is asked to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `execute`.
    Predict,
    /// `explain`.
    Explain,
}

/// What flows back to the HTTP handler.
#[derive(Debug)]
pub enum Reply {
    /// An intermediate chunk (streaming).
    Chunk(Response),
    /// The final response.
    Final(Result<Response, PluginError>),
}

/// One queued request.
pub struct Job {
    /// The request.
    pub request: Request,
    /// Predict or explain.
    pub kind: JobKind,
    /// Where replies go. When the receiver is dropped (the client went away or timed out),
    /// the request counts as cancelled.
    pub reply: mpsc::Sender<Reply>,
    /// When it was queued.
    pub enqueued: Instant,
}

/// Chunks buffered per request before a streaming plugin blocks on a slow client.
pub const REPLY_BUFFER: usize = 64;

/// What a worker is doing, for the describe API and the `cresset_workers` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerStatus {
    /// Creating its instance.
    Starting = 0,
    /// Waiting for work.
    Ready = 1,
    /// Running a batch.
    Busy = 2,
    /// Finished (stopped, or its instance failed to start).
    Stopped = 3,
}

impl WorkerStatus {
    /// All statuses, for metrics.
    pub const ALL: [WorkerStatus; 4] = [Self::Starting, Self::Ready, Self::Busy, Self::Stopped];

    /// TorchServe's names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "STARTING",
            Self::Ready => "READY",
            Self::Busy => "BUSY",
            Self::Stopped => "STOPPED",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Ready,
            2 => Self::Busy,
            _ => Self::Stopped,
        }
    }
}

/// A worker's status, shared with the registry.
#[derive(Debug, Clone, Default)]
pub struct StatusCell(Arc<AtomicU8>);

impl StatusCell {
    /// The current status.
    pub fn get(&self) -> WorkerStatus {
        WorkerStatus::from_u8(self.0.load(Ordering::Relaxed))
    }
    fn set(&self, status: WorkerStatus) {
        self.0.store(status as u8, Ordering::Relaxed);
    }
}

/// How a worker was set up.
pub struct WorkerSpec {
    /// Model name and version, for logs and metrics.
    pub model: String,
    /// The version.
    pub version: String,
    /// The loaded model.
    pub plugin_model: Arc<ModelBox>,
    /// Where it runs.
    pub assignment: InstanceAssignment,
    /// The version's queue.
    pub queue: Receiver<Job>,
    /// A message (or the sender's drop) here stops this worker after its current batch.
    pub stop: Receiver<()>,
    /// Where the worker publishes what it is doing.
    pub status: StatusCell,
    /// The most requests per `execute`.
    pub batch_size: usize,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How long a send to one client may wait for room (a client that stopped reading a
    /// stream); past it the request is abandoned as cancelled.
    pub reply_timeout: Duration,
    /// The plugin does continuous batching: requests stay open across `execute` calls.
    pub continuous: bool,
    /// The version's idle workers: which of them waits on the queue.
    pub idle: Arc<idle::IdleStack>,
}

/// Start a worker thread. `ready` receives `Ok` once the instance exists, or the error.
pub fn spawn(
    spec: WorkerSpec,
    ready: std::sync::mpsc::Sender<Result<(), PluginError>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!(
        "cresset-{}-{}-w{}",
        spec.model, spec.version, spec.assignment.index
    );
    std::thread::Builder::new()
        .name(truncate(name, 60))
        .spawn(move || run(spec, ready))
}

fn truncate(mut s: String, n: usize) -> String {
    if s.len() > n {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn run(spec: WorkerSpec, ready: std::sync::mpsc::Sender<Result<(), PluginError>>) {
    let span = tracing::info_span!("worker", model = %spec.model, version = %spec.version, index = spec.assignment.index);
    let _entered = span.enter();
    let mut instance = match spec.plugin_model.new_instance(&spec.assignment) {
        RResult::ROk(instance) => instance,
        RResult::RErr(e) => {
            tracing::error!("instance failed to start: {e}");
            spec.status.set(WorkerStatus::Stopped);
            let _ = ready.send(Err(e));
            return;
        }
    };
    spec.status.set(WorkerStatus::Ready);
    let _ = ready.send(Ok(()));
    tracing::debug!("instance ready");
    if spec.continuous {
        run_continuous(&spec, &mut instance);
        spec.status.set(WorkerStatus::Stopped);
        drop(instance);
        return;
    }
    let labels = [spec.model.as_str(), spec.version.as_str()];
    let mut carried: Option<Job> = None;
    let seat = idle::Seat::new();
    // Back in the idle stack since the end of the last batch.
    let mut parked: Option<idle::Idle<'_>> = None;
    loop {
        spec.status.set(WorkerStatus::Ready);
        let first = match carried.take() {
            Some(job) => {
                parked = None;
                job
            }
            None => match next_job(&spec, &seat, parked.take()) {
                Some(job) => job,
                None => break,
            },
        };
        let kind = first.kind;
        let mut batch = vec![first];
        while batch.len() < spec.batch_size {
            match spec.queue.try_recv() {
                Ok(job) if job.kind == kind => batch.push(job),
                Ok(job) => {
                    carried = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        // Requests whose clients already left are answered (nobody listens) and skipped.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let now = Instant::now();
        for job in &batch {
            spec.metrics
                .queue_latency
                .with_label_values(&labels)
                .observe((now - job.enqueued).as_secs_f64());
        }
        spec.metrics
            .batch_size
            .with_label_values(&labels)
            .observe(batch.len() as f64);

        spec.status.set(WorkerStatus::Busy);
        // Move the requests out (bodies can be large): the sink keeps only the reply ends.
        let (requests, replies): (Vec<Request>, Vec<mpsc::Sender<Reply>>) = batch
            .into_iter()
            .map(|job| (job.request, job.reply))
            .unzip();
        let mut sink = JobSink::new(&replies, spec.reply_timeout, true);
        let executing = Instant::now();
        let outcome = {
            let sink_ref: SinkRef<'_> = SinkRef::from_ptr(&mut sink, TD_Opaque);
            match kind {
                JobKind::Predict => instance.execute(RSlice::from_slice(&requests), sink_ref),
                JobKind::Explain => instance.explain(RSlice::from_slice(&requests), sink_ref),
            }
        };
        spec.metrics
            .inference_latency
            .with_label_values(&labels)
            .observe(executing.elapsed().as_secs_f64());
        let fallback = match outcome {
            RResult::ROk(()) => None,
            RResult::RErr(e) => {
                tracing::warn!(batch = requests.len(), "execute failed: {e}");
                Some(e)
            }
        };
        for i in 0..requests.len() {
            if !sink.finished[i] {
                let error = fallback.clone().unwrap_or_else(|| {
                    PluginError::internal(format!(
                        "the plugin sent no final response for request {}",
                        requests[i].id
                    ))
                });
                sink.send_final(i, RResult::RErr(error));
            }
        }
        // Back in the idle stack before the reply that completes the batch goes out.
        parked = Some(spec.idle.enter(&seat));
        if let Some((index, message)) = sink.release_now() {
            // Its client is slow to read: out of the other workers' way while waiting on it.
            parked = None;
            sink.send(index, message);
        }
    }
    drop(parked);
    spec.status.set(WorkerStatus::Stopped);
    tracing::debug!("worker stopped");
    drop(instance);
}

/// The next job for an idle worker, or `None` when it should stop: scaled down, or the queue
/// closed and empty (the version is gone). Queued work is taken at once; otherwise the worker
/// waits in the version's [`idle::IdleStack`], on the queue only while it is the most recently
/// idle (`parked`: it already went back in at the end of its batch). Biased to the queue: a worker told to stop first finishes the work already queued (or
/// leaves it to the workers that stay), so scaling down (even to zero) strands no request.
fn next_job<'a>(
    spec: &'a WorkerSpec,
    seat: &'a idle::Seat,
    parked: Option<idle::Idle<'a>>,
) -> Option<Job> {
    match spec.queue.try_recv() {
        Ok(job) => return Some(job),
        Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
        Err(crossbeam_channel::TryRecvError::Empty) => {}
    }
    let idle = parked.unwrap_or_else(|| spec.idle.enter(seat));
    loop {
        if idle.on_top() {
            crossbeam_channel::select_biased! {
                recv(spec.queue) -> job => return job.ok(),
                recv(spec.stop) -> _ => return None,
                recv(seat.baton) -> _ => {} // stepped down, or woken: look again
            }
        } else {
            crossbeam_channel::select_biased! {
                recv(seat.baton) -> _ => {}
                recv(spec.stop) -> _ => return None,
            }
        }
    }
}

/// Continuous batching: the instance keeps sequences running across `execute` calls. Each
/// call hands over the requests that arrived since the last (none while the others run), and
/// the loop calls again at once while any request is open, so a request that arrives while
/// others decode joins them at the next step. Indices number the instance's requests in the
/// order given, across calls. Explanations run on their own, as usual.
fn run_continuous(spec: &WorkerSpec, instance: &mut cresset_plugin_api::InstanceBox) {
    let labels = [spec.model.as_str(), spec.version.as_str()];
    // Every running sequence shares this thread: a client that stops reading its stream may
    // hold it only briefly before its request is abandoned (64 chunks are buffered first).
    let mut sink = OpenSink {
        open: std::collections::HashMap::new(),
        timeout: spec.reply_timeout.min(STALLED_STREAM_GRACE),
    };
    let mut next_index = 0usize;
    let mut stopping = false;
    loop {
        let mut new: Vec<Job> = Vec::new();
        if sink.open.is_empty() {
            spec.status.set(WorkerStatus::Ready);
            if stopping {
                // Told to stop while busy: finish what is queued, as the batch loop does.
                match spec.queue.try_recv() {
                    Ok(job) => new.push(job),
                    Err(_) => break,
                }
            } else {
                crossbeam_channel::select_biased! {
                    recv(spec.queue) -> job => match job {
                        Ok(job) => new.push(job),
                        Err(_) => break,
                    },
                    recv(spec.stop) -> _ => break,
                }
            }
        }
        if spec.stop.try_recv().is_ok() {
            stopping = true;
        }
        // Take what has arrived, up to the batch size in all: the plugin has that many slots.
        while sink.open.len() + new.len() < spec.batch_size {
            match spec.queue.try_recv() {
                Ok(job) => new.push(job),
                Err(_) => break,
            }
        }
        let (explain, predict): (Vec<Job>, Vec<Job>) = new
            .into_iter()
            .partition(|job| job.kind == JobKind::Explain);
        for job in explain {
            explain_alone(spec, instance, job);
        }
        let now = Instant::now();
        let mut requests = Vec::with_capacity(predict.len());
        for job in predict {
            spec.metrics
                .queue_latency
                .with_label_values(&labels)
                .observe((now - job.enqueued).as_secs_f64());
            sink.open.insert(
                next_index,
                Open {
                    id: job.request.id.to_string(),
                    reply: job.reply,
                    abandoned: false,
                },
            );
            next_index += 1;
            requests.push(job.request);
        }
        if sink.open.is_empty() {
            continue;
        }
        spec.status.set(WorkerStatus::Busy);
        spec.metrics
            .batch_size
            .with_label_values(&labels)
            .observe(sink.open.len() as f64);
        let executing = Instant::now();
        let outcome = {
            let sink_ref: SinkRef<'_> = SinkRef::from_ptr(&mut sink, TD_Opaque);
            instance.execute(RSlice::from_slice(&requests), sink_ref)
        };
        spec.metrics
            .inference_latency
            .with_label_values(&labels)
            .observe(executing.elapsed().as_secs_f64());
        if let RResult::RErr(e) = outcome {
            tracing::warn!(open = sink.open.len(), "execute failed: {e}");
            let indices: Vec<usize> = sink.open.keys().copied().collect();
            for index in indices {
                sink.send_final(index, RResult::RErr(e.clone()));
            }
        }
        // A request whose client is gone and that the plugin has not finished is dropped by
        // the plugin at its next step (it sees `is_cancelled`); nothing is waiting for it.
    }
    let open: Vec<String> = sink.open.values().map(|o| o.id.clone()).collect();
    if !open.is_empty() {
        tracing::warn!(?open, "worker stopped with requests still open");
    }
}

fn explain_alone(spec: &WorkerSpec, instance: &mut cresset_plugin_api::InstanceBox, job: Job) {
    let replies = [job.reply];
    let mut sink = JobSink::new(&replies, spec.reply_timeout, false);
    let requests = [job.request];
    let outcome = {
        let sink_ref: SinkRef<'_> = SinkRef::from_ptr(&mut sink, TD_Opaque);
        instance.explain(RSlice::from_slice(&requests), sink_ref)
    };
    if !sink.finished[0] {
        let error = match outcome {
            RResult::RErr(e) => e,
            RResult::ROk(()) => PluginError::internal("the plugin sent no explanation"),
        };
        sink.send_final(0, RResult::RErr(error));
    }
}

/// How long a continuous-batching worker waits on a stream whose client stopped reading.
const STALLED_STREAM_GRACE: Duration = Duration::from_millis(250);

/// One request a continuous-batching instance has not finished.
struct Open {
    id: String,
    reply: mpsc::Sender<Reply>,
    abandoned: bool,
}

/// The sink of a continuous-batching worker: open requests by index, across calls.
struct OpenSink {
    open: std::collections::HashMap<usize, Open>,
    timeout: Duration,
}

impl ResponseSink for OpenSink {
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        let timeout = self.timeout;
        match self.open.get_mut(&index) {
            Some(open) if !open.abandoned => {
                let ok = send_with_timeout(&open.reply, Reply::Chunk(chunk), timeout, index);
                if !ok {
                    open.abandoned = true;
                }
                ok
            }
            _ => false,
        }
    }

    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
        if let Some(open) = self.open.remove(&index) {
            if !open.abandoned {
                send_with_timeout(
                    &open.reply,
                    Reply::Final(result.into()),
                    self.timeout,
                    index,
                );
            }
        }
    }

    fn is_cancelled(&self, index: usize) -> bool {
        match self.open.get(&index) {
            Some(open) => open.abandoned || open.reply.is_closed(),
            None => true,
        }
    }
}

/// Send without blocking forever: a streaming client that stops reading fills its channel and
/// must not stall the worker (and every request behind it). Gives up after `timeout`.
fn send_with_timeout(
    reply: &mpsc::Sender<Reply>,
    mut message: Reply,
    timeout: Duration,
    index: usize,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(100);
    loop {
        match reply.try_send(message) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    tracing::warn!(
                        index,
                        "a client stopped reading its stream; abandoning the request"
                    );
                    return false;
                }
                message = back;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// The sink one batch writes to: replies go to each request's channel.
struct JobSink<'a> {
    replies: &'a [mpsc::Sender<Reply>],
    finished: Vec<bool>,
    /// Requests whose client stopped reading: no more waiting on them.
    abandoned: Vec<bool>,
    timeout: Duration,
    /// Hold the final response that completes the batch until [`JobSink::release`]: the worker
    /// first goes back into the idle stack, so that the client's next request finds it there
    /// rather than a worker whose OpenMP team has gone cold (see [`idle`]).
    hold_last: bool,
    held: Option<(usize, Reply)>,
}

impl<'a> JobSink<'a> {
    fn new(replies: &'a [mpsc::Sender<Reply>], timeout: Duration, hold_last: bool) -> Self {
        Self {
            replies,
            finished: vec![false; replies.len()],
            abandoned: vec![false; replies.len()],
            timeout,
            hold_last,
            held: None,
        }
    }

    /// Send the held final response, if any, if its channel has room now; else hand it back,
    /// to be sent with [`JobSink::send`] once the worker is out of the idle stack's way.
    fn release_now(&mut self) -> Option<(usize, Reply)> {
        let (index, message) = self.held.take()?;
        match self.replies.get(index).map(|r| r.try_send(message)) {
            Some(Err(mpsc::error::TrySendError::Full(back))) => Some((index, back)),
            _ => None,
        }
    }

    /// Send without blocking forever: a streaming client that stops reading fills its channel,
    /// and must not stall the worker (and every request behind it). Gives up after `timeout`,
    /// marking the request abandoned.
    fn send(&mut self, index: usize, message: Reply) -> bool {
        let Some(reply) = self.replies.get(index) else {
            return false;
        };
        if self.abandoned[index] {
            return false;
        }
        let sent = send_with_timeout(reply, message, self.timeout, index);
        if !sent && !reply.is_closed() {
            self.abandoned[index] = true;
        }
        sent
    }
}

impl ResponseSink for JobSink<'_> {
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        match self.finished.get(index) {
            Some(false) => self.send(index, Reply::Chunk(chunk)),
            _ => false,
        }
    }

    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
        if let Some(false) = self.finished.get(index) {
            self.finished[index] = true;
            let message = Reply::Final(result.into());
            if self.hold_last && self.finished.iter().all(|f| *f) {
                self.held = Some((index, message));
            } else {
                self.send(index, message);
            }
        }
    }

    fn is_cancelled(&self, index: usize) -> bool {
        match self.replies.get(index) {
            Some(reply) => self.abandoned[index] || reply.is_closed(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_that_completes_a_batch_waits_for_release_and_the_others_go_at_once() {
        let (tx_a, mut rx_a) = mpsc::channel(4);
        let (tx_b, mut rx_b) = mpsc::channel(4);
        let replies = [tx_a, tx_b];
        let mut sink = JobSink::new(&replies, Duration::from_secs(1), true);
        sink.send_final(1, RResult::ROk(Response::ok("text/plain", "b")));
        assert!(matches!(rx_b.try_recv(), Ok(Reply::Final(Ok(_)))));
        sink.send_final(0, RResult::ROk(Response::ok("text/plain", "a")));
        assert!(rx_a.try_recv().is_err(), "held until released");
        assert!(sink.release_now().is_none(), "sent: its channel has room");
        assert!(matches!(rx_a.try_recv(), Ok(Reply::Final(Ok(_)))));
        // A full channel hands the reply back, to be sent out of the idle stack's way.
        let (tx, _rx_full) = mpsc::channel(1);
        tx.try_send(Reply::Chunk(Response::ok("text/plain", "x")))
            .expect("room for one");
        let replies = [tx];
        let mut sink = JobSink::new(&replies, Duration::from_millis(50), true);
        sink.send_final(0, RResult::ROk(Response::ok("text/plain", "y")));
        assert!(matches!(sink.release_now(), Some((0, Reply::Final(_)))));
    }

    #[test]
    fn a_client_that_stops_reading_is_abandoned_instead_of_stalling_the_worker() {
        let (tx, _rx_kept_but_never_read) = mpsc::channel(1);
        let replies = [tx];
        let mut sink = JobSink::new(&replies, Duration::from_millis(50), false);
        assert!(sink.send_chunk(0, Response::ok("text/plain", "a")));
        assert!(!sink.is_cancelled(0));
        let started = Instant::now();
        assert!(
            !sink.send_chunk(0, Response::ok("text/plain", "b")),
            "the channel is full"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(sink.is_cancelled(0));
        // Later sends give up at once.
        let started = Instant::now();
        sink.send_final(0, RResult::ROk(Response::ok("text/plain", "c")));
        assert!(started.elapsed() < Duration::from_millis(40));
    }
}
