//! Causal self-attention with grouped-query heads and the slot KV cache: rotary positions
//! (Llama) or ALiBi biases (BLOOM) as the configuration says, and [`Step`], what every layer's
//! attention shares about one forward pass (the rows' places in the cache, the causal mask, the
//! rotary tables at the rows' positions).

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
}
