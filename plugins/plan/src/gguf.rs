//! GGUF headers (llama.cpp's format): metadata and the tensor directory, parsed as hostile
//! input (every count, length and offset is checked against the file before use). The planner
//! reads sizes from here; `cresset-torch` reads the tensors themselves.
//!
//! A parse costs memory for what is used, not for what the file claims. Metadata arrays (the
//! tokenizer's vocabulary and merges, token types, scores) stay in the file: an [`Array`] is an
//! element type, a length and a byte range, and [`Array::values`] decodes the elements one at
//! a time when a user reads them. Scalars are copied. Totals are capped by
//! [`MAX_METADATA_BYTES`] and [`MAX_METADATA_ELEMENTS`], so that even a decoded array stays
//! bounded. (Holding every element as a `Value` cost 33 times the file: 2.1 GiB for a 64 MiB
//! file of four `u8` arrays.)

use std::collections::BTreeMap;
use std::path::Path;

use crate::safetensors::CheckpointError;

/// The file's first four bytes ("GGUF", read as a little-endian u32).
pub const MAGIC: u32 = 0x4655_4747;
const DEFAULT_ALIGNMENT: u64 = 32;
/// Block of 32 weights for the quantized types this reader supports.
pub const QK: usize = 32;
/// Super-block of 256 weights of the k-quants.
pub const QK_K: usize = 256;

/// The most bytes the metadata section may take. Nearly all of it is the tokenizer, about 16
/// bytes a string with its length: SmolLM2's metadata is 1.7 MiB (49,152 tokens, 48,900
/// merges, measured), Llama 3's about 7 MiB (128,256 tokens, 280,147 merges), Gemma 3's about
/// 6.5 MiB (262,144 tokens with scores and types). 64 MiB is 9 times the largest.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// The most elements all metadata arrays may hold together, which bounds what decoding them
/// can cost. SmolLM2 has 147,205; Gemma 3 has the most we know of, 786,432 (262,144 tokens,
/// scores and types), then Llama 3, 536,659 (tokens, types and merges). 4 Mi is over 5 times
/// the largest.
pub const MAX_METADATA_ELEMENTS: u64 = 1 << 22;

/// The most metadata keys. Real files have a few dozen.
pub const MAX_METADATA_KEYS: u64 = 1 << 16;

/// The longest metadata key: the GGUF specification's limit (2^16 − 1 bytes).
const MAX_KEY_BYTES: usize = (1 << 16) - 1;

/// The most tensors. Llama 3.1 405B has 1,138, DeepSeek-V3 (experts stacked, as llama.cpp
/// writes them) about 1,100: 65,536 is over 50 times that.
pub const MAX_TENSORS: u64 = 1 << 16;

/// The longest tensor name. ggml's own limit (`GGML_MAX_NAME`) is 64 bytes; 256 leaves room
/// for writers that do not enforce it.
const MAX_TENSOR_NAME_BYTES: usize = 256;

/// How deeply arrays may nest (an array of arrays of arrays).
const MAX_ARRAY_DEPTH: u32 = 2;

/// The type of a metadata value (GGUF's `gguf_metadata_value_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// UINT8.
    U8,
    /// INT8.
    I8,
    /// UINT16.
    U16,
    /// INT16.
    I16,
    /// UINT32.
    U32,
    /// INT32.
    I32,
    /// FLOAT32.
    F32,
    /// BOOL.
    Bool,
    /// STRING.
    String,
    /// ARRAY.
    Array,
    /// UINT64.
    U64,
    /// INT64.
    I64,
    /// FLOAT64.
    F64,
}

impl ValueType {
    /// The type of a GGUF type id.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// Bytes of one value of a fixed-size type; `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        Some(match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::String | Self::Array => return None,
        })
    }
}

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
    /// ARRAY, left in the file until read.
    Array(Array),
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
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A metadata array as it lies in the file: its element type, its length, and the bytes of its
/// elements. Parsing it cost nothing per element; [`Array::values`] decodes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Array {
    element: ValueType,
    len: usize,
    /// The elements' bytes in the file.
    start: usize,
    end: usize,
}

impl Array {
    /// The type of every element.
    pub fn element_type(&self) -> ValueType {
        self.element
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements, decoded one at a time from `file`: the bytes of the file the header was
    /// parsed from (its memory map). An element of a nested array is again an [`Array`].
    pub fn values<'a>(&self, file: &'a [u8]) -> Values<'a> {
        let mut cursor = Cursor::new(file.get(..self.end).unwrap_or_default());
        cursor.pos = self.start;
        Values {
            cursor,
            start: self.start,
            end: self.end,
            element: self.element,
            left: self.len,
        }
    }
}

/// The elements of an [`Array`], decoded as they are iterated.
#[derive(Debug)]
pub struct Values<'a> {
    cursor: Cursor<'a>,
    start: usize,
    end: usize,
    element: ValueType,
    left: usize,
}

impl Iterator for Values<'_> {
    type Item = Result<Value, CheckpointError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The parse has walked these bytes already; a failure here means that `file` is not
        // the file the header came from.
        let mut unlimited = u64::MAX;
        match self.cursor.value(self.element, 1, &mut unlimited) {
            Ok(v) => Some(Ok(v)),
            Err(problem) => {
                self.left = 0;
                Some(Err(CheckpointError(format!(
                    "metadata array at bytes {}..{}: {problem} (not the file it was parsed from?)",
                    self.start, self.end
                ))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// The ggml tensor types this reader can read (named as ggml names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
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
    /// k-quant: super-blocks of 256 in 8 groups of 32, 4 bits, 6-bit scales and minimums.
    Q4_K,
    /// k-quant: as `Q4_K`, with a fifth bit per weight.
    Q5_K,
    /// k-quant: super-blocks of 256 in 16 groups of 16, 6 bits, 8-bit scales.
    Q6_K,
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
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Elements per block (1 for the float types).
    pub fn block_elements(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 => QK as u64,
            Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K as u64,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes for `n` elements (`n` a multiple of the block for block types).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let per = self.block_elements();
        (n % per == 0)
            .then(|| n / per)
            .and_then(|blocks| blocks.checked_mul(self.block_bytes()))
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

/// A parsed GGUF header. Its metadata arrays refer to the file's bytes: decode them with
/// [`Array::values`] and the bytes the header was parsed from.
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

/// Reads the file front to back. Its errors are problems without the file's name, which
/// [`parse`] adds.
#[derive(Debug)]
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Where the metadata must end ([`MAX_METADATA_BYTES`] after it starts) while it is read.
    metadata_end: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            metadata_end: usize::MAX,
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let truncated = || format!("truncated header at byte {}", self.pos);
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .ok_or_else(truncated)?;
        // The cap first: a length past it is refused whatever the file's size.
        if end > self.metadata_end {
            return Err(format!(
                "the metadata takes more than {MAX_METADATA_BYTES} bytes, the most this reader accepts"
            ));
        }
        if end > self.bytes.len() {
            return Err(truncated());
        }
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A string's bytes, not copied.
    fn str_bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u64()?;
        self.take(len)
    }
    fn string(&mut self) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.str_bytes()?).into_owned())
    }
    /// A metadata key or a tensor name, of at most `max` bytes.
    fn name(&mut self, max: usize) -> Result<String, String> {
        let bytes = self.str_bytes()?;
        if bytes.len() > max {
            return Err(format!(
                "a name of {} bytes is longer than the {max} this reader accepts",
                bytes.len()
            ));
        }
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value_type(&mut self) -> Result<ValueType, String> {
        let id = self.u32()?;
        ValueType::from_id(id).ok_or_else(|| format!("unknown metadata type {id}"))
    }

    /// One value of type `kind`; an array is passed over, not decoded. `elements_left` is what
    /// remains of [`MAX_METADATA_ELEMENTS`].
    fn value(
        &mut self,
        kind: ValueType,
        depth: u32,
        elements_left: &mut u64,
    ) -> Result<Value, String> {
        Ok(match kind {
            ValueType::U8 => Value::Uint(u64::from(self.array::<1>()?[0])),
            ValueType::I8 => Value::Int(i64::from(self.array::<1>()?[0] as i8)),
            ValueType::U16 => Value::Uint(u64::from(u16::from_le_bytes(self.array()?))),
            ValueType::I16 => Value::Int(i64::from(i16::from_le_bytes(self.array()?))),
            ValueType::U32 => Value::Uint(u64::from(self.u32()?)),
            ValueType::I32 => Value::Int(i64::from(i32::from_le_bytes(self.array()?))),
            ValueType::F32 => Value::Float(f64::from(f32::from_le_bytes(self.array()?))),
            ValueType::Bool => Value::Bool(self.array::<1>()?[0] != 0),
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => Value::Array(self.pass_array(depth, elements_left)?),
            ValueType::U64 => Value::Uint(self.u64()?),
            ValueType::I64 => Value::Int(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::Float(f64::from_le_bytes(self.array()?)),
        })
    }

    /// A tensor's entry after its name: dimensions (innermost first), ggml type, offset.
    fn tensor_entry(&mut self) -> Result<(Vec<u64>, u32, u64), String> {
        let dims = self.u32()?;
        if dims == 0 || dims > 4 {
            return Err(format!("{dims} dimensions (GGUF has 1 to 4)"));
        }
        let shape = (0..dims)
            .map(|_| self.u64())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((shape, self.u32()?, self.u64()?))
    }

    /// Pass over an array, checking its elements' lengths without copying them.
    fn pass_array(&mut self, depth: u32, elements_left: &mut u64) -> Result<Array, String> {
        if depth > MAX_ARRAY_DEPTH {
            return Err("arrays nested too deeply".into());
        }
        let element = self.value_type()?;
        let count = self.u64()?;
        if count > *elements_left {
            return Err(format!(
                "an array of {count} elements is more than the {MAX_METADATA_ELEMENTS} array \
                 elements this reader accepts in all"
            ));
        }
        *elements_left -= count;
        let len = usize::try_from(count).map_err(|_| "array length overflows".to_owned())?;
        let start = self.pos;
        match element.fixed_size() {
            Some(size) => {
                let bytes = count
                    .checked_mul(size)
                    .ok_or_else(|| format!("an array of {count} elements overflows"))?;
                self.take(bytes)?;
            }
            None if element == ValueType::String => {
                for _ in 0..count {
                    self.str_bytes()?;
                }
            }
            None => {
                for _ in 0..count {
                    self.pass_array(depth + 1, elements_left)?;
                }
            }
        }
        Ok(Array {
            element,
            len,
            start,
            end: self.pos,
        })
    }
}

/// Parse the header of a GGUF file (version 2 or 3) whose whole contents are `bytes`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header, CheckpointError> {
    let mut c = Cursor::new(bytes);
    let at = |problem: String| bad(path, problem);
    if c.u32().map_err(at)? != MAGIC {
        return Err(bad(path, "not a GGUF file (bad magic)"));
    }
    let version = c.u32().map_err(at)?;
    if !(2..=3).contains(&version) {
        return Err(bad(
            path,
            format!("GGUF version {version} is not supported (2 or 3)"),
        ));
    }
    let tensor_count = c.u64().map_err(at)?;
    let kv_count = c.u64().map_err(at)?;
    for (count, max, what) in [
        (tensor_count, MAX_TENSORS, "tensors"),
        (kv_count, MAX_METADATA_KEYS, "metadata keys"),
    ] {
        if count > max {
            return Err(bad(
                path,
                format!("{count} {what} is more than the {max} this reader accepts"),
            ));
        }
    }
    c.metadata_end = c.pos.saturating_add(MAX_METADATA_BYTES as usize);
    let mut elements_left = MAX_METADATA_ELEMENTS;
    let mut metadata = BTreeMap::new();
    for index in 0..kv_count {
        let key = c
            .name(MAX_KEY_BYTES)
            .map_err(|p| bad(path, format!("metadata key {index}: {p}")))?;
        let value = c
            .value_type()
            .and_then(|kind| c.value(kind, 0, &mut elements_left))
            .map_err(|p| bad(path, format!("metadata `{key}`: {p}")))?;
        metadata.insert(key, value);
    }
    c.metadata_end = usize::MAX;
    let mut raw = Vec::new();
    for index in 0..tensor_count {
        let name = c
            .name(MAX_TENSOR_NAME_BYTES)
            .map_err(|p| bad(path, format!("tensor {index}: {p}")))?;
        let entry = c
            .tensor_entry()
            .map_err(|p| bad(path, format!("tensor `{name}`: {p}")))?;
        raw.push((name, entry));
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .filter(|a| a.is_power_of_two())
        .unwrap_or(DEFAULT_ALIGNMENT);
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    let mut tensors = BTreeMap::new();
    for (name, (dims, type_id, offset)) in raw {
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                bad(path, format!("tensor `{name}` has ggml type {type_id}, which Cresset cannot read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"))
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
        if tensors
            .insert(
                name.clone(),
                TensorInfo {
                    shape,
                    ggml_type,
                    offset: start,
                    size,
                },
            )
            .is_some()
        {
            return Err(bad(path, format!("tensor `{name}` appears twice")));
        }
    }
    Ok(Header { metadata, tensors })
}

/// Read and parse the header of the GGUF file at `path` (memory-mapped; only the header's pages
/// are read). The mapping is dropped: to decode a metadata array, map the file again.
pub fn read(path: &Path) -> Result<Header, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    // SAFETY: a read-only private mapping of a model file that nothing writes while it is read;
    // the parsed header owns its data.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(path, e))?;
    parse(path, &map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting_alloc::allocated_by;

    /// A GGUF file written field by field.
    struct Writer(Vec<u8>);

    impl Writer {
        fn new(tensors: u64, keys: u64) -> Self {
            let mut w = Self(Vec::new());
            w.u32(MAGIC).u32(3).u64(tensors).u64(keys);
            w
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend(s.as_bytes());
            self
        }
        /// A key and a string value.
        fn string_kv(&mut self, key: &str, value: &str) -> &mut Self {
            self.str(key).u32(8).str(value)
        }
        /// A key and an array of `count` u8 elements, all `fill`.
        fn u8_array_kv(&mut self, key: &str, count: u64, fill: u8) -> &mut Self {
            self.str(key).u32(9).u32(0).u64(count);
            self.0.resize(self.0.len() + count as usize, fill);
            self
        }
        /// A key and an array of strings.
        fn string_array_kv(&mut self, key: &str, items: &[&str]) -> &mut Self {
            self.str(key).u32(9).u32(8).u64(items.len() as u64);
            for item in items {
                self.str(item);
            }
            self
        }
        fn parse(&self) -> Result<Header, CheckpointError> {
            parse(Path::new("x.gguf"), &self.0)
        }
    }

    fn refusal(w: &Writer) -> String {
        w.parse().expect_err("refused").to_string()
    }

    fn assert_refused(w: &Writer, needle: &str) {
        let err = refusal(w);
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn huge_u8_arrays_parse_without_a_value_per_element() {
        // The attack's shape at a smaller scale: three arrays of 1 Mi u8 elements (3 MiB),
        // under the element cap. Holding a `Value` per element cost 40 bytes each (120 MiB).
        let mut w = Writer::new(0, 4);
        for key in ["a", "b", "c"] {
            w.u8_array_kv(key, 1 << 20, 7);
        }
        w.string_kv("general.name", "huge");
        let (header, allocated) = allocated_by(|| w.parse().expect("parses"));
        assert!(
            allocated < 16 << 10,
            "the parse allocated {allocated} bytes for a {} byte file",
            w.0.len()
        );
        let a = header.metadata["a"].as_array().expect("an array");
        assert_eq!((a.len(), a.element_type()), (1 << 20, ValueType::U8));
        // Decoded on demand, one element at a time, from the file's bytes.
        let mut values = a.values(&w.0);
        assert_eq!(
            values.next().expect("one").expect("decodes"),
            Value::Uint(7)
        );
        assert_eq!(values.count(), (1 << 20) - 1);
        assert_eq!(header.metadata["general.name"].as_str(), Some("huge"));
    }

    #[test]
    fn string_arrays_decode_on_demand_and_nested_arrays_too() {
        let mut w = Writer::new(0, 2);
        w.string_array_kv("tokenizer.ggml.tokens", &["a", "b c", ""]);
        // An array of two arrays of u32.
        w.str("nested").u32(9).u32(9).u64(2);
        w.u32(4).u64(2).u32(1).u32(2);
        w.u32(4).u64(1).u32(3);
        let header = w.parse().expect("parses");
        let tokens: Vec<Value> = header.metadata["tokenizer.ggml.tokens"]
            .as_array()
            .expect("array")
            .values(&w.0)
            .collect::<Result<_, _>>()
            .expect("decodes");
        assert_eq!(
            tokens,
            ["a", "b c", ""].map(|s| Value::String(s.into())).to_vec()
        );
        let inner: Vec<Vec<Value>> = header.metadata["nested"]
            .as_array()
            .expect("array")
            .values(&w.0)
            .map(|v| {
                let v = v.expect("decodes");
                let a = v.as_array().expect("inner array");
                a.values(&w.0).collect::<Result<_, _>>().expect("decodes")
            })
            .collect();
        assert_eq!(
            inner,
            vec![vec![Value::Uint(1), Value::Uint(2)], vec![Value::Uint(3)]]
        );
        // Bytes that are not the file's are an error, not a panic.
        let array = header.metadata["tokenizer.ggml.tokens"]
            .as_array()
            .expect("array");
        let err = array
            .values(&w.0[..30])
            .next()
            .expect("one")
            .expect_err("error");
        assert!(err.to_string().contains("not the file"), "{err}");
    }

    #[test]
    fn more_array_elements_than_the_cap_are_refused_before_they_are_read() {
        let half = MAX_METADATA_ELEMENTS / 2;
        let mut w = Writer::new(0, 2);
        w.u8_array_kv("a", half, 0).u8_array_kv("b", half + 1, 0);
        let err = refusal(&w);
        assert!(
            err.contains("x.gguf")
                && err.contains("metadata `b`")
                && err.contains(&MAX_METADATA_ELEMENTS.to_string()),
            "{err}"
        );
        // The count alone is enough: the elements need not be there.
        let mut w = Writer::new(0, 1);
        w.str("a").u32(9).u32(8).u64(u64::MAX);
        assert_refused(&w, "is more than the");
    }

    #[test]
    fn metadata_past_the_byte_cap_is_refused_before_it_is_copied() {
        // A string claiming more than the cap, in a small file.
        let mut w = Writer::new(0, 1);
        w.str("general.name").u32(8).u64(MAX_METADATA_BYTES + 1);
        let (result, allocated) = allocated_by(|| w.parse());
        let err = result.expect_err("refused").to_string();
        assert!(
            err.contains("metadata `general.name`") && err.contains("more than"),
            "{err}"
        );
        assert!(allocated < 4 << 10, "{allocated} bytes allocated");
        // One within the cap but past the end of the file is truncated.
        let mut w = Writer::new(0, 1);
        w.str("general.name").u32(8).u64(100);
        assert_refused(&w, "truncated");
    }

    #[test]
    fn implausible_counts_and_nesting_are_refused() {
        let w = Writer::new(MAX_TENSORS + 1, 0);
        assert_refused(&w, "tensors is more than");
        let w = Writer::new(0, MAX_METADATA_KEYS + 1);
        assert_refused(&w, "metadata keys");
        // Arrays of arrays of arrays of arrays.
        let mut w = Writer::new(0, 1);
        w.str("deep").u32(9);
        for _ in 0..MAX_ARRAY_DEPTH + 1 {
            w.u32(9).u64(1);
        }
        w.u32(0).u64(0);
        assert_refused(&w, "nested too deeply");
        let mut w = Writer::new(0, 1);
        w.str("odd").u32(13);
        assert_refused(&w, "unknown metadata type 13");
    }

    #[test]
    fn tensor_entries_are_checked() {
        // A long name.
        let mut w = Writer::new(1, 0);
        w.str(&"x".repeat(MAX_TENSOR_NAME_BYTES + 1));
        assert_refused(&w, "tensor 0: a name of 257 bytes");
        // Five dimensions.
        let mut w = Writer::new(1, 0);
        w.str("w").u32(5);
        assert_refused(&w, "tensor `w`: 5 dimensions");
        // Twice the same tensor, each 32 F32 elements at offset 0.
        let mut w = Writer::new(2, 0);
        for _ in 0..2 {
            w.str("w").u32(1).u64(32).u32(0).u64(0);
        }
        let start = w.0.len().div_ceil(32) * 32;
        w.0.resize(start + 128, 0);
        assert_refused(&w, "tensor `w` appears twice");
        // One whose bytes lie past the end.
        let mut w = Writer::new(1, 0);
        w.str("w").u32(1).u64(32).u32(0).u64(64);
        let start = w.0.len().div_ceil(32) * 32;
        w.0.resize(start + 128, 0);
        assert_refused(&w, "lies outside the file");
    }
}
