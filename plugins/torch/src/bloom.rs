//! BLOOM's configuration and ALiBi slopes (`BloomForCausalLM`, the reference architecture of
//! the Accelerate handler). The model itself runs as a [`crate::decoder::Decoder`] of the
//! BLOOM family: ALiBi biases instead of position embeddings, a LayerNorm after the word
//! embeddings, query/key/value fused per head, GELU (tanh) MLPs, the head tied to the
//! embeddings.

use crate::layers::HfConfig;
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
