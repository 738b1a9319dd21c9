//! The linear layer every projection goes through: the decoders' attention, MLP and output
//! head, and the encoders' layers. A layer's weight is dense (in the model's dtype) or
//! weight-only quantized (int8 per channel or int4 in groups, on libtorch's CPU kernels:
//! [`crate::quant`]); either way [`Linear::forward`] is the same call. Quantized weights live on
//! the CPU in a packed layout made at load: they are not moved to other devices, split for
//! tensor parallelism or written to disk for offload (loading refuses those combinations
//! before any weight is read).

use tch::{Device, Kind, Tensor};

use crate::quant::QuantizedWeight;
use crate::weights::Weights;
use crate::ModelError;

/// How a layer's weight is held.
enum Weight {
    /// `[out, in]` in the model's dtype.
    Dense(Tensor),
    /// Weight-only int8 or int4.
    Quantized(QuantizedWeight),
}

/// How to quantize dense weights at load (gpt-fast's recipes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// int8, one scale per output channel.
    Int8,
    /// int4 in groups of `group` inputs (32, 64, 128 or 256).
    Int4 {
        /// Inputs per group.
        group: i64,
    },
}

/// A linear layer `x @ weight.T + bias`, with the weight `[out, in]` as nn.Linear stores it.
pub struct Linear {
    weight: Weight,
    /// `[out]`, if any.
    bias: Option<Tensor>,
}

impl Weight {
    fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Quantized(_) => None,
        }
    }
}

/// Panic text for an operation that loading must have refused on a quantized layer.
const REFUSED_AT_LOAD: &str =
    "a quantized layer cannot be moved, split or offloaded (loading refuses it): this is a bug";

/// Bytes of a tensor's elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

impl Linear {
    /// A dense layer from its weight `[out, in]` and bias `[out]`.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// A quantized layer (its bias, if any, stays in the model's dtype).
    pub fn quantized(weight: QuantizedWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Quantized(weight),
            bias,
        }
    }

    /// This layer with its dense weight quantized as `how` says (a quantized one is kept).
    pub fn quantize(self, how: Quantize) -> Result<Self, ModelError> {
        let Weight::Dense(dense) = &self.weight else {
            return Ok(self);
        };
        let weight = match how {
            Quantize::Int8 => QuantizedWeight::int8_from_dense(dense),
            Quantize::Int4 { group } => QuantizedWeight::int4_from_dense(dense, group)?,
        };
        Ok(Self::quantized(weight, self.bias))
    }

    /// The weight, if it is held in GGUF blocks of 32 ([`crate::quant::blocks`]).
    pub fn block_weight(&self) -> Option<&crate::quant::BlockWeight> {
        match &self.weight {
            Weight::Quantized(QuantizedWeight::Blocks(b)) => Some(b),
            _ => None,
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quantized(_))
    }

    /// Load `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]` (required).
    pub fn load(w: &mut Weights, prefix: &str, inp: i64, out: i64) -> Result<Self, ModelError> {
        Ok(Self::from_parts(
            w.take(&format!("{prefix}.weight"), &[out, inp])?,
            Some(w.take(&format!("{prefix}.bias"), &[out])?),
        ))
    }

    /// Load GPT-2's Conv1D, which stores the weight as `[in, out]`; it is transposed once here.
    pub fn load_conv1d(
        w: &mut Weights,
        prefix: &str,
        inp: i64,
        out: i64,
    ) -> Result<Self, ModelError> {
        Ok(Self::from_parts(
            w.take(&format!("{prefix}.weight"), &[inp, out])?
                .transpose(0, 1)
                .contiguous(),
            Some(w.take(&format!("{prefix}.bias"), &[out])?),
        ))
    }

    /// Stack dense layers that read the same input into one (outputs concatenated in order),
    /// so that one matmul replaces several.
    pub fn fuse(parts: &[Linear]) -> Self {
        let weights: Vec<&Tensor> = parts
            .iter()
            .map(|l| l.weight.dense().expect(REFUSED_AT_LOAD))
            .collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        Self::from_parts(Tensor::cat(&weights, 0), biases.map(|b| Tensor::cat(&b, 0)))
    }

    /// Apply to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => x.linear(w, self.bias.as_ref()),
            Weight::Quantized(q) => {
                let y = q.forward(x);
                match &self.bias {
                    Some(b) => y + b,
                    None => y,
                }
            }
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> u64 {
        let weight = match &self.weight {
            Weight::Dense(w) => tensor_bytes(w),
            Weight::Quantized(q) => q.bytes(),
        };
        weight + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        match &self.weight {
            Weight::Dense(w) => w.device(),
            Weight::Quantized(_) => Device::Cpu,
        }
    }

    /// The same layer on `device` (itself, shallowly, where it is there already). A quantized
    /// layer is on the CPU only.
    pub fn to_device(&self, device: Device) -> Self {
        let weight = match &self.weight {
            Weight::Dense(w) => Weight::Dense(w.to_device(device)),
            Weight::Quantized(q) => {
                assert_eq!(device, Device::Cpu, "{REFUSED_AT_LOAD}");
                Weight::Quantized(q.shallow_clone())
            }
        };
        Self {
            weight,
            bias: self.bias.as_ref().map(|b| b.to_device(device)),
        }
    }

    /// Tensor parallelism: the output features in `ranges` (`(start, len)` each, concatenated
    /// in order), with their biases, on `device`.
    pub fn select_outputs(&self, ranges: &[(i64, i64)], device: Device) -> Self {
        let rows = |t: &Tensor| {
            let pieces: Vec<Tensor> = ranges.iter().map(|&(a, len)| t.narrow(0, a, len)).collect();
            Tensor::cat(&pieces, 0).to_device(device)
        };
        Self {
            weight: Weight::Dense(rows(self.weight.dense().expect(REFUSED_AT_LOAD))),
            bias: self.bias.as_ref().map(rows),
        }
    }

    /// Tensor parallelism: the input features `start..start + len`, on `device`. The parts'
    /// outputs are summed, so the bias goes with one of them only: this one if `with_bias`.
    pub fn select_inputs(&self, start: i64, len: i64, with_bias: bool, device: Device) -> Self {
        let weight = self.weight.dense().expect(REFUSED_AT_LOAD);
        Self {
            weight: Weight::Dense(weight.narrow(1, start, len).to_device(device)),
            bias: self
                .bias
                .as_ref()
                .filter(|_| with_bias)
                .map(|b| b.copy().to_device(device)),
        }
    }

    /// The tensors that hold the layer, by name: what disk offload writes, and
    /// [`Linear::from_tensors`] reads back.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("weight", self.weight.dense().expect(REFUSED_AT_LOAD))];
        if let Some(b) = &self.bias {
            out.push(("bias", b));
        }
        out
    }

    /// The layer from the tensors [`Linear::tensors`] named, each read by `get` (`None` where
    /// absent).
    pub fn from_tensors(
        mut get: impl FnMut(&str) -> Result<Option<Tensor>, ModelError>,
    ) -> Result<Self, ModelError> {
        Ok(Self::from_parts(
            get("weight")?
                .ok_or_else(|| ModelError::Checkpoint("a linear layer has no `weight`".into()))?,
            get("bias")?,
        ))
    }

    /// Let the weights go from memory (disk offload wrote them elsewhere).
    pub fn release(&mut self) {
        self.weight = Weight::Dense(Tensor::zeros([0], (Kind::Float, Device::Cpu)));
        self.bias = None;
    }
}
