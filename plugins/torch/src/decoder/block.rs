//! One pre-norm decoder layer: norm → attention → residual → norm → MLP → residual, each
//! sublayer run by every tensor-parallel shard and the partial outputs summed
//! ([`Parts`]).

use tch::Tensor;

use super::attention::Step;
use super::cache::KvPart;
use super::norm::Norm;
use super::parallel::{Parts, Shard};

/// A decoder layer.
pub(super) struct Block {
    /// Before attention.
    pub input_norm: Norm,
    /// Before the MLP.
    pub post_norm: Norm,
    /// One per tensor-parallel device (one when the model is not sharded).
    pub shards: Vec<Shard>,
}

impl Block {
    /// Run the layer on the residual stream `x` (on the model's device). `loaded` holds the
    /// shards read from disk for this pass (`None` for those in memory), `kv` the layer's
    /// cache, one entry per shard.
    pub fn forward(
        &self,
        x: Tensor,
        loaded: &[Option<Shard>],
        step: &Step,
        kv: &[KvPart],
    ) -> Tensor {
        let parts = Parts::new(&self.shards, loaded, kv, x.device());
        let attended = parts.attention(&self.input_norm.forward(&x), step);
        let x = residual(x, attended);
        let fed = parts.mlp(&self.post_norm.forward(&x));
        residual(x, fed)
    }
}

/// `x + out`, or `x` where no shard had an output.
fn residual(x: Tensor, out: Option<Tensor>) -> Tensor {
    match out {
        Some(out) => x + out,
        None => x,
    }
}
