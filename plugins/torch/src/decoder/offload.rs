//! Disk offload: a layer's shards written to safetensors files in the offload folder and freed
//! from memory. Each forward pass reads an offloaded layer's files when it reaches the layer,
//! memory-mapped (the next layer's are mapped and faulted in on a helper thread, [`ReadAhead`],
//! while the current one computes), and drops the weights after use, so that at most two
//! offloaded layers are in memory at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};

use super::attention::Attention;
use super::block::Block;
use super::linear::Linear;
use super::mlp::Mlp;
use super::parallel::Shard;
use super::Decoder;
use crate::ModelError;

/// The file layer `layer`'s shard `part` is offloaded to.
pub(super) fn offload_path(folder: &Path, layer: usize, part: usize) -> PathBuf {
    folder.join(format!("layer-{layer}-part-{part}.safetensors"))
}

/// Create the offload folder.
pub(super) fn create_folder(folder: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(folder)
        .map_err(|e| ModelError::Checkpoint(format!("cannot create {}: {e}", folder.display())))
}

impl Shard {
    /// Write the weights to `path` (safetensors) and let them go from memory.
    pub fn offload(&mut self, path: &Path) -> Result<(), ModelError> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (name, linear) in self.linears() {
            for (what, tensor) in linear.tensors() {
                named.push((format!("{name}.{what}"), tensor));
            }
        }
        Tensor::write_safetensors(&named, path)?;
        for linear in self.linears_mut() {
            linear.release();
        }
        self.offloaded = Some(path.to_path_buf());
        Ok(())
    }

    /// This shard with its weights from `map` (its offload file, memory-mapped). CPU tensors
    /// of the model's dtype point into the mapping (no copy; the shard keeps it alive); others
    /// are copied and converted.
    fn with_weights(
        &self,
        path: &Path,
        map: &Arc<memmap2::Mmap>,
        kind: Kind,
    ) -> Result<Shard, ModelError> {
        let bytes: &[u8] = map;
        let header = crate::weights::parse_header(path, bytes, bytes.len() as u64)?;
        let tensor = |name: &str| -> Result<Option<Tensor>, ModelError> {
            let Some(info) = header.tensors.get(name) else {
                return Ok(None);
            };
            let start = (header.data_start + info.data_offsets[0]) as usize;
            let end = (header.data_start + info.data_offsets[1]) as usize;
            let src = crate::weights::kind_of_dtype(&info.dtype).ok_or_else(|| {
                ModelError::Checkpoint(format!("{}: dtype {}", path.display(), info.dtype))
            })?;
            let data = &bytes[start..end];
            let aligned = (data.as_ptr() as usize) % src.elt_size_in_bytes() == 0;
            if src == kind && self.device == Device::Cpu && aligned {
                let mut strides = vec![1i64; info.shape.len()];
                for i in (0..info.shape.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * info.shape[i + 1];
                }
                // SAFETY: `data` lies inside `map` (parse_header checked the offsets against
                // its length, and the size against the shape); the returned shard holds `map`
                // in `_backing`, dropped after its tensors. The mapping is read-only and the
                // weights are never written (forward passes only read them).
                let t = unsafe {
                    Tensor::f_from_blob(data.as_ptr(), &info.shape, &strides, src, Device::Cpu)?
                };
                return Ok(Some(t));
            }
            let t = Tensor::f_from_data_size(data, &info.shape, src)?;
            Ok(Some(t.to_kind(kind).to_device(self.device)))
        };
        let linear = |name: &str| {
            Linear::from_tensors(|what| tensor(&format!("{name}.{what}")))
                .map_err(|e| ModelError::Checkpoint(format!("{}: {name}: {e}", path.display())))
        };
        let (attention, mlp) = (&self.attention, &self.mlp);
        Ok(Shard {
            attention: Attention {
                qkv: linear("qkv")?,
                o_proj: linear("o_proj")?,
                alibi: attention.alibi.as_ref().map(Tensor::shallow_clone),
                ..*attention
            },
            mlp: Mlp {
                gate_up: linear("gate_up")?,
                down: linear("down")?,
                ..*mlp
            },
            device: self.device,
            offloaded: None,
            _backing: Some(Arc::clone(map)),
        })
    }
}

/// Map an offload file and fault its pages in (on the read-ahead thread, so that the forward
/// pass finds them resident).
fn map_offload(path: &Path) -> std::io::Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path)?;
    // SAFETY: offload files are written by this process when the model loads and never
    // modified while it lives; the mapping is read-only.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let _ = map.advise(memmap2::Advice::WillNeed);
    let mut touched = 0u8;
    for i in (0..map.len()).step_by(4096) {
        touched ^= map[i];
    }
    std::hint::black_box(touched);
    Ok(Arc::new(map))
}

type Mapping = JoinHandle<std::io::Result<Arc<memmap2::Mmap>>>;

/// The offloaded shards of a forward pass, read one layer ahead on helper threads.
pub(super) struct ReadAhead<'a> {
    blocks: &'a [Block],
    /// The mappings under way for the next layer, one per shard (`None` for resident ones).
    pending: Vec<Option<Mapping>>,
    kind: Kind,
}

impl<'a> ReadAhead<'a> {
    /// Start reading the first layer's offloaded shards.
    pub fn start(blocks: &'a [Block], kind: Kind) -> Self {
        Self {
            blocks,
            pending: Self::read(blocks, 0),
            kind,
        }
    }

    fn read(blocks: &[Block], l: usize) -> Vec<Option<Mapping>> {
        blocks.get(l).map_or_else(Vec::new, |block| {
            block
                .shards
                .iter()
                .map(|shard| {
                    shard
                        .offloaded
                        .clone()
                        .map(|path| std::thread::spawn(move || map_offload(&path)))
                })
                .collect()
        })
    }

    /// Layer `l`'s offloaded shards with their weights, one entry per shard (`None` for those
    /// in memory), and start reading layer `l + 1`'s. Layers are taken in order.
    pub fn take(&mut self, l: usize) -> Result<Vec<Option<Shard>>, ModelError> {
        let reads = std::mem::replace(&mut self.pending, Self::read(self.blocks, l + 1));
        let shards = &self.blocks[l].shards;
        let mut loaded = Vec::with_capacity(shards.len());
        for (shard, read) in shards
            .iter()
            .zip(reads.into_iter().chain(std::iter::repeat_with(|| None)))
        {
            loaded.push(match (read, &shard.offloaded) {
                (Some(handle), Some(path)) => {
                    let map = handle
                        .join()
                        .map_err(|_| {
                            ModelError::Checkpoint(format!("mapping {} failed", path.display()))
                        })?
                        .map_err(|e| {
                            ModelError::Checkpoint(format!("cannot map {}: {e}", path.display()))
                        })?;
                    Some(shard.with_weights(path, &map, self.kind)?)
                }
                _ => None,
            });
        }
        Ok(loaded)
    }
}

impl Decoder {
    /// Disk offload: write the weights of `layers` to safetensors files in `folder` and free
    /// them from memory. Each forward pass reads an offloaded layer's file when it reaches the
    /// layer (the next one is read ahead on another thread while the current one computes) and
    /// drops the weights after use, so at most two offloaded layers are in memory at a time.
    pub fn offload_layers(mut self, layers: &[usize], folder: &Path) -> Result<Self, ModelError> {
        self.refuse_if_quantized("disk offload")?;
        create_folder(folder)?;
        for &l in layers {
            let block = self
                .blocks
                .get_mut(l)
                .ok_or_else(|| ModelError::Config(format!("there is no layer {l} to offload")))?;
            for (p, shard) in block.shards.iter_mut().enumerate() {
                shard.offload(&offload_path(folder, l, p))?;
            }
        }
        Ok(self)
    }

    /// Layers whose weights are offloaded to disk.
    pub fn offloaded_layers(&self) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&l| self.blocks[l].shards.iter().any(|s| s.offloaded.is_some()))
            .collect()
    }
}
