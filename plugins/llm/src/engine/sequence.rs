//! One sequence of the batch: the shared loop's [`generation::Sequence`] (prompt, slot,
//! history, sampler) carrying the engine's [`Reply`]: its request, the text streamed so far,
//! and its timings.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cresset_torch::generation::{self, Finish};
use cresset_torch::sampling::{Rng, SamplingParams};

use crate::api::GenRequest;
use crate::prompt::Prepared;
use crate::text::TextStream;

/// What the engine keeps to answer a sequence's request.
pub(super) struct Reply {
    /// The request id, for OpenAI's `id`.
    pub id: String,
    pub created: u64,
    pub request: GenRequest,
    pub max_new: usize,
    pub text: TextStream,
    pub started: Instant,
    pub first_token_at: Option<Instant>,
    pub chunks_sent: usize,
}

/// A sequence of the engine's batch.
pub(super) type Sequence = generation::Sequence<Reply>;

/// Request `index` (id `id`, arrived at `started`), ready to wait for a slot.
pub(super) fn sequence(index: usize, id: String, started: Instant, prepared: Prepared) -> Sequence {
    let Prepared {
        request,
        ids,
        max_new,
    } = prepared;
    let rng = request
        .seed
        .map(Rng::seeded)
        .unwrap_or_else(Rng::from_entropy);
    let sampling = SamplingParams {
        temperature: request.temperature as f32,
        top_k: request.top_k as usize,
        top_p: request.top_p as f32,
        repetition_penalty: request.repetition_penalty as f32,
    };
    let reply = Reply {
        id,
        created: now_secs(),
        text: TextStream::new(request.stop.clone()),
        request,
        max_new,
        started,
        first_token_at: None,
        chunks_sent: 0,
    };
    let mut seq = Sequence::new(index, ids, sampling, rng, reply);
    if max_new == 0 {
        seq.finish = Some(Finish::Length);
    }
    seq
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
