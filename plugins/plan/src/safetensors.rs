//! safetensors checkpoints as the planner sees them: headers only (names, dtypes, shapes,
//! byte ranges), parsed and validated as hostile input, and the files of a checkpoint folder
//! (one file, or shards listed by `model.safetensors.index.json`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A checkpoint that cannot be read; the message names the file and the problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CheckpointError(pub String);

fn invalid(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError(format!("{}: {message}", path.display()))
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorInfo {
    /// `F32`, `F16`, `BF16`, `I64`, …
    pub dtype: String,
    /// The shape.
    pub shape: Vec<i64>,
    /// Start and end of the bytes, relative to the end of the header.
    pub data_offsets: [u64; 2],
}

/// A parsed safetensors header: tensor name → entry, plus where the data begins.
#[derive(Debug, Clone)]
pub struct Header {
    /// Entries by tensor name (`__metadata__` excluded).
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_start: u64,
}

/// The size in bytes of one element of a safetensors dtype.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// The largest header accepted (real ones are a few hundred KiB).
const MAX_HEADER: u64 = 100 << 20;

/// Parse and validate the header of a safetensors file of `file_len` bytes from its first
/// bytes (`bytes` may be the whole mapping).
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header, CheckpointError> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| invalid(path, "too short to be a safetensors file"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(invalid(
            path,
            format!("header length {header_len} is larger than the file"),
        ));
    }
    let json = bytes
        .get(8..8 + header_len as usize)
        .ok_or_else(|| invalid(path, "truncated header"))?;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| invalid(path, format!("header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value)
            .map_err(|e| invalid(path, format!("tensor `{name}`: {e}")))?;
        let [start, end] = info.data_offsets;
        if start > end || end > data_len {
            return Err(invalid(
                path,
                format!(
                    "tensor `{name}`: bytes {start}..{end} lie outside the data ({data_len} bytes)"
                ),
            ));
        }
        if let Some(size) = dtype_size(&info.dtype) {
            let numel = info.shape.iter().try_fold(1u64, |acc, &d| {
                u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            });
            if numel.and_then(|n| n.checked_mul(size as u64)) != Some(end - start) {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{name}`: shape {:?} of {} does not match its {} bytes",
                        info.shape,
                        info.dtype,
                        end - start
                    ),
                ));
            }
        }
        tensors.insert(name, info);
    }
    Ok(Header {
        tensors,
        data_start,
    })
}

/// Read only the header of a safetensors file (the planner's view: sizes without weights).
pub fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| invalid(path, e))?;
    let file_len = file.metadata().map_err(|e| invalid(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| invalid(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(invalid(
            path,
            format!(
                "header length {header_len} is larger than the file or than {MAX_HEADER} bytes"
            ),
        ));
    }
    let mut bytes = len.to_vec();
    bytes.resize(8 + header_len as usize, 0);
    file.read_exact(&mut bytes[8..])
        .map_err(|e| invalid(path, e))?;
    parse_header(path, &bytes, file_len)
}

/// The safetensors files of a checkpoint directory: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(|e| invalid(&index, e))?;
        let parsed: Index = serde_json::from_str(&text)
            .map_err(|e| invalid(&index, format!("not a safetensors index: {e}")))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in parsed.weight_map.values() {
            let name = Path::new(shard);
            if name.components().count() != 1 || name.is_absolute() {
                return Err(invalid(
                    &index,
                    format!("shard name {shard:?} is not a file name"),
                ));
            }
            let path = dir.join(name);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(CheckpointError(format!(
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}
