//! The feed-forward block: gated (Llama's SwiGLU, `down(act(gate(x)) · up(x))`, gate and up
//! stacked into one projection) or plain (`down(act(up(x)))`, GPT-2's and BLOOM's GELU).

use super::config::DecoderConfig;
use super::linear::Linear;
use crate::layers::Activation;
use tch::Tensor;

/// The feed-forward block of one tensor-parallel part of a layer: some of the inner columns
/// (all of them when the model is not sharded).
pub(super) struct Mlp {
    /// Inner columns.
    pub inter: i64,
    /// Gated: gate and up stacked (`2 × inter` rows); plain: up (`inter` rows).
    pub gate_up: Linear,
    /// The down projection.
    pub down: Linear,
    /// Whether the activation of the gate multiplies the up projection.
    pub gated: bool,
    /// The activation.
    pub act: Activation,
}

impl Mlp {
    /// All of `cfg`'s inner columns.
    pub fn new(cfg: &DecoderConfig, gate_up: Linear, down: Linear) -> Self {
        Self {
            inter: cfg.intermediate,
            gate_up,
            down,
            gated: cfg.gated_mlp(),
            act: cfg.act,
        }
    }

    /// Apply to `x` (`[rows, s, hidden]`, normed, on this part's device). Returns this part's
    /// share of the down projection.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gu = self.gate_up.forward(x);
        let inter = self.inter;
        let act = if self.gated {
            self.act.forward(&gu.narrow(-1, 0, inter)) * gu.narrow(-1, inter, inter)
        } else {
            self.act.forward(&gu)
        };
        self.down.forward(&act)
    }
}
