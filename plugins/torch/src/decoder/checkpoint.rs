//! Checkpoints: how each family's tensors are named and laid out in HuggingFace safetensors
//! and GGUF files, and the one canonical set of tensors (names and shapes) the decoder is
//! built from. [`Checkpoint`] reads a canonical tensor by converting names and layouts (GPT-2's
//! Conv1D weights transposed, BLOOM's per-head q/k/v reordered, llama.cpp's q/k row permutation
//! undone, q/k/v and gate/up stacked) and checks every shape against the configuration.
//! [`DecoderConfig::modules`] gives the device-map planner the same tensors under
//! transformers' module names.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::config::{DecoderConfig, Family, Positions};
use super::embedding::TokenTable;
use super::linear::{Linear, Quantize};
use super::norm::Norm;
use crate::gguf::{unpermute_qk, Gguf};
use crate::weights::Weights;
use crate::ModelError;

/// Where a checkpoint's tensors are named and laid out.
#[derive(Debug, Clone)]
pub(super) enum Naming {
    /// HuggingFace Llama (`model.layers.N.self_attn.q_proj.weight`, ...).
    Llama,
    /// GGUF (`blk.N.attn_q.weight`, ...), q/k rows permuted by llama.cpp.
    Gguf,
    /// HuggingFace GPT-2, with its prefix (`transformer.` or none); Conv1D weights.
    Gpt2(String),
    /// HuggingFace BLOOM, with its prefix; q/k/v fused per head.
    Bloom(String),
}

impl Naming {
    /// The naming of a HuggingFace checkpoint of `cfg`'s family (GPT-2 and BLOOM checkpoints
    /// come with a `transformer.` prefix or without).
    pub fn hf(cfg: &DecoderConfig, w: &Weights) -> Self {
        let prefix = |name: &str| {
            if w.contains(&format!("transformer.{name}")) {
                "transformer.".to_owned()
            } else {
                String::new()
            }
        };
        match cfg.family {
            Family::Llama => Naming::Llama,
            Family::Gpt2 => Naming::Gpt2(prefix("wte.weight")),
            Family::Bloom => Naming::Bloom(prefix("word_embeddings.weight")),
        }
    }
}

/// The tensors a decoder is built from, by canonical name, with their shapes in the layout the
/// decoder computes with: `[out, in]` weights, query/key/value stacked, gate/up stacked.
fn canonical(cfg: &DecoderConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let (q, kv) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
    let layer_norm = cfg.layer_norm();
    let gated = if cfg.gated_mlp() { 2 } else { 1 };
    let mut out = vec![("embed".to_owned(), vec![cfg.vocab_size, h])];
    let norm = |out: &mut Vec<(String, Vec<i64>)>, name: &str| {
        out.push((format!("{name}.weight"), vec![h]));
        if layer_norm {
            out.push((format!("{name}.bias"), vec![h]));
        }
    };
    if cfg.positions() == Positions::Learned {
        out.push(("positions".into(), vec![cfg.max_positions, h]));
    }
    if cfg.embedding_norm() {
        norm(&mut out, "embed_norm");
    }
    for l in 0..cfg.layers {
        norm(&mut out, &format!("{l}.input_norm"));
        out.push((format!("{l}.qkv.weight"), vec![q + 2 * kv, h]));
        if cfg.attention_bias {
            out.push((format!("{l}.qkv.bias"), vec![q + 2 * kv]));
        }
        out.push((format!("{l}.o.weight"), vec![h, q]));
        if cfg.attention_bias {
            out.push((format!("{l}.o.bias"), vec![h]));
        }
        norm(&mut out, &format!("{l}.post_norm"));
        out.push((format!("{l}.gate_up.weight"), vec![gated * i, h]));
        if cfg.mlp_bias {
            out.push((format!("{l}.gate_up.bias"), vec![gated * i]));
        }
        out.push((format!("{l}.down.weight"), vec![h, i]));
        if cfg.mlp_bias {
            out.push((format!("{l}.down.bias"), vec![h]));
        }
    }
    norm(&mut out, "norm");
    if !cfg.tie_embeddings {
        out.push(("lm_head".into(), vec![cfg.vocab_size, h]));
    }
    out
}

/// A reader of checkpoint tensors by the checkpoint's own names, checking shapes.
pub(super) type Raw<'a> = dyn FnMut(&str, &[i64]) -> Result<Tensor, ModelError> + 'a;

/// Read the canonical tensor `name` through `raw`, converting names and layouts.
fn fetch(
    cfg: &DecoderConfig,
    naming: &Naming,
    raw: &mut Raw<'_>,
    name: &str,
    shape: &[i64],
) -> Result<Tensor, ModelError> {
    let h = cfg.hidden;
    let (q, kv, i) = (
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
        cfg.intermediate,
    );
    let (layer, what) = match name.split_once('.') {
        Some((l, rest)) if l.parse::<u32>().is_ok() => (Some(l), rest),
        _ => (None, name),
    };
    let suffix = what.rsplit('.').next().unwrap_or("weight");
    // Pieces stacked into one tensor: weights `[rows, h]`, biases `[rows]`.
    let mut stack = |names: &[(String, i64)]| -> Result<Tensor, ModelError> {
        let pieces = names
            .iter()
            .map(|(n, rows)| {
                let piece_shape = if suffix == "weight" {
                    vec![*rows, h]
                } else {
                    vec![*rows]
                };
                raw(n, &piece_shape)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&pieces, 0))
    };
    let conv1d = |t: Tensor| t.transpose(0, 1).contiguous();
    match naming {
        Naming::Llama => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw("model.embed_tokens.weight", shape),
                    "norm.weight" => raw("model.norm.weight", shape),
                    _ => raw("lm_head.weight", shape),
                };
            };
            let b = format!("model.layers.{l}");
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.input_layernorm.weight"), shape),
                "post_norm" => raw(&format!("{b}.post_attention_layernorm.weight"), shape),
                "qkv" => stack(&[
                    (format!("{b}.self_attn.q_proj.{suffix}"), q),
                    (format!("{b}.self_attn.k_proj.{suffix}"), kv),
                    (format!("{b}.self_attn.v_proj.{suffix}"), kv),
                ]),
                "o" => raw(&format!("{b}.self_attn.o_proj.{suffix}"), shape),
                "gate_up" => stack(&[
                    (format!("{b}.mlp.gate_proj.{suffix}"), i),
                    (format!("{b}.mlp.up_proj.{suffix}"), i),
                ]),
                _ => raw(&format!("{b}.mlp.down_proj.{suffix}"), shape),
            }
        }
        Naming::Gguf => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw("token_embd.weight", shape),
                    "norm.weight" => raw("output_norm.weight", shape),
                    _ => raw("output.weight", shape),
                };
            };
            let b = format!("blk.{l}");
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.attn_norm.weight"), shape),
                "post_norm" => raw(&format!("{b}.ffn_norm.weight"), shape),
                "qkv" => {
                    let wq = raw(&format!("{b}.attn_q.weight"), &[q, h])?;
                    let wk = raw(&format!("{b}.attn_k.weight"), &[kv, h])?;
                    let wv = raw(&format!("{b}.attn_v.weight"), &[kv, h])?;
                    let wq = unpermute_qk(&wq, cfg.heads);
                    let wk = unpermute_qk(&wk, cfg.kv_heads);
                    Ok(Tensor::cat(&[wq, wk, wv], 0))
                }
                "o" => raw(&format!("{b}.attn_output.weight"), shape),
                "gate_up" => stack(&[
                    (format!("{b}.ffn_gate.weight"), i),
                    (format!("{b}.ffn_up.weight"), i),
                ]),
                _ => raw(&format!("{b}.ffn_down.weight"), shape),
            }
        }
        Naming::Gpt2(p) => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw(&format!("{p}wte.weight"), shape),
                    "positions" => raw(&format!("{p}wpe.weight"), shape),
                    _ => raw(&format!("{p}ln_f.{suffix}"), shape),
                };
            };
            let b = format!("{p}h.{l}");
            let weight = suffix == "weight";
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.ln_1.{suffix}"), shape),
                "post_norm" => raw(&format!("{b}.ln_2.{suffix}"), shape),
                "qkv" if weight => raw(&format!("{b}.attn.c_attn.weight"), &[h, 3 * h]).map(conv1d),
                "qkv" => raw(&format!("{b}.attn.c_attn.bias"), shape),
                "o" if weight => raw(&format!("{b}.attn.c_proj.weight"), &[h, h]).map(conv1d),
                "o" => raw(&format!("{b}.attn.c_proj.bias"), shape),
                "gate_up" if weight => raw(&format!("{b}.mlp.c_fc.weight"), &[h, i]).map(conv1d),
                "gate_up" => raw(&format!("{b}.mlp.c_fc.bias"), shape),
                _ if weight => raw(&format!("{b}.mlp.c_proj.weight"), &[i, h]).map(conv1d),
                _ => raw(&format!("{b}.mlp.c_proj.bias"), shape),
            }
        }
        Naming::Bloom(p) => {
            let Some(l) = layer else {
                return match name {
                    "embed" => raw(&format!("{p}word_embeddings.weight"), shape),
                    n if n.starts_with("embed_norm.") => {
                        raw(&format!("{p}word_embeddings_layernorm.{suffix}"), shape)
                    }
                    _ => raw(&format!("{p}ln_f.{suffix}"), shape),
                };
            };
            let b = format!("{p}h.{l}");
            match what.split('.').next().unwrap_or_default() {
                "input_norm" => raw(&format!("{b}.input_layernorm.{suffix}"), shape),
                "post_norm" => raw(&format!("{b}.post_attention_layernorm.{suffix}"), shape),
                "qkv" => {
                    // BLOOM stacks [q, k, v] per head; the decoder wants all q, then k, then v.
                    let t = raw(
                        &format!("{b}.self_attention.query_key_value.{suffix}"),
                        shape,
                    )?;
                    let (heads, d) = (cfg.heads, cfg.head_dim);
                    Ok(if suffix == "weight" {
                        t.view([heads, 3, d, h]).transpose(0, 1).reshape([3 * h, h])
                    } else {
                        t.view([heads, 3, d]).transpose(0, 1).reshape([3 * h])
                    })
                }
                "o" => raw(&format!("{b}.self_attention.dense.{suffix}"), shape),
                "gate_up" => raw(&format!("{b}.mlp.dense_h_to_4h.{suffix}"), shape),
                _ => raw(&format!("{b}.mlp.dense_4h_to_h.{suffix}"), shape),
            }
        }
    }
}

fn required(t: Option<Tensor>, name: &str) -> Result<Tensor, ModelError> {
    t.ok_or_else(|| ModelError::Checkpoint(format!("the checkpoint has no `{name}` weights")))
}

/// A checkpoint's tensors by canonical name, in the model's dtype on the load device.
pub(super) struct Checkpoint<'c, 'r> {
    cfg: &'c DecoderConfig,
    naming: &'c Naming,
    raw: &'c mut Raw<'r>,
    shapes: HashMap<String, Vec<i64>>,
    kind: Kind,
    device: Device,
    /// A GGUF file whose quantized layers load as they are (see `quantized`).
    gguf: Option<&'c Gguf>,
    /// Quantize dense layers at load.
    quantize: Option<Quantize>,
}

impl<'c, 'r> Checkpoint<'c, 'r> {
    /// Read `cfg`'s tensors through `raw` (the checkpoint's own names) as `naming` says,
    /// converted to `kind` on `device`.
    pub fn new(
        cfg: &'c DecoderConfig,
        naming: &'c Naming,
        raw: &'c mut Raw<'r>,
        kind: Kind,
        device: Device,
    ) -> Self {
        Self {
            cfg,
            naming,
            raw,
            shapes: canonical(cfg).into_iter().collect(),
            kind,
            device,
            gguf: None,
            quantize: None,
        }
    }

    /// Load `gguf`'s quantized layers as they are (when given), and quantize dense layers as
    /// `quantize` says.
    pub fn quantized(mut self, gguf: Option<&'c Gguf>, quantize: Option<Quantize>) -> Self {
        self.gguf = gguf;
        self.quantize = quantize;
        self
    }

    /// Whether any layer may load quantized.
    pub fn quantizes(&self) -> bool {
        self.gguf.is_some() || self.quantize.is_some()
    }

    /// The layer `prefix` from dense weights `weight` (and `bias`), quantized if asked to.
    fn dense_linear(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear, ModelError> {
        let linear = Linear::from_parts(weight, bias);
        match self.quantize {
            Some(how) => linear.quantize(how),
            None => Ok(linear),
        }
    }

    /// The word embeddings: a GGUF file's quantized blocks as they are when its quantization
    /// is kept, else dense.
    pub fn token_table(&mut self) -> Result<TokenTable, ModelError> {
        if let Some(gguf) = self.gguf {
            if let Some(table) = super::quantized::gguf_token_table(gguf, self.cfg, self.kind)? {
                return Ok(table);
            }
        }
        Ok(TokenTable::Dense(self.required("embed")?))
    }

    /// The output head `[vocab, hidden]`: the file's own projection, or for a tied head the
    /// word embeddings `tokens`, as a layer of its own (quantized like the others, or sharing
    /// `tokens` when dense).
    pub fn head(&mut self, tokens: &TokenTable) -> Result<Linear, ModelError> {
        if let Some(gguf) = self.gguf {
            if let Some(l) = super::quantized::gguf_linear(self.cfg, gguf, "lm_head")? {
                return Ok(l);
            }
        }
        let weight = if self.cfg.tie_embeddings {
            tokens.dense().map(Tensor::shallow_clone).ok_or_else(|| {
                ModelError::Checkpoint(
                    "the head is tied to quantized embeddings but is not quantized itself".into(),
                )
            })?
        } else {
            self.required("lm_head")?
        };
        self.dense_linear(weight, None)
    }

    /// The canonical tensor `name`, or `None` where the configuration implies none (a bias
    /// the family does not have, an untied head).
    pub fn tensor(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        let Some(shape) = self.shapes.get(name) else {
            return Ok(None);
        };
        let t = fetch(self.cfg, self.naming, self.raw, name, shape)?;
        let t = check_shape(name, t, shape)?;
        Ok(Some(t.to_kind(self.kind).to_device(self.device)))
    }

    /// The canonical tensor `name`, which the configuration implies.
    pub fn required(&mut self, name: &str) -> Result<Tensor, ModelError> {
        required(self.tensor(name)?, name)
    }

    /// The linear layer `{prefix}.weight` (and its bias, if the family has one): quantized
    /// GGUF blocks as they are when asked to, else dense (then quantized if asked to).
    pub fn linear(&mut self, prefix: &str) -> Result<Linear, ModelError> {
        if let Some(gguf) = self.gguf {
            if let Some(l) = super::quantized::gguf_linear(self.cfg, gguf, prefix)? {
                return Ok(l);
            }
        }
        let weight = required(self.tensor(&format!("{prefix}.weight"))?, prefix)?;
        let bias = self.tensor(&format!("{prefix}.bias"))?;
        self.dense_linear(weight, bias)
    }

    /// The norm `{prefix}`: a LayerNorm or an RMSNorm as the configuration says.
    pub fn norm(&mut self, prefix: &str) -> Result<Norm, ModelError> {
        let weight = required(self.tensor(&format!("{prefix}.weight"))?, prefix)?;
        Ok(if self.cfg.layer_norm() {
            Norm::layer(
                weight,
                self.tensor(&format!("{prefix}.bias"))?,
                self.cfg.eps,
            )
        } else {
            Norm::rms(weight, self.cfg.eps)
        })
    }
}

pub(super) fn check_shape(name: &str, t: Tensor, shape: &[i64]) -> Result<Tensor, ModelError> {
    if t.size() != shape {
        return Err(ModelError::Checkpoint(format!(
            "tensor `{name}` has shape {:?}, the config implies {shape:?}",
            t.size()
        )));
    }
    Ok(t)
}

impl DecoderConfig {
    /// What the device-map planner places, with bytes at `elt_bytes` per element: the
    /// embeddings (and GPT-2's positions, BLOOM's embedding norm), each decoder layer (whole),
    /// the final norm and the output head (0 bytes when tied). Names follow transformers'
    /// module names, so that explicit `device_map`s written for Accelerate apply.
    pub fn modules(&self, elt_bytes: usize) -> Vec<cresset_plan::Module> {
        let (embed, layer, norm) = match self.family {
            Family::Llama => ("model.embed_tokens", "model.layers", "model.norm"),
            Family::Gpt2 => ("transformer.wte", "transformer.h", "transformer.ln_f"),
            Family::Bloom => (
                "transformer.word_embeddings",
                "transformer.h",
                "transformer.ln_f",
            ),
        };
        let mut out: Vec<cresset_plan::Module> = Vec::new();
        let mut add = |name: String, numel: i64, layer: Option<usize>| {
            let bytes = numel.max(0) as u64 * elt_bytes as u64;
            match out.iter_mut().find(|m| m.name == name) {
                Some(m) => m.bytes += bytes,
                None => out.push(cresset_plan::Module { name, bytes, layer }),
            }
        };
        for (name, shape) in canonical(self) {
            let numel: i64 = shape.iter().product();
            let (l, what) = match name.split_once('.') {
                Some((l, rest)) => (l.parse::<usize>().ok(), rest),
                None => (None, name.as_str()),
            };
            match (l, what) {
                (Some(l), _) => add(format!("{layer}.{l}"), numel, Some(l)),
                (None, _) if name == "embed" => add(embed.into(), numel, None),
                (None, _) if name == "positions" => add("transformer.wpe".into(), numel, None),
                (None, _) if name.starts_with("embed_norm") => {
                    add("transformer.word_embeddings_layernorm".into(), numel, None)
                }
                (None, _) if name == "lm_head" => add("lm_head".into(), numel, None),
                _ => add(norm.into(), numel, None),
            }
        }
        if self.tie_embeddings {
            add("lm_head".into(), 0, None);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::tiny;
    use super::*;

    #[test]
    fn modules_carry_transformers_names_and_sizes() {
        let llama = tiny(Family::Llama).modules(4);
        let names: Vec<&str> = llama.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens",
                "model.layers.0",
                "model.layers.1",
                "model.norm",
                "lm_head"
            ]
        );
        // A Llama layer: two norms, qkv 24×8, o 8×8, gate+up 32×8, down 8×16, in f32.
        assert_eq!(llama[1].bytes, 4 * (8 + 8 + 24 * 8 + 64 + 32 * 8 + 128));
        assert_eq!(llama[4].bytes, 0, "a tied head has no bytes of its own");
        let bloom = tiny(Family::Bloom).modules(2);
        let names: Vec<&str> = bloom.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "transformer.word_embeddings",
                "transformer.word_embeddings_layernorm",
                "transformer.h.0",
                "transformer.h.1",
                "transformer.ln_f",
                "lm_head"
            ]
        );
        let gpt2 = tiny(Family::Gpt2).modules(2);
        assert_eq!(gpt2[1].name, "transformer.wpe");
        assert_eq!(gpt2[1].bytes, 2 * 16 * 8);
    }
}
