//! Speculative decoding: a draft model with the same vocabulary proposes a few tokens per
//! sequence, and one forward pass of the target checks them all. Each sequence keeps the
//! longest accepted prefix plus one token of the target's (speculative sampling's rule, so that
//! greedy output is the target's own and sampled output has the target's distribution).

use tch::{Device, Kind};

use super::{Scheduler, Sequence};
use crate::decoder::{Decoder, SlotCache};
use crate::sampling::{accept_or_replace, distribution, draw, sample};
use crate::ModelError;

/// A draft model for speculative decoding: the same vocabulary, its own cache slots.
pub struct Draft {
    pub(super) model: Decoder,
    pub(super) cache: SlotCache,
    k: usize,
    pub(super) drafted: u64,
    pub(super) accepted: u64,
}

impl Draft {
    /// `model` drafting `k` tokens per step, with `slots` slots of `positions` positions.
    pub fn new(model: Decoder, slots: usize, positions: i64, k: usize) -> Self {
        Self {
            cache: model.new_cache(slots, positions),
            model,
            k,
            drafted: 0,
            accepted: 0,
        }
    }
}

impl<T> Scheduler<T> {
    /// Speculative decoding for `rows` (indices into `running`, by slot): the draft proposes
    /// up to k tokens per row, one forward pass of `model` checks them all.
    pub(super) fn speculate(
        &mut self,
        model: &Decoder,
        rows: &[usize],
        on_token: &mut impl FnMut(&mut Sequence<T>, i64),
    ) -> Result<(), ModelError> {
        let slots: Vec<usize> = rows.iter().map(|&k| self.slot_of(k)).collect();
        let Some(draft) = self.draft.as_mut() else {
            return Ok(());
        };
        // Both caches hold each sequence but its last token, which is fed now; the target takes
        // k + 1 positions this step.
        let room = slots
            .iter()
            .map(|&s| (self.cache.capacity - self.cache.lens[s] - 1).max(0) as usize)
            .min()
            .unwrap_or(0);
        let k = draft.k.min(room);
        let lasts: Vec<i64> = rows
            .iter()
            .map(|&r| self.running[r].history.last().copied().unwrap_or(0))
            .collect();
        let mut fed: Vec<Vec<i64>> = lasts.iter().map(|&t| vec![t]).collect();
        let mut drafts: Vec<Vec<i64>> = vec![Vec::new(); rows.len()];
        let mut draft_dists: Vec<Vec<Vec<f64>>> = vec![Vec::new(); rows.len()];
        for _ in 0..k {
            let logits = draft.model.forward(&slots, &fed, &mut draft.cache, true)?;
            for (i, mut row) in super::rows_of(logits)?.into_iter().enumerate() {
                let seq = &mut self.running[rows[i]];
                let mut history = seq.history.clone();
                history.extend(&drafts[i]);
                let q = distribution(&mut row, &seq.sampling, &history);
                let order: Vec<usize> = (0..q.len()).collect();
                let d = draw(&order, &q, &mut seq.rng);
                drafts[i].push(d);
                draft_dists[i].push(q);
                fed[i] = vec![d];
            }
        }
        // The target checks the fed token and every draft in one pass.
        let tokens: Vec<Vec<i64>> = lasts
            .iter()
            .zip(&drafts)
            .map(|(&t, d)| std::iter::once(t).chain(d.iter().copied()).collect())
            .collect();
        let before: Vec<i64> = slots.iter().map(|&s| self.cache.lens[s]).collect();
        let logits = model
            .forward(&slots, &tokens, &mut self.cache, false)?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let logits = Vec::<Vec<Vec<f32>>>::try_from(logits)?;
        let mut catch_up: Vec<(usize, i64)> = Vec::new();
        let (mut drafted, mut accepted_total) = (0u64, 0u64);
        for (i, mut positions) in logits.into_iter().enumerate() {
            let seq = &mut self.running[rows[i]];
            let mut accepted = 0;
            let mut replacement: Option<i64> = None;
            for j in 0..k {
                let mut history = seq.history.clone();
                history.extend(&drafts[i][..j]);
                let p = distribution(&mut positions[j], &seq.sampling, &history);
                match accept_or_replace(drafts[i][j] as usize, &p, &draft_dists[i][j], &mut seq.rng)
                {
                    Ok(()) => accepted += 1,
                    Err(t) => {
                        replacement = Some(t);
                        break;
                    }
                }
            }
            let next = match replacement {
                Some(t) => t,
                None => {
                    // Every draft accepted: the target's own next token comes free.
                    let mut history = seq.history.clone();
                    history.extend(&drafts[i]);
                    sample(&mut positions[k], &seq.sampling, &history, &mut seq.rng)
                }
            };
            drafted += k as u64;
            accepted_total += accepted as u64;
            // Keep the fed token and the accepted drafts; the new token is fed next step.
            let slot = slots[i];
            self.cache.lens[slot] = before[i] + 1 + accepted as i64;
            if accepted == k && k > 0 {
                // The draft never saw its own last proposal: it is fed before the next round.
                catch_up.push((slot, drafts[i][k - 1]));
            }
            for &t in drafts[i][..accepted].iter().chain(std::iter::once(&next)) {
                if seq.finish.is_some() {
                    break;
                }
                seq.history.push(t);
                on_token(seq, t);
            }
        }
        for (i, &slot) in slots.iter().enumerate() {
            let kept = self.cache.lens[slot];
            draft.cache.lens[slot] = kept.min(before[i] + k as i64);
        }
        if !catch_up.is_empty() {
            let slots: Vec<usize> = catch_up.iter().map(|c| c.0).collect();
            let tokens: Vec<Vec<i64>> = catch_up.iter().map(|c| vec![c.1]).collect();
            let _logits = draft
                .model
                .forward(&slots, &tokens, &mut draft.cache, true)?;
        }
        draft.drafted += drafted;
        draft.accepted += accepted_total;
        Ok(())
    }
}
