//! Choosing the next token from logits: greedy, temperature, top-k, top-p and repetition
//! penalty, with a seedable generator so that a `seed` reproduces a sampled output.
//!
//! Two paths give the same tokens for the same seed: [`sample_rows`] (`device`) picks every
//! row of a step where its logits are, so that only the chosen ids cross to the host (one
//! synchronisation per step on a GPU); [`sample`] and friends (`host`) work on one row copied
//! to the host, for speculative decoding, which needs the whole distributions.

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
    /// > 1 discourages tokens already in the sequence (CTRL's rule, as transformers applies it).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Whether this picks the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether the candidates are taken most likely first (top-k or top-p); otherwise a sample
    /// is drawn over the vocabulary in index order.
    pub fn ranks_candidates(&self) -> bool {
        self.top_p < 1.0 || self.top_k > 0
    }
}

/// The distinct tokens of `history` inside a vocabulary of `vocab`, in increasing order: those
/// the repetition penalty applies to.
pub fn seen_tokens(history: &[i64], vocab: usize) -> Vec<i64> {
    let mut seen: Vec<i64> = history
        .iter()
        .copied()
        .filter(|&t| usize::try_from(t).is_ok_and(|t| t < vocab))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// A small, fast, seedable generator (SplitMix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator that repeats for the same seed.
    pub fn seeded(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// A generator seeded from the clock and a process-wide counter.
    pub fn from_entropy() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::seeded(nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

mod device;
mod host;

pub use device::{sample_rows, RowSampling};
pub use host::{accept_or_replace, argmax, candidates, distribution, draw, sample};
