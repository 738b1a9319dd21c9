//! Loading linear layers quantized: GGUF blocks straight into quantized layers (no dense copy of
//! the weight at any point), and which combinations of loading options a quantized model allows.
//!
//! Where the CPU runs Cresset's block kernel ([`crate::quant::blocks`]), a GGUF layer whose
//! pieces (q, k, v; gate, up) are Q4_0, Q4_1, Q4_K, Q5_K or Q8_0 keeps the file's blocks of 32
//! as they are (4-bit, or 8-bit where a piece needs it); elsewhere all-Q4 layers load as
//! libtorch's int4 group 32, exactly up to the bf16 rounding of each group's scale and zero.
//! Pieces of any other block type (Q6_K, or Q8_0 and Q5_K without the block kernel) load as
//! int8 per channel, requantized row by row. Float pieces (F32, F16, BF16) stay dense.

use tch::{Device, Kind};

use super::config::DecoderConfig;
use super::embedding::TokenTable;
use super::linear::Linear;
use super::load::{LayerTarget, LoadOptions};
use crate::gguf::{GgmlType, Gguf};
use crate::quant::blocks::{self, BlockWeight};
use crate::quant::{row_bytes, unpermuted_rows, QuantizedWeight};
use crate::ModelError;

fn is_q4(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K)
}

fn is_float(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// One tensor of a fused layer: its GGUF name and, for q and k, the heads whose rows llama.cpp
/// permuted.
struct Piece {
    name: String,
    permuted_heads: Option<i64>,
}

fn pieces(cfg: &DecoderConfig, prefix: &str) -> Option<Vec<Piece>> {
    let piece = |name: String, heads: Option<i64>| Piece {
        name,
        permuted_heads: heads,
    };
    if prefix == "lm_head" {
        let name = if cfg.tie_embeddings {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        return Some(vec![piece(name.into(), None)]);
    }
    let (layer, what) = prefix.split_once('.')?;
    let b = format!("blk.{layer}");
    Some(match what {
        "qkv" => vec![
            piece(format!("{b}.attn_q.weight"), Some(cfg.heads)),
            piece(format!("{b}.attn_k.weight"), Some(cfg.kv_heads)),
            piece(format!("{b}.attn_v.weight"), None),
        ],
        "o" => vec![piece(format!("{b}.attn_output.weight"), None)],
        "gate_up" => vec![
            piece(format!("{b}.ffn_gate.weight"), None),
            piece(format!("{b}.ffn_up.weight"), None),
        ],
        "down" => vec![piece(format!("{b}.ffn_down.weight"), None)],
        _ => return None,
    })
}

/// The GGUF layer `prefix` (`{l}.qkv`, `{l}.o`, `{l}.gate_up`, `{l}.down`, `lm_head`) as a
/// quantized [`Linear`], or `None` where its tensors are floats (it then loads dense).
pub(super) fn gguf_linear(
    cfg: &DecoderConfig,
    gguf: &Gguf,
    prefix: &str,
) -> Result<Option<Linear>, ModelError> {
    let Some(pieces) = pieces(cfg, prefix) else {
        return Ok(None);
    };
    let mut kinds = Vec::new();
    for p in &pieces {
        let kind = gguf.ggml_type(&p.name).ok_or_else(|| {
            ModelError::Checkpoint(format!("the GGUF file has no tensor `{}`", p.name))
        })?;
        kinds.push(kind);
    }
    if kinds.iter().any(|&k| is_float(k)) {
        return Ok(None);
    }
    #[derive(Clone, Copy)]
    enum As {
        Blocks(u8),
        Int4,
        Int8,
    }
    let load = |target: As| -> Result<Vec<QuantizedWeight>, ModelError> {
        pieces
            .iter()
            .map(|p| {
                gguf.with_raw(&p.name, |kind, bytes, shape| {
                    let [rows, cols] = shape else {
                        return Err(ModelError::Checkpoint(format!(
                            "tensor `{}` has shape {shape:?}; a linear layer's is [out, in]",
                            p.name
                        )));
                    };
                    let order = p.permuted_heads.map(|h| unpermuted_rows(*rows, h));
                    let order = order.as_deref();
                    match target {
                        As::Blocks(bits) => {
                            BlockWeight::from_gguf(kind, bytes, *rows, *cols, order, bits)
                                .map(QuantizedWeight::Blocks)
                        }
                        As::Int4 => {
                            QuantizedWeight::int4_from_gguf(kind, bytes, *rows, *cols, order)
                        }
                        As::Int8 => {
                            QuantizedWeight::int8_from_gguf(kind, bytes, *rows, *cols, order)
                        }
                    }
                })?
            })
            .collect()
    };
    let all_q4 = kinds.iter().all(|&k| is_q4(k));
    if blocks::vectorized() && kinds.iter().all(|&k| blocks::loads_as_blocks(k)) {
        let bits = if all_q4 { 4 } else { 8 };
        if let Some(w) = QuantizedWeight::cat(&load(As::Blocks(bits))?) {
            return Ok(Some(Linear::quantized(w, None)));
        }
    }
    if all_q4 {
        if let Some(w) = QuantizedWeight::cat(&load(As::Int4)?) {
            return Ok(Some(Linear::quantized(w, None)));
        }
    }
    // Mixed types, or int4 parts that cannot stack: int8 for the whole layer.
    let w = QuantizedWeight::cat(&load(As::Int8)?).ok_or_else(|| {
        ModelError::Checkpoint(format!("the pieces of layer `{prefix}` do not stack"))
    })?;
    Ok(Some(Linear::quantized(w, None)))
}

/// A GGUF file's quantized word embeddings as the file holds them (`None` where they are
/// floats: they then load dense).
pub(super) fn gguf_token_table(
    gguf: &Gguf,
    cfg: &DecoderConfig,
    out: Kind,
) -> Result<Option<TokenTable>, ModelError> {
    let name = "token_embd.weight";
    let kind = gguf
        .ggml_type(name)
        .ok_or_else(|| ModelError::Checkpoint(format!("the GGUF file has no tensor `{name}`")))?;
    if is_float(kind) {
        return Ok(None);
    }
    gguf.with_raw(name, |kind, bytes, shape| {
        let expected = [cfg.vocab_size, cfg.hidden];
        if shape != expected {
            return Err(ModelError::Checkpoint(format!(
                "tensor `{name}` has shape {shape:?}; the configuration implies {expected:?}"
            )));
        }
        Ok(Some(TokenTable::Blocks {
            kind,
            row_bytes: row_bytes(kind, bytes, cfg.vocab_size, cfg.hidden)?,
            bytes: bytes.to_vec(),
            vocab: cfg.vocab_size,
            hidden: cfg.hidden,
            out,
        }))
    })?
}

/// Quantized layers run on libtorch's CPU kernels, in a packed layout made at load: refuse,
/// before any weight is read, what would move, split or offload them.
pub(super) fn check_options(opts: &LoadOptions) -> Result<(), ModelError> {
    let on_cpu = |d: Device| d == Device::Cpu;
    let elsewhere = !on_cpu(opts.device)
        || opts.embeddings.is_some_and(|d| !on_cpu(d))
        || opts.head.is_some_and(|d| !on_cpu(d))
        || opts
            .layers
            .iter()
            .any(|t| !matches!(t, LayerTarget::Device(Device::Cpu)));
    if elsewhere {
        return Err(ModelError::Config(
            "quantized weights (`quantize`, or a GGUF file's quantized tensors kept as they are) run on the CPU only: they cannot be placed on a GPU or offloaded to disk; set `quantize = \"none\"` to load dense weights".into(),
        ));
    }
    Ok(())
}
