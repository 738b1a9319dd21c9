//! Speculative decoding: a draft model with the same vocabulary proposes a few tokens per
//! sequence, and one forward pass of the target checks them all.

use cresset_plugin_api::sdk::StepContext;
use cresset_plugin_api::PluginError;
use cresset_torch::decoder::{Decoder, SlotCache};
use cresset_torch::sampling::sample;
use cresset_torch::tch::Kind;

use super::sequence::placeholder;
use super::Engine;

/// A draft model for speculative decoding: the same vocabulary, its own cache slots.
pub(crate) struct Draft {
    pub(super) model: Decoder,
    pub(super) cache: SlotCache,
    pub(super) k: usize,
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

impl Engine {
    /// Speculative decoding for `rows` (indices into `running`): the draft proposes up to k
    /// tokens per row, one forward pass of the target checks them all, and each row keeps the
    /// longest accepted prefix plus one token of the target's (speculative sampling's rule, so
    /// greedy output is the target's own and sampled output has the target's distribution).
    pub(super) fn speculate(
        &mut self,
        rows: &[usize],
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        use cresset_torch::sampling::{accept_or_replace, distribution, draw};
        let Some(draft) = self.draft.as_mut() else {
            return Ok(());
        };
        let slots: Vec<usize> = rows.iter().map(|&k| self.running[k].slot).collect();
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
            let logits = draft
                .model
                .forward(&slots, &fed, &mut draft.cache, true)
                .and_then(|l| {
                    Ok(Vec::<Vec<f32>>::try_from(
                        l.to_kind(Kind::Float).squeeze_dim(1),
                    )?)
                })
                .map_err(PluginError::from)?;
            for (i, mut row) in logits.into_iter().enumerate() {
                let seq = &mut self.running[rows[i]];
                let mut history = seq.history.clone();
                history.extend(&drafts[i]);
                let q = distribution(&mut row, &seq.params(), &history);
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
        let logits = self
            .model
            .forward(&slots, &tokens, &mut self.cache, false)
            .and_then(|l| Ok(Vec::<Vec<Vec<f32>>>::try_from(l.to_kind(Kind::Float))?))
            .map_err(PluginError::from)?;
        let mut catch_up: Vec<(usize, i64)> = Vec::new();
        let (mut drafted, mut accepted_total) = (0u64, 0u64);
        for (i, mut positions) in logits.into_iter().enumerate() {
            let r = rows[i];
            let mut seq = std::mem::replace(&mut self.running[r], placeholder());
            let mut accepted = 0;
            let mut replacement: Option<i64> = None;
            for j in 0..k {
                let mut history = seq.history.clone();
                history.extend(&drafts[i][..j]);
                let p = distribution(&mut positions[j], &seq.params(), &history);
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
                    let params = seq.params();
                    sample(&mut positions[k], &params, &history, &mut seq.rng)
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
                self.emit(&mut seq, t, ctx);
            }
            self.running[r] = seq;
        }
        let Some(draft) = self.draft.as_mut() else {
            return Ok(());
        };
        for (i, &slot) in slots.iter().enumerate() {
            let kept = self.cache.lens[slot];
            draft.cache.lens[slot] = kept.min(before[i] + k as i64);
        }
        if !catch_up.is_empty() {
            let slots: Vec<usize> = catch_up.iter().map(|c| c.0).collect();
            let tokens: Vec<Vec<i64>> = catch_up.iter().map(|c| vec![c.1]).collect();
            let _logits = draft
                .model
                .forward(&slots, &tokens, &mut draft.cache, true)
                .map_err(PluginError::from)?;
        }
        draft.drafted += drafted;
        draft.accepted += accepted_total;
        if draft.drafted > 0 {
            self.host.gauge(
                "cresset_speculative_acceptance_ratio",
                "Drafted tokens the target accepted, since start",
                &[],
                draft.accepted as f64 / draft.drafted as f64,
            );
        }
        Ok(())
    }
}
