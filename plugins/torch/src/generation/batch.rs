//! Whole requests run to their end on the one loop ([`Scheduler`]): what the `nlp` handler's
//! text generation calls, a batch at a time. Requests are taken in groups whose cache (rows ×
//! longest sequence) stays within a budget, each group in a cache of its own.

use super::{Finish, Scheduler, Sequence};
use crate::decoder::Decoder;
use crate::sampling::{Rng, SamplingParams};
use crate::ModelError;

/// One sequence for [`generate`].
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<i64>,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Seed for sampling (random when absent).
    pub seed: Option<u64>,
    /// Stop after any of these (included in the output).
    pub stop_ids: Vec<i64>,
}

/// Cache positions (rows × longest sequence) one group may hold.
const BUDGET: usize = 1 << 15;

/// Generate for several prompts together: each sequence gets a slot of one cache, its whole
/// prompt is prefilled into it, and then every unfinished sequence decodes one token per
/// forward pass until each reaches `max_new_tokens` or a stop id. Returns the new tokens of
/// each request, in order.
pub fn generate(
    model: &Decoder,
    requests: &[GenerationRequest],
) -> Result<Vec<Vec<i64>>, ModelError> {
    for r in requests {
        if r.prompt.is_empty() {
            return Err(ModelError::Invalid("a prompt has no tokens".into()));
        }
        if r.prompt.len() + r.max_new_tokens > model.config.max_positions as usize {
            return Err(ModelError::Invalid(format!(
                "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the model's context \
                 of {} tokens",
                r.prompt.len(),
                r.max_new_tokens,
                model.config.max_positions
            )));
        }
    }
    let mut outputs = Vec::with_capacity(requests.len());
    let mut start = 0;
    while start < requests.len() {
        let mut end = start + 1;
        let mut longest = requests[start].prompt.len() + requests[start].max_new_tokens;
        while end < requests.len() {
            let len = longest.max(requests[end].prompt.len() + requests[end].max_new_tokens);
            if len * (end + 1 - start) > BUDGET {
                break;
            }
            longest = len;
            end += 1;
        }
        outputs.extend(generate_group(
            model,
            &requests[start..end],
            longest as i64,
        )?);
        start = end;
    }
    Ok(outputs)
}

/// Run `requests` to their end in one cache of `capacity` positions per slot.
fn generate_group(
    model: &Decoder,
    requests: &[GenerationRequest],
    capacity: i64,
) -> Result<Vec<Vec<i64>>, ModelError> {
    let cache = model.new_cache(requests.len(), capacity);
    // The whole prompt in one pass: every prompt fits the cache.
    let mut scheduler: Scheduler<()> = Scheduler::new(cache, usize::MAX, None);
    for (index, r) in requests.iter().enumerate() {
        let rng = r.seed.map(Rng::seeded).unwrap_or_else(Rng::from_entropy);
        let mut seq = Sequence::new(index, r.prompt.clone(), r.sampling.clone(), rng, ());
        if r.max_new_tokens == 0 {
            seq.finish = Some(Finish::Length);
        }
        scheduler.enqueue(seq);
    }
    let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); requests.len()];
    while !scheduler.is_idle() {
        let ended = scheduler.step(model, |seq, token| {
            let r = &requests[seq.index];
            if r.stop_ids.contains(&token) {
                seq.finish = Some(Finish::Stop);
            } else if seq.generated().len() >= r.max_new_tokens {
                seq.finish = Some(Finish::Length);
            }
        })?;
        for seq in ended {
            outputs[seq.index] = seq.generated().to_vec();
        }
    }
    Ok(outputs)
}
