//! Causal self-attention with grouped-query heads and the slot KV cache: rotary positions
//! (Llama) or ALiBi biases (BLOOM) as the configuration says, and [`Step`], what every layer's
//! attention shares about one forward pass (the rows' places in the cache, the causal mask, the
//! rotary tables at the rows' positions).

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::cache::{KvPart, Rows};
use super::config::{DecoderConfig, Positions};
use super::linear::Linear;
use super::rope::{Rope, RotaryAt};

/// The attention of one tensor-parallel part of a layer: some query heads with their key/value
/// heads (all of them when the model is not sharded).
pub(super) struct Attention {
    /// Query heads.
    pub heads: i64,
    /// Key/value heads.
    pub kv_heads: i64,
    /// Per-head size.
    pub head_dim: i64,
    /// Query, key and value projections, stacked in that order.
    pub qkv: Linear,
    /// The output projection.
    pub o_proj: Linear,
    /// ALiBi: the slopes of these heads (f32, on the part's device).
    pub alibi: Option<Tensor>,
}

extern "C" {
    fn cresset_decode_attention(
        qkv: *mut f32,
        cos: *const f32,
        sin: *const f32,
        positions: *const i64,
        slots: *const i64,
        keys: *mut f32,
        values: *mut f32,
        rows: i64,
        heads: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        out: *mut f32,
    ) -> i32;
}

/// Whether a CPU decode step's attention runs as one call (`decode_attention.cpp`);
/// `CRESSET_FUSED_DECODE=0` says no, for probes that compare the two.
fn fused_decode_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("CRESSET_FUSED_DECODE").map_or(true, |v| v != "0"))
}

thread_local! {
    /// Layers' attention computed by the fused call on this thread (for tests that must know
    /// the path ran).
    static FUSED_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many layers' attention the fused decode call has computed on this thread.
#[doc(hidden)]
pub fn fused_decode_calls() -> u64 {
    FUSED_CALLS.with(std::cell::Cell::get)
}

/// What every layer's attention shares about one forward pass.
pub(super) struct Step {
    /// Where the rows sit in the cache.
    pub rows: Rows,
    /// Rotary tables at the rows' positions.
    rotary: Option<RotaryAt>,
    /// Keys visible to each query, `[rows, 1, s, read]`: positions ≤ the query's own, within
    /// the row's sequence.
    causal: Tensor,
    /// ALiBi: the key positions (`[1, 1, 1, read]`, f32) and the keys hidden from each query.
    alibi: Option<(Tensor, Tensor)>,
}

impl Step {
    /// The step of `rows`, whose new tokens are at `positions` (`[rows, s]`, on the model's
    /// device), with the model's rotary tables if it has them and ALiBi's masks if it uses it.
    pub fn new(rows: Rows, positions: &Tensor, rope: Option<&Rope>, alibi: bool) -> Self {
        let device = positions.device();
        let rotary = rope.map(|r| r.at(positions));
        // Keys past a row's own positions (stale ones of an earlier sequence, or never
        // written, when the read is bucketed) are hidden like its future ones.
        let key_pos = Tensor::arange(rows.read, (Kind::Int64, device)).view([1, 1, rows.read]);
        let causal = key_pos.le_tensor(&positions.unsqueeze(-1)).unsqueeze(1);
        // ALiBi adds slope × key position to the scores (per head; the rest of the relative
        // distance is constant along a row, which softmax ignores).
        let alibi = alibi.then(|| {
            (
                key_pos.to_kind(Kind::Float).unsqueeze(0),
                causal.logical_not(),
            )
        });
        Self {
            rows,
            rotary,
            causal,
            alibi,
        }
    }
}

/// ALiBi slopes for every head of `cfg`, if it uses ALiBi.
pub(super) fn alibi_slopes(cfg: &DecoderConfig, device: Device) -> Option<Tensor> {
    (cfg.positions() == Positions::Alibi).then(|| {
        Tensor::from_slice(&crate::bloom::alibi_slopes(cfg.heads))
            .to_kind(Kind::Float)
            .to_device(device)
    })
}

impl Attention {
    /// All of `cfg`'s heads.
    pub fn new(cfg: &DecoderConfig, qkv: Linear, o_proj: Linear, alibi: Option<Tensor>) -> Self {
        Self {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            qkv,
            o_proj,
            alibi,
        }
    }

    /// Attend from `x` (`[rows, s, hidden]`, normed, on this part's device) over what `kv`
    /// holds plus the new positions, which are written into `kv` first. Returns this part's
    /// share of the output projection.
    pub fn forward(&self, x: &Tensor, step: &Step, kv: &KvPart) -> Tensor {
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (rows, s) = (step.rows.slots.len() as i64, step.rows.len);
        let device = x.device();
        let qkv = self.qkv.forward(x);
        if let Some(attn) = self.decode_on_cpu(&qkv, step, kv) {
            return self.o_proj.forward(&attn);
        }
        // RoPE on the query and key heads together.
        let qk = qkv
            .narrow(-1, 0, (h + kvh) * hd)
            .view([rows, s, h + kvh, hd])
            .transpose(1, 2);
        let qk = match &step.rotary {
            Some(rotary) => rotary.apply(&qk),
            None => qk,
        };
        let q = qk.narrow(1, 0, h);
        let k = qk.narrow(1, h, kvh);
        let v = qkv
            .narrow(-1, (h + kvh) * hd, kvh * hd)
            .view([rows, s, kvh, hd])
            .transpose(1, 2);
        kv.store(&step.rows, &k, &v);
        let (keys, values) = kv.visible(&step.rows);
        let mask = match (&self.alibi, &step.alibi) {
            (Some(slopes), Some((key_pos, hidden))) => (slopes.view([1, h, 1, 1])
                * key_pos.to_device(device))
            .masked_fill(&hidden.to_device(device), f64::NEG_INFINITY)
            .to_kind(q.kind()),
            _ => step.causal.to_device(device),
        };
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &keys,
            &values,
            Some(&mask),
            0.0,
            false,
            None,
            kvh != h,
        );
        let attn = attn.transpose(1, 2).contiguous().view([rows, s, h * hd]);
        self.o_proj.forward(&attn)
    }

    /// A CPU decode step (one new position per row, f32, rotary or learned positions) in one
    /// call: rotary, the cache write and the attention (see `decode_attention.cpp`). `None`
    /// where the step is not one (a prompt, another device or dtype, ALiBi, a step whose
    /// positions are known on the device only): the op-by-op path then runs.
    fn decode_on_cpu(&self, qkv: &Tensor, step: &Step, kv: &KvPart) -> Option<Tensor> {
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let rows = &step.rows;
        let (keys, values) = kv.tensors();
        let f32_cpu =
            |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous();
        let tables = step.rotary.as_ref().map(RotaryAt::tables);
        let eligible = fused_decode_enabled()
            && rows.len == 1
            && rows.starts_known
            && rows.starts.len() == rows.slots.len()
            && self.alibi.is_none()
            && kvh > 0
            && h % kvh == 0
            && hd % 2 == 0
            && f32_cpu(qkv)
            && qkv.numel() == rows.slots.len() * ((h + 2 * kvh) * hd) as usize
            && f32_cpu(keys)
            && f32_cpu(values)
            && tables.is_none_or(|(cos, sin)| {
                let extent = rows.slots.len() * hd as usize;
                f32_cpu(cos) && f32_cpu(sin) && cos.numel() == extent && sin.numel() == extent
            });
        if !eligible {
            return None;
        }
        let size = keys.size();
        let (slot_count, capacity) = (size[0], size[2]);
        if size != [slot_count, kvh, capacity, hd] || values.size() != size {
            return None;
        }
        let slots: Vec<i64> = rows.slots.iter().map(|&s| s as i64).collect();
        let mut seen = vec![false; slot_count as usize];
        let in_bounds = slots.iter().zip(&rows.starts).all(|(&slot, &pos)| {
            let fresh = (0..slot_count).contains(&slot) && !seen[slot as usize];
            if fresh {
                seen[slot as usize] = true;
            }
            fresh && (0..capacity).contains(&pos)
        });
        if !in_bounds {
            return None;
        }
        let n = slots.len() as i64;
        let out = Tensor::empty([n, 1, h * hd], (Kind::Float, Device::Cpu));
        let (cos, sin) = tables.map_or((std::ptr::null(), std::ptr::null()), |(c, s)| {
            (c.data_ptr() as *const f32, s.data_ptr() as *const f32)
        });
        // SAFETY: checked above: one start per slot, `qkv` a contiguous f32 of n rows of
        // (h + 2·kvh)·hd values, the tables (if any) contiguous f32 of n × hd, the caches
        // contiguous f32 [slot_count, kvh, capacity, hd], every slot distinct and below
        // slot_count, every position below capacity, h a multiple of kvh, hd even; `out` is
        // fresh, n × h·hd. The call writes `qkv` (rotated in place: this step's own tensor),
        // the rows' own cache positions and `out`, nothing else.
        let status = unsafe {
            cresset_decode_attention(
                qkv.data_ptr() as *mut f32,
                cos,
                sin,
                rows.starts.as_ptr(),
                slots.as_ptr(),
                keys.data_ptr() as *mut f32,
                values.data_ptr() as *mut f32,
                n,
                h,
                kvh,
                hd,
                capacity,
                out.data_ptr() as *mut f32,
            )
        };
        // The call rotated `qkv` and wrote the cache before it could fail: the op-by-op path
        // cannot take over from there.
        assert_eq!(
            status, 0,
            "the fused decode attention failed (an exception in its thread pool)"
        );
        FUSED_CALLS.with(|c| c.set(c.get() + 1));
        Some(out)
    }
}
