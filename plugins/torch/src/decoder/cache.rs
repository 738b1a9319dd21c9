//! The slot KV cache: allocated once with one slot per running sequence. A step writes each
//! sequence's new keys and values at its own position, in place, and reads the rows back as a
//! view when the running slots are `0..n` (a gather otherwise).

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
    /// One past the last position any row reaches: keys `0..end` are read.
    pub end: i64,
    /// Whether the slots are `0..rows`, so that their cache reads as a view.
    contiguous: bool,
    /// The slots as a tensor, for the gather when they are not.
    index: Tensor,
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
        Self {
            layers,
            lens: vec![0; slots],
            capacity,
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// The rows of a step that adds `len` positions to each of `slots`, checked against the
    /// cache's capacity and the model's `max_positions`.
    pub(super) fn rows(
        &self,
        slots: &[usize],
        len: i64,
        max_positions: i64,
        device: Device,
    ) -> Result<Rows, ModelError> {
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
        let index: Vec<i64> = slots.iter().map(|&x| x as i64).collect();
        Ok(Rows {
            slots: slots.to_vec(),
            starts,
            len,
            end,
            contiguous: slots.iter().enumerate().all(|(i, &s)| i == s),
            index: Tensor::from_slice(&index).to_device(device),
        })
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
    /// Write each row's new keys and values (`[rows, kv_heads, len, head_dim]`) into its
    /// slot, in place.
    pub fn store(&self, rows: &Rows, k: &Tensor, v: &Tensor) {
        for (row, (&slot, &start)) in rows.slots.iter().zip(&rows.starts).enumerate() {
            let row = row as i64;
            self.keys
                .get(slot as i64)
                .narrow(1, start, rows.len)
                .copy_(&k.get(row));
            self.values
                .get(slot as i64)
                .narrow(1, start, rows.len)
                .copy_(&v.get(row));
        }
    }

    /// The keys and values of positions `0..rows.end` of each row, `[rows, kv_heads, end,
    /// head_dim]`: a view when the slots are `0..rows`, else a gather.
    pub fn visible(&self, rows: &Rows) -> (Tensor, Tensor) {
        if rows.contiguous {
            let n = rows.slots.len() as i64;
            (
                self.keys.narrow(0, 0, n).narrow(2, 0, rows.end),
                self.values.narrow(0, 0, n).narrow(2, 0, rows.end),
            )
        } else {
            let index = rows.index.to_device(self.keys.device());
            (
                self.keys.narrow(2, 0, rows.end).index_select(0, &index),
                self.values.narrow(2, 0, rows.end).index_select(0, &index),
            )
        }
    }
}
