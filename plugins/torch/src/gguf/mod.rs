//! GGUF files (llama.cpp's format): metadata, tensor directory, and dequantization of F32,
//! F16, BF16, Q8_0, Q4_0 and Q4_1 tensors at load, so that users of the llama.cpp ecosystem can
//! serve the files they already have.
//!
//! The file is memory-mapped; the header is parsed as hostile input (every count, length and
//! offset is checked against the file before use, and the metadata is capped). Metadata arrays
//! stay in the mapping until they are read ([`Gguf::array`]), so a parse costs memory only for
//! what a model uses. The tokenizers a file's vocabulary describes are built in
//! `gguf/tokenizer.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::ModelError;

pub use cresset_plan::gguf::{Array, GgmlType, TensorInfo, Value, ValueType, MAGIC, QK};

mod tokenizer;

/// A parsed GGUF file.
pub struct Gguf {
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    map: memmap2::Mmap,
    path: PathBuf,
}

pub(crate) fn bad(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("{}: {message}", path.display()))
}

impl Gguf {
    /// Open and parse a GGUF file (version 2 or 3).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| bad(path, e))?;
        // SAFETY: read-only private mapping of a staged model file that nothing writes while it
        // is loaded; tensors are copied out of it before use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(path, e))?;
        let header = cresset_plan::gguf::parse(path, &map)?;
        Ok(Self {
            metadata: header.metadata,
            tensors: header.tensors,
            map,
            path: path.to_path_buf(),
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned metadata value.
    pub fn u64(&self, key: &str) -> Result<u64, ModelError> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| {
            bad(
                &self.path,
                format!("metadata `{key}` is missing or not an integer"),
            )
        })
    }

    /// A required string metadata value.
    pub fn str(&self, key: &str) -> Result<&str, ModelError> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| {
            bad(
                &self.path,
                format!("metadata `{key}` is missing or not a string"),
            )
        })
    }

    /// The elements of the metadata array `key`, decoded one at a time from the file (a
    /// parse leaves arrays in the file); `None` if there is no array of that name.
    pub fn array<'a>(
        &'a self,
        key: &str,
    ) -> Option<impl Iterator<Item = Result<Value, ModelError>> + 'a> {
        let array = self.get(key)?.as_array()?;
        let key = key.to_owned();
        Some(
            array
                .values(&self.map)
                .map(move |v| v.map_err(|e| bad(&self.path, format!("metadata `{key}`: {e}")))),
        )
    }

    /// The strings of the metadata array `key`, decoded one at a time.
    fn strings<'a>(
        &'a self,
        key: &'a str,
    ) -> Result<impl Iterator<Item = Result<String, ModelError>> + 'a, ModelError> {
        let values = self.array(key).ok_or_else(|| {
            bad(
                &self.path,
                format!("metadata `{key}` is missing or not an array"),
            )
        })?;
        Ok(values.map(move |v| match v? {
            Value::String(s) => Ok(s),
            _ => Err(bad(&self.path, format!("`{key}` holds a non-string"))),
        }))
    }

    /// Dequantize a tensor into a `kind` tensor on `device`.
    pub fn tensor(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor, ModelError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("the file has no tensor `{name}`")))?;
        let bytes = &self.map[info.offset as usize..(info.offset + info.size) as usize];
        let tensor = match info.ggml_type {
            GgmlType::F32 => Tensor::f_from_data_size(bytes, &info.shape, Kind::Float)?,
            GgmlType::F16 => Tensor::f_from_data_size(bytes, &info.shape, Kind::Half)?,
            GgmlType::BF16 => Tensor::f_from_data_size(bytes, &info.shape, Kind::BFloat16)?,
            quantized => {
                Tensor::from_slice(&dequantize(quantized, bytes)).view(info.shape.as_slice())
            }
        };
        // The bytes are copied out. Drop the file's pages from this process's resident set
        // (they stay in the page cache), so that a file read tensor by tensor is never resident
        // all at once.
        #[cfg(unix)]
        // SAFETY: the mapping is private and read-only, and nothing borrows from it past this
        // point (`bytes` is not used again); a later read faults the pages back in.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                info.offset as usize,
                info.size as usize,
            )
        };
        Ok(tensor.to_kind(kind).to_device(device))
    }

    /// Call `f` with a tensor's type, its bytes in the file and its shape (outermost first),
    /// then drop those pages from this process's resident set (as [`Gguf::tensor`] does): for
    /// reading quantized blocks without dequantizing them.
    pub fn with_raw<R>(
        &self,
        name: &str,
        f: impl FnOnce(GgmlType, &[u8], &[i64]) -> R,
    ) -> Result<R, ModelError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("the file has no tensor `{name}`")))?;
        let bytes = &self.map[info.offset as usize..(info.offset + info.size) as usize];
        let out = f(info.ggml_type, bytes, &info.shape);
        #[cfg(unix)]
        // SAFETY: the mapping is private and read-only, and `f` has returned: nothing borrows
        // from these pages any more; a later read faults them back in.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                info.offset as usize,
                info.size as usize,
            )
        };
        Ok(out)
    }

    /// The type of tensor `name`, if the file has it.
    pub fn ggml_type(&self, name: &str) -> Option<GgmlType> {
        self.tensors.get(name).map(|t| t.ggml_type)
    }
}

fn f16(bytes: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(bytes).to_f32()
}

/// Dequantize whole blocks of a quantized type to f32 (`bytes` must hold whole blocks).
pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let block_bytes = kind.block_bytes() as usize;
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * kind.block_elements() as usize);
    for block in bytes.chunks_exact(block_bytes) {
        match kind {
            GgmlType::Q8_0 => {
                let d = f16([block[0], block[1]]);
                out.extend(block[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
            GgmlType::Q4_0 => {
                let d = f16([block[0], block[1]]);
                let qs = &block[2..18];
                out.extend(qs.iter().map(|&q| (f32::from(q & 0x0F) - 8.0) * d));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16([block[0], block[1]]), f16([block[2], block[3]]));
                let qs = &block[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                for group in kquant::groups(kind, block) {
                    out.extend(
                        group
                            .q
                            .iter()
                            .map(|&q| f32::from(q) * group.scale - group.min),
                    );
                }
            }
            GgmlType::Q6_K => out.extend(kquant::q6_k(block)),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {}
        }
    }
    out
}

/// The k-quants' super-blocks of 256 weights (llama.cpp's `block_q4_K`, `block_q5_K`,
/// `block_q6_K`; checked against the `gguf` package's dequantization in the tests).
pub mod kquant {
    use super::f16;
    use crate::gguf::GgmlType;

    /// One group of 32 weights of a Q4_K or Q5_K super-block: `w = scale·q − min`.
    pub struct Group {
        /// The effective scale (`d·sc`).
        pub scale: f32,
        /// The effective minimum (`dmin·m`).
        pub min: f32,
        /// The 32 quantized values (0..16 for Q4_K, 0..32 for Q5_K).
        pub q: [u8; 32],
    }

    /// The 6-bit scale and minimum of group `j` (0..8) from the 12 packed bytes.
    fn scale_min(scales: &[u8], j: usize) -> (u8, u8) {
        if j < 4 {
            (scales[j] & 0x3F, scales[j + 4] & 0x3F)
        } else {
            (
                (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 2) & 0x30),
                (scales[j + 4] >> 4) | ((scales[j] >> 2) & 0x30),
            )
        }
    }

    /// The 8 groups of a Q4_K (144 bytes) or Q5_K (176 bytes) super-block.
    pub fn groups(kind: GgmlType, block: &[u8]) -> Vec<Group> {
        let d = f16([block[0], block[1]]);
        let dmin = f16([block[2], block[3]]);
        let scales = &block[4..16];
        let (qh, qs) = match kind {
            GgmlType::Q5_K => (Some(&block[16..48]), &block[48..176]),
            _ => (None, &block[16..144]),
        };
        (0..8)
            .map(|j| {
                let (sc, m) = scale_min(scales, j);
                let (chunk, shift) = (j / 2, 4 * (j % 2));
                let mut q = [0u8; 32];
                for (i, v) in q.iter_mut().enumerate() {
                    *v = (qs[chunk * 32 + i] >> shift) & 0x0F;
                    if let Some(qh) = qh {
                        *v |= ((qh[i] >> j) & 1) << 4;
                    }
                }
                Group {
                    scale: d * f32::from(sc),
                    min: dmin * f32::from(m),
                    q,
                }
            })
            .collect()
    }

    /// The 256 weights of a Q6_K super-block (210 bytes): `w = d·scale[t/16]·(q − 32)`.
    pub fn q6_k(block: &[u8]) -> Vec<f32> {
        let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
        let d = f16([block[208], block[209]]);
        (0..256)
            .map(|t| {
                let (chunk, i) = (t / 32, t % 32);
                let (half, s) = (chunk / 4, (chunk % 4) / 2);
                let low = (ql[half * 64 + (chunk % 2) * 32 + i] >> (4 * s)) & 0x0F;
                let high = (qh[half * 32 + i] >> (2 * (chunk % 4))) & 0x03;
                let q = i32::from(low | (high << 4)) - 32;
                d * f32::from(scales[t / 16] as i8) * q as f32
            })
            .collect()
    }
}

/// Undo llama.cpp's row permutation of a q or k projection (`[heads × head_dim, in]`): its
/// converter interleaves the two rotary halves of each head; HuggingFace keeps them apart.
pub fn unpermute_qk(weight: &Tensor, heads: i64) -> Tensor {
    let size = weight.size();
    let (rows, cols) = (size[0], size[1]);
    weight
        .reshape([heads, rows / heads / 2, 2, cols])
        .swapaxes(1, 2)
        .reshape([rows, cols])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_dequantize_as_ggml_defines_them() {
        let d = half::f16::from_f32(0.5).to_le_bytes();
        let m = half::f16::from_f32(-1.0).to_le_bytes();
        // Q8_0: scale, then 32 signed bytes.
        let mut q8 = d.to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = dequantize(GgmlType::Q8_0, &q8);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
        // Q4_0: low nibbles are elements 0..16, high nibbles 16..32, both minus 8.
        let mut q4 = d.to_vec();
        q4.extend((0..16).map(|i| (i as u8) | (15 - i as u8) << 4));
        let out = dequantize(GgmlType::Q4_0, &q4);
        assert_eq!((out[0], out[15], out[16], out[31]), (-4.0, 3.5, 3.5, -4.0));
        // Q4_1: value * d + m.
        let mut q41 = d.to_vec();
        q41.extend_from_slice(&m);
        q41.extend((0..16).map(|i| (i as u8) | (15 - i as u8) << 4));
        let out = dequantize(GgmlType::Q4_1, &q41);
        assert_eq!((out[0], out[15], out[16], out[31]), (-1.0, 6.5, 6.5, -1.0));
    }

    #[test]
    fn the_qk_permutation_is_undone() {
        // llama.cpp: w.reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).reshape(rows, cols),
        // with head_dim 8, so that the two middle axes differ in size.
        let hf = Tensor::arange(16 * 3, (Kind::Float, Device::Cpu)).view([16, 3]);
        let permuted = hf.reshape([2, 2, 4, 3]).swapaxes(1, 2).reshape([16, 3]);
        assert!(!permuted.equal(&hf));
        assert!(unpermute_qk(&permuted, 2).equal(&hf));
        // Applying the permutation again does not undo it.
        let again = permuted
            .reshape([2, 2, 4, 3])
            .swapaxes(1, 2)
            .reshape([16, 3]);
        assert!(!again.equal(&hf));
    }

    #[test]
    fn hostile_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.gguf");
        let mut bytes = MAGIC.to_le_bytes().to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        // One key whose string claims a huge length.
        bytes.extend(u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let err = Gguf::open(&path).err().expect("refused");
        assert!(
            err.to_string().contains("truncated") || err.to_string().contains("overflow"),
            "{err}"
        );
        std::fs::write(&path, b"GGML....").expect("write");
        assert!(Gguf::open(&path)
            .err()
            .expect("refused")
            .to_string()
            .contains("magic"));
    }
}
