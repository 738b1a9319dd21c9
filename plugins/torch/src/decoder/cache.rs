//! The slot KV cache: allocated once with one slot per running sequence. A step writes each
//! sequence's new keys and values at its own positions, in place, with one indexed write per
//! layer whose indices are tensors on the device (no per-row host arithmetic), and reads the
//! rows back as a view when the running slots are `0..n` (a gather otherwise).
//!
//! How far a step reads is its [`KvReads`]: exactly the longest row (the CPU's default: least
//! work), or a length rounded up to a power of two (the GPU's default): then the shapes of a
//! decode step repeat from one step to the next (the keys a row must not see are masked), so
//! kernels chosen and plans built for a shape are reused, and a captured CUDA graph can replay.

use tch::{Device, Kind, Tensor};

use crate::ModelError;

/// Per-layer caches of keys and values, `[slots, kv_heads, capacity, head_dim]` per
/// tensor-parallel part (on the part's device, with its key/value heads), allocated once. Each
/// slot holds one sequence; `lens[slot]` positions of it are filled.
pub struct SlotCache {
    /// `[layer][part]`.
    layers: Vec<Vec<KvPart>>,
    /// Filled positions per slot.
    pub lens: Vec<i64>,
    /// Positions per slot.
    pub capacity: i64,
    /// How far a step reads.
    pub reads: KvReads,
}

/// `values` on `device` as one int64 tensor. On a GPU, one copy from pinned host memory that
/// does not wait for the device (the step's one synchronisation is the copy of the chosen ids
/// back); on the CPU, the values as they are.
pub fn upload(values: &[i64], device: Device) -> Tensor {
    let host = Tensor::from_slice(values);
    match device {
        Device::Cuda(_) => {
            let on_device = Tensor::empty([values.len() as i64], (Kind::Int64, device));
            let _ = host.pin_memory(device).internal_copy_from(&on_device, true);
            on_device
        }
        _ => host.to_device(device),
    }
}

/// How many positions of the cache a step's attention reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvReads {
    /// Up to the longest row's end.
    Exact,
    /// Up to the longest row's end rounded up to a power of two (at least 16, at most the
    /// capacity).
    Bucketed,
}

impl KvReads {
    /// The default on `device`: bucketed on a GPU, exact on the CPU.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cpu => Self::Exact,
            _ => Self::Bucketed,
        }
    }

    /// Positions read by a step whose rows reach `end`, in a cache of `capacity`.
    pub fn read(self, end: i64, capacity: i64) -> i64 {
        match self {
            Self::Exact => end,
            Self::Bucketed => (end.max(16) as u64)
                .next_power_of_two()
                .min(capacity.max(end) as u64) as i64,
        }
    }
}

/// The keys and values of one tensor-parallel part of one layer.
pub(super) struct KvPart {
    keys: Tensor,
    values: Tensor,
}

/// Where the rows of a step sit in the cache.
pub(super) struct Rows {
    /// Each row's slot (distinct).
    pub slots: Vec<usize>,
    /// Each row's first new position (what its slot held before the step).
    pub starts: Vec<i64>,
    /// New positions per row (the same for every row).
    pub len: i64,
    /// Keys `0..read` are read: one past the last position any row reaches, or more (see
    /// [`KvReads`]).
    pub read: i64,
    /// Whether the slots are `0..rows`, so that their cache reads as a view.
    contiguous: bool,
    /// Whether `starts` are the rows' real first positions (a step of a captured graph's shape
    /// knows them on the device only).
    pub starts_known: bool,
    /// The slots as a tensor (`[rows]`, on the model's device).
    index: Tensor,
    /// The new positions of each row (`[rows, len]`, on the model's device).
    pub positions: Tensor,
}

impl SlotCache {
    /// An empty cache of `slots` sequences of up to `capacity` positions each; `parts` gives
    /// each layer's parts as (key/value heads, device).
    pub(super) fn new(
        parts: &[Vec<(i64, Device)>],
        slots: usize,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
    ) -> Self {
        let zeros = |kv_heads: i64, device: Device| {
            Tensor::zeros([slots as i64, kv_heads, capacity, head_dim], (kind, device))
        };
        let layers = parts
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|&(kv_heads, device)| KvPart {
                        keys: zeros(kv_heads, device),
                        values: zeros(kv_heads, device),
                    })
                    .collect()
            })
            .collect();
        let device = parts.iter().flatten().next().map_or(Device::Cpu, |p| p.1);
        Self {
            layers,
            lens: vec![0; slots],
            capacity,
            reads: KvReads::for_device(device),
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Where each of `slots` is filled to (its first new position), and one past the last
    /// position any of them reaches after adding `len`, checked against the cache's capacity
    /// and the model's `max_positions`.
    pub fn starts(
        &self,
        slots: &[usize],
        len: i64,
        max_positions: i64,
    ) -> Result<(Vec<i64>, i64), ModelError> {
        let starts: Vec<i64> = slots
            .iter()
            .map(|&slot| {
                self.lens
                    .get(slot)
                    .copied()
                    .ok_or_else(|| ModelError::Invalid(format!("no slot {slot}")))
            })
            .collect::<Result<_, _>>()?;
        let end = starts.iter().map(|p| p + len).max().unwrap_or(len);
        if end > self.capacity || end > max_positions {
            return Err(ModelError::Invalid(format!(
                "the sequence needs {end} positions; the cache holds {} and the model {}",
                self.capacity, max_positions
            )));
        }
        Ok((starts, end))
    }

    /// The rows of a step that adds `len` positions to each of `slots` (see [`Self::starts`]).
    pub(super) fn rows(
        &self,
        slots: &[usize],
        len: i64,
        max_positions: i64,
        device: Device,
        ids: &[i64],
    ) -> Result<(Rows, Tensor), ModelError> {
        let (starts, end) = self.starts(slots, len, max_positions)?;
        let rows = slots.len() as i64;
        // The ids, positions and slots go to the device in one copy.
        let mut host: Vec<i64> = ids.to_vec();
        host.extend(starts.iter().flat_map(|&p| p..p + len));
        host.extend(slots.iter().map(|&x| x as i64));
        let uploaded = upload(&host, device);
        let ids = uploaded.narrow(0, 0, rows * len).view([rows, len]);
        let positions = uploaded.narrow(0, rows * len, rows * len).view([rows, len]);
        let index = uploaded.narrow(0, 2 * rows * len, rows);
        let places = Rows {
            slots: slots.to_vec(),
            read: self.reads.read(end, self.capacity),
            starts,
            len,
            contiguous: slots.iter().enumerate().all(|(i, &s)| i == s),
            starts_known: true,
            index,
            positions,
        };
        Ok((places, ids))
    }

    /// The rows of a decode step over slots `0..rows` that reads every position of the cache
    /// (the shape of a captured graph's step), the rows' new positions in `positions`
    /// (`[rows, 1]`, on the model's device). Their starts are not known on the host: the
    /// caller advances `lens`.
    pub(super) fn rows_static(&self, positions: &Tensor) -> Rows {
        let rows = positions.size()[0];
        Rows {
            slots: (0..rows as usize).collect(),
            starts: vec![0; rows as usize],
            len: 1,
            read: self.capacity,
            contiguous: true,
            starts_known: false,
            index: Tensor::arange(rows, (Kind::Int64, positions.device())),
            positions: positions.shallow_clone(),
        }
    }

    /// Copy positions `start..end` of slot `from` into slot `to`, in every layer, and count
    /// them filled in `to` (`lens[to] = end`): a prompt that begins as another sequence's does
    /// takes that sequence's keys and values for the common part instead of computing them.
    /// The caller keeps `start <= lens[to]` and `end <= lens[from]`.
    pub fn copy_positions(&mut self, from: usize, to: usize, start: i64, end: i64) {
        if end > start && from != to {
            for part in self.layers.iter().flatten() {
                for t in [&part.keys, &part.values] {
                    let mut dst = t.get(to as i64).narrow(1, start, end - start);
                    dst.copy_(&t.get(from as i64).narrow(1, start, end - start));
                }
            }
        }
        self.lens[to] = end;
    }

    /// Layer `l`'s parts.
    pub(super) fn layer(&self, l: usize) -> &[KvPart] {
        &self.layers[l]
    }

    /// Record that every row of `rows` now holds its new positions.
    pub(super) fn advance(&mut self, rows: &Rows) {
        for (&slot, &start) in rows.slots.iter().zip(&rows.starts) {
            self.lens[slot] = start + rows.len;
        }
    }
}

impl KvPart {
    /// The keys and the values, `[slots, kv_heads, capacity, head_dim]` each.
    pub(super) fn tensors(&self) -> (&Tensor, &Tensor) {
        (&self.keys, &self.values)
    }

    /// Write each row's new keys and values (`[rows, kv_heads, len, head_dim]`) into its
    /// slot at its positions, in place: one indexed write per tensor.
    pub fn store(&self, rows: &Rows, k: &Tensor, v: &Tensor) {
        let device = self.keys.device();
        let slots = rows.index.to_device(device).unsqueeze(1);
        let positions = rows.positions.to_device(device);
        let at = [Some(slots), None, Some(positions), None];
        for (cache, new) in [(&self.keys, k), (&self.values, v)] {
            // Advanced indices around a slice: the indexed shape is [rows, len, kv_heads, dim].
            let mut cache = cache.shallow_clone();
            let _ = cache.index_put_(&at, &new.transpose(1, 2).to_kind(cache.kind()), false);
        }
    }

    /// The keys and values of positions `0..rows.read` of each row, `[rows, kv_heads, read,
    /// head_dim]`: a view when the slots are `0..rows`, else a gather.
    pub fn visible(&self, rows: &Rows) -> (Tensor, Tensor) {
        if rows.contiguous {
            let n = rows.slots.len() as i64;
            (
                self.keys.narrow(0, 0, n).narrow(2, 0, rows.read),
                self.values.narrow(0, 0, n).narrow(2, 0, rows.read),
            )
        } else {
            let index = rows.index.to_device(self.keys.device());
            (
                self.keys.narrow(2, 0, rows.read).index_select(0, &index),
                self.values.narrow(2, 0, rows.read).index_select(0, &index),
            )
        }
    }
}
