//! HuggingFace-layout checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Files are memory-mapped and each tensor is copied from the mapping into a libtorch tensor
//! (never read into a buffer first), then converted to the target dtype and moved to the
//! device when those differ. The header is validated as hostile input: offsets must lie inside
//! the file and agree with the shape.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::ModelError;

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

/// The libtorch kind of a safetensors dtype, with its size in bytes.
pub fn kind_of_dtype(dtype: &str) -> Option<(Kind, usize)> {
    Some(match dtype {
        "F64" => (Kind::Double, 8),
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I16" => (Kind::Int16, 2),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

/// The largest header accepted (real ones are a few hundred KiB).
const MAX_HEADER: u64 = 100 << 20;

fn invalid(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("{}: {message}", path.display()))
}

/// Parse and validate the header of a safetensors file of `file_len` bytes from its first
/// bytes (`bytes` may be the whole mapping).
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header, ModelError> {
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
        if let Some((_, size)) = kind_of_dtype(&info.dtype) {
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
pub fn read_header(path: &Path) -> Result<Header, ModelError> {
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
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
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
    Err(ModelError::Checkpoint(format!(
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// The weights of a checkpoint, converted to one floating dtype on one device. Models take
/// their tensors out by name; a missing name is an error that names it.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
}

impl Weights {
    /// Load every tensor of the checkpoint in `dir`. Floating tensors become `kind` on `device`;
    /// integer tensors (such as BERT's `position_ids` buffer) keep their kind.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        for path in checkpoint_files(dir)? {
            let file = File::open(&path).map_err(|e| invalid(&path, e))?;
            // SAFETY: the mapping is read-only and private; the checkpoint files belong to the
            // model's staged copy, which nothing writes while it is loaded. Every byte is copied
            // out before the mapping is dropped at the end of this iteration.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| invalid(&path, e))?;
            let header = parse_header(&path, &map, map.len() as u64)?;
            for (name, info) in &header.tensors {
                let Some((src_kind, _)) = kind_of_dtype(&info.dtype) else {
                    return Err(invalid(
                        &path,
                        format!("tensor `{name}` has unsupported dtype {}", info.dtype),
                    ));
                };
                let start = (header.data_start + info.data_offsets[0]) as usize;
                let end = (header.data_start + info.data_offsets[1]) as usize;
                let bytes = &map[start..end];
                let tensor = Tensor::f_from_data_size(bytes, &info.shape, src_kind)?;
                let tensor = if matches!(
                    src_kind,
                    Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16
                ) && src_kind != kind
                {
                    tensor.to_kind(kind)
                } else {
                    tensor
                };
                tensors.insert(name.clone(), tensor.to_device(device));
            }
        }
        Ok(Self {
            tensors,
            source: dir.to_path_buf(),
        })
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Take a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let tensor = self.tensors.remove(name).ok_or_else(|| {
            ModelError::Checkpoint(format!(
                "{}: the checkpoint has no tensor `{name}`",
                self.source.display()
            ))
        })?;
        if tensor.size() != shape {
            return Err(ModelError::Checkpoint(format!(
                "{}: tensor `{name}` has shape {:?}, the config implies {shape:?}",
                self.source.display(),
                tensor.size()
            )));
        }
        Ok(tensor)
    }

    /// Take a tensor if present.
    pub fn take_optional(
        &mut self,
        name: &str,
        shape: &[i64],
    ) -> Result<Option<Tensor>, ModelError> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).expect("write");
        (dir, path)
    }

    #[test]
    fn loads_and_converts_tensors() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let (dir, _) = file_with(
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}"#,
            &data,
        );
        let mut weights = Weights::load(dir.path(), Kind::Half, Device::Cpu).expect("load");
        let w = weights.take("w", &[2, 2]).expect("w");
        assert_eq!(w.kind(), Kind::Half);
        assert_eq!(
            Vec::<f32>::try_from(w.to_kind(Kind::Float).flatten(0, -1)).expect("vec"),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let missing = weights.take("w", &[2, 2]).err().expect("taken once");
        assert!(missing.to_string().contains("no tensor `w`"), "{missing}");
    }

    #[test]
    fn hostile_headers_are_refused() {
        for (header, data, needle) in [
            (
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,64]}}"#,
                vec![0u8; 8],
                "outside",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                vec![0u8; 8],
                "does not match",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                vec![0u8; 8],
                "does not match",
            ),
            ("not json", vec![], "not valid JSON"),
        ] {
            let (dir, _) = file_with(header, &data);
            let err = Weights::load(dir.path(), Kind::Float, Device::Cpu)
                .err()
                .expect("refused");
            assert!(err.to_string().contains(needle), "{header}: {err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("model.safetensors"), u64::MAX.to_le_bytes()).expect("w");
        let err = Weights::load(dir.path(), Kind::Float, Device::Cpu)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("larger than the file"), "{err}");
    }
}
