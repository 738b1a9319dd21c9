//! The step loop of continuous batching. Each sequence has a slot of a KV cache allocated once
//! at start-up; its prompt is prefilled into the slot (a bounded number of prompt tokens per
//! step, so that a long prompt does not stall the others' decoding), and then one forward pass
//! per step decodes every running sequence. A sequence leaves the batch when it ends (end of
//! sequence, a `stop` string, `max_new_tokens`) or its client goes away.
//!
//! The engine takes sequences whose prompts are already tokens ([`Engine::enqueue`]); turning
//! requests into tokens is [`crate::prompt`]'s.

mod sequence;
mod speculative;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use cresset_plugin_api::sdk::{Host, StepContext};
use cresset_plugin_api::{PluginError, Response};
use cresset_torch::decoder::{Decoder, SlotCache};
use cresset_torch::sampling::sample;
use cresset_torch::tch::Kind;

use crate::api::{self, Finish};
use crate::prompt::{Prepared, PromptEncoder};
use sequence::{placeholder, Sequence};
pub(crate) use speculative::Draft;

/// The answer to a request whose client went away.
pub(crate) fn cancelled() -> PluginError {
    PluginError::new(cresset_plugin_api::ErrorCode::CANCELLED, "cancelled")
}

/// The model, its KV cache and the sequences of the batch.
pub(crate) struct Engine {
    model: Decoder,
    /// Token ids that end a sequence.
    eos_ids: Vec<i64>,
    /// Its tokenizer decodes generated tokens.
    prompts: Arc<PromptEncoder>,
    cache: SlotCache,
    /// Prompt tokens prefilled per step, across sequences (chunked prefill).
    prefill_budget: usize,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    draft: Option<Draft>,
    free_slots: Vec<usize>,
    host: Host,
    model_name: String,
    /// This worker's index, as a metric label.
    instance: String,
}

/// Who the engine reports as, in answers and metrics.
pub(crate) struct Identity {
    /// The host's services (metrics).
    pub host: Host,
    /// The model name, for OpenAI's `model`.
    pub model_name: String,
    /// This worker's index, as a metric label.
    pub instance: String,
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
            free_slots: (0..cache.slots()).collect(),
            model,
            eos_ids,
            prompts,
            cache,
            prefill_budget,
            running: Vec::new(),
            waiting: VecDeque::new(),
            draft,
            host: identity.host,
            model_name: identity.model_name,
            instance: identity.instance,
        }
    }

    /// The model.
    pub fn model(&self) -> &Decoder {
        &self.model
    }

    /// Request `index` (id `id`, arrived at `started`), tokenized: it waits for a slot, behind
    /// the requests the host gave before it.
    pub fn enqueue(&mut self, index: usize, id: String, started: Instant, prepared: Prepared) {
        let at = self.waiting.partition_point(|s| s.index < index);
        self.waiting
            .insert(at, Sequence::new(index, id, started, prepared));
    }

    /// Whether no sequence waits or runs: a step would do nothing.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Forget every sequence after a failed step (the cache may be half-written; the host
    /// answers each with the error).
    pub fn abort(&mut self) {
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            if seq.slot != usize::MAX {
                self.free_slots.push(seq.slot);
            }
        }
        self.free_slots.sort_unstable();
    }

    /// Pick and record the next token of `seq` from its logits; stream what can be released.
    fn advance(&self, seq: &mut Sequence, mut logits: Vec<f32>, ctx: &mut StepContext<'_, '_>) {
        let params = seq.params();
        let token = sample(&mut logits, &params, &seq.history, &mut seq.rng);
        self.emit(seq, token, ctx);
    }

    /// Record the next token of `seq`; stream what can be released; note why it ends, if it does.
    fn emit(&self, seq: &mut Sequence, token: i64, ctx: &mut StepContext<'_, '_>) {
        seq.history.push(token);
        seq.generated += 1;
        if seq.first_token_at.is_none() {
            seq.first_token_at = Some(Instant::now());
        }
        let eos = self.eos_ids.contains(&token);
        let mut piece = if eos {
            String::new()
        } else {
            seq.text.push(self.prompts.tokenizer(), token as u32)
        };
        if eos || seq.text.stopped() {
            seq.finish = Some(Finish::Stop);
        } else if seq.generated >= seq.max_new {
            seq.finish = Some(Finish::Length);
        }
        if seq.finish.is_some() {
            // Release what was held back in case it began a stop string.
            piece.push_str(&seq.text.finish(self.prompts.tokenizer()));
        }
        if seq.request.stream && !piece.is_empty() {
            let meta = api::Meta {
                id: &seq.id,
                created: seq.created,
                model: &self.model_name,
            };
            let chunk = match api::chunk(seq.request.api, &meta, &piece, seq.chunks_sent == 0) {
                Some(v) => Response::json(&v),
                None => Ok(Response::ok(
                    "text/plain; charset=utf-8",
                    piece.into_bytes(),
                )),
            };
            if let Ok(chunk) = chunk {
                seq.chunks_sent += 1;
                if !ctx.send_chunk(seq.index, chunk) {
                    seq.finish = Some(Finish::Stop);
                }
            }
        }
    }

    fn answer(&self, seq: &Sequence) -> Result<Response, PluginError> {
        let meta = api::Meta {
            id: &seq.id,
            created: seq.created,
            model: &self.model_name,
        };
        let finish = seq.finish.unwrap_or(Finish::Length);
        let (prompt, completion) = (seq.prompt.len(), seq.generated);
        if seq.request.stream {
            return match api::stream_end(
                seq.request.api,
                &meta,
                finish,
                prompt,
                completion,
                seq.request.include_usage,
            ) {
                Some(v) => Response::json(&v),
                None => Ok(Response::ok("text/plain; charset=utf-8", Vec::new())),
            };
        }
        Response::json(&api::whole(
            seq.request.api,
            &meta,
            seq.text.text(),
            finish,
            prompt,
            completion,
        ))
    }

    fn observe(&self, seq: &Sequence) {
        let h = &self.host;
        h.counter(
            "cresset_generated_tokens_total",
            "Tokens generated",
            &[],
            seq.generated as f64,
        );
        if let Some(first) = seq.first_token_at {
            h.observe(
                "cresset_time_to_first_token_seconds",
                "From a sequence's arrival at the instance to its first token",
                &[],
                (first - seq.started).as_secs_f64(),
            );
            if seq.generated > 1 {
                h.observe(
                    "cresset_time_per_output_token_seconds",
                    "Mean time per generated token after the first",
                    &[],
                    first.elapsed().as_secs_f64() / (seq.generated - 1) as f64,
                );
            }
        }
    }

    fn gauges(&self) {
        let h = &self.host;
        let instance = [("instance", self.instance.as_str())];
        let (running, waiting) = (self.running.len() as f64, self.waiting.len() as f64);
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
            running / self.cache.slots().max(1) as f64,
        );
    }

    /// The draft's acceptance so far: (accepted, drafted), if a draft model is configured.
    pub fn speculation(&self) -> Option<(u64, u64)> {
        self.draft.as_ref().map(|d| (d.accepted, d.drafted))
    }

    /// Sequences waiting or running (for tests).
    pub fn in_flight(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// One scheduling step: admit, prefill within the token budget, decode every running
    /// sequence in one forward pass, retire the finished.
    pub fn schedule(&mut self, ctx: &mut StepContext<'_, '_>) -> Result<(), PluginError> {
        // Clients that went away free their slot (or their place in line) now.
        for seq in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            if seq.finish.is_none() && ctx.is_cancelled(seq.index) {
                seq.finish = Some(Finish::Stop);
            }
        }
        // Into free slots, lowest first, in arrival order.
        while !self.free_slots.is_empty() && !self.waiting.is_empty() {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.finish.is_some() {
                self.running.push(seq);
                continue;
            }
            seq.slot = self.free_slots.remove(0);
            self.cache.lens[seq.slot] = 0;
            if let Some(draft) = self.draft.as_mut() {
                draft.cache.lens[seq.slot] = 0;
            }
            self.running.push(seq);
        }
        // Prefill, at most `prefill_budget` prompt tokens this step (a long prompt takes several
        // steps, so that it does not stall the others' decoding).
        let mut budget = self.prefill_budget;
        for k in 0..self.running.len() {
            let seq = &self.running[k];
            if seq.finish.is_some() || seq.prefilled == seq.prompt.len() || budget == 0 {
                continue;
            }
            let take = (seq.prompt.len() - seq.prefilled).min(budget);
            budget -= take;
            let chunk = seq.prompt[seq.prefilled..seq.prefilled + take].to_vec();
            let (slot, done) = (seq.slot, seq.prefilled + take == seq.prompt.len());
            let logits = self
                .model
                .forward(&[slot], &[chunk], &mut self.cache, true)
                .and_then(|l| Ok(Vec::<f32>::try_from(l.to_kind(Kind::Float).view([-1]))?))
                .map_err(PluginError::from)?;
            if let Some(draft) = self.draft.as_mut() {
                let chunk = self.running[k].prompt[self.running[k].prefilled..][..take].to_vec();
                let _logits = draft
                    .model
                    .forward(&[slot], &[chunk], &mut draft.cache, true)
                    .map_err(PluginError::from)?;
            }
            self.running[k].prefilled += take;
            if done {
                // Its first token comes from the prefill's last position.
                let mut seq = std::mem::replace(&mut self.running[k], placeholder());
                self.advance(&mut seq, logits, ctx);
                self.running[k] = seq;
            }
        }
        // Decode every sequence that has a token to feed, in one pass (by slot order, so that
        // slots 0..n read their cache as a view).
        let mut rows: Vec<usize> = (0..self.running.len())
            .filter(|&k| self.running[k].decoding() && self.running[k].generated > 0)
            .collect();
        rows.sort_by_key(|&k| self.running[k].slot);
        if !rows.is_empty() && self.draft.is_some() {
            self.speculate(&rows, ctx)?;
        } else if !rows.is_empty() {
            let slots: Vec<usize> = rows.iter().map(|&k| self.running[k].slot).collect();
            let tokens: Vec<Vec<i64>> = rows
                .iter()
                .map(|&k| vec![self.running[k].history.last().copied().unwrap_or(0)])
                .collect();
            let all = self
                .model
                .forward(&slots, &tokens, &mut self.cache, true)
                .and_then(|l| {
                    Ok(Vec::<Vec<f32>>::try_from(
                        l.to_kind(Kind::Float).squeeze_dim(1),
                    )?)
                })
                .map_err(PluginError::from)?;
            let mut taken: Vec<Sequence> = Vec::new();
            for &k in &rows {
                taken.push(std::mem::replace(&mut self.running[k], placeholder()));
            }
            for (seq, logits) in taken.iter_mut().zip(all) {
                self.advance(seq, logits, ctx);
            }
            for (&k, seq) in rows.iter().zip(taken) {
                self.running[k] = seq;
            }
        }
        // Retire the finished; their slots go back.
        let mut k = 0;
        while k < self.running.len() {
            if self.running[k].finish.is_some() {
                let seq = self.running.swap_remove(k);
                self.observe(&seq);
                if seq.slot != usize::MAX {
                    let at = self.free_slots.partition_point(|&s| s < seq.slot);
                    self.free_slots.insert(at, seq.slot);
                }
                let answer = if ctx.is_cancelled(seq.index) {
                    Err(cancelled())
                } else {
                    self.answer(&seq)
                };
                ctx.send_final(seq.index, answer);
            } else {
                k += 1;
            }
        }
        self.gauges();
        Ok(())
    }
}
