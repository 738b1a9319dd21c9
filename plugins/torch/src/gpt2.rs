//! GPT-2 (`GPT2LMHeadModel`) with a preallocated KV cache, and batched generation.
//!
//! A batch of prompts is left-padded to a common length; the cache holds
//! `[batch, heads, prompt + max_new_tokens, head_dim]` per layer, allocated once, and each
//! decode step writes one column into it. Rows that finished keep stepping (their tokens are
//! discarded) until the last row is done.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::layers::{merge_heads, split_heads, Activation, HfConfig, KvCache, LayerNorm, Linear};
use crate::sampling::{sample, Rng, SamplingParams};
use crate::weights::Weights;
use crate::ModelError;

/// GPT-2's sizes from `config.json`.
#[derive(Debug, Clone)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Context length (`n_positions`).
    pub max_positions: i64,
    /// Hidden size (`n_embd`).
    pub hidden: i64,
    /// Layers.
    pub layers: i64,
    /// Heads.
    pub heads: i64,
    /// Feed-forward size (`n_inner`, default 4 × hidden).
    pub inner: i64,
    /// Layer norm epsilon.
    pub eps: f64,
    /// Activation.
    pub act: Activation,
}

impl Gpt2Config {
    /// Read from `config.json`.
    pub fn from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        match config.opt_str("model_type")? {
            Some("gpt2") => {}
            other => {
                return Err(ModelError::Config(format!(
                    "model_type {other:?} is not gpt2"
                )))
            }
        }
        if config.opt_bool("scale_attn_by_inverse_layer_idx")? == Some(true) {
            return Err(ModelError::Config(
                "scale_attn_by_inverse_layer_idx is not supported".into(),
            ));
        }
        if config.opt_bool("scale_attn_weights")? == Some(false) {
            return Err(ModelError::Config(
                "scale_attn_weights = false is not supported".into(),
            ));
        }
        let hidden = config.usize("n_embd")?;
        Ok(Self {
            vocab_size: config.usize("vocab_size")?,
            max_positions: match config.opt_usize("n_positions")? {
                Some(n) => n,
                None => config.usize("n_ctx")?,
            },
            hidden,
            layers: config.usize("n_layer")?,
            heads: config.usize("n_head")?,
            inner: config.opt_usize("n_inner")?.unwrap_or(4 * hidden),
            eps: config.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            act: Activation::parse(config.opt_str("activation_function")?.unwrap_or("gelu_new"))?,
        })
    }
}

/// The end-of-sequence ids generation stops at, as transformers decides them: from
/// `generation_config.json` when the checkpoint has one (where a missing `eos_token_id` means
/// none), else from `config.json`.
pub fn generation_eos_ids(dir: &Path, config: &HfConfig) -> Result<Vec<i64>, ModelError> {
    if dir.join("generation_config.json").is_file() {
        let text = std::fs::read_to_string(dir.join("generation_config.json"))
            .map_err(|e| ModelError::Config(format!("cannot read generation_config.json: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("generation_config.json is not JSON: {e}")))?;
        return HfConfig::from_value(value).token_ids("eos_token_id");
    }
    config.token_ids("eos_token_id")
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// A loaded GPT-2.
pub struct Gpt2 {
    /// Its configuration.
    pub config: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Tensor,
    device: Device,
    kind: Kind,
}

/// One sequence to generate.
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

impl Gpt2 {
    /// Load from a checkpoint directory.
    pub fn load(
        dir: &Path,
        config: &HfConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        let cfg = Gpt2Config::from_hf(config)?;
        if cfg.hidden % cfg.heads != 0 {
            return Err(ModelError::Config(format!(
                "n_embd {} is not a multiple of n_head {}",
                cfg.hidden, cfg.heads
            )));
        }
        let mut w = Weights::load(dir, kind, device)?;
        let p = if w.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (h, inner) = (cfg.hidden, cfg.inner);
        let wte = w.take(&format!("{p}wte.weight"), &[cfg.vocab_size, h])?;
        let wpe = w.take(&format!("{p}wpe.weight"), &[cfg.max_positions, h])?;
        let mut blocks = Vec::new();
        for l in 0..cfg.layers {
            let b = format!("{p}h.{l}");
            blocks.push(Block {
                ln_1: LayerNorm::load(&mut w, &format!("{b}.ln_1"), h, cfg.eps)?,
                c_attn: Linear::load_conv1d(&mut w, &format!("{b}.attn.c_attn"), h, 3 * h)?,
                c_proj: Linear::load_conv1d(&mut w, &format!("{b}.attn.c_proj"), h, h)?,
                ln_2: LayerNorm::load(&mut w, &format!("{b}.ln_2"), h, cfg.eps)?,
                c_fc: Linear::load_conv1d(&mut w, &format!("{b}.mlp.c_fc"), h, inner)?,
                mlp_proj: Linear::load_conv1d(&mut w, &format!("{b}.mlp.c_proj"), inner, h)?,
            });
        }
        let ln_f = LayerNorm::load(&mut w, &format!("{p}ln_f"), h, cfg.eps)?;
        let lm_head = w
            .take_optional("lm_head.weight", &[cfg.vocab_size, h])?
            .unwrap_or_else(|| wte.shallow_clone());
        Ok(Self {
            config: cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            device,
            kind,
        })
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let d = self.config.hidden / self.config.heads;
        let shape = [batch, self.config.heads, capacity, d];
        KvCache::new(self.config.layers, shape, self.kind, self.device)
    }

    /// Run `input_ids` `[b, s]` at `position_ids` `[b, s]` after what the cache holds.
    /// `key_valid` is `[b, cache.len + s]`, false for left padding. Returns the logits of the
    /// last position, `[b, vocab]`, and advances the cache by `s`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_valid: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let s = input_ids.size()[1];
        let past = cache.len;
        let total = past + s;
        if total > cache.capacity {
            return Err(ModelError::Invalid(format!(
                "the sequence needs {total} positions; the cache holds {}",
                cache.capacity
            )));
        }
        let heads = self.config.heads;
        let h = self.config.hidden;
        // [b, 1, s, total]: causal, only real keys, and every query sees itself (so that a
        // padding row is never fully masked, which would give NaN).
        let q_pos = Tensor::arange_start(past, total, (Kind::Int64, self.device)).view([s, 1]);
        let k_pos = Tensor::arange(total, (Kind::Int64, self.device)).view([1, total]);
        let causal = k_pos.le_tensor(&q_pos).unsqueeze(0);
        let own = k_pos.eq_tensor(&q_pos).unsqueeze(0);
        let mask = (causal.logical_and(&key_valid.unsqueeze(1)))
            .logical_or(&own)
            .unsqueeze(1);
        let mut x = Tensor::embedding(&self.wte, input_ids, -1, false, false)
            + Tensor::embedding(&self.wpe, position_ids, -1, false, false);
        for (l, block) in self.blocks.iter().enumerate() {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x));
            let parts = qkv.split(h, -1);
            let q = split_heads(&parts[0], heads);
            let k = split_heads(&parts[1], heads);
            let v = split_heads(&parts[2], heads);
            let (keys, values) = cache.append(l, past, &k, &v);
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(&mask),
                0.0,
                false,
                None,
                false,
            );
            x = x + block.c_proj.forward(&merge_heads(&attn));
            let ff = block.mlp_proj.forward(
                &self
                    .config
                    .act
                    .forward(&block.c_fc.forward(&block.ln_2.forward(&x))),
            );
            x = x + ff;
        }
        cache.len = total;
        let last = self.ln_f.forward(&x.select(1, -1));
        Ok(last.matmul(&self.lm_head.tr()))
    }

    /// Generate for a batch of prompts. Requests run together, left-padded, in groups whose
    /// KV cache stays under a token budget. Returns the new tokens of each request (ending with
    /// a stop id if one was produced).
    pub fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Vec<i64>>, ModelError> {
        for r in requests {
            if r.prompt.is_empty() {
                return Err(ModelError::Invalid("a prompt has no tokens".into()));
            }
            if r.prompt.len() + r.max_new_tokens > self.config.max_positions as usize {
                return Err(ModelError::Invalid(format!(
                    "the prompt ({} tokens) plus max_new_tokens ({}) exceeds the model's context \
                     of {} tokens",
                    r.prompt.len(),
                    r.max_new_tokens,
                    self.config.max_positions
                )));
            }
        }
        // Cache positions (rows × longest sequence) per group.
        const BUDGET: usize = 1 << 15;
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
            outputs.extend(self.generate_group(&requests[start..end])?);
            start = end;
        }
        Ok(outputs)
    }

    fn generate_group(&self, requests: &[GenerationRequest]) -> Result<Vec<Vec<i64>>, ModelError> {
        let batch = requests.len();
        let prompt_len = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0) as i64;
        let max_new = requests.iter().map(|r| r.max_new_tokens).max().unwrap_or(0) as i64;
        let mut ids = vec![0i64; batch * prompt_len as usize];
        let mut valid = vec![false; batch * (prompt_len + max_new) as usize];
        let mut positions = vec![0i64; batch * prompt_len as usize];
        let width = (prompt_len + max_new) as usize;
        for (row, r) in requests.iter().enumerate() {
            let pad = prompt_len as usize - r.prompt.len();
            for (j, &t) in r.prompt.iter().enumerate() {
                ids[row * prompt_len as usize + pad + j] = t;
                positions[row * prompt_len as usize + pad + j] = j as i64;
            }
            for v in &mut valid[row * width + pad..(row + 1) * width] {
                *v = true;
            }
        }
        let b = batch as i64;
        let to = |t: Tensor| t.to_device(self.device);
        let key_valid = to(Tensor::from_slice(&valid).view([b, prompt_len + max_new]));
        let mut cache = self.new_cache(b, prompt_len + max_new);
        let mut rngs: Vec<Rng> = requests
            .iter()
            .map(|r| r.seed.map(Rng::seeded).unwrap_or_else(Rng::from_entropy))
            .collect();
        let mut histories: Vec<Vec<i64>> = requests.iter().map(|r| r.prompt.clone()).collect();
        let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); batch];
        let mut done: Vec<bool> = requests.iter().map(|r| r.max_new_tokens == 0).collect();
        let mut input = to(Tensor::from_slice(&ids).view([b, prompt_len]));
        let mut pos = to(Tensor::from_slice(&positions).view([b, prompt_len]));
        let mut next_pos: Vec<i64> = requests.iter().map(|r| r.prompt.len() as i64).collect();
        while !done.iter().all(|d| *d) {
            let total = cache.len + input.size()[1];
            let logits = self.forward(&input, &pos, &key_valid.narrow(1, 0, total), &mut cache)?;
            let last = logits.to_kind(Kind::Float).to_device(Device::Cpu);
            let rows = Vec::<Vec<f32>>::try_from(&last)?;
            let mut next = Vec::with_capacity(batch);
            for (row, mut row_logits) in rows.into_iter().enumerate() {
                let r = &requests[row];
                let token = if done[row] {
                    0
                } else {
                    sample(
                        &mut row_logits,
                        &r.sampling,
                        &histories[row],
                        &mut rngs[row],
                    )
                };
                if !done[row] {
                    outputs[row].push(token);
                    histories[row].push(token);
                    if outputs[row].len() >= r.max_new_tokens || r.stop_ids.contains(&token) {
                        done[row] = true;
                    }
                }
                next.push(token);
            }
            input = to(Tensor::from_slice(&next).view([b, 1]));
            pos = to(Tensor::from_slice(&next_pos).view([b, 1]));
            // A finished row keeps stepping with its last position, never past the table.
            for (p, d) in next_pos.iter_mut().zip(&done) {
                if !*d {
                    *p += 1;
                }
            }
            if cache.len >= cache.capacity {
                break;
            }
        }
        Ok(outputs)
    }
}
