//! Tensor parallelism: a layer is held as one [`Shard`] per device, each with some attention
//! heads (query heads with their key/value heads) and some feed-forward columns, and the
//! shards' partial outputs are summed on the model's device after each attention and
//! feed-forward block ([`reduce`]: an all-reduce by copies and a sum; there is no NCCL). An
//! unsharded layer has one shard holding everything.

use std::path::PathBuf;
use std::sync::Arc;

use tch::Device;
use tch::Tensor;

use super::attention::{Attention, Step};
use super::cache::KvPart;
use super::linear::Linear;
use super::mlp::Mlp;
use super::Decoder;
use crate::ModelError;

/// One tensor-parallel part of a layer, on one device.
pub(super) struct Shard {
    /// Its attention heads.
    pub attention: Attention,
    /// Its feed-forward columns.
    pub mlp: Mlp,
    /// The device of its weights (and of its part of the KV cache).
    pub device: Device,
    /// Set when the weights live in this file (disk offload) and are read for each use.
    pub offloaded: Option<PathBuf>,
    /// The mapped offload file the weights of a shard read from disk point into (declared
    /// last: it is dropped after the tensors).
    pub _backing: Option<Arc<memmap2::Mmap>>,
}

/// Split `total` into `n` near-equal counts (the first ones one larger).
fn split_counts(total: i64, n: i64) -> Vec<i64> {
    (0..n)
        .map(|i| total / n + i64::from(i < total % n))
        .collect()
}

/// The tensor-parallel all-reduce: the parts' partial outputs summed on `device`; none when no
/// part had any (every part of a layer may lack heads only in a degenerate split).
fn reduce(partials: impl Iterator<Item = Tensor>, device: Device) -> Option<Tensor> {
    partials
        .map(|t| t.to_device(device))
        .reduce(|sum, out| sum + out)
}

/// A layer's shards as one forward pass runs them: each with its weights (read from disk for
/// an offloaded one) and its part of the KV cache.
pub(super) struct Parts<'a> {
    shards: Vec<(&'a Shard, &'a KvPart)>,
    /// The model's device, where the partial outputs are summed.
    device: Device,
}

impl<'a> Parts<'a> {
    /// `shards` (or, where `loaded` has one, its copy read from disk) with their caches `kv`.
    pub fn new(
        shards: &'a [Shard],
        loaded: &'a [Option<Shard>],
        kv: &'a [KvPart],
        device: Device,
    ) -> Self {
        let shards = shards
            .iter()
            .zip(loaded.iter().chain(std::iter::repeat(&None)))
            .map(|(shard, read)| read.as_ref().unwrap_or(shard))
            .zip(kv)
            .collect();
        Self { shards, device }
    }

    /// Every shard's attention on `x` (normed), summed.
    pub fn attention(&self, x: &Tensor, step: &Step) -> Option<Tensor> {
        let partials = self
            .shards
            .iter()
            .filter(|(shard, _)| shard.attention.heads > 0)
            .map(|(shard, kv)| {
                shard
                    .attention
                    .forward(&x.to_device(shard.device), step, kv)
            });
        reduce(partials, self.device)
    }

    /// Every shard's MLP on `x` (normed), summed.
    pub fn mlp(&self, x: &Tensor) -> Option<Tensor> {
        let partials = self
            .shards
            .iter()
            .filter(|(shard, _)| shard.mlp.inter > 0)
            .map(|(shard, _)| shard.mlp.forward(&x.to_device(shard.device)));
        reduce(partials, self.device)
    }
}

impl Shard {
    /// A whole layer on `device`.
    pub fn new(attention: Attention, mlp: Mlp, device: Device) -> Self {
        Self {
            attention,
            mlp,
            device,
            offloaded: None,
            _backing: None,
        }
    }

    /// Its linear layers, by the names disk offload writes them under.
    pub fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("qkv", &self.attention.qkv),
            ("o_proj", &self.attention.o_proj),
            ("gate_up", &self.mlp.gate_up),
            ("down", &self.mlp.down),
        ]
    }

    /// Its linear layers, to change.
    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.attention.qkv,
            &mut self.attention.o_proj,
            &mut self.mlp.gate_up,
            &mut self.mlp.down,
        ]
    }

    /// Bytes of weights held in memory.
    pub fn bytes(&self) -> u64 {
        self.linears().iter().map(|(_, l)| l.bytes()).sum()
    }

    /// Move the weights to `device`.
    pub fn move_to(&mut self, device: Device) {
        for linear in self.linears_mut() {
            *linear = linear.to_device(device);
        }
        self.attention.alibi = self.attention.alibi.as_ref().map(|s| s.to_device(device));
        self.device = device;
    }

    /// Cut this (whole) shard into `devices.len()` shards: key/value heads (with their query
    /// heads) and feed-forward columns split as evenly as they go. The output projections'
    /// biases go with the first shard only, since the shards' outputs are summed.
    pub fn split(&self, devices: &[Device]) -> Vec<Shard> {
        let (attention, mlp) = (&self.attention, &self.mlp);
        let n = devices.len() as i64;
        let head_dim = attention.head_dim;
        let group = attention.heads / attention.kv_heads;
        let kv_counts = split_counts(attention.kv_heads, n);
        let inter_counts = split_counts(mlp.inter, n);
        let q_rows = attention.heads * head_dim;
        let kv_rows = attention.kv_heads * head_dim;
        let (mut kv_at, mut inter_at) = (0, 0);
        let mut shards = Vec::new();
        for (i, &device) in devices.iter().enumerate() {
            let (kv, inter) = (kv_counts[i], inter_counts[i]);
            let (q_at, q_len) = (kv_at * group * head_dim, kv * group * head_dim);
            let (k_at, k_len) = (kv_at * head_dim, kv * head_dim);
            let qkv_ranges = [
                (q_at, q_len),
                (q_rows + k_at, k_len),
                (q_rows + kv_rows + k_at, k_len),
            ];
            let gu_ranges: Vec<(i64, i64)> = if mlp.gated {
                vec![(inter_at, inter), (mlp.inter + inter_at, inter)]
            } else {
                vec![(inter_at, inter)]
            };
            let first = i == 0;
            let attention = Attention {
                heads: kv * group,
                kv_heads: kv,
                head_dim,
                qkv: attention.qkv.select_outputs(&qkv_ranges, device),
                o_proj: attention.o_proj.select_inputs(q_at, q_len, first, device),
                alibi: attention
                    .alibi
                    .as_ref()
                    .map(|s| s.narrow(0, kv_at * group, kv * group).to_device(device)),
            };
            let mlp = Mlp {
                inter,
                gate_up: mlp.gate_up.select_outputs(&gu_ranges, device),
                down: mlp.down.select_inputs(inter_at, inter, first, device),
                gated: mlp.gated,
                act: mlp.act,
            };
            shards.push(Shard::new(attention, mlp, device));
            kv_at += kv;
            inter_at += inter;
        }
        shards
    }
}

impl Decoder {
    /// Tensor parallelism: split every layer's attention heads (query heads with their
    /// key/value heads) and feed-forward columns over `devices`, so that each holds a share of
    /// the weights and, in its caches, of the KV cache. Partial outputs are summed on the
    /// model's device after each attention and feed-forward block (an all-reduce by copies and
    /// a sum; there is no NCCL). Uneven splits are allowed; a part may have no heads.
    pub fn shard(mut self, devices: &[Device]) -> Result<Self, ModelError> {
        self.refuse_if_quantized("tensor parallelism")?;
        if devices.is_empty() || devices.len() as i64 > self.config.intermediate {
            return Err(ModelError::Config(format!(
                "tensor parallelism over {} devices is not possible",
                devices.len()
            )));
        }
        if !self.offloaded_layers().is_empty() {
            return Err(ModelError::Config(
                "tensor parallelism cannot be combined with disk offload".into(),
            ));
        }
        for block in &mut self.blocks {
            let whole = match block.shards.as_slice() {
                [one] => one,
                _ => return Err(ModelError::Config("the model is already sharded".into())),
            };
            block.shards = whole.split(devices);
        }
        Ok(self)
    }

    /// Tensor-parallel parts per layer.
    pub fn shards(&self) -> usize {
        self.blocks.first().map(|b| b.shards.len()).unwrap_or(1)
    }
}
