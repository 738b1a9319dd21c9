//! The ends of a decoder: the input embeddings (word embeddings, GPT-2's learned positions,
//! BLOOM's norm after them) and the output head (the final norm and the projection to the
//! vocabulary, tied to the word embeddings in most checkpoints).

use tch::{Device, Tensor};

use super::linear::{tensor_bytes, Linear};
use super::norm::Norm;

/// Token ids to the residual stream.
pub(super) struct Embeddings {
    /// `[vocab, hidden]`.
    pub tokens: Tensor,
    /// GPT-2: `[max_positions, hidden]`, added to the word embeddings.
    pub positions: Option<Tensor>,
    /// BLOOM: a norm after the embeddings.
    pub norm: Option<Norm>,
}

impl Embeddings {
    /// The device of the word embeddings, where the ids are looked up.
    pub fn device(&self) -> Device {
        self.tokens.device()
    }

    /// Embed `ids` (`[rows, s]`, on [`Embeddings::device`]) at `positions` (`[rows, s]`).
    pub fn forward(&self, ids: &Tensor, positions: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.tokens, ids, -1, false, false);
        let x = match &self.positions {
            Some(table) => {
                let size = x.size();
                let at = positions.view([-1]).to_device(self.device());
                x + table.index_select(0, &at).view([size[0], size[1], size[2]])
            }
            None => x,
        };
        match &self.norm {
            Some(norm) => norm.forward(&x),
            None => x,
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> u64 {
        tensor_bytes(&self.tokens)
            + self.positions.as_ref().map_or(0, tensor_bytes)
            + self.norm.as_ref().map_or(0, Norm::bytes)
    }
}

/// The residual stream to logits.
pub(super) struct Head {
    /// The final norm.
    pub norm: Norm,
    /// `[vocab, hidden]`, no bias.
    pub lm_head: Linear,
    /// Whether `lm_head` is the word embedding matrix (its bytes are counted there).
    pub tied: bool,
}

impl Head {
    /// Logits for every position of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.norm.forward(&x.to_device(self.norm.device()));
        self.lm_head.forward(&x.to_device(self.lm_head.device()))
    }

    /// Bytes held in memory (a tied projection's are the embeddings').
    pub fn bytes(&self) -> u64 {
        self.norm.bytes() + if self.tied { 0 } else { self.lm_head.bytes() }
    }
}
