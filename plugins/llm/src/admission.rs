//! Requests become prompt tokens off the step loop. Every running sequence shares the step
//! loop's thread, so a prompt that takes long to tokenize must not be tokenized there (with
//! SmolLM2's tokenizer on a CPU core: 2 KiB in about 0.5 ms, the 166 KB that its 2048-token
//! context allows in 52 ms, 6.4 MB in seconds): it goes to the instance's tokenizer thread,
//! and joins the batch at the first step after its tokens are ready. The loop waits for that
//! thread only when it has nothing else to do, and then for a few milliseconds at a time, so
//! that the host can hand over new requests meanwhile.
//!
//! A small body is prepared on the loop at once: it costs about half a millisecond, less than
//! the step it would otherwise wait for.
//!
//! Requests keep the indices the host gave them; those ready in the same step are handed to
//! the engine in index order. A request whose client goes away before its tokens are ready is
//! answered `CANCELLED` at the next step, and its prompt is not tokenized (or, if it already
//! is being, its tokens are dropped); a request that cannot be prepared is answered with its
//! error.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cresset_plugin_api::{PluginError, Request};

use crate::engine::cancelled;
use crate::prompt::{Prepared, PromptEncoder};

/// Request bodies up to this size are prepared on the step loop (about half a millisecond of
/// tokenizing).
pub const INLINE_BODY_BYTES: usize = 2048;

/// How long an idle step loop waits for the tokenizer thread before it returns to the host.
const IDLE_WAIT: Duration = Duration::from_millis(10);

/// One request's way into the batch: its tokens, or the error that answers it.
pub(crate) struct Admission {
    /// The request's index (numbered by the host, across calls).
    pub index: usize,
    /// The request id.
    pub id: String,
    /// When the request reached the instance.
    pub arrived: Instant,
    /// Its prompt's tokens, or why it is refused.
    pub outcome: Result<Prepared, PluginError>,
}

/// A request on its way to the tokenizer thread.
struct Job {
    index: usize,
    request: Request,
    arrived: Instant,
    /// Set by the step loop when the request was answered without it (its client went away,
    /// or a step failed).
    cancelled: Arc<AtomicBool>,
}

/// The tokenizer thread and the requests in its hands.
pub(crate) struct Admissions {
    prompts: Arc<PromptEncoder>,
    jobs: SyncSender<Job>,
    /// Jobs the thread's queue had no room for yet.
    backlog: VecDeque<Job>,
    done: Receiver<Admission>,
    /// Requests given to the thread and not back yet: their cancellation flags, by index.
    pending: BTreeMap<usize, Arc<AtomicBool>>,
    /// Admissions for the next [`Admissions::collect`].
    ready: Vec<Admission>,
}

impl Admissions {
    /// Start the tokenizer thread (`name`), with room for `capacity` requests in each
    /// direction. The thread ends once this is dropped and its current prompt is done.
    pub fn start(
        prompts: Arc<PromptEncoder>,
        capacity: usize,
        name: String,
    ) -> Result<Self, PluginError> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(capacity.max(1));
        let (answers, done) = mpsc::sync_channel::<Admission>(capacity.max(1));
        let worker = Arc::clone(&prompts);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || tokenize_until_closed(&worker, &queue, &answers))
            .map_err(|e| {
                PluginError::internal(format!("cannot start the tokenizer thread: {e}"))
            })?;
        Ok(Self {
            prompts,
            jobs,
            backlog: VecDeque::new(),
            done,
            pending: BTreeMap::new(),
            ready: Vec::new(),
        })
    }

    /// Take request `index`: prepare it now if it is small, else hand it to the thread.
    pub fn submit(&mut self, index: usize, request: &Request) {
        let arrived = Instant::now();
        if request.body.len() <= INLINE_BODY_BYTES {
            self.ready.push(Admission {
                index,
                id: request.id.to_string(),
                arrived,
                outcome: self.prompts.prepare(request),
            });
            return;
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        self.pending.insert(index, Arc::clone(&cancelled));
        self.backlog.push_back(Job {
            index,
            request: request.clone(),
            arrived,
            cancelled,
        });
        self.send_backlog();
    }

    /// The admissions ready now, in index order. `is_cancelled` tells which clients went away.
    /// With `idle` (nothing else to do this step) and nothing ready, wait a little for the
    /// thread.
    pub fn collect(&mut self, is_cancelled: impl Fn(usize) -> bool, idle: bool) -> Vec<Admission> {
        // A client that went away is answered now; the thread skips its prompt, or drops its
        // tokens if it has begun.
        let gone: Vec<usize> = self
            .pending
            .keys()
            .copied()
            .filter(|&index| is_cancelled(index))
            .collect();
        for index in gone {
            if let Some(flag) = self.pending.remove(&index) {
                flag.store(true, Ordering::Relaxed);
                self.ready.push(Admission {
                    index,
                    id: String::new(),
                    arrived: Instant::now(),
                    outcome: Err(cancelled()),
                });
            }
        }
        self.send_backlog();
        if idle && self.ready.is_empty() && !self.pending.is_empty() {
            match self.done.recv_timeout(IDLE_WAIT) {
                Ok(admission) => self.receive(admission),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.thread_gone(),
            }
        }
        loop {
            match self.done.try_recv() {
                Ok(admission) => self.receive(admission),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.thread_gone();
                    break;
                }
            }
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.sort_by_key(|a| a.index);
        ready
    }

    /// Forget every request (after a failed step, the host answers them all); the thread
    /// skips those it has not begun.
    pub fn abandon(&mut self) {
        for flag in self.pending.values() {
            flag.store(true, Ordering::Relaxed);
        }
        self.pending.clear();
        self.ready.clear();
    }

    /// Requests not yet handed to the engine.
    pub fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }

    fn send_backlog(&mut self) {
        while let Some(job) = self.backlog.pop_front() {
            match self.jobs.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    self.backlog.push_front(job);
                    break;
                }
                // The thread is gone: `collect` answers what it held.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    fn receive(&mut self, admission: Admission) {
        // Cancelled and abandoned requests were answered already.
        if self.pending.remove(&admission.index).is_some() {
            self.ready.push(admission);
        }
    }

    /// The thread is gone (it never should be): what it held fails, rather than hangs.
    fn thread_gone(&mut self) {
        self.backlog.clear();
        for (index, _) in std::mem::take(&mut self.pending) {
            self.ready.push(Admission {
                index,
                id: String::new(),
                arrived: Instant::now(),
                outcome: Err(PluginError::internal(
                    "the tokenizer thread stopped: this is a bug",
                )),
            });
        }
    }
}

/// The tokenizer thread: prepare each job that has not been answered already, until the step
/// loop's side is dropped.
fn tokenize_until_closed(
    prompts: &PromptEncoder,
    queue: &Receiver<Job>,
    answers: &SyncSender<Admission>,
) {
    while let Ok(job) = queue.recv() {
        if job.cancelled.load(Ordering::Relaxed) {
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| prompts.prepare(&job.request)))
            .unwrap_or_else(|_| Err(PluginError::internal("preparing the prompt panicked")));
        let admission = Admission {
            index: job.index,
            id: job.request.id.to_string(),
            arrived: job.arrived,
            outcome,
        };
        if answers.send(admission).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{ChatTemplate, Limits};
    use cresset_plugin_api::sdk::testing::request;
    use cresset_plugin_api::ErrorCode;
    use std::path::Path;

    /// The prompts of the small Llama fixture (a byte-level BPE of 512 tokens), 256 positions.
    fn prompts() -> Arc<PromptEncoder> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/generated/llm/llama-gqa-tied");
        let tokenizer = cresset_torch::load_tokenizer(&dir).expect("run `make models`");
        let chat = ChatTemplate {
            template: None,
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let limits = Limits {
            capacity: 256,
            max_new_tokens: 8,
            vocab_size: 512,
            sampling: Default::default(),
        };
        Arc::new(PromptEncoder::new(tokenizer, chat, None, limits))
    }

    /// A request too big to be tokenized on the loop: 200 tokens of 12 bytes.
    fn big() -> Request {
        let body = serde_json::json!({"data": "<|im_start|>".repeat(200)}).to_string();
        assert!(body.len() > INLINE_BODY_BYTES);
        request("application/json", body)
    }

    fn admissions(prompts: &Arc<PromptEncoder>) -> Admissions {
        Admissions::start(Arc::clone(prompts), 2, "prompts-test".into()).expect("thread")
    }

    /// Collect (as an idle loop) until `n` admissions came back.
    fn collect_all(admissions: &mut Admissions, n: usize) -> Vec<Admission> {
        let mut got = Vec::new();
        for _ in 0..3000 {
            got.extend(admissions.collect(|_| false, true));
            if got.len() >= n {
                break;
            }
        }
        got
    }

    #[test]
    fn a_big_prompt_is_tokenized_off_the_loop_and_collected_when_ready() {
        let prompts = prompts();
        let mut admissions = admissions(&prompts);
        let held = prompts.hold_tokenizing();
        admissions.submit(0, &big());
        for _ in 0..5 {
            assert!(
                admissions.collect(|_| false, false).is_empty(),
                "still tokenizing"
            );
        }
        assert_eq!(admissions.in_flight(), 1);
        drop(held);
        let got = collect_all(&mut admissions, 1);
        assert_eq!(got.len(), 1);
        let prepared = got[0].outcome.as_ref().expect("prepared");
        assert_eq!(prepared.ids.len(), 200);
        assert_eq!(admissions.in_flight(), 0);
    }

    #[test]
    fn a_request_whose_client_left_is_answered_cancelled_at_once_and_not_tokenized() {
        let prompts = prompts();
        let mut admissions = admissions(&prompts);
        let held = prompts.hold_tokenizing();
        // The thread holds the first; the second waits behind it, and its client leaves.
        admissions.submit(0, &big());
        admissions.submit(1, &big());
        let got = admissions.collect(|i| i == 1, false);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].index, 1);
        let Err(err) = &got[0].outcome else {
            panic!("the second should be cancelled")
        };
        assert_eq!(err.code, ErrorCode::CANCELLED);
        assert_eq!(admissions.in_flight(), 1);
        drop(held);
        let got = collect_all(&mut admissions, 1);
        assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), [0]);
        assert!(got[0].outcome.is_ok());
        // Nothing else comes back, and the second was never tokenized.
        admissions.submit(2, &big());
        let got = collect_all(&mut admissions, 1);
        assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), [2]);
        assert_eq!(prompts.tokenized(), 2);
    }

    #[test]
    fn errors_answer_their_request_and_requests_come_back_in_order() {
        let prompts = prompts();
        let mut admissions = admissions(&prompts);
        let not_json = request("application/json", "{".repeat(INLINE_BODY_BYTES + 1));
        let held = prompts.hold_tokenizing();
        admissions.submit(0, &big());
        admissions.submit(1, &not_json);
        admissions.submit(2, &big());
        admissions.submit(3, &big());
        drop(held);
        let got = collect_all(&mut admissions, 4);
        assert_eq!(
            got.iter().map(|a| a.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let Err(err) = &got[1].outcome else {
            panic!("a body that is not JSON should be refused")
        };
        assert_eq!(err.code, ErrorCode::INVALID_INPUT);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        assert_eq!(got.iter().filter(|a| a.outcome.is_ok()).count(), 3);
    }

    #[test]
    fn abandoned_requests_never_come_back() {
        let prompts = prompts();
        let mut admissions = admissions(&prompts);
        let held = prompts.hold_tokenizing();
        admissions.submit(0, &big());
        admissions.abandon();
        assert_eq!(admissions.in_flight(), 0);
        drop(held);
        // The thread finishes what it began; nothing is handed to the engine.
        admissions.submit(1, &big());
        let got = collect_all(&mut admissions, 1);
        assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), [1]);
    }
}
