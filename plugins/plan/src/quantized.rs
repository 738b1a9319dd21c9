//! What quantized weights cost, as `cresset-torch`'s loader holds them: a GGUF's blocks of 32
//! kept at 4 or 8 bits with an f16 scale and zero each (where the CPU runs the block kernel),
//! int8 with one bf16 scale per output channel, int4 packed two to a byte with a bf16 scale and
//! zero per group, and a GGUF file's quantized word embeddings kept as the file stores them (or
//! as the tied head's blocks, which serve both).

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
    /// A GGUF file's quantized tensors as they are (see [`kept_as`]); quantized word
    /// embeddings as stored, or shared with a tied head kept in blocks.
    GgufKept,
}

/// How a fused layer of a GGUF file loads when its quantization is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Blocks of 32 at `bits` (4 or 8) with an f16 scale and zero each.
    Blocks {
        /// 4 or 8.
        bits: u64,
    },
    /// libtorch's int4, group 32.
    Int4,
    /// int8 per channel.
    Int8,
}

/// Bytes of a `[out, in]` weight in blocks of 32 at `bits`: the values and an f16 scale and
/// zero per block.
pub fn block_bytes(out: u64, inp: u64, bits: u64) -> u64 {
    out * inp * bits / 8 + 4 * out * (inp / 32)
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

/// Types the block kernel holds as they are (Q5_K and Q8_0 at 8 bits).
fn loads_as_blocks(kind: GgmlType) -> bool {
    is_q4(kind) || matches!(kind, GgmlType::Q5_K | GgmlType::Q8_0)
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

/// How a fused layer whose pieces are `pieces` loads when the file's quantization is kept
/// (`None`: dense), as `cresset-torch`'s loader decides: where the CPU runs the block kernel
/// ([`crate::cpu_runs_block_kernel`]) and every piece is Q4_0, Q4_1, Q4_K, Q5_K or Q8_0, in
/// blocks (4 bits when all are Q4, else 8); else all-Q4 pieces in whole 64-row blocks as int4;
/// else int8.
pub fn kept_as(pieces: &[&TensorInfo]) -> Option<Kept> {
    if pieces.iter().any(|p| is_float(p.ggml_type)) {
        return None;
    }
    let all_q4 = pieces.iter().all(|p| is_q4(p.ggml_type));
    if crate::cpu_runs_block_kernel() && pieces.iter().all(|p| loads_as_blocks(p.ggml_type)) {
        return Some(Kept::Blocks {
            bits: if all_q4 { 4 } else { 8 },
        });
    }
    Some(if all_q4 && pieces.iter().all(|p| dims(p).0 % 64 == 0) {
        Kept::Int4
    } else {
        Kept::Int8
    })
}

/// Bytes of a linear weight `[out, in]` held as `q` (`kept`: what [`kept_as`] said of its
/// fused layer), with `dense` bytes per element otherwise.
pub(crate) fn linear_bytes(
    info: &TensorInfo,
    q: Quantization,
    kept: Option<Kept>,
    dense: u64,
) -> u64 {
    let (out, inp) = dims(info);
    match (q, kept) {
        (Quantization::Int8, _) | (Quantization::GgufKept, Some(Kept::Int8)) => {
            int8_bytes(out, inp)
        }
        (Quantization::Int4 { group }, _) => int4_bytes(out, inp, group),
        (Quantization::GgufKept, Some(Kept::Int4)) => int4_bytes(out, inp, 32),
        (Quantization::GgufKept, Some(Kept::Blocks { bits })) => block_bytes(out, inp, bits),
        (Quantization::None, _) | (Quantization::GgufKept, None) => out * inp * dense,
    }
}

/// Bytes of the word embeddings: as stored when a GGUF file's quantized table is kept (or as
/// the tied head's blocks, which serve both), else dense.
pub(crate) fn embedding_bytes(info: &TensorInfo, q: Quantization, tied: bool, dense: u64) -> u64 {
    let (rows, cols) = dims(info);
    if q != Quantization::GgufKept || is_float(info.ggml_type) {
        return rows * cols * dense;
    }
    match kept_as(&[info]) {
        Some(Kept::Blocks { bits }) if tied => block_bytes(rows, cols, bits),
        _ => info.size,
    }
}
