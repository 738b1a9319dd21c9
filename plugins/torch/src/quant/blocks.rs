//! GGUF weights kept in blocks of 32, as the file holds them, on Cresset's own block kernel
//! (`qblock.cpp`): every row of a `[out, in]` weight is `in / 32` blocks, each of 32 quantized
//! values with one scale and one zero (`w = q·scale + zero`, both f16).
//!
//! - 4-bit blocks hold Q4_0 (scale `d`, zero `−8d`), Q4_1 (`d`, `m`) and Q4_K's groups of 32
//!   (`d·sc`, `−dmin·m`), in GGUF's nibble order.
//! - 8-bit blocks hold Q8_0 (`d`, 0; signed bytes) and Q5_K's groups of 32 (values 0..32, scale
//!   `d·sc`, zero `−dmin·m`); a 4-bit block widens to 8 bits exactly (the same values a byte
//!   each), which is how a layer that mixes the two stacks.
//! - Q4_0, Q4_1 and Q8_0 are exact: their scales and minimums are f16 in the file. For the
//!   k-quants the products `d·sc` and `dmin·m` are rounded to f16 (a relative 2⁻¹¹ in f16's
//!   normal range; below 2⁻¹⁴ the step is absolute, 2⁻²⁴). Scales or zeros that are not finite
//!   f16 numbers are refused at load.
//!
//! The kernel decodes each block once for up to eight rows of activations (in f32, or rounded
//! to int16 per block on AVX2: see [`KernelPath::Auto`]) and sums in f32: a decode step of continuous batching is a few rows, where libtorch's int4 kernel (rows in
//! tiles of four, the weights decoded again per tile, activations rounded to bf16) pays twice
//! for eight rows what it pays for four (BENCHMARKS.md, the llm section). It is vectorized for
//! AVX2 with FMA and F16C; elsewhere a scalar loop runs, and loading keeps libtorch's int4 kernel
//! instead ([`vectorized`]).

use tch::{Device, Kind, Tensor};

use crate::gguf::{kquant, GgmlType};
use crate::ModelError;

extern "C" {
    fn cresset_qblock_vectorized() -> i32;
    fn cresset_qblock_matmul(
        x: *const f32,
        m: i64,
        k: i64,
        q: *const u8,
        sz: *const u16,
        n: i64,
        bits: i32,
        out: *mut f32,
        path: i32,
    ) -> i32;
    fn cresset_qblock_dequantize(
        q: *const u8,
        sz: *const u16,
        n: i64,
        k: i64,
        bits: i32,
        w: *mut f32,
    ) -> i32;
}

/// Values per block.
pub const BLOCK: i64 = 32;

/// Which loop of the block kernel computes a product.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum KernelPath {
    /// The fastest for the CPU and the row count: with AVX2 and up to eight rows, each row of
    /// `x` rounded to int16 per block of 32 (`dx = max|x| / 32767`: a value moves by at most
    /// about `max|x| / 65534` of its block) and multiplied with the weights' integers in integer
    /// lanes, the zeros' share taken from `x` itself (a block whose largest value is under
    /// 1e-30 counts as zeros); with more rows, the float path.
    Auto = 0,
    /// The scalar loop (what a CPU without AVX2 runs).
    Scalar = 1,
    /// The vectorized float path whatever the row count (the weights decoded to f32).
    Float = 2,
}

/// Whether the block kernel's vectorized path runs on this CPU (AVX2, FMA and F16C), and so
/// GGUF files load into blocks; `CRESSET_BLOCK_KERNEL=0` says no (libtorch's kernels then),
/// as [`cresset_plan::cpu_runs_block_kernel`] does.
pub fn vectorized() -> bool {
    // SAFETY: a pure query of the CPU's features.
    let cpu = unsafe { cresset_qblock_vectorized() == 1 };
    cpu && std::env::var("CRESSET_BLOCK_KERNEL").map_or(true, |v| v != "0")
}

/// Whether a GGUF block type loads into blocks of 32 (4-bit or 8-bit) without requantizing.
pub fn loads_as_blocks(kind: GgmlType) -> bool {
    bits_of(kind).is_some()
}

fn bits_of(kind: GgmlType) -> Option<u8> {
    match kind {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => Some(4),
        GgmlType::Q8_0 | GgmlType::Q5_K => Some(8),
        _ => None,
    }
}

/// A `[out, in]` weight in blocks of 32.
#[derive(Debug)]
pub struct BlockWeight {
    /// `[out, in/32 · 16]` (4-bit) or `[out, in]` (8-bit) bytes.
    q: Tensor,
    /// `[out, in/32, 2]` f16: scale and zero per block.
    scale_zeros: Tensor,
    /// 4 or 8.
    bits: u8,
}

fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// Rows of blocks being built: the quantized bytes and the scale/zero pairs.
struct Builder {
    bits: u8,
    q: Vec<u8>,
    sz: Vec<half::f16>,
}

impl Builder {
    /// 32 values in 0..32 (a 4-bit block holds 0..16); in an 8-bit block they are bytes as
    /// they are (the kernel reads them as signed, which they are not below 128).
    fn push(&mut self, values: &[u8; 32], scale: f32, zero: f32) {
        if self.bits == 4 {
            self.q
                .extend((0..16).map(|j| (values[j] & 0x0F) | (values[j + 16] << 4)));
        } else {
            self.q.extend_from_slice(values);
        }
        self.sz.push(half::f16::from_f32(scale));
        self.sz.push(half::f16::from_f32(zero));
    }

    /// One GGUF block (of `block_elements` values) of type `kind`.
    fn block(&mut self, kind: GgmlType, block: &[u8]) {
        match kind {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = f16(&block[0..2]);
                let (zero, qs) = if kind == GgmlType::Q4_1 {
                    (f16(&block[2..4]), &block[4..20])
                } else {
                    (-8.0 * d, &block[2..18])
                };
                let mut values = [0u8; 32];
                for (j, &b) in qs.iter().enumerate() {
                    values[j] = b & 0x0F;
                    values[j + 16] = b >> 4;
                }
                self.push(&values, d, zero);
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                for g in kquant::groups(kind, block) {
                    self.push(&g.q, g.scale, -g.min);
                }
            }
            GgmlType::Q8_0 => {
                // Signed bytes, as they are.
                self.q.extend_from_slice(&block[2..34]);
                self.sz.push(half::f16::from_le_bytes([block[0], block[1]]));
                self.sz.push(half::f16::ZERO);
            }
            // `from_gguf` admits only the types above.
            _ => {}
        }
    }
}

impl BlockWeight {
    /// A GGUF weight `[out, in]` of type `kind` as blocks, read row by row with `rows` giving
    /// the source row of each output row (`None`: identity). `bits` is 4 (Q4_0, Q4_1, Q4_K only)
    /// or 8 (any type [`loads_as_blocks`] admits).
    pub fn from_gguf(
        kind: GgmlType,
        bytes: &[u8],
        out: i64,
        inp: i64,
        rows: Option<&[i64]>,
        bits: u8,
    ) -> Result<Self, ModelError> {
        let natural = bits_of(kind).ok_or_else(|| {
            ModelError::Checkpoint(format!(
                "{kind:?} tensors cannot load as blocks of 32 (Q4_0, Q4_1, Q4_K, Q5_K and Q8_0 can)"
            ))
        })?;
        if bits != 4 && bits != 8 || bits < natural {
            return Err(ModelError::Checkpoint(format!(
                "{kind:?} tensors cannot load as {bits}-bit blocks"
            )));
        }
        let row_bytes = super::row_bytes(kind, bytes, out, inp)?;
        if inp % BLOCK != 0 {
            return Err(ModelError::Checkpoint(format!(
                "a block weight's inputs must be whole blocks of {BLOCK}. Given: {out}×{inp}"
            )));
        }
        let blocks = (out * inp / BLOCK) as usize;
        let mut builder = Builder {
            bits,
            q: Vec::with_capacity(blocks * usize::from(bits) * 4),
            sz: Vec::with_capacity(blocks * 2),
        };
        let block_bytes = kind.block_bytes() as usize;
        for r in 0..out as usize {
            let src = rows.map_or(r, |p| p[r] as usize);
            let row = &bytes[src * row_bytes..(src + 1) * row_bytes];
            for block in row.chunks_exact(block_bytes) {
                builder.block(kind, block);
            }
        }
        // A hostile file's scales can be out of f16's range (Q4_0's zero is −8·d): refused,
        // rather than answered with NaN.
        if let Some(bad) = builder.sz.iter().find(|v| !v.is_finite()) {
            return Err(ModelError::Checkpoint(format!(
                "a {kind:?} tensor has a block scale or zero that is not a finite f16 number ({bad})"
            )));
        }
        let per_row = inp / BLOCK * i64::from(bits) * 4;
        Ok(Self {
            q: Tensor::from_slice(&builder.q).reshape([out, per_row]),
            scale_zeros: Tensor::from_slice(&builder.sz).reshape([out, inp / BLOCK, 2]),
            bits,
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        let s = self.scale_zeros.size();
        [s[0], s[1] * BLOCK]
    }

    /// 4 or 8.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        size(&self.q) + size(&self.scale_zeros)
    }

    /// The same weight, sharing its tensors.
    pub fn shallow_clone(&self) -> Self {
        Self {
            q: self.q.shallow_clone(),
            scale_zeros: self.scale_zeros.shallow_clone(),
            bits: self.bits,
        }
    }

    /// This weight in 8-bit blocks: the same values a byte each, the same scales and zeros.
    pub fn widened(&self) -> Self {
        if self.bits == 8 {
            return self.shallow_clone();
        }
        let [out, _] = self.shape();
        Self {
            q: self.values().reshape([out, -1]),
            scale_zeros: self.scale_zeros.shallow_clone(),
            bits: 8,
        }
    }

    /// Stack weights that read the same input (outputs concatenated in order); parts of
    /// different widths stack as 8-bit blocks. `None` where their inputs differ.
    pub fn cat(parts: &[&BlockWeight]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.shape()[1] != first.shape()[1]) {
            return None;
        }
        let bits = parts.iter().map(|p| p.bits).max()?;
        let same: Vec<BlockWeight> = parts
            .iter()
            .map(|p| {
                if p.bits == bits {
                    p.shallow_clone()
                } else {
                    p.widened()
                }
            })
            .collect();
        let q: Vec<&Tensor> = same.iter().map(|p| &p.q).collect();
        let sz: Vec<&Tensor> = same.iter().map(|p| &p.scale_zeros).collect();
        Some(Self {
            q: Tensor::cat(&q, 0),
            scale_zeros: Tensor::cat(&sz, 0),
            bits,
        })
    }

    /// The quantized values `[out, in/32, 32]`: 0..16 for 4-bit blocks, signed for 8-bit.
    fn values(&self) -> Tensor {
        let [out, inp] = self.shape();
        if self.bits == 4 {
            let bytes = self.q.reshape([out, inp / BLOCK, 16]);
            Tensor::cat(
                &[
                    bytes.bitwise_and(0x0F),
                    bytes.bitwise_right_shift_tensor_scalar(4),
                ],
                2,
            )
        } else {
            self.q
                .view_dtype(Kind::Int8)
                .reshape([out, inp / BLOCK, BLOCK])
        }
    }

    /// The weight as a dense f32 `[out, in]` tensor: exactly what the kernel computes with.
    pub fn dequantize(&self) -> Tensor {
        let [out, inp] = self.shape();
        let w = Tensor::empty([out, inp], (Kind::Float, Device::Cpu));
        // SAFETY: `q` and `scale_zeros` are contiguous (made so at load) with `out` rows of
        // `inp / 32` blocks of `bits`; `w` is a fresh contiguous [out, inp] f32.
        let status = unsafe {
            cresset_qblock_dequantize(
                self.q.data_ptr() as *const u8,
                self.scale_zeros.data_ptr() as *const u16,
                out,
                inp,
                i32::from(self.bits),
                w.data_ptr() as *mut f32,
            )
        };
        assert_eq!(
            status, 0,
            "decoding the blocks failed (an exception in its thread pool)"
        );
        w
    }

    /// Rows `ids` (int64, `[n]`, each checked against the row count) as a dense f32 `[n, in]`
    /// tensor: how a tied head's blocks serve as the word embeddings too.
    pub fn rows(&self, ids: &[i64]) -> Tensor {
        let [out, _] = self.shape();
        for &id in ids {
            // The engines check prompts against the vocabulary; a dense table panics here too
            // (an index out of range).
            assert!(
                (0..out).contains(&id),
                "token id {id} is outside the vocabulary of {out}"
            );
        }
        let index = Tensor::from_slice(ids);
        Self {
            q: self.q.index_select(0, &index),
            scale_zeros: self.scale_zeros.index_select(0, &index),
            bits: self.bits,
        }
        .dequantize()
    }

    /// `x · Wᵀ` for `x` of shape `[..., in]`, in `x`'s dtype (computed in f32; where the
    /// vectorized path runs with up to eight rows, each row's values rounded to int16 per block
    /// of 32 first: see [`KernelPath::Auto`]).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_on(x, KernelPath::Auto)
    }

    /// [`Self::forward`] on the given path, whatever the CPU and row count (for tests and
    /// probes of each path).
    #[doc(hidden)]
    pub fn forward_on(&self, x: &Tensor, path: KernelPath) -> Tensor {
        let kind = x.kind();
        let mut shape = x.size();
        let [out, inp] = self.shape();
        assert_eq!(
            shape.last().copied(),
            Some(inp),
            "a block weight of {inp} inputs was given {shape:?}"
        );
        // A decode step calls this a few times per layer: an input that is already a
        // contiguous f32 on the CPU is read where it lies, and the output is made in its final
        // shape (its memory is the same as the kernel's [rows, out]), with no further tensor op.
        let converted;
        let flat = if kind == Kind::Float && x.device() == Device::Cpu && x.is_contiguous() {
            x
        } else {
            converted = x.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            &converted
        };
        let rows = shape.iter().rev().skip(1).product::<i64>();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        let y = Tensor::empty(shape.as_slice(), (Kind::Float, Device::Cpu));
        // SAFETY: `flat` is a contiguous f32 holding [rows, inp]; `q` and `scale_zeros` are
        // contiguous (made so at load) with `out` rows of `inp / 32` blocks of `bits`; `y` is a
        // fresh contiguous f32 of rows × out values. The kernel reads and writes only within
        // those extents.
        let status = unsafe {
            cresset_qblock_matmul(
                flat.data_ptr() as *const f32,
                rows,
                inp,
                self.q.data_ptr() as *const u8,
                self.scale_zeros.data_ptr() as *const u16,
                out,
                i32::from(self.bits),
                y.data_ptr() as *mut f32,
                path as i32,
            )
        };
        assert_eq!(
            status, 0,
            "the block kernel failed (an exception in its thread pool)"
        );
        if kind == Kind::Float {
            y
        } else {
            y.to_kind(kind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    /// A pseudo-random byte stream.
    fn bytes(seed: u64, count: usize) -> Vec<u8> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect()
    }

    /// Random GGUF blocks of `kind` for a `[out, in]` weight, with sane f16 scales.
    fn gguf_blocks(kind: GgmlType, out: usize, inp: usize, seed: u64) -> Vec<u8> {
        let per = kind.block_elements() as usize;
        let size = kind.block_bytes() as usize;
        let mut all = bytes(seed, out * inp / per * size);
        let scale = |i: usize| half::f16::from_f32(0.001 + (i % 97) as f32 / 4000.0).to_le_bytes();
        for (i, block) in all.chunks_exact_mut(size).enumerate() {
            match kind {
                GgmlType::Q8_0 | GgmlType::Q4_0 => block[0..2].copy_from_slice(&scale(i)),
                GgmlType::Q4_1 => {
                    block[0..2].copy_from_slice(&scale(i));
                    block[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
                }
                // d and dmin; the 6-bit scales and minimums are the random bytes.
                _ => {
                    block[0..2].copy_from_slice(&scale(i));
                    block[2..4].copy_from_slice(&scale(i + 1));
                }
            }
        }
        all
    }

    const KINDS: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q8_0,
    ];

    #[test]
    fn blocks_hold_the_files_weights() {
        let (out, inp) = (48usize, 256usize);
        for kind in KINDS {
            let raw = gguf_blocks(kind, out, inp, 7);
            let want =
                Tensor::from_slice(&dequantize(kind, &raw)).reshape([out as i64, inp as i64]);
            let natural = if matches!(kind, GgmlType::Q5_K | GgmlType::Q8_0) {
                8
            } else {
                4
            };
            for bits in [4u8, 8] {
                let w = BlockWeight::from_gguf(kind, &raw, out as i64, inp as i64, None, bits);
                if bits < natural {
                    assert!(w.is_err(), "{kind:?} as {bits}-bit blocks must be refused");
                    continue;
                }
                let got = w.expect("loads").dequantize();
                let diff = (&got - &want).abs().max().double_value(&[]);
                // Q4_0, Q4_1 and Q8_0 hold the file's own f16 numbers: exact. The k-quants'
                // products d·sc and dmin·m round to f16: a relative 2⁻¹¹ of scale·q and of the
                // minimum, bounded by 2⁻¹¹ of the largest |q·scale| + |min| here.
                let bound = if matches!(kind, GgmlType::Q4_K | GgmlType::Q5_K) {
                    want.abs().max().double_value(&[]) * 2f64.powi(-10)
                } else {
                    0.0
                };
                assert!(
                    diff <= bound,
                    "{kind:?} as {bits}-bit blocks: {diff} > {bound}"
                );
            }
        }
        // Shapes that are not whole blocks, and byte counts that do not match, are refused.
        let raw = gguf_blocks(GgmlType::Q4_0, 4, 64, 1);
        assert!(BlockWeight::from_gguf(GgmlType::Q4_0, &raw, 4, 48, None, 4).is_err());
        assert!(BlockWeight::from_gguf(GgmlType::Q4_0, &raw[1..], 4, 64, None, 4).is_err());
        assert!(BlockWeight::from_gguf(GgmlType::Q6_K, &raw, 4, 64, None, 8).is_err());
        // Scales out of f16's range (Q4_0's zero −8·d overflows for d > 8188) or NaN.
        let mut big = raw.clone();
        big[0..2].copy_from_slice(&half::f16::from_f32(10_000.0).to_le_bytes());
        let err = BlockWeight::from_gguf(GgmlType::Q4_0, &big, 4, 64, None, 4).expect_err("inf");
        assert!(err.to_string().contains("not a finite"), "{err}");
        let mut nan = gguf_blocks(GgmlType::Q8_0, 4, 64, 1);
        nan[0..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        assert!(BlockWeight::from_gguf(GgmlType::Q8_0, &nan, 4, 64, None, 8).is_err());
    }

    /// Whether the kernel's vectorized paths run on this CPU (what the kernel itself checks,
    /// whatever `CRESSET_BLOCK_KERNEL` says about loading).
    fn cpu_vectorized() -> bool {
        // SAFETY: a pure query of the CPU's features.
        unsafe { cresset_qblock_vectorized() == 1 }
    }

    /// The kernel's result against the dequantized weight in f64, within what f32 summation
    /// can lose: a sum of K products computed in f32 (each rounded, then accumulated) is within
    /// (K + 1)·2⁻²⁴·Σ|x·w| of the exact sum (Higham's γ bound, first order). Where the path
    /// rounds x to int16 per block (`int16`), each x moves by at most 0.51·dx (half a step, and
    /// the f32 roundings of 1/dx, of dx and of x/dx, each at most 32767·2⁻²⁴ of a step) with
    /// dx = max|x_block| / 32767: under max|x_block| / 64000 (a block under 1e-30 counts as
    /// zeros: its values move by their own size); times Σ|q·s| of the block (the zeros' share
    /// uses x itself).
    fn check_against_dense(w: &BlockWeight, x: &Tensor, y: &Tensor, int16: bool, what: &str) {
        let dense = w.dequantize().to_kind(Kind::Double);
        let x64 = x.to_kind(Kind::Double);
        let want = x64.matmul(&dense.tr());
        let magnitude = x64.abs().matmul(&dense.abs().tr());
        let k = w.shape()[1] as f64;
        let mut bound = magnitude * ((k + 1.0) * 2f64.powi(-24)) + 1e-30;
        if int16 {
            let [out, inp] = w.shape();
            let rows = x.size()[0];
            let zeros = w
                .scale_zeros
                .to_kind(Kind::Double)
                .select(2, 1)
                .unsqueeze(-1)
                .expand([out, inp / BLOCK, BLOCK], false)
                .reshape([out, inp]);
            let scaled = (&dense - zeros).abs();
            let top = x64
                .abs()
                .view([rows, inp / BLOCK, BLOCK])
                .amax([-1i64].as_slice(), true)
                .expand([rows, inp / BLOCK, BLOCK], false)
                .reshape([rows, inp]);
            let step = (&top / 64000.0).where_self(&top.ge(1e-30), &top);
            bound += step.matmul(&scaled.tr());
        }
        let excess = ((y.to_kind(Kind::Double) - &want).abs() - &bound)
            .max()
            .double_value(&[]);
        assert!(
            excess <= 0.0,
            "{what}: the kernel is off by more than its rounding allows"
        );
    }

    #[test]
    fn the_kernel_equals_a_dense_matmul_on_every_path_and_row_count() {
        let _guard = tch::no_grad_guard();
        // 512 inputs are whole groups of four blocks; 544 (17 blocks) and 96 leave a tail that
        // the vectorized paths read block by block.
        for (kind, inp) in [
            (GgmlType::Q4_1, 512i64),
            (GgmlType::Q8_0, 512),
            (GgmlType::Q4_K, 512),
            (GgmlType::Q4_0, 544),
            (GgmlType::Q8_0, 96),
        ] {
            let out = 80i64;
            let raw = gguf_blocks(kind, out as usize, inp as usize, 3);
            let w = BlockWeight::from_gguf(
                kind,
                &raw,
                out,
                inp,
                None,
                if kind == GgmlType::Q8_0 { 8 } else { 4 },
            )
            .expect("loads");
            // 1 to 8 rows take the int16 path where the CPU has it, and run in one pass of
            // the float path; 9 to 17 rows run in passes of up to eight.
            for rows in [1i64, 2, 3, 5, 8, 9, 17] {
                // Blocks of very different sizes within a row, and a block of zeros.
                let x = Tensor::randn([rows, inp], (Kind::Float, Device::Cpu))
                    * Tensor::logspace(-3.0, 3.0, inp, 10.0, (Kind::Float, Device::Cpu));
                let _ = x.narrow(1, 32, 32).fill_(0.0);
                // And a block too small for int16 steps (it counts as zeros there).
                let _ = x.narrow(1, 64, 32).g_mul_scalar_(1e-35);
                for path in [KernelPath::Auto, KernelPath::Scalar, KernelPath::Float] {
                    let y = w.forward_on(&x, path);
                    assert_eq!(y.size(), [rows, out]);
                    let int16 = path == KernelPath::Auto && cpu_vectorized() && rows <= 8;
                    check_against_dense(
                        &w,
                        &x,
                        &y,
                        int16,
                        &format!("{kind:?}, {rows} rows, {path:?}"),
                    );
                }
            }
            // No rows: an empty answer on every path.
            for path in [KernelPath::Auto, KernelPath::Scalar, KernelPath::Float] {
                let none = w.forward_on(&Tensor::zeros([0, inp], (Kind::Float, Device::Cpu)), path);
                assert_eq!(none.size(), [0, out]);
            }
            // Leading dimensions and the input's dtype carry through.
            let x = Tensor::randn([2, 3, inp], (Kind::BFloat16, Device::Cpu));
            let y = w.forward(&x);
            assert_eq!((y.size(), y.kind()), (vec![2, 3, out], Kind::BFloat16));
        }
    }

    #[test]
    fn the_int16_path_is_tighter_than_its_bound_says() {
        // The bound above is a worst case; on random data the int16 path lands far inside it
        // (and within a few f32 rounding steps of the float path), so a wrong scale or a lost
        // zero cannot hide under it.
        if !cpu_vectorized() {
            return;
        }
        let _guard = tch::no_grad_guard();
        let raw = gguf_blocks(GgmlType::Q4_1, 64, 576, 9);
        let w = BlockWeight::from_gguf(GgmlType::Q4_1, &raw, 64, 576, None, 4).expect("loads");
        let x = Tensor::randn([1, 576], (Kind::Float, Device::Cpu));
        let want = x
            .to_kind(Kind::Double)
            .matmul(&w.dequantize().to_kind(Kind::Double).tr());
        let scale = want.abs().max().double_value(&[]);
        let off = |y: &Tensor| {
            (y.to_kind(Kind::Double) - &want)
                .abs()
                .max()
                .double_value(&[])
                / scale
        };
        let int16 = off(&w.forward(&x));
        let float = off(&w.forward_on(&x, KernelPath::Float));
        assert!(
            int16 < 1e-4,
            "int16 path off by {int16:e} of the largest output"
        );
        assert!(
            float < 1e-5,
            "float path off by {float:e} of the largest output"
        );
    }

    #[test]
    fn the_planner_and_the_kernel_agree_on_this_cpu() {
        // The planner sizes GGUF layers as blocks exactly where loading makes them blocks.
        assert_eq!(vectorized(), cresset_plan::cpu_runs_block_kernel());
    }

    #[test]
    fn mixed_widths_stack_as_eight_bit_blocks_exactly() {
        let inp = 128i64;
        let a_raw = gguf_blocks(GgmlType::Q4_1, 32, inp as usize, 5);
        let b_raw = gguf_blocks(GgmlType::Q8_0, 16, inp as usize, 6);
        let a = BlockWeight::from_gguf(GgmlType::Q4_1, &a_raw, 32, inp, None, 4).expect("a");
        let b = BlockWeight::from_gguf(GgmlType::Q8_0, &b_raw, 16, inp, None, 8).expect("b");
        let both = BlockWeight::cat(&[&a, &b]).expect("stacks");
        assert_eq!((both.bits(), both.shape()), (8, [48, inp]));
        let want = Tensor::cat(&[a.dequantize(), b.dequantize()], 0);
        assert_eq!(
            (both.dequantize() - want).abs().max().double_value(&[]),
            0.0
        );
        // Rows are taken in the order given (how q and k undo llama.cpp's permutation).
        let order: Vec<i64> = (0..32).rev().collect();
        let rev =
            BlockWeight::from_gguf(GgmlType::Q4_1, &a_raw, 32, inp, Some(&order), 4).expect("rev");
        let want = a.dequantize().flip([0i64].as_slice());
        assert_eq!((rev.dequantize() - want).abs().max().double_value(&[]), 0.0);
    }
}
