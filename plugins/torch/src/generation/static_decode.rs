//! Decode steps in repeating shapes, replayed as CUDA graphs on a GPU: gpt-fast's recipe
//! without Python. A step over the running sequences runs over slots `0..b`, `b` the smallest
//! bucket (1, 2, 4, ... up to the slot count) that holds the highest running slot; every key
//! of the cache is read (positions past a row's own are masked); the slots in `0..b` that do
//! not decode this step are rows too, fed token 0 at the cache's last position (see
//! [`StaticDecode::step`] for why that is harmless). So each bucket has one shape, and on a
//! GPU one graph, captured once (at warm-up, or the first time the bucket is needed) with its
//! own input buffers: a step copies the ids and positions in, replays, and samples from the
//! graph's logits. Prefill stays eager (its shapes vary).
//!
//! Without graphs (the CPU, or a capture that failed) the same shapes run eagerly, which is how
//! the tests check the arithmetic on the CPU.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::cuda_graph::CudaGraph;
use crate::decoder::{upload, Decoder, SlotCache};
use crate::ModelError;

/// One bucket's input buffers, its output, and its graph.
struct Bucket {
    /// `[2, b, 1]`: the ids, then the positions (one copy from the host fills both).
    inputs: Tensor,
    logits: Tensor,
    graph: Option<CudaGraph>,
}

impl Bucket {
    /// The ids and the positions, `[b, 1]` each: views of `inputs`.
    fn ids_and_positions(&self) -> (Tensor, Tensor) {
        (self.inputs.get(0), self.inputs.get(1))
    }
}

/// The static decode path of one scheduler (its cache).
pub struct StaticDecode {
    /// The CUDA device to capture graphs on; `None` runs the shapes eagerly.
    graphs_on: Option<usize>,
    buckets: BTreeMap<i64, Bucket>,
}

impl StaticDecode {
    /// Static steps for `model`, as graphs if `graphs` and the model can be captured (one
    /// CUDA device, nothing offloaded), else eagerly.
    pub fn new(model: &Decoder, graphs: bool) -> Self {
        Self {
            graphs_on: model.graph_device().filter(|_| graphs),
            buckets: BTreeMap::new(),
        }
    }

    /// Whether steps replay CUDA graphs.
    pub fn graphs(&self) -> bool {
        self.graphs_on.is_some()
    }

    /// The buckets of a cache of `slots`: 1, 2, 4, ... and `slots` itself.
    pub fn buckets(slots: usize) -> Vec<i64> {
        let mut sizes: Vec<i64> = std::iter::successors(Some(1i64), |b| Some(b * 2))
            .take_while(|&b| b < slots as i64)
            .collect();
        sizes.push(slots as i64);
        sizes
    }

    /// The position fed to the rows that do not decode: the last the cache and the model hold.
    fn idle_position(model: &Decoder, cache: &SlotCache) -> i64 {
        cache.capacity.min(model.config.max_positions) - 1
    }

    /// Prepare every bucket (capturing its graph): what a first request would otherwise pay.
    pub fn warm_up(&mut self, model: &Decoder, cache: &SlotCache) -> Result<(), ModelError> {
        for b in Self::buckets(cache.slots()) {
            self.bucket(model, cache, b)?;
        }
        Ok(())
    }

    /// Bucket `b`, made (and captured) the first time.
    fn bucket(
        &mut self,
        model: &Decoder,
        cache: &SlotCache,
        b: i64,
    ) -> Result<&mut Bucket, ModelError> {
        if !self.buckets.contains_key(&b) {
            let device = model.device();
            let idle = Self::idle_position(model, cache);
            let inputs = Tensor::stack(
                &[
                    Tensor::zeros([b, 1], (Kind::Int64, device)),
                    Tensor::full([b, 1], idle, (Kind::Int64, device)),
                ],
                0,
            );
            let (ids, positions) = (inputs.get(0), inputs.get(1));
            // One eager pass first (as PyTorch's capture recipe does: libraries initialise,
            // the allocator warms), which also gives the eager path its logits tensor.
            let logits = model.forward_static(&ids, &positions, cache)?;
            let (logits, graph) = match self.graphs_on {
                None => (logits, None),
                Some(index) => {
                    let captured = CudaGraph::capture(index, || {
                        model
                            .forward_static(&ids, &positions, cache)
                            .map_err(|e| e.to_string())
                    });
                    match captured {
                        Ok((graph, logits)) => (logits, Some(graph)),
                        Err(why) => {
                            // Eager from now on, for every bucket: a capture that failed once
                            // fails again.
                            tracing::warn!(
                                "decode steps run without CUDA graphs: capturing one failed: {why}"
                            );
                            self.graphs_on = None;
                            (logits, None)
                        }
                    }
                }
            };
            self.buckets.insert(
                b,
                Bucket {
                    inputs,
                    logits,
                    graph,
                },
            );
        }
        Ok(self.buckets.get_mut(&b).expect("inserted above"))
    }

    /// Decode one token for each of `slots` (distinct), `tokens[i]` being the last token of
    /// the sequence in `slots[i]`: the logits, `[slots.len(), 1, vocab]`, and each slot's
    /// `cache.lens` advanced by one.
    ///
    /// The slots of the bucket that do not decode are fed token 0 at the cache's last
    /// position, in their own slot: a free slot's contents do not matter; a sequence that is
    /// still prefilling (or waiting for its first decode) has not reached that position, and
    /// writes it itself before any query of its reads it (keys are written before they are
    /// read, and a position is read only by queries at or after it).
    pub fn step(
        &mut self,
        model: &Decoder,
        cache: &mut SlotCache,
        slots: &[usize],
        tokens: &[i64],
    ) -> Result<Tensor, ModelError> {
        let highest = slots.iter().copied().max().ok_or_else(|| {
            ModelError::Invalid("a decode step needs at least one sequence".into())
        })?;
        model.check_ids(tokens)?;
        let (positions, _) = cache.starts(slots, 1, model.config.max_positions)?;
        let b = Self::buckets(cache.slots())
            .into_iter()
            .find(|&b| b > highest as i64)
            .ok_or_else(|| ModelError::Invalid(format!("no slot {highest}")))?;
        let idle = Self::idle_position(model, cache);
        let (mut ids_in, mut positions_in) = (vec![0i64; b as usize], vec![idle; b as usize]);
        for ((&slot, &token), &at) in slots.iter().zip(tokens).zip(&positions) {
            ids_in[slot] = token;
            positions_in[slot] = at;
        }
        let device = model.device();
        let bucket = self.bucket(model, &*cache, b)?;
        // One copy from the host (without waiting for the device, on a GPU): the bucket's ids
        // and positions, then the slots whose logits are taken.
        ids_in.extend_from_slice(&positions_in);
        ids_in.extend(slots.iter().map(|&s| s as i64));
        let uploaded = upload(&ids_in, device);
        bucket
            .inputs
            .copy_(&uploaded.narrow(0, 0, 2 * b).view([2, b, 1]));
        match bucket.graph.as_mut() {
            Some(graph) => graph
                .replay()
                .map_err(|why| ModelError::Torch(tch::TchError::Torch(why)))?,
            None => {
                let (ids, positions) = bucket.ids_and_positions();
                bucket.logits = model.forward_static(&ids, &positions, cache)?
            }
        }
        // A copy: the next replay overwrites the graph's logits.
        let rows = uploaded.narrow(0, 2 * b, slots.len() as i64);
        let logits = bucket.logits.index_select(0, &rows);
        for (&slot, &at) in slots.iter().zip(&positions) {
            cache.lens[slot] = at + 1;
        }
        Ok(logits)
    }
}
