//! Weight-only quantized linear layers: a GGUF's blocks of 32 as the file holds them, on
//! Cresset's own block kernel ([`blocks`], where the CPU has AVX2, FMA and F16C: the default for
//! GGUF files there); and, on libtorch's CPU kernels, int8 with one scale per output channel
//! (`_weight_int8pack_mm`) and int4 in groups along the input dimension with a scale and a zero
//! per group (`_weight_int4pack_mm_for_cpu`, `w = (q − 8)·scale + zero`). What follows is about
//! libtorch's kernels, which quantizing at load uses everywhere and GGUF files use on CPUs
//! without the block kernel's instructions.
//!
//! - GGUF Q4_0 (`w = d·(q − 8)`) and Q4_1 (`w = d·q + m`) blocks of 32 map exactly onto int4
//!   with group 32: Q4_0 is scale `d`, zero 0; Q4_1 is scale `d`, zero `m + 8d`. They are read
//!   block by block straight into the packed layout, 64 rows at a time: no f32 copy of the
//!   weight exists at any point, and the only loss is rounding the scales to the activation
//!   dtype.
//! - GGUF Q4_K groups of 32 (6-bit scale and minimum each) map exactly onto int4 group 32 too.
//! - GGUF Q8_0 (a scale per 32 weights), Q5_K and Q6_K cannot be expressed by the per-channel
//!   int8 kernel: they are requantized per channel (see [`QuantizedWeight::int8_from_gguf`] for
//!   the error).
//! - Dense weights quantize at load as gpt-fast does: int8 symmetric per channel, int4
//!   asymmetric per group (min/max).
//!
//! The packed int4 layout depends on the CPU's instruction set: it is made at load and never
//! written to disk. The kernels are vectorized for bf16 activations (f32 falls back to a scalar
//! loop, 10-20 times slower: measured in BENCHMARKS.md), so a quantized layer computes in bf16
//! and hands back its input's dtype.

pub mod blocks;

use tch::{Device, Kind, Tensor};

pub use blocks::BlockWeight;

use crate::gguf::GgmlType;
use crate::ModelError;

/// Rows packed at once: the CPU int4 packing works on blocks of 64 output rows.
const PACK_ROWS: i64 = 64;

/// A quantized weight of a linear layer `[out, in]`, ready for its kernel.
#[derive(Debug)]
pub enum QuantizedWeight {
    /// int8, one scale per output channel.
    Int8 {
        /// `[out, in]` int8.
        weight: Tensor,
        /// `[out]`, in the compute dtype.
        scales: Tensor,
    },
    /// int4 in groups along the input dimension.
    Int4 {
        /// The packed weight (`_convert_weight_to_int4pack_for_cpu`).
        packed: Tensor,
        /// Inputs per group (32, 64, 128 or 256).
        group: i64,
        /// `[in / group, out, 2]`: scale and zero, in the compute dtype.
        scale_zeros: Tensor,
        /// `out`.
        out_features: i64,
        /// `in`.
        in_features: i64,
    },
    /// GGUF blocks of 32 as the file holds them, on Cresset's block kernel ([`blocks`]).
    Blocks(BlockWeight),
}

/// The dtype the quantized kernels compute in (see the module docs).
pub const COMPUTE_KIND: Kind = Kind::BFloat16;

fn invalid(message: String) -> ModelError {
    ModelError::Checkpoint(message)
}

/// The source row of each output row when llama.cpp's q/k row permutation is undone
/// (see [`crate::gguf::unpermute_qk`]): `out = h·hd + a·half + b` comes from `h·hd + 2b + a`.
pub fn unpermuted_rows(rows: i64, heads: i64) -> Vec<i64> {
    let per_head = rows / heads;
    let half = per_head / 2;
    (0..rows)
        .map(|out| {
            let (h, within) = (out / per_head, out % per_head);
            let (a, b) = (within / half, within % half);
            h * per_head + b * 2 + a
        })
        .collect()
}

fn f16(bytes: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(bytes).to_f32()
}

/// A scale as the kernels will hold it: rounded to bf16, and never below `scale`, so that the
/// quantized values are computed with the stored scale and never clip (bf16 keeps 8 significant
/// bits: rounding to nearest moves a value by at most 2⁻⁸ of it, so growing it by 2⁻⁷ first
/// keeps it above, at a cost of at most 1.2% in step size).
fn stored_scale(scale: f32) -> f32 {
    half::bf16::from_f32(scale * (1.0 + 2f32.powi(-7))).to_f32()
}

/// [`stored_scale`] on a tensor.
fn stored_scales(scales: &Tensor) -> Tensor {
    (scales * (1.0 + 2f64.powi(-7)))
        .to_kind(COMPUTE_KIND)
        .to_kind(Kind::Float)
}

impl QuantizedWeight {
    /// The same weight, sharing its tensors.
    pub fn shallow_clone(&self) -> Self {
        match self {
            Self::Int8 { weight, scales } => Self::Int8 {
                weight: weight.shallow_clone(),
                scales: scales.shallow_clone(),
            },
            Self::Int4 {
                packed,
                group,
                scale_zeros,
                out_features,
                in_features,
            } => Self::Int4 {
                packed: packed.shallow_clone(),
                group: *group,
                scale_zeros: scale_zeros.shallow_clone(),
                out_features: *out_features,
                in_features: *in_features,
            },
            Self::Blocks(b) => Self::Blocks(b.shallow_clone()),
        }
    }

    /// Stack weights that read the same input (outputs concatenated in order). int4 parts
    /// stack when they share a group size and each has whole 64-row blocks (the packing's unit);
    /// int8 parts always. `None` where the parts cannot be stacked as they are.
    pub fn cat(parts: &[QuantizedWeight]) -> Option<Self> {
        let first = parts.first()?;
        let inp = first.shape()[1];
        if parts.iter().any(|p| p.shape()[1] != inp) {
            return None;
        }
        match first {
            Self::Blocks(_) => {
                let mut blocks = Vec::new();
                for p in parts {
                    let Self::Blocks(b) = p else {
                        return None;
                    };
                    blocks.push(b);
                }
                BlockWeight::cat(&blocks).map(Self::Blocks)
            }
            Self::Int8 { .. } => {
                let mut weights = Vec::new();
                let mut scales = Vec::new();
                for p in parts {
                    let Self::Int8 { weight, scales: s } = p else {
                        return None;
                    };
                    weights.push(weight);
                    scales.push(s);
                }
                Some(Self::Int8 {
                    weight: Tensor::cat(&weights, 0),
                    scales: Tensor::cat(&scales, 0),
                })
            }
            Self::Int4 { group, .. } => {
                let mut packed = Vec::new();
                let mut sz = Vec::new();
                let mut out = 0;
                for p in parts {
                    let Self::Int4 {
                        packed: pk,
                        group: g,
                        scale_zeros,
                        out_features,
                        ..
                    } = p
                    else {
                        return None;
                    };
                    if g != group || out_features % PACK_ROWS != 0 {
                        return None;
                    }
                    packed.push(pk);
                    sz.push(scale_zeros);
                    out += out_features;
                }
                Some(Self::Int4 {
                    packed: Tensor::cat(&packed, 0),
                    group: *group,
                    scale_zeros: Tensor::cat(&sz, 1),
                    out_features: out,
                    in_features: inp,
                })
            }
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        match self {
            Self::Int8 { weight, .. } => {
                let s = weight.size();
                [s[0], s[1]]
            }
            Self::Int4 {
                out_features,
                in_features,
                ..
            } => [*out_features, *in_features],
            Self::Blocks(b) => b.shape(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match self {
            Self::Int8 { weight, scales } => size(weight) + size(scales),
            Self::Int4 {
                packed,
                scale_zeros,
                ..
            } => size(packed) + size(scale_zeros),
            Self::Blocks(b) => b.bytes(),
        }
    }

    /// `x · Wᵀ` for `x` of shape `[..., in]`, in `x`'s dtype (computed in [`COMPUTE_KIND`],
    /// or in f32 for block weights).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if let Self::Blocks(b) = self {
            return b.forward(x);
        }
        let kind = x.kind();
        let size = x.size();
        let inner = *size.last().unwrap_or(&0);
        let flat = x.reshape([-1, inner]).to_kind(COMPUTE_KIND);
        let y = match self {
            Self::Int8 { weight, scales } => flat.internal_weight_int8pack_mm(weight, scales),
            Self::Int4 {
                packed,
                group,
                scale_zeros,
                ..
            } => flat.internal_weight_int4pack_mm_for_cpu(packed, *group, scale_zeros),
            Self::Blocks(_) => unreachable!("block weights return above"),
        };
        let mut out_shape = size;
        if let Some(last) = out_shape.last_mut() {
            *last = self.shape()[0];
        }
        y.reshape(out_shape).to_kind(kind)
    }

    /// The weight as a dense f32 `[out, in]` tensor: exactly what the kernels compute with
    /// (the stored scales and zeros, in f32).
    pub fn dequantize(&self) -> Tensor {
        match self {
            Self::Blocks(b) => b.dequantize(),
            Self::Int8 { weight, scales } => {
                weight.to_kind(Kind::Float) * scales.to_kind(Kind::Float).unsqueeze(1)
            }
            Self::Int4 {
                packed,
                group,
                scale_zeros,
                in_features,
                ..
            } => {
                // The packed layout is the kernel's own: read it back through the kernel, with
                // x = I in f32 (its exact, scalar path), which gives Wᵀ.
                let eye = Tensor::eye(*in_features, (Kind::Float, Device::Cpu));
                eye.internal_weight_int4pack_mm_for_cpu(
                    packed,
                    *group,
                    &scale_zeros.to_kind(Kind::Float),
                )
                .transpose(0, 1)
                .contiguous()
            }
        }
    }

    /// int8 per output channel, symmetric (gpt-fast's `WeightOnlyInt8QuantHandler`): the scale
    /// of a row is its largest magnitude / 127, as stored ([`stored_scale`]): every weight is
    /// within half a step.
    pub fn int8_from_dense(weight: &Tensor) -> Self {
        let w = weight.to_kind(Kind::Float).to_device(Device::Cpu);
        let scales =
            stored_scales(&(w.abs().amax([1i64].as_slice(), true) / 127.0).clamp_min(1e-10));
        let q = (&w / &scales)
            .round()
            .clamp(-128.0, 127.0)
            .to_kind(Kind::Int8);
        Self::Int8 {
            weight: q,
            scales: scales.squeeze_dim(1).to_kind(COMPUTE_KIND),
        }
    }

    /// int4 in groups of `group` inputs, asymmetric (gpt-fast's `WeightOnlyInt4QuantHandler`):
    /// `scale = (max − min) / 15`, `zero = min + 8·scale`, `q = round((w − zero) / scale) + 8`,
    /// against the scale and zero as stored: every weight within half a step, but for the bf16
    /// rounding of the zero (2⁻⁸ of it).
    pub fn int4_from_dense(weight: &Tensor, group: i64) -> Result<Self, ModelError> {
        let size = weight.size();
        let (out, inp) = (size[0], size[1]);
        check_int4_shape(out, inp, group)?;
        let w =
            weight
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
                .reshape([out, inp / group, group]);
        let max = w.amax([2i64].as_slice(), true);
        let min = w.amin([2i64].as_slice(), true);
        let scale = stored_scales(&((&max - &min) / 15.0).clamp_min(1e-6));
        // The zero as stored: the weights are quantized against what the kernel will use.
        let zero = (&min + &scale * 8.0)
            .to_kind(COMPUTE_KIND)
            .to_kind(Kind::Float);
        let q = ((&w - &zero) / &scale + 8.0)
            .round()
            .clamp(0.0, 15.0)
            .reshape([out, inp])
            .to_kind(Kind::Int);
        // [out, in/group, 1] each → [in/group, out, 2].
        let scale_zeros = Tensor::cat(&[scale, zero], 2).transpose(0, 1).contiguous();
        Ok(Self::Int4 {
            packed: pack_int4(&q),
            group,
            scale_zeros: scale_zeros.to_kind(COMPUTE_KIND),
            out_features: out,
            in_features: inp,
        })
    }

    /// int4 (group 32) from GGUF Q4_0, Q4_1 or Q4_K blocks of a `[out, in]` weight, row by
    /// row, with `rows` giving the source row of each output row (to undo a row permutation;
    /// `None`: identity). Each group of 32 maps exactly: Q4_0 is scale `d`, zero 0; Q4_1 is
    /// scale `d`, zero `m + 8d`; a Q4_K group is scale `d·sc`, zero `8·d·sc − dmin·m`.
    pub fn int4_from_gguf(
        kind: GgmlType,
        bytes: &[u8],
        out: i64,
        inp: i64,
        rows: Option<&[i64]>,
    ) -> Result<Self, ModelError> {
        if !matches!(kind, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K) {
            return Err(invalid(format!(
                "{kind:?} blocks cannot load as int4 (Q4_0, Q4_1 and Q4_K can)"
            )));
        }
        const GROUP: i64 = 32;
        check_int4_shape(out, inp, GROUP)?;
        let row_bytes = row_bytes(kind, bytes, out, inp)?;
        let block_bytes = kind.block_bytes() as usize;
        let source = |r: i64| -> usize { rows.map_or(r, |p| p[r as usize]) as usize };
        let mut packed_chunks = Vec::new();
        // Scale and zero per (row, group): [out, in/32, 2].
        let mut sz: Vec<f32> = Vec::with_capacity(out as usize * (inp / GROUP) as usize * 2);
        let mut q: Vec<i32> = Vec::with_capacity((PACK_ROWS * inp) as usize);
        let mut first = 0;
        while first < out {
            let n = PACK_ROWS.min(out - first);
            q.clear();
            for r in first..first + n {
                let src = source(r);
                let row = &bytes[src * row_bytes..(src + 1) * row_bytes];
                for block in row.chunks_exact(block_bytes) {
                    match kind {
                        GgmlType::Q4_K => {
                            for g in crate::gguf::kquant::groups(kind, block) {
                                sz.push(g.scale);
                                sz.push(8.0 * g.scale - g.min);
                                q.extend(g.q.iter().map(|&v| i32::from(v)));
                            }
                        }
                        _ => {
                            let d = f16([block[0], block[1]]);
                            let (zero, qs) = match kind {
                                GgmlType::Q4_1 => {
                                    (f16([block[2], block[3]]) + 8.0 * d, &block[4..20])
                                }
                                _ => (0.0, &block[2..18]),
                            };
                            sz.push(d);
                            sz.push(zero);
                            q.extend(qs.iter().map(|&b| i32::from(b & 0x0F)));
                            q.extend(qs.iter().map(|&b| i32::from(b >> 4)));
                        }
                    }
                }
            }
            let chunk = Tensor::from_slice(&q).reshape([n, inp]);
            packed_chunks.push(pack_int4(&chunk));
            first += n;
        }
        let scale_zeros = Tensor::from_slice(&sz)
            .reshape([out, inp / GROUP, 2])
            .transpose(0, 1)
            .contiguous()
            .to_kind(COMPUTE_KIND);
        Ok(Self::Int4 {
            packed: Tensor::cat(&packed_chunks, 0),
            group: GROUP,
            scale_zeros,
            out_features: out,
            in_features: inp,
        })
    }

    /// int8 per output channel from GGUF blocks of any type (Q8_0, Q5_K, Q6_K, ...),
    /// requantized: each row is decoded block by block and scaled by its largest magnitude /
    /// 127, as stored ([`stored_scale`]). The rounding adds at most half a step of the row's
    /// scale (grown by at most 1.2%) to each weight, on top of the file's own error; for Q8_0
    /// (a scale per 32) the row's step is no smaller than any of its blocks', so the error of a
    /// weight at most doubles. Done row by row (no whole f32 copy).
    pub fn int8_from_gguf(
        kind: GgmlType,
        bytes: &[u8],
        out: i64,
        inp: i64,
        rows: Option<&[i64]>,
    ) -> Result<Self, ModelError> {
        let row_bytes = row_bytes(kind, bytes, out, inp)?;
        let mut q = vec![0i8; (out * inp) as usize];
        let mut scales = Vec::with_capacity(out as usize);
        for r in 0..out as usize {
            let src = rows.map_or(r as i64, |p| p[r]) as usize;
            let decoded =
                crate::gguf::dequantize(kind, &bytes[src * row_bytes..(src + 1) * row_bytes]);
            let max = decoded.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = stored_scale((max / 127.0).max(1e-10));
            scales.push(scale);
            for (j, v) in decoded.iter().enumerate() {
                q[r * inp as usize + j] = (v / scale).round().clamp(-128.0, 127.0) as i8;
            }
        }
        Ok(Self::Int8 {
            weight: Tensor::from_slice(&q).reshape([out, inp]),
            scales: Tensor::from_slice(&scales).to_kind(COMPUTE_KIND),
        })
    }
}

/// Bytes per row of a `[out, in]` tensor of block type `kind`, checked against `bytes`.
pub(crate) fn row_bytes(
    kind: GgmlType,
    bytes: &[u8],
    out: i64,
    inp: i64,
) -> Result<usize, ModelError> {
    let per = kind.block_elements() as i64;
    if kind.block_elements() == 1 || inp % per != 0 {
        return Err(invalid(format!(
            "a {kind:?} tensor's rows must be whole blocks of {per}. Given: {out}×{inp}"
        )));
    }
    let row = (inp / per) as usize * kind.block_bytes() as usize;
    if bytes.len() != row * out as usize {
        return Err(invalid(format!(
            "a {out}×{inp} {kind:?} tensor needs {} bytes; it has {}",
            row * out as usize,
            bytes.len()
        )));
    }
    Ok(row)
}

fn check_int4_shape(out: i64, inp: i64, group: i64) -> Result<(), ModelError> {
    if ![32, 64, 128, 256].contains(&group) {
        return Err(ModelError::Config(format!(
            "`group_size` must be 32, 64, 128 or 256. Given: {group}"
        )));
    }
    if inp % group != 0 || out % 16 != 0 {
        return Err(invalid(format!(
            "an int4 weight needs its inputs in whole groups of {group} and its outputs in multiples of 16. Given: {out}×{inp}"
        )));
    }
    Ok(())
}

/// Pack `[n, in]` int32 values in 0..16 for the CPU int4 kernel, 64 rows at a time (the
/// packing works on blocks of 64 rows, so this equals packing the whole at once).
fn pack_int4(q: &Tensor) -> Tensor {
    let n = q.size()[0];
    let chunks: Vec<Tensor> = (0..n)
        .step_by(PACK_ROWS as usize)
        .map(|first| {
            q.narrow(0, first, PACK_ROWS.min(n - first))
                .contiguous()
                .internal_convert_weight_to_int4pack_for_cpu(2)
        })
        .collect();
    Tensor::cat(&chunks, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Q4 blocks of a random `[out, in]` weight, as llama.cpp writes them.
    fn q4_blocks(kind: GgmlType, out: usize, inp: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        for _ in 0..out * inp / 32 {
            let d = half::f16::from_f32((next() % 1000) as f32 / 50_000.0 + 0.001);
            bytes.extend(d.to_le_bytes());
            if kind == GgmlType::Q4_1 {
                let m = half::f16::from_f32(-((next() % 1000) as f32) / 10_000.0);
                bytes.extend(m.to_le_bytes());
            }
            bytes.extend((0..16).map(|_| (next() & 0xFF) as u8));
        }
        bytes
    }

    /// What the int4 kernel should hold for Q4 blocks: `(q − 8)·bf16(d) + bf16(zero)`.
    fn q4_with_bf16_scales(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
        let block_bytes = if kind == GgmlType::Q4_1 { 20 } else { 18 };
        let mut out = Vec::new();
        for block in bytes.chunks_exact(block_bytes) {
            let d = f16([block[0], block[1]]);
            let (zero, qs) = match kind {
                GgmlType::Q4_1 => (f16([block[2], block[3]]) + 8.0 * d, &block[4..20]),
                _ => (0.0, &block[2..18]),
            };
            let (s, z) = (bf16(d), bf16(zero));
            out.extend(qs.iter().map(|&q| (f32::from(q & 0x0F) - 8.0) * s + z));
            out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * s + z));
        }
        out
    }

    #[test]
    fn q4_blocks_load_as_int4_exactly_up_to_the_scales_rounding() {
        let (out, inp) = (128usize, 96usize);
        for kind in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = q4_blocks(kind, out, inp, 7);
            let q = QuantizedWeight::int4_from_gguf(kind, &bytes, out as i64, inp as i64, None)
                .expect("int4");
            // Exactly the blocks' values, but for the bf16 rounding of each scale and zero.
            let expected = Tensor::from_slice(&q4_with_bf16_scales(kind, &bytes))
                .reshape([out as i64, inp as i64]);
            let diff = max_diff(&q.dequantize(), &expected);
            assert!(diff <= 1e-6, "{kind:?}: {diff}");
            // And that rounding is small against the weights: bf16 keeps 8 significant bits, so
            // |Δw| ≤ 8·|Δd| + |Δzero| ≤ 2⁻⁸·(8·d + |zero|) ≤ 2⁻⁸·2·max|w| (8·d ≤ max|w| for
            // Q4_0; for Q4_1, whose values span m..m + 15d, 8·d + |m + 8d| ≤ 2·max|w|).
            let dense = Tensor::from_slice(&crate::gguf::dequantize(kind, &bytes))
                .reshape([out as i64, inp as i64]);
            let bound = 2.0 * dense.abs().max().double_value(&[]) * 2f64.powi(-8) + 1e-6;
            let rounding = max_diff(&expected, &dense);
            assert!(rounding <= bound, "{kind:?}: {rounding} > {bound}");
            // A bf16 matmul agrees with the dense f32 one to bf16's precision over the sum:
            // each of the `in` products is rounded to 8 bits once, as x is.
            let x = Tensor::randn([3, inp as i64], (Kind::Float, Device::Cpu));
            let y = q.forward(&x);
            let reference = x.matmul(&expected.transpose(0, 1));
            let tolerance = x.abs().sum(Kind::Float).double_value(&[])
                * expected.abs().max().double_value(&[])
                * 2f64.powi(-8);
            assert!(max_diff(&y, &reference) <= tolerance, "{kind:?}");
        }
    }

    #[test]
    fn a_row_permutation_is_applied_to_the_rows_of_a_q4_weight() {
        let (out, inp, heads) = (128i64, 64i64, 4i64);
        let bytes = q4_blocks(GgmlType::Q4_0, out as usize, inp as usize, 3);
        let held =
            Tensor::from_slice(&q4_with_bf16_scales(GgmlType::Q4_0, &bytes)).reshape([out, inp]);
        let rows = unpermuted_rows(out, heads);
        let q = QuantizedWeight::int4_from_gguf(GgmlType::Q4_0, &bytes, out, inp, Some(&rows))
            .expect("int4");
        let expected = crate::gguf::unpermute_qk(&held, heads);
        assert!(max_diff(&q.dequantize(), &expected) <= 1e-6);
    }

    #[test]
    fn dense_weights_quantize_within_half_a_step() {
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu)) * 0.05;
        // The stored step is at most (1 + 2⁻⁷)(1 + 2⁻⁸) of the exact one.
        let growth = (1.0 + 2f64.powi(-7)) * (1.0 + 2f64.powi(-8));
        let int8 = QuantizedWeight::int8_from_dense(&w);
        let row_step = w.abs().amax([1i64].as_slice(), true) / 127.0 * growth;
        let over = ((int8.dequantize() - &w).abs() - row_step * 0.5)
            .max()
            .double_value(&[]);
        assert!(over <= 1e-7, "int8: {over}");
        let int4 = QuantizedWeight::int4_from_dense(&w, 32).expect("int4");
        let groups = w.reshape([64, 4, 32]);
        let range = groups.amax([2i64].as_slice(), true) - groups.amin([2i64].as_slice(), true);
        let step = (&range / 15.0 * growth).expand([64, 4, 32], false);
        // Half a step, and the zero's rounding: |zero| ≤ max|w| + 8·step, 2⁻⁸ of it.
        let zero_rounding =
            (groups.abs().amax([2i64].as_slice(), true) + &range * 0.6) * 2f64.powi(-8);
        let allowed = (step * 0.5 + zero_rounding).reshape([64, 128]);
        let over = ((int4.dequantize() - &w).abs() - allowed)
            .max()
            .double_value(&[]);
        assert!(over <= 1e-7, "int4: {over}");
        assert!(QuantizedWeight::int4_from_dense(&w, 48).is_err());
    }

    #[test]
    fn q8_0_requantized_per_channel_at_most_doubles_the_blocks_error() {
        let (out, inp) = (32usize, 128usize);
        let mut bytes = Vec::new();
        for r in 0..out {
            for b in 0..inp / 32 {
                // Blocks of one row with scales spread over a decade.
                let d = 0.001 * (1.0 + (r + 3 * b) as f32 % 10.0);
                bytes.extend(half::f16::from_f32(d).to_le_bytes());
                bytes.extend((0..32).map(|j| ((j * 37 + r * 11 + b) % 255) as u8));
            }
        }
        let dense = Tensor::from_slice(&crate::gguf::dequantize(GgmlType::Q8_0, &bytes))
            .reshape([out as i64, inp as i64]);
        let q =
            QuantizedWeight::int8_from_gguf(GgmlType::Q8_0, &bytes, out as i64, inp as i64, None)
                .expect("int8");
        let growth = (1.0 + 2f64.powi(-7)) * (1.0 + 2f64.powi(-8));
        let row_step = dense.abs().amax([1i64].as_slice(), true) / 127.0 * growth;
        let err = (q.dequantize() - &dense).abs();
        // Half a row step, plus the bf16 rounding of the row scale.
        let allowed = &row_step * 0.5;
        let over = (err - allowed).max().double_value(&[]);
        assert!(over <= 1e-6, "{over}");
    }

    #[test]
    fn the_unpermutation_matches_the_tensor_one() {
        let w = Tensor::arange(64, (Kind::Float, Device::Cpu)).reshape([16, 4]);
        let rows = unpermuted_rows(16, 2);
        let index = Tensor::from_slice(&rows);
        let gathered = w.index_select(0, &index);
        assert_eq!(max_diff(&gathered, &crate::gguf::unpermute_qk(&w, 2)), 0.0);
    }
}
