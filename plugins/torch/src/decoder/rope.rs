//! Rotary position embeddings (Llama): the inverse frequencies with the `rope_scaling` types
//! Llama 3 uses, the cos/sin tables built once at load, and their application to the query and
//! key heads of a step.

use tch::{Device, Kind, Tensor};

use super::config::{DecoderConfig, RopeScaling};

impl DecoderConfig {
    /// The inverse frequencies of the rotary embedding, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Llama's rotary tables, `[max_positions, head_dim]`: cos, and sin with rotate_half's sign.
/// rotate_half(x) = cat(−x2, x1) = roll(x, d/2) · (−1 on the first half), so the sign goes
/// into the sin table and RoPE is `x·cos + roll(x, d/2)·sin'`.
pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The rotary tables at one step's positions, `[rows, 1, s, head_dim]` each.
pub(super) struct RotaryAt {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables for every position of `cfg`, in `kind` on `device`. `rope_freqs` are Llama
    /// 3.1 GGUFs' per-frequency divisors (their form of RoPE scaling).
    pub fn new(
        cfg: &DecoderConfig,
        rope_freqs: Option<Tensor>,
        kind: Kind,
        device: Device,
    ) -> Self {
        let inv_freq = Tensor::from_slice(&cfg.inv_freq()).to_kind(Kind::Float);
        let inv_freq = match rope_freqs {
            Some(factors) => inv_freq / factors.to_kind(Kind::Float),
            None => inv_freq,
        };
        let positions = Tensor::arange(cfg.max_positions, (Kind::Float, Device::Cpu));
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos().to_kind(kind).to_device(device);
        let half = cfg.head_dim / 2;
        let sign = Tensor::cat(
            &[
                Tensor::full([half], -1.0, (Kind::Float, Device::Cpu)),
                Tensor::ones([half], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let sin = (emb.sin() * sign).to_kind(kind).to_device(device);
        Self { cos, sin }
    }

    /// The tables at `positions` (`[rows, s]`, on the tables' device).
    pub fn at(&self, positions: &Tensor) -> RotaryAt {
        let size = positions.size();
        let (rows, s) = (size[0], size[1]);
        let head_dim = self.cos.size()[1];
        let table = |t: &Tensor| {
            t.index_select(0, &positions.view([-1]))
                .view([rows, 1, s, head_dim])
        };
        RotaryAt {
            cos: table(&self.cos),
            sin: table(&self.sin),
        }
    }
}

impl RotaryAt {
    /// The cos and sin tables at the rows' positions, `[rows, 1, s, head_dim]` each (sin with
    /// rotate-half's sign folded in: its first half negated).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotate `x` (`[rows, heads, s, head_dim]`, query and key heads together): four ops for
    /// all of them.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let device = x.device();
        let half = x.size()[3] / 2;
        x * self.cos.to_device(device) + x.roll([half], [-1]) * self.sin.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{tiny, Family};
    use super::*;

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let cfg = DecoderConfig {
            hidden: 128,
            head_dim: 128,
            heads: 1,
            kv_heads: 1,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            ..tiny(Family::Llama)
        };
        let scaled = cfg.inv_freq();
        let plain = DecoderConfig {
            rope_scaling: None,
            ..cfg
        }
        .inv_freq();
        assert_eq!(scaled[0], plain[0], "the highest frequency is kept");
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 8.0).abs() < 1e-15,
            "the lowest is divided"
        );
    }
}
