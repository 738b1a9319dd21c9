//! GGUF headers (llama.cpp's format): metadata and the tensor directory, parsed as hostile
//! input (every count, length and offset is checked against the file before use). The planner
//! reads sizes from here; `cresset-torch` reads the tensors themselves.

use std::collections::BTreeMap;
use std::path::Path;

use crate::safetensors::CheckpointError;

/// The file's first four bytes ("GGUF", read as a little-endian u32).
pub const MAGIC: u32 = 0x4655_4747;
const DEFAULT_ALIGNMENT: u64 = 32;
/// Block of 32 weights for the quantized types this reader supports.
pub const QK: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// F32 or F64.
    Float(f64),
    /// BOOL.
    Bool(bool),
    /// STRING.
    String(String),
    /// ARRAY.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Uint(v) => Some(*v),
            Self::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// As a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::Uint(v) => Some(*v as f64),
            Self::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader can dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale (values − 8).
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and an f16 minimum.
    Q4_1,
}

impl GgmlType {
    /// The type of a ggml type id, if this reader supports it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Bytes for `n` elements (`n` a multiple of 32 for block types).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let block = |bytes: u64| (n % QK as u64 == 0).then(|| n / QK as u64 * bytes);
        match self {
            Self::F32 => n.checked_mul(4),
            Self::F16 | Self::BF16 => n.checked_mul(2),
            Self::Q8_0 => block(34),
            Self::Q4_0 => block(18),
            Self::Q4_1 => block(20),
        }
    }
}

/// One tensor's directory entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Shape in PyTorch order (outermost first; GGUF stores it innermost first).
    pub shape: Vec<i64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

fn bad(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError(format!("{}: {message}", path.display()))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn take(&mut self, n: u64) -> Result<&[u8], CheckpointError> {
        let n = usize::try_from(n).map_err(|_| bad(self.path, "length overflows"))?;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| bad(self.path, format!("truncated header at byte {}", self.pos)))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CheckpointError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, CheckpointError> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, kind: u32, depth: u32) -> Result<Value, CheckpointError> {
        Ok(match kind {
            0 => Value::Uint(u64::from(self.array::<1>()?[0])),
            1 => Value::Int(i64::from(self.array::<1>()?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Value::Uint(u64::from(self.u32()?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.array()?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.array()?))),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(bad(self.path, "arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least one byte: a count beyond the file is a lie; and
                // no vocabulary needs more than a few million entries.
                if count > (self.bytes.len() - self.pos) as u64 || count > 1 << 24 {
                    return Err(bad(
                        self.path,
                        format!("array of {count} elements is implausible"),
                    ));
                }
                let mut items = Vec::with_capacity((count as usize).min(1 << 16));
                for _ in 0..count {
                    items.push(self.value(inner, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.array()?)),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(bad(self.path, format!("unknown metadata type {other}"))),
        })
    }
}

/// Parse the header of a GGUF file (version 2 or 3) whose whole contents are `bytes`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header, CheckpointError> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    if c.u32()? != MAGIC {
        return Err(bad(path, "not a GGUF file (bad magic)"));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(bad(
            path,
            format!("GGUF version {version} is not supported (2 or 3)"),
        ));
    }
    let tensor_count = c.u64()?;
    let kv_count = c.u64()?;
    if tensor_count > 1 << 20 || kv_count > 1 << 20 {
        return Err(bad(path, "implausible tensor or metadata count"));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = c.string()?;
        let kind = c.u32()?;
        metadata.insert(key, c.value(kind, 0)?);
    }
    let mut raw = Vec::new();
    for _ in 0..tensor_count {
        let name = c.string()?;
        let dims = c.u32()?;
        if dims == 0 || dims > 4 {
            return Err(bad(path, format!("tensor `{name}` has {dims} dimensions")));
        }
        let mut shape = Vec::new();
        for _ in 0..dims {
            shape.push(c.u64()?);
        }
        let type_id = c.u32()?;
        let offset = c.u64()?;
        raw.push((name, shape, type_id, offset));
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .filter(|a| a.is_power_of_two())
        .unwrap_or(DEFAULT_ALIGNMENT);
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    let mut tensors = BTreeMap::new();
    for (name, dims, type_id, offset) in raw {
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                bad(path, format!("tensor `{name}` has ggml type {type_id}, which Cresset cannot dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1)"))
            })?;
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n < 1 << 40)
            .ok_or_else(|| bad(path, format!("tensor `{name}` has shape {dims:?}")))?;
        let size = ggml_type.bytes_for(numel).ok_or_else(|| {
            bad(
                path,
                format!("tensor `{name}`: {numel} elements do not fill whole blocks"),
            )
        })?;
        let start = data_start
            .checked_add(offset)
            .filter(|s| s.checked_add(size).is_some_and(|e| e <= file_len))
            .ok_or_else(|| bad(path, format!("tensor `{name}` lies outside the file")))?;
        let shape = dims.iter().rev().map(|&d| d as i64).collect();
        tensors.insert(
            name,
            TensorInfo {
                shape,
                ggml_type,
                offset: start,
                size,
            },
        );
    }
    Ok(Header { metadata, tensors })
}

/// Read and parse the header of the GGUF file at `path` (memory-mapped; only the header's pages
/// are read).
pub fn read(path: &Path) -> Result<Header, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    // SAFETY: a read-only private mapping of a model file that nothing writes while it is read;
    // the parsed header owns its data.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(path, e))?;
    parse(path, &map)
}
