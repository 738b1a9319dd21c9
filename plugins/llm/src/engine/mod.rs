//! The engine of the `gpt` handler: sequences of requests on the crate's one generation loop
//! ([`Scheduler`], shared with the `nlp` handler). Each sequence has a slot of a KV cache
//! allocated once at start-up; the scheduler prefills its prompt into the slot (a bounded number
//! of prompt tokens per step, so that a long prompt does not stall the others' decoding) and
//! then decodes every running sequence in one forward pass per step (speculatively, with a
//! draft model). The engine turns each token into text and streamed chunks, ends a sequence
//! (end of sequence, a `stop` string, `max_new_tokens`, a client that went away), and answers
//! it.
//!
//! The engine takes sequences whose prompts are already tokens ([`Engine::enqueue`]); turning
//! requests into tokens is [`crate::prompt`]'s.

mod sequence;

use std::sync::Arc;
use std::time::Instant;

use cresset_plugin_api::sdk::{Host, StepContext};
use cresset_plugin_api::{PluginError, Response};
use cresset_torch::decoder::{Decoder, SlotCache};
use cresset_torch::generation::{Finish, Scheduler};
use cresset_torch::ModelError;

use crate::api;
use crate::prompt::{Prepared, PromptEncoder};
use sequence::{sequence, Reply, Sequence};

pub(crate) use cresset_torch::generation::Draft;

/// The answer to a request whose client went away.
pub(crate) fn cancelled() -> PluginError {
    PluginError::new(cresset_plugin_api::ErrorCode::CANCELLED, "cancelled")
}

/// The model, the loop running its batch, and what answers the sequences.
pub(crate) struct Engine {
    model: Decoder,
    scheduler: Scheduler<Reply>,
    responder: Responder,
    host: Host,
    /// This worker's index, as a metric label.
    instance: String,
}

/// Turns a sequence's tokens into its client's chunks and answer: the same for every sequence.
struct Responder {
    /// Token ids that end a sequence.
    eos_ids: Vec<i64>,
    /// Its tokenizer decodes generated tokens.
    prompts: Arc<PromptEncoder>,
    /// The model name, for OpenAI's `model`.
    model_name: String,
    /// `/predictions` answers plain text (`response_format = "torchserve"`).
    plain_text: bool,
}

/// Who the engine reports as, in answers and metrics.
pub(crate) struct Identity {
    /// The host's services (metrics).
    pub host: Host,
    /// The model name, for OpenAI's `model`.
    pub model_name: String,
    /// This worker's index, as a metric label.
    pub instance: String,
    /// `/predictions` answers plain text (`response_format = "torchserve"`).
    pub plain_text: bool,
}

impl Engine {
    /// An engine for `model` with `cache` (one slot per sequence of the batch).
    pub fn new(
        model: Decoder,
        eos_ids: Vec<i64>,
        prompts: Arc<PromptEncoder>,
        cache: SlotCache,
        prefill_budget: usize,
        draft: Option<Draft>,
        identity: Identity,
    ) -> Self {
        Self {
            model,
            scheduler: Scheduler::new(cache, prefill_budget, draft),
            responder: Responder {
                eos_ids,
                prompts,
                model_name: identity.model_name,
                plain_text: identity.plain_text,
            },
            host: identity.host,
            instance: identity.instance,
        }
    }

    /// The model.
    pub fn model(&self) -> &Decoder {
        &self.model
    }

    /// Decode steps replayed as CUDA graphs, every bucket captured now, where the model can be
    /// captured; returns whether graphs replay (else the steps stay eager and dynamic).
    pub fn use_cuda_graphs(&mut self) -> Result<bool, ModelError> {
        let _mode = cresset_torch::InferenceMode::enter();
        self.scheduler.use_static_decode(&self.model, true, true)
    }

    /// Request `index` (id `id`, arrived at `started`), tokenized: it waits for a slot, behind
    /// the requests the host gave before it.
    pub fn enqueue(&mut self, index: usize, id: String, started: Instant, prepared: Prepared) {
        self.scheduler
            .enqueue(sequence(index, id, started, prepared));
    }

    /// Whether no sequence waits or runs: a step would do nothing.
    pub fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    /// Forget every sequence after a failed step (the cache may be half-written; the host
    /// answers each with the error).
    pub fn abort(&mut self) {
        self.scheduler.abort();
    }

    /// The draft's acceptance so far: (accepted, drafted), if a draft model is configured.
    pub fn speculation(&self) -> Option<(u64, u64)> {
        self.scheduler.speculation()
    }

    /// The draft model, if one is configured.
    pub fn draft_model(&self) -> Option<&cresset_torch::decoder::Decoder> {
        self.scheduler.draft_model()
    }

    /// Sequences waiting or running (for tests).
    pub fn in_flight(&self) -> usize {
        self.scheduler.running() + self.scheduler.waiting()
    }

    /// One scheduling step: the loop admits, prefills within the token budget, decodes every
    /// running sequence in one forward pass; the ended are answered.
    pub fn schedule(&mut self, ctx: &mut StepContext<'_, '_>) -> Result<(), PluginError> {
        // Clients that went away free their slot (or their place in line) now.
        for seq in self.scheduler.sequences_mut() {
            if seq.finish.is_none() && ctx.is_cancelled(seq.index) {
                seq.finish = Some(Finish::Stop);
            }
        }
        let responder = &self.responder;
        let ended = self
            .scheduler
            .step(&self.model, |seq, token| responder.emit(seq, token, ctx))
            .map_err(PluginError::from)?;
        for seq in ended {
            self.observe(&seq);
            let answer = if ctx.is_cancelled(seq.index) {
                Err(cancelled())
            } else {
                self.responder.answer(&seq)
            };
            ctx.send_final(seq.index, answer);
        }
        self.gauges();
        Ok(())
    }

    fn observe(&self, seq: &Sequence) {
        let h = &self.host;
        let generated = seq.generated().len();
        h.counter(
            "cresset_generated_tokens_total",
            "Tokens generated",
            &[],
            generated as f64,
        );
        if let Some(first) = seq.data.first_token_at {
            h.observe(
                "cresset_time_to_first_token_seconds",
                "From a sequence's arrival at the instance to its first token",
                &[],
                (first - seq.data.started).as_secs_f64(),
            );
            if generated > 1 {
                h.observe(
                    "cresset_time_per_output_token_seconds",
                    "Mean time per generated token after the first",
                    &[],
                    first.elapsed().as_secs_f64() / (generated - 1) as f64,
                );
            }
        }
    }

    fn gauges(&self) {
        let h = &self.host;
        let instance = [("instance", self.instance.as_str())];
        let running = self.scheduler.running() as f64;
        let waiting = self.scheduler.waiting() as f64;
        h.gauge(
            "cresset_running_sequences",
            "Sequences holding a KV-cache slot",
            &instance,
            running,
        );
        h.gauge(
            "cresset_waiting_sequences",
            "Sequences waiting for a KV-cache slot",
            &instance,
            waiting,
        );
        h.gauge(
            "cresset_kv_slots_used_ratio",
            "Share of the KV-cache slots in use",
            &instance,
            running / self.scheduler.slots().max(1) as f64,
        );
        if let Some((accepted, drafted)) = self.speculation().filter(|&(_, d)| d > 0) {
            h.gauge(
                "cresset_speculative_acceptance_ratio",
                "Drafted tokens the target accepted, since start",
                &[],
                accepted as f64 / drafted as f64,
            );
        }
    }
}

impl Responder {
    /// Record the next token of `seq`: stream what can be released; note why it ends, if it
    /// does.
    fn emit(&self, seq: &mut Sequence, token: i64, ctx: &mut StepContext<'_, '_>) {
        let generated = seq.generated().len();
        let reply = &mut seq.data;
        if reply.first_token_at.is_none() {
            reply.first_token_at = Some(Instant::now());
        }
        let eos = self.eos_ids.contains(&token);
        let mut piece = if eos {
            String::new()
        } else {
            reply.text.push(self.prompts.tokenizer(), token as u32)
        };
        if eos || reply.text.stopped() {
            seq.finish = Some(Finish::Stop);
        } else if generated >= reply.max_new {
            seq.finish = Some(Finish::Length);
        }
        if seq.finish.is_some() {
            // Release what was held back in case it began a stop string.
            piece.push_str(&reply.text.finish(self.prompts.tokenizer()));
        }
        if reply.request.stream && !piece.is_empty() {
            let meta = api::Meta {
                id: &reply.id,
                created: reply.created,
                model: &self.model_name,
            };
            let chunk = match api::chunk(reply.request.api, &meta, &piece, reply.chunks_sent == 0) {
                Some(v) => Response::json(&v),
                None => Ok(Response::ok(
                    "text/plain; charset=utf-8",
                    piece.into_bytes(),
                )),
            };
            if let Ok(chunk) = chunk {
                reply.chunks_sent += 1;
                if !ctx.send_chunk(seq.index, chunk) {
                    seq.finish = Some(Finish::Stop);
                }
            }
        }
    }

    fn answer(&self, seq: &Sequence) -> Result<Response, PluginError> {
        let reply = &seq.data;
        let meta = api::Meta {
            id: &reply.id,
            created: reply.created,
            model: &self.model_name,
        };
        let finish = seq.finish.unwrap_or(Finish::Length);
        let (prompt, completion) = (seq.prompt().len(), seq.generated().len());
        if reply.request.stream {
            return match api::stream_end(
                reply.request.api,
                &meta,
                finish,
                prompt,
                completion,
                reply.request.include_usage,
            ) {
                Some(v) => Response::json(&v),
                None => Ok(Response::ok("text/plain; charset=utf-8", Vec::new())),
            };
        }
        if self.plain_text && reply.request.api == api::Api::TorchServe {
            return Ok(Response::ok(
                "text/plain; charset=utf-8",
                reply.text.text().to_owned(),
            ));
        }
        Response::json(&api::whole(
            reply.request.api,
            &meta,
            reply.text.text(),
            finish,
            prompt,
            completion,
        ))
    }
}
