//! The one generation loop of the crate: continuous batching over a [`Decoder`]'s slot KV
//! cache. [`Scheduler::step`] admits waiting sequences into free slots, prefills their prompts
//! (a bounded number of prompt tokens per step, so that a long prompt does not stall the
//! others' decoding), decodes every running sequence in one forward pass (speculatively, with a
//! [`Draft`]), and hands back the sequences that ended. What a token means to the caller
//! (streaming text, a stop string, an answer) is the caller's: it sees each token as it is
//! chosen and says when its sequence ends.
//!
//! Two callers share it: the `gpt` engine (`cresset-llm`), one step per host step, and whole
//! batches of requests run to the end ([`generate`], for the `nlp` handler).

mod batch;
mod speculative;
mod static_decode;

use std::collections::VecDeque;

use tch::{Device, Kind};

use crate::decoder::{Decoder, SlotCache};
use crate::sampling::{sample_rows, Rng, RowSampling, SamplingParams};
use crate::ModelError;

pub use batch::{generate, GenerationRequest};
pub use speculative::Draft;
pub use static_decode::StaticDecode;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence, a stop token or string, or its client went away.
    Stop,
    /// It reached its most new tokens.
    Length,
}

impl Finish {
    /// `stop` or `length` (OpenAI's `finish_reason`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One sequence: waiting for a slot, prefilling, or decoding. `T` is the caller's (its
/// request, its output so far).
pub struct Sequence<T> {
    /// The caller's number for it; sequences are admitted in this order.
    pub index: usize,
    /// How its tokens are picked.
    pub sampling: SamplingParams,
    /// Its random numbers.
    pub rng: Rng,
    /// Why it ended, once it has: it leaves the batch (and frees its slot) at the end of the
    /// step.
    pub finish: Option<Finish>,
    /// The caller's.
    pub data: T,
    prompt: Vec<i64>,
    /// The prompt, then the generated tokens.
    history: Vec<i64>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    slot: Option<usize>,
}

impl<T> Sequence<T> {
    /// Sequence `index` with `prompt` (not empty), to wait for a slot.
    pub fn new(
        index: usize,
        prompt: Vec<i64>,
        sampling: SamplingParams,
        rng: Rng,
        data: T,
    ) -> Self {
        Self {
            index,
            sampling,
            rng,
            finish: None,
            data,
            history: prompt.clone(),
            prompt,
            prefilled: 0,
            slot: None,
        }
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[i64] {
        &self.prompt
    }

    /// The prompt's tokens, then the generated ones.
    pub fn history(&self) -> &[i64] {
        &self.history
    }

    /// The generated tokens.
    pub fn generated(&self) -> &[i64] {
        &self.history[self.prompt.len()..]
    }

    /// Whether it takes part in decoding: prefilled, not ended.
    fn decoding(&self) -> bool {
        self.finish.is_none() && self.prefilled == self.prompt.len()
    }
}

/// Pick the next token of each of `rows` (indices into `running`, distinct) from `logits`
/// (`[rows.len(), 1, vocab]`, the rows' last positions) where the logits are, and record it in
/// the sequence's history: only the ids cross to the host.
fn choose<T>(
    running: &mut [Sequence<T>],
    rows: &[usize],
    logits: &tch::Tensor,
) -> Result<Vec<i64>, ModelError> {
    let mut by_index: Vec<Option<&mut Sequence<T>>> = running.iter_mut().map(Some).collect();
    let mut seqs: Vec<&mut Sequence<T>> = rows
        .iter()
        .map(|&k| {
            by_index[k]
                .take()
                .expect("the rows of a pass are distinct sequences: this is a bug")
        })
        .collect();
    let mut picks: Vec<RowSampling> = seqs
        .iter_mut()
        .map(|seq| {
            let Sequence {
                sampling,
                history,
                rng,
                ..
            } = &mut **seq;
            RowSampling {
                params: sampling,
                history,
                rng,
            }
        })
        .collect();
    let tokens = sample_rows(&logits.squeeze_dim(1), &mut picks)?;
    drop(picks);
    for (seq, &token) in seqs.iter_mut().zip(&tokens) {
        seq.history.push(token);
    }
    Ok(tokens)
}

/// The sequences of a batch, their slots in one KV cache, and the loop that runs them.
pub struct Scheduler<T> {
    cache: SlotCache,
    draft: Option<Draft>,
    /// Prompt tokens prefilled per step, across sequences (chunked prefill).
    prefill_budget: usize,
    free_slots: Vec<usize>,
    running: Vec<Sequence<T>>,
    waiting: VecDeque<Sequence<T>>,
    /// Decode steps in repeating shapes (CUDA graphs on a GPU), when chosen.
    static_decode: Option<StaticDecode>,
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The logits of a forward pass's rows, on the CPU in f32: `[rows, vocab]` from
/// `[rows, 1, vocab]`.
fn rows_of(logits: tch::Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    let logits = logits.to_kind(Kind::Float).to_device(Device::Cpu);
    Ok(Vec::<Vec<f32>>::try_from(logits.squeeze_dim(1))?)
}

impl<T> Scheduler<T> {
    /// A scheduler over `cache` (one slot per sequence of the batch), prefilling at most
    /// `prefill_budget` prompt tokens per step, with a draft model for speculative decoding
    /// (whose cache has the same slots) if given.
    pub fn new(cache: SlotCache, prefill_budget: usize, draft: Option<Draft>) -> Self {
        Self {
            free_slots: (0..cache.slots()).collect(),
            cache,
            draft,
            prefill_budget,
            running: Vec::new(),
            waiting: VecDeque::new(),
            static_decode: None,
        }
    }

    /// Decode in repeating shapes ([`StaticDecode`]): replaying CUDA graphs if `graphs`, or
    /// eagerly (how the CPU tests check the shapes' arithmetic). Every shape is prepared now
    /// (`warm_up`: no request pays for a capture). Returns whether the path is on: not with a
    /// draft model (speculative steps verify several tokens at once), and not when graphs were
    /// asked for but cannot be captured (the model is not wholly on one GPU, or a capture
    /// failed): eager steps in the static shapes would read the whole cache every step, so the
    /// dynamic steps stay.
    pub fn use_static_decode(
        &mut self,
        model: &Decoder,
        graphs: bool,
        warm_up: bool,
    ) -> Result<bool, ModelError> {
        if self.draft.is_some() {
            return Ok(false);
        }
        let mut path = StaticDecode::new(model, graphs);
        if graphs && !path.graphs() {
            return Ok(false);
        }
        if warm_up {
            let _guard = tch::no_grad_guard();
            path.warm_up(model, &self.cache)?;
            if graphs && !path.graphs() {
                return Ok(false);
            }
        }
        self.static_decode = Some(path);
        Ok(true)
    }

    /// Whether decode steps replay CUDA graphs.
    pub fn cuda_graphs(&self) -> bool {
        self.static_decode
            .as_ref()
            .is_some_and(StaticDecode::graphs)
    }

    /// Let `seq` wait for a slot, behind the waiting sequences with lower indices.
    pub fn enqueue(&mut self, seq: Sequence<T>) {
        let at = self.waiting.partition_point(|s| s.index < seq.index);
        self.waiting.insert(at, seq);
    }

    /// Every sequence, running, then waiting.
    pub fn sequences_mut(&mut self) -> impl Iterator<Item = &mut Sequence<T>> {
        self.running.iter_mut().chain(self.waiting.iter_mut())
    }

    /// Whether no sequence waits or runs: a step would do nothing.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Sequences holding a slot.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Slots of the cache.
    pub fn slots(&self) -> usize {
        self.cache.slots()
    }

    /// The draft's acceptance so far: (accepted, drafted), if a draft model is configured.
    pub fn speculation(&self) -> Option<(u64, u64)> {
        self.draft.as_ref().map(|d| (d.accepted, d.drafted))
    }

    /// The draft model, if one is configured.
    pub fn draft_model(&self) -> Option<&crate::decoder::Decoder> {
        self.draft.as_ref().map(|d| &d.model)
    }

    /// Forget every sequence (after a failed step, when the cache may be half-written).
    pub fn abort(&mut self) {
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            if let Some(slot) = seq.slot {
                self.free_slots.push(slot);
            }
        }
        self.free_slots.sort_unstable();
    }

    /// One scheduling step with `model`: admit waiting sequences into free slots (lowest
    /// first), prefill within the token budget, decode every running sequence in one forward
    /// pass, and return the sequences that ended, their slots freed. Each chosen token goes to
    /// `on_token` (already in the sequence's history), which sets `finish` when the sequence
    /// ends.
    pub fn step(
        &mut self,
        model: &Decoder,
        mut on_token: impl FnMut(&mut Sequence<T>, i64),
    ) -> Result<Vec<Sequence<T>>, ModelError> {
        self.admit();
        self.prefill(model, &mut on_token)?;
        // Decode every sequence that has a token to feed, in one pass (by slot order, so that
        // slots 0..n read their cache as a view).
        let mut rows: Vec<usize> = (0..self.running.len())
            .filter(|&k| self.running[k].decoding() && !self.running[k].generated().is_empty())
            .collect();
        rows.sort_by_key(|&k| self.running[k].slot);
        if !rows.is_empty() && self.draft.is_some() {
            self.speculate(model, &rows, &mut on_token)?;
        } else if !rows.is_empty() {
            self.decode(model, &rows, &mut on_token)?;
        }
        Ok(self.retire())
    }

    /// Into free slots, lowest first, in index order. An ended sequence (its client went
    /// away while it waited) joins the running ones without a slot, to leave at the step's end.
    fn admit(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.finish.is_none() {
                let slot = self.free_slots.remove(0);
                self.cache.lens[slot] = 0;
                if let Some(draft) = self.draft.as_mut() {
                    draft.cache.lens[slot] = 0;
                }
                seq.slot = Some(slot);
            }
            self.running.push(seq);
        }
    }

    /// Prefill at most `prefill_budget` prompt tokens (a long prompt takes several steps);
    /// a sequence whose prompt is all in gets its first token from the last position.
    /// Sequences prefill together, one forward pass for all of them, as many tokens each as
    /// the shortest rest among them (a pass takes rows of one length), until the budget is
    /// spent: prompts of equal length take one pass, where one pass per prompt decoded the
    /// weights once per prompt.
    fn prefill(
        &mut self,
        model: &Decoder,
        on_token: &mut impl FnMut(&mut Sequence<T>, i64),
    ) -> Result<(), ModelError> {
        let mut budget = self.prefill_budget;
        loop {
            self.share_prefixes();
            // By slot, so that a run of slots from 0 reads its cache as a view.
            let mut group: Vec<usize> = (0..self.running.len())
                .filter(|&k| {
                    let seq = &self.running[k];
                    seq.slot.is_some() && seq.finish.is_none() && seq.prefilled < seq.prompt.len()
                })
                .collect();
            group.sort_by_key(|&k| self.running[k].slot);
            // A prompt that begins as an earlier one in the group waits for that one to be
            // computed, then takes its keys and values (`share_prefixes`).
            let mut leaders: Vec<usize> = Vec::new();
            for &k in &group {
                let seq = &self.running[k];
                let follows = leaders.iter().any(|&l| {
                    common_prefix(&seq.prompt, &self.running[l].prompt).min(seq.prompt.len() - 1)
                        > seq.prefilled
                });
                if !follows {
                    leaders.push(k);
                }
            }
            let mut group = leaders;
            if group.is_empty() || budget == 0 {
                return Ok(());
            }
            group.truncate(budget);
            let rest = |seq: &Sequence<T>| seq.prompt.len() - seq.prefilled;
            let shortest = group
                .iter()
                .map(|&k| rest(&self.running[k]))
                .min()
                .unwrap_or(0);
            let take = shortest.min(budget / group.len());
            budget -= take * group.len();
            let slots: Vec<usize> = group.iter().map(|&k| self.slot_of(k)).collect();
            let chunks: Vec<Vec<i64>> = group
                .iter()
                .map(|&k| {
                    let seq = &self.running[k];
                    seq.prompt[seq.prefilled..seq.prefilled + take].to_vec()
                })
                .collect();
            let logits = model.forward(&slots, &chunks, &mut self.cache, true)?;
            if let Some(draft) = self.draft.as_mut() {
                let _logits = draft
                    .model
                    .forward(&slots, &chunks, &mut draft.cache, true)?;
            }
            // The prompts that are all in take their first token from their last position.
            let mut done = Vec::new();
            let mut done_rows = Vec::new();
            for (row, &k) in group.iter().enumerate() {
                let seq = &mut self.running[k];
                seq.prefilled += take;
                if seq.prefilled == seq.prompt.len() {
                    done.push(k);
                    done_rows.push(row as i64);
                }
            }
            if !done.is_empty() {
                let index = tch::Tensor::from_slice(&done_rows).to_device(logits.device());
                let tokens = choose(&mut self.running, &done, &logits.index_select(0, &index))?;
                for (&k, token) in done.iter().zip(tokens) {
                    on_token(&mut self.running[k], token);
                }
            }
        }
    }

    /// Prompts that begin as another running sequence's tokens do (a shared system prompt, the
    /// same question asked twice) take the keys and values of the common part from that
    /// sequence's slot rather than computing them again; the last prompt token is always
    /// computed, for its logits.
    fn share_prefixes(&mut self) {
        for k in 0..self.running.len() {
            let seq = &self.running[k];
            let Some(slot) = seq.slot else { continue };
            if seq.finish.is_some() || seq.prefilled >= seq.prompt.len() {
                continue;
            }
            let wanted = &seq.prompt[..seq.prompt.len() - 1];
            let mut best: Option<(usize, usize)> = None;
            for other in &self.running {
                let Some(from) = other.slot.filter(|&s| s != slot) else {
                    continue;
                };
                let held = self.shareable(from).min(other.history.len());
                let common = common_prefix(wanted, &other.history[..held]);
                if common > best.map_or(seq.prefilled, |b| b.1) {
                    best = Some((from, common));
                }
            }
            let Some((from, common)) = best else { continue };
            let start = seq.prefilled as i64;
            self.cache.copy_positions(from, slot, start, common as i64);
            if let Some(draft) = self.draft.as_mut() {
                draft.cache.copy_positions(from, slot, start, common as i64);
            }
            self.running[k].prefilled = common;
        }
    }

    /// Positions of `slot` whose keys and values are computed in every cache (the draft's too).
    fn shareable(&self, slot: usize) -> usize {
        let held = self.cache.lens[slot];
        let held = match &self.draft {
            Some(draft) => held.min(draft.cache.lens[slot]),
            None => held,
        };
        held.max(0) as usize
    }

    /// One forward pass for `rows` (indices into `running`, by slot), one token each.
    fn decode(
        &mut self,
        model: &Decoder,
        rows: &[usize],
        on_token: &mut impl FnMut(&mut Sequence<T>, i64),
    ) -> Result<(), ModelError> {
        let slots: Vec<usize> = rows.iter().map(|&k| self.slot_of(k)).collect();
        let tokens: Vec<Vec<i64>> = rows
            .iter()
            .map(|&k| vec![self.running[k].history.last().copied().unwrap_or(0)])
            .collect();
        let logits = match self.static_decode.as_mut() {
            Some(path) => {
                let last: Vec<i64> = tokens.iter().map(|t| t[0]).collect();
                path.step(model, &mut self.cache, &slots, &last)?
            }
            None => model.forward(&slots, &tokens, &mut self.cache, true)?,
        };
        let tokens = choose(&mut self.running, rows, &logits)?;
        for (&k, token) in rows.iter().zip(tokens) {
            on_token(&mut self.running[k], token);
        }
        Ok(())
    }

    /// The slot of running sequence `k`, which is in a forward pass.
    fn slot_of(&self, k: usize) -> usize {
        self.running[k]
            .slot
            .expect("a sequence in a forward pass holds a slot: this is a bug")
    }

    /// Take out the ended sequences; their slots go back.
    fn retire(&mut self) -> Vec<Sequence<T>> {
        let mut ended = Vec::new();
        let mut k = 0;
        while k < self.running.len() {
            if self.running[k].finish.is_some() {
                let seq = self.running.swap_remove(k);
                if let Some(slot) = seq.slot {
                    let at = self.free_slots.partition_point(|&s| s < slot);
                    self.free_slots.insert(at, slot);
                }
                ended.push(seq);
            } else {
                k += 1;
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sequence `index`: greedy, after `prompt`.
    fn greedy(index: usize, prompt: &[i64]) -> Sequence<()> {
        let sampling = SamplingParams::default();
        Sequence::new(index, prompt.to_vec(), sampling, Rng::seeded(0), ())
    }

    /// Run `scheduler` to its end; each sequence ends after `max_new` tokens. Returns the
    /// generated tokens by index and, per step, the indices that got a token.
    fn run(
        model: &Decoder,
        scheduler: &mut Scheduler<()>,
        max_new: usize,
    ) -> (Vec<Vec<i64>>, Vec<Vec<usize>>) {
        let (mut outputs, mut steps) = (vec![Vec::new(); 8], Vec::new());
        while !scheduler.is_idle() {
            let mut got = Vec::new();
            let ended = scheduler
                .step(model, |seq, _| {
                    got.push(seq.index);
                    if seq.generated().len() >= max_new {
                        seq.finish = Some(Finish::Length);
                    }
                })
                .expect("step");
            for seq in ended {
                outputs[seq.index] = seq.generated().to_vec();
            }
            steps.push(got);
        }
        (outputs, steps)
    }

    #[test]
    fn sequences_take_free_slots_in_index_order_and_the_next_waits_for_one() {
        let model = Decoder::made_up();
        let mut scheduler = Scheduler::new(model.new_cache(2, 16), usize::MAX, None);
        for index in [2, 0, 1] {
            scheduler.enqueue(greedy(index, &[1, 2, 3]));
        }
        let (outputs, steps) = run(&model, &mut scheduler, 3);
        // 0 and 1 prefill (a token each) and decode (another) in the first step; 2 waits.
        assert_eq!(steps[0], [0, 1, 0, 1]);
        assert!(steps[..2].iter().all(|s| !s.contains(&2)), "{steps:?}");
        assert!(
            steps[2].contains(&2),
            "2 takes the first freed slot: {steps:?}"
        );
        assert_eq!(
            outputs[0], outputs[2],
            "the same prompt gives the same tokens"
        );
        assert_eq!(outputs[0].len(), 3);
        assert_eq!(scheduler.running() + scheduler.waiting(), 0);
    }

    #[test]
    fn a_prompt_prefills_within_the_budget_over_several_steps_to_the_same_tokens() {
        let model = Decoder::made_up();
        let prompt = [3, 1, 4, 1, 5, 9, 2, 6];
        let mut whole = Scheduler::new(model.new_cache(1, 16), usize::MAX, None);
        whole.enqueue(greedy(0, &prompt));
        let (expected, _) = run(&model, &mut whole, 4);
        let mut chunked = Scheduler::new(model.new_cache(1, 16), 3, None);
        chunked.enqueue(greedy(0, &prompt));
        let (outputs, steps) = run(&model, &mut chunked, 4);
        // 3 + 3 + 2 prompt tokens: the first token comes in the third step.
        assert!(steps[0].is_empty() && steps[1].is_empty(), "{steps:?}");
        assert_eq!(steps[2], [0, 0]);
        assert_eq!(outputs[0], expected[0]);
    }

    #[test]
    fn static_decode_buckets_are_powers_of_two_up_to_the_slot_count() {
        // (The tokens of static steps are checked on a real checkpoint, in decoder_fidelity.)
        assert_eq!(StaticDecode::buckets(3), [1, 2, 3]);
        assert_eq!(StaticDecode::buckets(8), [1, 2, 4, 8]);
        assert_eq!(StaticDecode::buckets(1), [1]);
    }

    #[test]
    fn prompts_that_begin_alike_share_the_computed_part_and_give_their_own_tokens() {
        let model = Decoder::made_up();
        let same = [3, 1, 4, 1, 5, 9, 2, 6];
        let prompts: [&[i64]; 4] = [&same, &same, &[3, 1, 4, 1, 7, 7], &same];
        let alone: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| {
                let mut s = Scheduler::new(model.new_cache(1, 24), usize::MAX, None);
                s.enqueue(greedy(0, p));
                run(&model, &mut s, 5).0.swap_remove(0)
            })
            .collect();
        // 8 + 1 + (6 - 4) + 1 = 12 prompt tokens computed: all four begin in the first step,
        // where computing every prompt whole would take 30.
        let mut shared = Scheduler::new(model.new_cache(4, 24), 12, None);
        for (i, p) in prompts.iter().enumerate() {
            shared.enqueue(greedy(i, p));
        }
        let (outputs, steps) = run(&model, &mut shared, 5);
        for i in 0..4 {
            assert!(steps[0].contains(&i), "{i} begins at once: {steps:?}");
            assert_eq!(outputs[i], alone[i], "prompt {i}");
        }
        // One token fewer and the prompt that shares least finishes in the next step.
        let mut tight = Scheduler::new(model.new_cache(4, 24), 11, None);
        for (i, p) in prompts.iter().enumerate() {
            tight.enqueue(greedy(i, p));
        }
        let (outputs, steps) = run(&model, &mut tight, 5);
        assert!(!steps[0].contains(&2) && steps[1].contains(&2), "{steps:?}");
        assert_eq!(&outputs[..4], &alone[..]);
    }

    #[test]
    fn an_ended_waiting_sequence_leaves_without_a_slot_and_abort_frees_every_slot() {
        let model = Decoder::made_up();
        let mut scheduler = Scheduler::new(model.new_cache(2, 16), usize::MAX, None);
        let mut gone = greedy(0, &[1, 2]);
        gone.finish = Some(Finish::Stop);
        scheduler.enqueue(gone);
        scheduler.enqueue(greedy(1, &[1, 2]));
        scheduler.enqueue(greedy(2, &[1, 2]));
        let ended = scheduler.step(&model, |_, _| {}).expect("step");
        let ended: Vec<usize> = ended.iter().map(|s| s.index).collect();
        assert_eq!(ended, [0], "it is answered at once, having taken no slot");
        assert_eq!((scheduler.running(), scheduler.waiting()), (2, 0));
        scheduler.abort();
        assert!(scheduler.is_idle());
        assert_eq!(scheduler.free_slots, [0, 1]);
    }
}
