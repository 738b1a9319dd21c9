//! One pre-norm decoder for the causal LMs Cresset serves, with the family deciding the
//! details:
//!
//! - **Llama** (`LlamaForCausalLM`, also Mistral-style configs): RMSNorm, rotary position
//!   embeddings (with the `rope_scaling` types Llama 3 uses), SwiGLU, grouped-query attention,
//!   tied or untied embeddings; from a HuggingFace checkpoint or a GGUF file (dequantized at
//!   load, llama.cpp's q/k row permutation undone).
//! - **GPT-2** (`GPT2LMHeadModel`): LayerNorm, learned position embeddings, a GELU MLP, biases
//!   everywhere, Conv1D weights (transposed at load), the head tied to the embeddings.
//! - **BLOOM** (`BloomForCausalLM`): LayerNorm (also after the word embeddings), ALiBi biases
//!   instead of positions, query/key/value fused per head (reordered at load), a GELU MLP,
//!   the head tied to the embeddings.
//!
//! Every family gets the same machinery: a slot KV cache, tensor parallelism
//! ([`Decoder::shard`]), per-layer device placement and disk offload, and layer-by-layer
//! loading ([`LoadOptions`]).
//!
//! Each part is its own type in its own module, as in candle's `models/llama.rs` and
//! mistral.rs: `config` (sizes and the per-family decisions), `checkpoint` (tensor names and
//! layouts), `load` (building and placing the layers), `linear` (every projection),
//! `norm`, `rope`, `attention`, `mlp`, `block` (one layer), `embedding` (the two ends),
//! `cache` (the slot KV cache), `parallel` (tensor-parallel shards) and `offload` (disk
//! offload). This module holds [`Decoder`] and its forward pass. Generation loops over
//! [`Decoder::forward`] live in [`crate::generation`].

mod attention;
mod block;
mod cache;
mod checkpoint;
mod config;
mod embedding;
mod linear;
mod load;
mod mlp;
mod norm;
mod offload;
mod parallel;
mod quantized;
mod rope;

use tch::{Device, Kind, Tensor};

pub use crate::generation::GenerationRequest;
pub use attention::fused_decode_calls;
pub use cache::{upload, KvReads, SlotCache};
pub use config::{DecoderConfig, Family, Positions, RopeScaling};
pub use linear::{Linear, Quantize};
pub use load::{LayerTarget, LoadOptions};
pub use norm::Norm;

use crate::ModelError;
use attention::Step;
use block::Block;
use embedding::{Embeddings, Head};
use offload::ReadAhead;
use rope::Rope;

/// A loaded decoder.
pub struct Decoder {
    /// Its configuration.
    pub config: DecoderConfig,
    embeddings: Embeddings,
    blocks: Vec<Block>,
    head: Head,
    /// Rotary tables, for the models that use them.
    rope: Option<Rope>,
    /// The device of the residual stream (and of an unsharded model's layers).
    device: Device,
    kind: Kind,
}

impl Decoder {
    /// The device of the embeddings, norms and head (and of an unsharded model's layers).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of the dense weights and the activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// What the device-map planner places (see [`DecoderConfig::modules`]).
    pub fn modules(&self) -> Vec<cresset_plan::Module> {
        self.config.modules(self.kind.elt_size_in_bytes())
    }

    /// The planner's modules (as [`Decoder::modules`] names them) with the bytes this model
    /// holds for each (quantized layers at their packed size, offloaded layers at 0): what
    /// `cresset_plan::modules_from_gguf_as` predicts from the file's header.
    pub fn resident_modules(&self) -> Vec<cresset_plan::Module> {
        let mut modules = self.modules();
        for m in &mut modules {
            m.bytes = match m.layer {
                Some(l) => self.blocks.get(l).map_or(0, |b| {
                    b.input_norm.bytes()
                        + b.post_norm.bytes()
                        + b.shards.iter().map(|s| s.bytes()).sum::<u64>()
                }),
                None if m.name == "lm_head" => match self.head.tied {
                    true => 0,
                    false => self.head.lm_head.bytes(),
                },
                None if m.name.ends_with("wpe") => self
                    .embeddings
                    .positions
                    .as_ref()
                    .map_or(0, linear::tensor_bytes),
                None if m.name.ends_with("layernorm") => {
                    self.embeddings.norm.as_ref().map_or(0, norm::Norm::bytes)
                }
                None if m.name.contains("emb") || m.name.ends_with("wte") => {
                    self.embeddings.tokens.bytes()
                }
                None => self.head.norm.bytes(),
            };
        }
        modules
    }

    /// Bytes of weights held in memory (offloaded layers not counted).
    pub fn resident_bytes(&self) -> u64 {
        let layers: u64 = self
            .blocks
            .iter()
            .map(|b| {
                b.input_norm.bytes()
                    + b.post_norm.bytes()
                    + b.shards.iter().map(|s| s.bytes()).sum::<u64>()
            })
            .sum();
        self.embeddings.bytes() + self.head.bytes() + layers
    }

    /// Whether any layer (or the head) holds quantized weights.
    pub fn is_quantized(&self) -> bool {
        self.head.lm_head.is_quantized()
            || self.blocks.iter().any(|b| {
                b.shards
                    .iter()
                    .any(|s| s.linears().iter().any(|(_, l)| l.is_quantized()))
            })
    }

    /// The error for what a quantized model cannot do (its weights are packed for the CPU).
    fn refuse_if_quantized(&self, what: &str) -> Result<(), ModelError> {
        if self.is_quantized() {
            return Err(ModelError::Config(format!(
                "a model with quantized weights cannot use {what}: its weights are packed for the CPU's kernels; load it dense (`quantize = \"none\"`)"
            )));
        }
        Ok(())
    }

    /// Move layer `l`'s weights (and so its part of the KV cache) to `device`. The
    /// embeddings, norms and head stay on the model's device; activations cross over.
    pub fn place_layer(&mut self, l: usize, device: Device) -> Result<(), ModelError> {
        if device != Device::Cpu {
            self.refuse_if_quantized("another device")?;
        }
        let block = self
            .blocks
            .get_mut(l)
            .ok_or_else(|| ModelError::Config(format!("there is no layer {l}")))?;
        for shard in &mut block.shards {
            shard.move_to(device);
        }
        Ok(())
    }

    /// The device of each layer (of its first part).
    pub fn layer_devices(&self) -> Vec<Device> {
        self.blocks
            .iter()
            .map(|b| b.shards.first().map_or(self.device, |s| s.device))
            .collect()
    }

    /// An empty cache of `slots` sequences of up to `capacity` positions each.
    pub fn new_cache(&self, slots: usize, capacity: i64) -> SlotCache {
        let parts: Vec<Vec<(i64, Device)>> = self
            .blocks
            .iter()
            .map(|b| {
                b.shards
                    .iter()
                    .map(|s| (s.attention.kv_heads, s.device))
                    .collect()
            })
            .collect();
        SlotCache::new(&parts, slots, capacity, self.config.head_dim, self.kind)
    }

    /// Run `tokens[i]` (new tokens of the sequence in slot `slots[i]`, all rows the same
    /// length `s`) after what each slot holds, and return the logits of every new position,
    /// `[rows, s, vocab]` (or only the last, `[rows, 1, vocab]`, with `last_only`). Advances
    /// each slot by `s`. Rows must be distinct slots.
    pub fn forward(
        &self,
        slots: &[usize],
        tokens: &[Vec<i64>],
        cache: &mut SlotCache,
        last_only: bool,
    ) -> Result<Tensor, ModelError> {
        let rows = slots.len() as i64;
        let s = tokens.first().map(|t| t.len()).unwrap_or(0) as i64;
        if rows == 0 || s == 0 || tokens.iter().any(|t| t.len() as i64 != s) {
            return Err(ModelError::Invalid(
                "a step needs rows of equal, non-zero length".into(),
            ));
        }
        let ids: Vec<i64> = tokens.iter().flatten().copied().collect();
        self.check_ids(&ids)?;
        let (places, ids) = cache.rows(slots, s, self.config.max_positions, self.device, &ids)?;
        let (x, places) = self.run(&ids, places, cache)?;
        cache.advance(&places);
        let x = if last_only { x.narrow(1, s - 1, 1) } else { x };
        Ok(self.head.forward(&x))
    }

    /// An error naming the first of `ids` outside the vocabulary, if any.
    pub fn check_ids(&self, ids: &[i64]) -> Result<(), ModelError> {
        match ids.iter().find(|&&t| t < 0 || t >= self.config.vocab_size) {
            Some(bad) => Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary"
            ))),
            None => Ok(()),
        }
    }

    /// One decode step over slots `0..ids.size()[0]` in shapes that repeat: `ids` and
    /// `positions` (`[rows, 1]`, on the model's device) are read where they are (a captured CUDA
    /// graph replays this on the same tensors), every key of the cache is read (the positions
    /// past a row's own masked), and each row's key and value are written at its position. The
    /// caller checks the ids and positions, and advances `cache.lens` itself. Returns the
    /// logits, `[rows, 1, vocab]`.
    pub fn forward_static(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &SlotCache,
    ) -> Result<Tensor, ModelError> {
        let places = cache.rows_static(positions);
        let (x, _) = self.run(ids, places, cache)?;
        Ok(self.head.forward(&x))
    }

    /// The layers over `ids` (`[rows, s]`) at the places `places` gives, writing the new keys
    /// and values into `cache`: the residual stream after the last layer, and the places.
    fn run(
        &self,
        ids: &Tensor,
        places: cache::Rows,
        cache: &SlotCache,
    ) -> Result<(Tensor, cache::Rows), ModelError> {
        let ids = ids.to_device(self.embeddings.device());
        let positions = places.positions.to_device(self.device);
        let alibi = self.config.positions() == Positions::Alibi;
        let step = Step::new(places, &positions, self.rope.as_ref(), alibi);
        // On the embeddings' device, then the residual stream moves to the model's.
        let mut x = self
            .embeddings
            .forward(&ids, &positions)
            .to_device(self.device);
        let mut disk = ReadAhead::start(&self.blocks, self.kind);
        for (l, block) in self.blocks.iter().enumerate() {
            let loaded = disk.take(l)?;
            x = block.forward(x, &loaded, &step, cache.layer(l));
        }
        Ok((x, step.rows))
    }

    /// The CUDA device whose graphs can hold a decode step of this model: every weight on that
    /// one device, nothing offloaded to disk. `None` otherwise (the CPU included).
    pub fn graph_device(&self) -> Option<usize> {
        let Device::Cuda(index) = self.device else {
            return None;
        };
        let one_device = self.embeddings.device() == self.device
            && self.blocks.iter().all(|b| {
                b.shards
                    .iter()
                    .all(|s| s.device == self.device && s.offloaded.is_none())
            });
        one_device.then_some(index)
    }

    /// Generate for several prompts together (see [`crate::generation::generate`]).
    pub fn generate(&self, requests: &[GenerationRequest]) -> Result<Vec<Vec<i64>>, ModelError> {
        crate::generation::generate(self, requests)
    }
}
