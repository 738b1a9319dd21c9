//! BLOOM (`BloomForCausalLM`), the reference architecture of the Accelerate handler: ALiBi
//! position biases instead of position embeddings, a LayerNorm after the word embeddings,
//! query/key/value fused per head, GELU (tanh) MLPs, and the output head tied to the
//! embeddings.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::layers::{Activation, HfConfig, KvCache, LayerNorm, Linear};
use crate::weights::Weights;
use crate::ModelError;

/// BLOOM's sizes.
#[derive(Debug, Clone)]
pub struct BloomConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden: i64,
    /// Layers.
    pub layers: i64,
    /// Heads.
    pub heads: i64,
    /// LayerNorm epsilon.
    pub eps: f64,
}

impl BloomConfig {
    /// From `config.json`.
    pub fn from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        if config.opt_str("model_type")? != Some("bloom") {
            return Err(ModelError::Config("model_type is not bloom".into()));
        }
        if config.opt_bool("apply_residual_connection_post_layernorm")? == Some(true) {
            return Err(ModelError::Config(
                "bloom: apply_residual_connection_post_layernorm is not supported".into(),
            ));
        }
        let hidden = match config.opt_usize("hidden_size")? {
            Some(h) => h,
            None => config.usize("n_embed")?,
        };
        let heads = match config.opt_usize("n_head")? {
            Some(h) => h,
            None => config.usize("num_attention_heads")?,
        };
        let layers = match config.opt_usize("n_layer")? {
            Some(l) => l,
            None => config.usize("num_hidden_layers")?,
        };
        if hidden % heads != 0 || layers > 1024 {
            return Err(ModelError::Config(format!(
                "bloom: hidden size {hidden} must split into {heads} heads (and at most 1024 layers)"
            )));
        }
        Ok(Self {
            vocab_size: config.usize("vocab_size")?,
            hidden,
            layers,
            heads,
            eps: config.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        })
    }
}

/// ALiBi slopes, one per head (as BLOOM computes them, for any head count).
pub fn alibi_slopes(heads: i64) -> Vec<f64> {
    let closest = 2f64.powi((heads as f64).log2().floor() as i32) as i64;
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f64> = (1..=closest).map(|p| base.powi(p as i32)).collect();
    if closest != heads {
        let extra = 2f64.powf(-(2f64.powf(-((2 * closest) as f64).log2() + 3.0)));
        let remaining = (heads - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra.powi((1 + 2 * i) as i32)));
    }
    slopes
}

struct Block {
    input_norm: LayerNorm,
    qkv: Linear,
    dense: Linear,
    post_norm: LayerNorm,
    up: Linear,
    down: Linear,
}

/// A loaded BLOOM.
pub struct Bloom {
    /// Its configuration.
    pub config: BloomConfig,
    embed: Tensor,
    embed_norm: LayerNorm,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    slopes: Tensor,
    device: Device,
    kind: Kind,
}

impl Bloom {
    /// Load from a checkpoint directory.
    pub fn load(
        dir: &Path,
        config: &HfConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        let cfg = BloomConfig::from_hf(config)?;
        let mut w = Weights::load(dir, kind, device)?;
        let p = if w.contains("transformer.word_embeddings.weight") {
            "transformer."
        } else {
            ""
        };
        let h = cfg.hidden;
        let embed = w.take(&format!("{p}word_embeddings.weight"), &[cfg.vocab_size, h])?;
        let embed_norm =
            LayerNorm::load(&mut w, &format!("{p}word_embeddings_layernorm"), h, cfg.eps)?;
        let mut blocks = Vec::new();
        for l in 0..cfg.layers {
            let b = format!("{p}h.{l}");
            blocks.push(Block {
                input_norm: LayerNorm::load(&mut w, &format!("{b}.input_layernorm"), h, cfg.eps)?,
                qkv: Linear::load(
                    &mut w,
                    &format!("{b}.self_attention.query_key_value"),
                    h,
                    3 * h,
                )?,
                dense: Linear::load(&mut w, &format!("{b}.self_attention.dense"), h, h)?,
                post_norm: LayerNorm::load(
                    &mut w,
                    &format!("{b}.post_attention_layernorm"),
                    h,
                    cfg.eps,
                )?,
                up: Linear::load(&mut w, &format!("{b}.mlp.dense_h_to_4h"), h, 4 * h)?,
                down: Linear::load(&mut w, &format!("{b}.mlp.dense_4h_to_h"), 4 * h, h)?,
            });
        }
        let final_norm = LayerNorm::load(&mut w, &format!("{p}ln_f"), h, cfg.eps)?;
        let slopes = Tensor::from_slice(&alibi_slopes(cfg.heads))
            .to_kind(Kind::Float)
            .to_device(device);
        Ok(Self {
            config: cfg,
            embed,
            embed_norm,
            blocks,
            final_norm,
            slopes,
            device,
            kind,
        })
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let shape = [
            batch,
            self.config.heads,
            capacity,
            self.config.hidden / self.config.heads,
        ];
        KvCache::new(self.config.layers, shape, self.kind, self.device)
    }

    /// Run `input_ids` `[batch, s]` after what the cache holds; returns the logits of every
    /// new position, `[batch, s, vocab]`.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let size = input_ids.size();
        let (b, s) = (size[0], size[1]);
        let past = cache.len;
        let total = past + s;
        let capacity = cache.capacity;
        if total > capacity {
            return Err(ModelError::Invalid(format!(
                "the sequence needs {total} positions; the cache holds {capacity}"
            )));
        }
        let (heads, h) = (self.config.heads, self.config.hidden);
        let d = h / heads;
        // Additive bias [1, heads, s, total]: slope × key position, and −inf on future keys.
        let key_pos = Tensor::arange(total, (Kind::Float, self.device));
        let alibi = (self.slopes.view([heads, 1, 1]) * key_pos.view([1, 1, total])).unsqueeze(0);
        let q_pos = Tensor::arange_start(past, total, (Kind::Int64, self.device)).view([s, 1]);
        let future = Tensor::arange(total, (Kind::Int64, self.device))
            .view([1, total])
            .gt_tensor(&q_pos);
        let bias = alibi
            .masked_fill(&future.view([1, 1, s, total]), f64::NEG_INFINITY)
            .to_kind(self.kind);
        let mut x =
            self.embed_norm
                .forward(&Tensor::embedding(&self.embed, input_ids, -1, false, false));
        for (l, block) in self.blocks.iter().enumerate() {
            let normed = block.input_norm.forward(&x);
            let qkv = block.qkv.forward(&normed).view([b, s, heads, 3, d]);
            let q = qkv.select(3, 0).transpose(1, 2);
            let k = qkv.select(3, 1).transpose(1, 2);
            let v = qkv.select(3, 2).transpose(1, 2);
            let (keys, values) = cache.append(l, past, &k, &v);
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(&bias),
                0.0,
                false,
                None,
                false,
            );
            let attn = attn.transpose(1, 2).contiguous().view([b, s, h]);
            x = x + block.dense.forward(&attn);
            let normed = block.post_norm.forward(&x);
            let ff = block
                .down
                .forward(&Activation::GeluTanh.forward(&block.up.forward(&normed)));
            x = x + ff;
        }
        cache.len = total;
        let x = self.final_norm.forward(&x);
        Ok(x.matmul(&self.embed.tr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_follow_bloom_for_powers_of_two_and_others() {
        let four = alibi_slopes(4);
        assert_eq!(four, vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // 6 heads: the 4 of a power of two, then odd powers of the next base.
        let six = alibi_slopes(6);
        assert_eq!(six.len(), 6);
        assert_eq!(&six[..4], four.as_slice());
        let extra = 2f64.powf(-(2f64.powf(-(8f64.log2() - 3.0))));
        assert!((six[4] - extra).abs() < 1e-15 && (six[5] - extra.powi(3)).abs() < 1e-15);
    }
}
