//! HuggingFace-layout checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; or, for older checkpoints, `pytorch_model.bin` (or its
//! shards), a `torch.save` zip whose pickle is read by a reader that runs no pickle code
//! ([`cresset_plan::pickle`]) and whose tensors are then read like safetensors' by byte range.
//!
//! [`Weights::load`] memory-maps the files. A tensor that needs no conversion, from a file
//! without write permission bits (the archive cache makes its files so), is used in place: a
//! CPU tensor over the mapping (private, so a write would touch a copy of the page, never the
//! file), which keeps the mapping alive while any such tensor lives. Every other tensor is
//! copied out of the mapping: a file that may be written could be truncated under a mapping,
//! and a truncated mapping faults when read. (Its owner, or root, can still make a read-only
//! file writable and truncate it: read-only model files must be left alone while served.) [`Weights::open`] reads each tensor when it is
//! taken. Tensors are then
//! converted to the target dtype and moved to the device when those differ. The header is validated as hostile input: offsets must lie inside
//! the file and agree with the shape.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cresset_plan::safetensors::{
    checkpoint_files, parse_header, read_any_header, read_header, Header, TensorInfo,
};
use tch::{Device, Kind, Tensor};

use crate::ModelError;

extern "C" {
    fn cresset_tensor_over(
        data: *mut c_void,
        sizes: *const i64,
        ndim: i64,
        scalar_type: i32,
        owner: *mut c_void,
        release: extern "C" fn(*mut c_void),
    ) -> *mut torch_sys::C_tensor;
}

/// A checkpoint file mapped privately, shared by the tensors over it.
struct Mapping {
    map: memmap2::MmapMut,
}

// SAFETY: the mapping is only read through tensors after it is made (a write lands in a
// private copy of a page); it is freed once, when the last owner goes.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

extern "C" fn release_mapping(owner: *mut c_void) {
    // SAFETY: `owner` came from `Arc::into_raw` in `tensor_over`, once per tensor storage.
    unsafe { drop(Arc::from_raw(owner as *const Mapping)) }
}

/// libtorch's number for the floating kinds used in place.
fn scalar_type(kind: Kind) -> Option<i32> {
    Some(match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        _ => return None,
    })
}

/// A CPU tensor of `shape` and `kind` over `mapping`'s bytes `start..end` (checked by the
/// caller against the file), or `None` where it cannot be one (a kind not used in place, a
/// misaligned offset).
fn tensor_over(
    mapping: &Arc<Mapping>,
    start: usize,
    end: usize,
    shape: &[i64],
    kind: Kind,
) -> Option<Tensor> {
    let code = scalar_type(kind)?;
    let elt = kind.elt_size_in_bytes();
    let numel: i64 = shape.iter().product();
    let base = mapping.map.as_ptr();
    // SAFETY: `start..end` lies inside the mapping (checked by the caller).
    let data = unsafe { base.add(start) };
    if data as usize % elt != 0 || (end - start) as i64 != numel * elt as i64 {
        return None;
    }
    let owner = Arc::into_raw(mapping.clone()) as *mut c_void;
    // SAFETY: `data` points at `numel` elements of `kind` inside a private mapping that
    // `owner` keeps alive until the storage releases it.
    let ptr = unsafe {
        cresset_tensor_over(
            data as *mut c_void,
            shape.as_ptr(),
            shape.len() as i64,
            code,
            owner,
            release_mapping,
        )
    };
    if ptr.is_null() {
        // The storage was never made: the reference is still ours.
        release_mapping(owner);
        return None;
    }
    // SAFETY: a new at::Tensor the shim allocated for us.
    Some(unsafe { Tensor::from_ptr(ptr) })
}

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
            let read_only = file
                .metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o222 == 0);
            // SAFETY: for a file without write permission, a private writable mapping that
            // tensors are made over (a write through one lands in a copy of the page, never
            // the file); for any other file a read-only mapping that everything is copied out
            // of while this iteration holds it (so only the in-place case is charged as
            // private memory).
            let (mapping, shared) = if read_only {
                let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
                    .map_err(|e| invalid(&path, e))?;
                (Some(Arc::new(Mapping { map })), None)
            } else {
                let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| invalid(&path, e))?;
                (None, Some(map))
            };
            for (name, info) in &header.tensors {
                let src = src_kind(&path, name, info)?;
                let start = (header.data_start + info.data_offsets[0]) as usize;
                let end = (header.data_start + info.data_offsets[1]) as usize;
                let whole: &[u8] = match (&mapping, &shared) {
                    (Some(m), _) => &m.map[..],
                    (None, Some(m)) => &m[..],
                    (None, None) => &[],
                };
                let bytes = whole.get(start..end).ok_or_else(|| {
                    invalid(&path, format!("tensor `{name}` lies outside the file"))
                })?;
                let in_place = mapping
                    .as_ref()
                    .filter(|_| src == kind && device == Device::Cpu)
                    .and_then(|m| tensor_over(m, start, end, &info.shape, src));
                let tensor = match in_place {
                    Some(t) => t,
                    None => convert(
                        Tensor::f_from_data_size(bytes, &info.shape, src)?,
                        src,
                        kind,
                        device,
                    ),
                };
                tensors.insert(name.clone(), tensor);
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

    /// Whether `ptr` lies in a mapping of the file at `path` (from `/proc/self/maps`).
    fn in_mapping_of(ptr: usize, path: &Path) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let path = std::fs::canonicalize(path).expect("path");
        let path = path.to_string_lossy();
        maps.lines()
            .filter(|l| l.ends_with(path.as_ref()))
            .any(|l| {
                let range = l.split_whitespace().next().unwrap_or("");
                let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
                let (a, b) = (
                    usize::from_str_radix(a, 16).unwrap_or(0),
                    usize::from_str_radix(b, 16).unwrap_or(0),
                );
                (a..b).contains(&ptr)
            })
    }

    #[test]
    fn read_only_checkpoints_are_used_in_place_and_writable_ones_copied() {
        let values: Vec<f32> = (0..4096).map(|i| i as f32).collect();
        let data: Vec<u8> = values.iter().flat_map(|f| f.to_le_bytes()).collect();
        // The header is padded so that the data starts 8-byte aligned, as safetensors writes.
        let header = r#"{"w":{"dtype":"F32","shape":[64,64],"data_offsets":[0,16384]}}"#;
        let header = format!("{header:<64}");
        for read_only in [true, false] {
            let (dir, path) = file_with(&header, &data);
            if read_only {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
                    .expect("chmod");
            }
            let mut weights = Weights::load(dir.path(), Kind::Float, Device::Cpu).expect("load");
            let w = weights.take("w", &[64, 64]).expect("w");
            drop(weights);
            // The tensor outlives the Weights that mapped the file.
            assert_eq!(Vec::<f32>::try_from(w.flatten(0, -1)).expect("vec"), values);
            assert_eq!(in_mapping_of(w.data_ptr() as usize, &path), read_only);
            if read_only {
                // A write lands in a private copy of the page, never in the file.
                let mut view = w.shallow_clone();
                let _ = view.fill_(7.0);
                assert_eq!(w.double_value(&[0, 0]), 7.0);
                let on_disk = std::fs::read(&path).expect("read");
                assert_eq!(&on_disk[on_disk.len() - data.len()..], data.as_slice());
            }
            // A conversion copies, whatever the file.
            let mut weights = Weights::load(dir.path(), Kind::Half, Device::Cpu).expect("load");
            let h = weights.take("w", &[64, 64]).expect("w");
            assert!(!in_mapping_of(h.data_ptr() as usize, &path));
        }
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
