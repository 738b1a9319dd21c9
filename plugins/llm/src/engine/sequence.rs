//! One sequence of the batch: its request, its prompt, where it is in the KV cache and what it
//! has generated.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cresset_torch::sampling::{Rng, SamplingParams};

use crate::api::{Api, Finish, GenRequest, Prompt, PromptField};
use crate::prompt::Prepared;
use crate::text::TextStream;

/// One sequence: waiting for a slot, prefilling, or decoding.
pub(super) struct Sequence {
    /// The request's index (numbered across calls).
    pub index: usize,
    /// The request id, for OpenAI's `id`.
    pub id: String,
    pub created: u64,
    pub request: GenRequest,
    pub prompt: Vec<i64>,
    /// Prompt tokens already in the cache.
    pub prefilled: usize,
    pub slot: usize,
    pub max_new: usize,
    pub history: Vec<i64>,
    pub generated: usize,
    pub rng: Rng,
    pub text: TextStream,
    pub finish: Option<Finish>,
    pub started: Instant,
    pub first_token_at: Option<Instant>,
    pub chunks_sent: usize,
}

impl Sequence {
    /// Request `index` (id `id`, arrived at `started`), ready to wait for a slot.
    pub fn new(index: usize, id: String, started: Instant, prepared: Prepared) -> Self {
        let Prepared {
            request,
            ids,
            max_new,
        } = prepared;
        Self {
            index,
            id,
            created: now_secs(),
            rng: request
                .seed
                .map(Rng::seeded)
                .unwrap_or_else(Rng::from_entropy),
            text: TextStream::new(request.stop.clone()),
            finish: (max_new == 0).then_some(Finish::Length),
            request,
            history: ids.clone(),
            prompt: ids,
            prefilled: 0,
            slot: usize::MAX,
            max_new,
            generated: 0,
            started,
            first_token_at: None,
            chunks_sent: 0,
        }
    }

    pub fn decoding(&self) -> bool {
        self.finish.is_none() && self.prefilled == self.prompt.len()
    }

    pub fn params(&self) -> SamplingParams {
        let r = &self.request;
        SamplingParams {
            temperature: r.temperature as f32,
            top_k: r.top_k as usize,
            top_p: r.top_p as f32,
            repetition_penalty: r.repetition_penalty as f32,
        }
    }
}

/// An empty sequence, to move real ones out of the running list briefly.
pub(super) fn placeholder() -> Sequence {
    Sequence {
        index: usize::MAX,
        id: String::new(),
        created: 0,
        request: GenRequest {
            api: Api::TorchServe,
            prompt: Prompt::Text(String::new()),
            prompt_field: PromptField::Body,
            max_new_tokens: None,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
        },
        prompt: Vec::new(),
        prefilled: 0,
        slot: usize::MAX,
        max_new: 0,
        history: Vec::new(),
        generated: 0,
        rng: Rng::seeded(0),
        text: TextStream::new(Vec::new()),
        finish: Some(Finish::Stop),
        started: Instant::now(),
        first_token_at: None,
        chunks_sent: 0,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
