//! Loading a decoder: from a HuggingFace checkpoint directory or a GGUF file, each layer
//! placed (on a device, or offloaded to disk) as [`LoadOptions`] say as soon as it is built,
//! so that with `low_cpu_mem_usage` at most one layer beyond the resident ones is in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::attention::{alibi_slopes, Attention};
use super::block::Block;
use super::checkpoint::{check_shape, Checkpoint, Naming, Raw};
use super::config::{DecoderConfig, Positions};
use super::embedding::{Embeddings, Head, TokenTable};
use super::linear::Quantize;
use super::mlp::Mlp;
use super::offload::{create_folder, offload_path};
use super::parallel::Shard;
use super::rope::Rope;
use super::Decoder;
use crate::gguf::Gguf;
use crate::layers::HfConfig;
use crate::weights::Weights;
use crate::ModelError;

/// Where a decoder layer's weights go at load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerTarget {
    /// On this device.
    Device(Device),
    /// In `offload_folder`, read for each use.
    Disk,
}

/// How to load a decoder.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The weights' dtype.
    pub kind: Kind,
    /// The device of the embeddings, norms and head, and of layers without a target.
    pub device: Device,
    /// Read each tensor from the checkpoint when its layer is built (and place or offload the
    /// layer before the next is read), instead of reading the whole state dict first.
    pub low_cpu_mem_usage: bool,
    /// Per-layer targets; layers past the end go to `device`.
    pub layers: Vec<LayerTarget>,
    /// Where disk-offloaded layers are written.
    pub offload_folder: Option<PathBuf>,
    /// The device of the embeddings (GPT-2's positions and BLOOM's embedding norm with them);
    /// default `device`. A tied head is the embedding matrix, so it is here too.
    pub embeddings: Option<Device>,
    /// The device of the final norm and an untied head; default `device`.
    pub head: Option<Device>,
    /// Quantize dense linear layers at load (the head too: a tied head gets a quantized copy
    /// of the word embeddings); `None` keeps them dense.
    pub quantize: Option<Quantize>,
    /// GGUF: load quantized tensors as they are (Q4_* as int4, other block types as int8)
    /// instead of dequantizing them to `kind`.
    pub keep_gguf_quantization: bool,
}

impl LoadOptions {
    /// Everything on `device`, the state dict read first.
    pub fn new(kind: Kind, device: Device) -> Self {
        Self {
            kind,
            device,
            low_cpu_mem_usage: false,
            layers: Vec::new(),
            offload_folder: None,
            embeddings: None,
            head: None,
            quantize: None,
            keep_gguf_quantization: false,
        }
    }
}

impl Decoder {
    /// Load from a HuggingFace checkpoint directory, everything on `device`.
    pub fn load(
        dir: &Path,
        config: &HfConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::load_with(dir, config, &LoadOptions::new(kind, device))
    }

    /// Load from a HuggingFace checkpoint directory, placing (or offloading) each layer as
    /// `opts` says as soon as it is built.
    pub fn load_with(
        dir: &Path,
        config: &HfConfig,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let cfg = DecoderConfig::from_hf(config)?;
        cfg.validate()?;
        let mut w = if opts.low_cpu_mem_usage {
            Weights::open(dir, opts.kind, opts.device)?
        } else {
            Weights::load(dir, opts.kind, opts.device)?
        };
        let naming = Naming::hf(&cfg, &w);
        let mut raw = |name: &str, shape: &[i64]| w.take(name, shape);
        Self::build(cfg, &naming, opts, &mut raw, None, None)
    }

    /// Load from a GGUF file, dequantizing to `kind`, everything on `device`.
    pub fn load_gguf(gguf: &Gguf, kind: Kind, device: Device) -> Result<Self, ModelError> {
        Self::load_gguf_with(gguf, &LoadOptions::new(kind, device))
    }

    /// Load from a GGUF file as `opts` says: with `low_cpu_mem_usage`, each tensor is
    /// dequantized when its layer is built; without, the whole state dict first.
    pub fn load_gguf_with(gguf: &Gguf, opts: &LoadOptions) -> Result<Self, ModelError> {
        let cfg = DecoderConfig::from_gguf(gguf)?;
        cfg.validate()?;
        // Llama 3.1+ GGUFs carry their RoPE scaling as per-frequency divisors.
        let rope_freqs = if gguf.tensors.contains_key("rope_freqs.weight") {
            let factors = gguf.tensor("rope_freqs.weight", Kind::Float, Device::Cpu)?;
            Some(check_shape(
                "rope_freqs.weight",
                factors,
                &[cfg.head_dim / 2],
            )?)
        } else {
            None
        };
        let (kind, device) = (opts.kind, opts.device);
        let native = opts.keep_gguf_quantization.then_some(gguf);
        if opts.low_cpu_mem_usage || native.is_some() {
            let mut raw = |name: &str, shape: &[i64]| {
                check_shape(name, gguf.tensor(name, kind, device)?, shape)
            };
            return Self::build(cfg, &Naming::Gguf, opts, &mut raw, rope_freqs, native);
        }
        let mut all = HashMap::new();
        for name in gguf.tensors.keys() {
            all.insert(name.clone(), gguf.tensor(name, kind, device)?);
        }
        let mut raw = |name: &str, shape: &[i64]| {
            let t = all.remove(name).ok_or_else(|| {
                ModelError::Checkpoint(format!("the GGUF file has no tensor `{name}`"))
            })?;
            check_shape(name, t, shape)
        };
        Self::build(cfg, &Naming::Gguf, opts, &mut raw, rope_freqs, None)
    }

    fn build(
        cfg: DecoderConfig,
        naming: &Naming,
        opts: &LoadOptions,
        raw: &mut Raw<'_>,
        rope_freqs: Option<Tensor>,
        gguf: Option<&Gguf>,
    ) -> Result<Self, ModelError> {
        let (kind, device) = (opts.kind, opts.device);
        let mut ckpt =
            Checkpoint::new(&cfg, naming, raw, kind, device).quantized(gguf, opts.quantize);
        if ckpt.quantizes() {
            super::quantized::check_options(opts)?;
        }
        let tokens = ckpt.token_table()?;
        let positions = ckpt.tensor("positions")?;
        let embed_norm = match cfg.embedding_norm() {
            true => Some(ckpt.norm("embed_norm")?),
            false => None,
        };
        let slopes = alibi_slopes(&cfg, device);
        if opts.layers.contains(&LayerTarget::Disk) {
            let folder = opts.offload_folder.as_deref().ok_or_else(|| {
                ModelError::Config("layers are mapped to disk but no offload folder is set".into())
            })?;
            create_folder(folder)?;
        }
        let mut blocks = Vec::new();
        for l in 0..cfg.layers as usize {
            let input_norm = ckpt.norm(&format!("{l}.input_norm"))?;
            let qkv = ckpt.linear(&format!("{l}.qkv"))?;
            let o_proj = ckpt.linear(&format!("{l}.o"))?;
            let post_norm = ckpt.norm(&format!("{l}.post_norm"))?;
            let gate_up = ckpt.linear(&format!("{l}.gate_up"))?;
            let down = ckpt.linear(&format!("{l}.down"))?;
            let alibi = slopes.as_ref().map(Tensor::shallow_clone);
            let mut shard = Shard::new(
                Attention::new(&cfg, qkv, o_proj, alibi),
                Mlp::new(&cfg, gate_up, down),
                device,
            );
            // Place the layer before the next one is read, so that with `low_cpu_mem_usage`
            // at most one layer beyond the resident ones is in memory.
            match opts.layers.get(l) {
                Some(LayerTarget::Disk) => {
                    if let Some(folder) = opts.offload_folder.as_deref() {
                        shard.offload(&offload_path(folder, l, 0))?;
                    }
                }
                Some(LayerTarget::Device(d)) if *d != device => shard.move_to(*d),
                _ => {}
            }
            blocks.push(Block {
                input_norm,
                post_norm,
                shards: vec![shard],
            });
            if opts.low_cpu_mem_usage {
                crate::release_freed_memory();
            }
        }
        let head_device = opts.head.unwrap_or(device);
        let norm = ckpt.norm("norm")?.to_device(head_device);
        let embed_device = opts.embeddings.unwrap_or(device);
        let mut embeddings = Embeddings {
            tokens: tokens.into_device(embed_device),
            positions: positions.map(|p| p.to_device(embed_device)),
            norm: embed_norm.map(|n| n.to_device(embed_device)),
        };
        let lm_head = ckpt.head(&embeddings.tokens)?;
        // A quantized head is a layer of its own, even when tied to the embeddings (a GGUF's
        // quantized table stays in its blocks for lookups: an int8 head serving as the table
        // too was measured to cost 1.6 points of top-1 agreement on SmolLM2's Q8_0 table),
        // unless it holds the file's blocks as they are: then one copy serves both.
        let mut tied = cfg.tie_embeddings && !lm_head.is_quantized();
        if let (true, Some(weight), Some(out)) = (
            cfg.tie_embeddings,
            lm_head.block_weight(),
            embeddings.tokens.out_kind(),
        ) {
            embeddings.tokens = TokenTable::Shared {
                weight: weight.shallow_clone(),
                out,
            };
            tied = true;
        }
        let head = Head {
            norm,
            lm_head: lm_head.to_device(head_device),
            tied,
        };
        let rope = (cfg.positions() == Positions::Rotary)
            .then(|| Rope::new(&cfg, rope_freqs, kind, device));
        Ok(Self {
            config: cfg,
            embeddings,
            blocks,
            head,
            rope,
            device,
            kind,
        })
    }
}

#[cfg(test)]
impl Decoder {
    /// A small Llama with made-up weights (deterministic: sines of the element index), on the
    /// CPU in f32, for unit tests of what runs decoders.
    pub(crate) fn made_up() -> Self {
        let mut cfg = super::config::tiny(super::config::Family::Llama);
        // Long enough for the scheduler's tests to read more than one bucket of the cache.
        cfg.max_positions = 64;
        let mut raw = |_: &str, shape: &[i64]| {
            let n: i64 = shape.iter().product();
            Ok((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37)
                .sin()
                .view(shape))
        };
        let opts = LoadOptions::new(Kind::Float, Device::Cpu);
        Self::build(cfg, &Naming::Llama, &opts, &mut raw, None, None)
            .expect("a made-up model builds")
    }
}
