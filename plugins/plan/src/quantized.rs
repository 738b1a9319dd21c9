//! What quantized weights cost, as `cresset-torch`'s loader holds them: int8 with one bf16 scale
//! per output channel, int4 packed two to a byte with a bf16 scale and zero per group, and a
//! GGUF file's quantized word embeddings kept as the file stores them.

use crate::gguf::{GgmlType, TensorInfo};

/// How the linear layers' weights will be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Dense, in the model's dtype.
    None,
    /// int8 per output channel, quantized at load.
    Int8,
    /// int4 in groups of `group` inputs, quantized at load.
    Int4 {
        /// Inputs per group.
        group: u64,
    },
    /// A GGUF file's quantized tensors as they are: layers whose pieces are all Q4_0, Q4_1 or
    /// Q4_K (in whole 64-row blocks) as int4 group 32, other block types as int8, float
    /// tensors dense; quantized word embeddings as stored.
    GgufKept,
}

/// Bytes of an int8 `[out, in]` weight: the values and a bf16 scale per row.
pub fn int8_bytes(out: u64, inp: u64) -> u64 {
    out * inp + 2 * out
}

/// Bytes of an int4 `[out, in]` weight in groups of `group`: packed values and a bf16 scale and
/// zero per group and row.
pub fn int4_bytes(out: u64, inp: u64, group: u64) -> u64 {
    out * inp / 2 + 4 * out * (inp / group.max(1))
}

fn is_q4(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K)
}

fn is_float(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

fn dims(info: &TensorInfo) -> (u64, u64) {
    let d = |i: usize| info.shape.get(i).copied().unwrap_or(1).max(0) as u64;
    (d(0), d(1))
}

/// The layer a GGUF linear tensor is fused into (`blk.N.qkv`, `blk.N.gate_up`, or itself), if
/// it is one of a decoder layer's linear weights.
pub(crate) fn fused_layer(name: &str) -> Option<String> {
    let rest = name.strip_prefix("blk.")?;
    let (n, what) = rest.split_once('.')?;
    let group = match what {
        "attn_q.weight" | "attn_k.weight" | "attn_v.weight" => "qkv",
        "ffn_gate.weight" | "ffn_up.weight" => "gate_up",
        "attn_output.weight" => "o",
        "ffn_down.weight" => "down",
        _ => return None,
    };
    Some(format!("blk.{n}.{group}"))
}

/// How a fused layer whose pieces are `pieces` loads when the file's quantization is kept:
/// `Some(true)` int4, `Some(false)` int8, `None` dense.
pub(crate) fn kept_as_int4(pieces: &[&TensorInfo]) -> Option<bool> {
    if pieces.iter().any(|p| is_float(p.ggml_type)) {
        return None;
    }
    Some(
        pieces
            .iter()
            .all(|p| is_q4(p.ggml_type) && dims(p).0 % 64 == 0),
    )
}

/// Bytes of a linear weight `[out, in]` held as `q` (`kept`: what [`kept_as_int4`] said of its
/// fused layer), with `dense` bytes per element otherwise.
pub(crate) fn linear_bytes(
    info: &TensorInfo,
    q: Quantization,
    kept: Option<bool>,
    dense: u64,
) -> u64 {
    let (out, inp) = dims(info);
    match (q, kept) {
        (Quantization::Int8, _) | (Quantization::GgufKept, Some(false)) => int8_bytes(out, inp),
        (Quantization::Int4 { group }, _) => int4_bytes(out, inp, group),
        (Quantization::GgufKept, Some(true)) => int4_bytes(out, inp, 32),
        (Quantization::None, _) | (Quantization::GgufKept, None) => out * inp * dense,
    }
}

/// Bytes of the word embeddings: as stored when a GGUF file's quantized table is kept, else
/// dense.
pub(crate) fn embedding_bytes(info: &TensorInfo, q: Quantization, dense: u64) -> u64 {
    let (rows, cols) = dims(info);
    if q == Quantization::GgufKept && !is_float(info.ggml_type) {
        info.size
    } else {
        rows * cols * dense
    }
}
