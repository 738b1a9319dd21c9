//! The ends of a decoder: the input embeddings (word embeddings, GPT-2's learned positions,
//! BLOOM's norm after them) and the output head (the final norm and the projection to the
//! vocabulary, tied to the word embeddings in most checkpoints).

use tch::{Device, Kind, Tensor};

use super::linear::{tensor_bytes, Linear};
use super::norm::Norm;
use crate::gguf::{dequantize, GgmlType};
use crate::quant::BlockWeight;

/// The word embedding matrix `[vocab, hidden]`.
pub(super) enum TokenTable {
    /// In the model's dtype.
    Dense(Tensor),
    /// A GGUF file's quantized blocks as the file holds them (on the CPU): a row is decoded
    /// when it is looked up, exactly as the file defines it, so the table costs what it costs
    /// on disk (a Q4_1 table is 5/32 of its f32 size).
    Blocks {
        /// The block type.
        kind: GgmlType,
        /// The rows' blocks, `row_bytes` each.
        bytes: Vec<u8>,
        /// Bytes per row.
        row_bytes: usize,
        /// Rows (the vocabulary).
        vocab: i64,
        /// Elements per row.
        hidden: i64,
        /// The dtype the rows are handed on in (the model's).
        out: Kind,
    },
    /// A tied head's blocks of 32 ([`crate::quant::blocks`]), which hold the file's table
    /// exactly (Q4_0, Q4_1, Q8_0; the k-quants' scales rounded to f16): one copy serves the
    /// lookups and the head.
    Shared {
        /// The head's weight.
        weight: BlockWeight,
        /// The dtype the rows are handed on in (the model's).
        out: Kind,
    },
}

impl TokenTable {
    /// The dense matrix, if it is one.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Blocks { .. } | Self::Shared { .. } => None,
        }
    }

    /// The table's dtype, once looked up (the model's).
    pub fn out_kind(&self) -> Option<Kind> {
        match self {
            Self::Dense(_) => None,
            Self::Blocks { out, .. } | Self::Shared { out, .. } => Some(*out),
        }
    }

    fn device(&self) -> Device {
        match self {
            Self::Dense(t) => t.device(),
            Self::Blocks { .. } | Self::Shared { .. } => Device::Cpu,
        }
    }

    /// The rows of `ids` (`[rows, s]`): `[rows, s, hidden]`.
    fn lookup(&self, ids: &Tensor) -> Tensor {
        match self {
            Self::Dense(t) => Tensor::embedding(t, ids, -1, false, false),
            Self::Blocks {
                kind,
                bytes,
                row_bytes,
                vocab,
                hidden,
                out,
            } => {
                let size = ids.size();
                let flat = ids
                    .reshape([-1])
                    .to_kind(Kind::Int64)
                    .to_device(Device::Cpu);
                let ids = Vec::<i64>::try_from(&flat).expect("int64 ids on the CPU convert");
                let mut rows = Vec::with_capacity(ids.len() * *hidden as usize);
                for id in ids {
                    // The engines check prompts against the vocabulary; a dense table panics
                    // here too (an index out of range).
                    assert!(
                        (0..*vocab).contains(&id),
                        "token id {id} is outside the vocabulary of {vocab}"
                    );
                    let at = id as usize * row_bytes;
                    rows.extend(dequantize(*kind, &bytes[at..at + row_bytes]));
                }
                let mut shape = size;
                shape.push(*hidden);
                Tensor::from_slice(&rows).reshape(shape).to_kind(*out)
            }
            Self::Shared { weight, out } => {
                let mut shape = ids.size();
                let flat = ids
                    .reshape([-1])
                    .to_kind(Kind::Int64)
                    .to_device(Device::Cpu);
                let ids = Vec::<i64>::try_from(&flat).expect("int64 ids on the CPU convert");
                shape.push(weight.shape()[1]);
                weight.rows(&ids).reshape(shape).to_kind(*out)
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        match self {
            Self::Dense(t) => tensor_bytes(t),
            Self::Blocks { bytes, .. } => bytes.len() as u64,
            Self::Shared { weight, .. } => weight.bytes(),
        }
    }

    /// The same table on `device` (a block table stays on the CPU: loading refuses to place
    /// a quantized model elsewhere).
    pub fn into_device(self, device: Device) -> Self {
        match self {
            Self::Dense(t) => Self::Dense(t.to_device(device)),
            blocks => blocks,
        }
    }
}

/// Token ids to the residual stream.
pub(super) struct Embeddings {
    /// `[vocab, hidden]`.
    pub tokens: TokenTable,
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
        let x = self.tokens.lookup(ids);
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
        self.tokens.bytes()
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
