//! HuggingFace-layout checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; or, for older checkpoints, `pytorch_model.bin` (or its
//! shards), a `torch.save` zip whose pickle is read by a reader that runs no pickle code
//! ([`cresset_plan::pickle`]) and whose tensors are then read like safetensors' by byte range.
//!
//! [`Weights::load`] memory-maps the files and copies every tensor from the mapping into a
//! libtorch tensor; [`Weights::open`] reads each tensor when it is taken. Tensors are then
//! converted to the target dtype and moved to the device when those differ. The header is validated as hostile input: offsets must lie inside
//! the file and agree with the shape.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use cresset_plan::safetensors::{
    checkpoint_files, parse_header, read_any_header, read_header, Header, TensorInfo,
};
use tch::{Device, Kind, Tensor};

use crate::ModelError;

impl From<cresset_plan::safetensors::CheckpointError> for ModelError {
    fn from(e: cresset_plan::safetensors::CheckpointError) -> Self {
        ModelError::Checkpoint(e.0)
    }
}

/// The libtorch kind of a safetensors dtype.
pub fn kind_of_dtype(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("{}: {message}", path.display()))
}

/// The weights of a checkpoint, converted to one floating dtype on one device. Models take
/// their tensors out by name; a missing name is an error that names it.
///
/// [`Weights::load`] reads every tensor up front (the whole state dict in memory);
/// [`Weights::open`] reads only the headers and reads each tensor from its file when it is
/// taken, so a model built part by part never holds more than the part being built.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Tensors not read yet: file index and header entry.
    lazy: HashMap<String, (usize, TensorInfo)>,
    /// Open files of a lazy checkpoint, with where their data starts.
    files: Vec<(File, PathBuf, u64)>,
    kind: Kind,
    device: Device,
    source: PathBuf,
}

/// Convert a tensor read as `src_kind`: floating tensors become `kind`, others keep theirs.
fn convert(tensor: Tensor, src_kind: Kind, kind: Kind, device: Device) -> Tensor {
    let floating = matches!(
        src_kind,
        Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16
    );
    let tensor = if floating && src_kind != kind {
        tensor.to_kind(kind)
    } else {
        tensor
    };
    tensor.to_device(device)
}

fn src_kind(path: &Path, name: &str, info: &TensorInfo) -> Result<Kind, ModelError> {
    kind_of_dtype(&info.dtype).ok_or_else(|| {
        invalid(
            path,
            format!("tensor `{name}` has unsupported dtype {}", info.dtype),
        )
    })
}

impl Weights {
    /// Load every tensor of the checkpoint in `dir`. Floating tensors become `kind` on `device`;
    /// integer tensors (such as BERT's `position_ids` buffer) keep their kind.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        for path in checkpoint_files(dir)? {
            let header = read_any_header(&path)?;
            let file = File::open(&path).map_err(|e| invalid(&path, e))?;
            // SAFETY: the mapping is read-only and private; the checkpoint files belong to the
            // model's staged copy, which nothing writes while it is loaded. Every byte is copied
            // out before the mapping is dropped at the end of this iteration.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| invalid(&path, e))?;
            for (name, info) in &header.tensors {
                let src = src_kind(&path, name, info)?;
                let start = (header.data_start + info.data_offsets[0]) as usize;
                let end = (header.data_start + info.data_offsets[1]) as usize;
                let bytes = map.get(start..end).ok_or_else(|| {
                    invalid(&path, format!("tensor `{name}` lies outside the file"))
                })?;
                let tensor = Tensor::f_from_data_size(bytes, &info.shape, src)?;
                tensors.insert(name.clone(), convert(tensor, src, kind, device));
            }
        }
        Ok(Self {
            tensors,
            lazy: HashMap::new(),
            files: Vec::new(),
            kind,
            device,
            source: dir.to_path_buf(),
        })
    }

    /// Open the checkpoint in `dir` without reading tensors: headers are read and validated
    /// now, each tensor's bytes when it is taken (one positioned read; nothing stays mapped).
    pub fn open(dir: &Path, kind: Kind, device: Device) -> Result<Self, ModelError> {
        let mut lazy = HashMap::new();
        let mut files = Vec::new();
        for path in checkpoint_files(dir)? {
            let header = read_any_header(&path)?;
            let file = File::open(&path).map_err(|e| invalid(&path, e))?;
            for (name, info) in header.tensors {
                src_kind(&path, &name, &info)?;
                lazy.insert(name, (files.len(), info));
            }
            files.push((file, path, header.data_start));
        }
        Ok(Self {
            tensors: HashMap::new(),
            lazy,
            files,
            kind,
            device,
            source: dir.to_path_buf(),
        })
    }

    fn read_lazy(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        use std::os::unix::fs::FileExt;
        let Some((index, info)) = self.lazy.remove(name) else {
            return Ok(None);
        };
        let (file, path, data_start) = &self.files[index];
        let src = src_kind(path, name, &info)?;
        let len = (info.data_offsets[1] - info.data_offsets[0]) as usize;
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, data_start + info.data_offsets[0])
            .map_err(|e| invalid(path, format!("reading `{name}`: {e}")))?;
        let tensor = Tensor::f_from_data_size(&bytes, &info.shape, src)?;
        drop(bytes);
        Ok(Some(convert(tensor, src, self.kind, self.device)))
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.lazy.contains_key(name)
    }

    /// Take a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        let tensor = match self.tensors.remove(name) {
            Some(t) => Some(t),
            None => self.read_lazy(name)?,
        };
        let tensor = tensor.ok_or_else(|| {
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
