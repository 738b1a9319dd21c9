//! The linear layer every projection goes through: the decoders' attention, MLP and output
//! head, and the encoders' layers. Today a layer is dense (a weight in the model's dtype and an
//! optional bias); a new representation of the weight (weight-only int8 or int4) is a new case
//! of this type, handled in this file only: how it is applied ([`Linear::forward`]), sized,
//! moved, split for tensor parallelism and written to disk for offload.

use tch::{Device, Kind, Tensor};

use crate::weights::Weights;
use crate::ModelError;

/// A linear layer `x @ weight.T + bias`, with the weight `[out, in]` as nn.Linear stores it.
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    /// `[out]`, if any.
    bias: Option<Tensor>,
}

/// Bytes of a tensor's elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

impl Linear {
    /// A dense layer from its weight `[out, in]` and bias `[out]`.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Load `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]` (required).
    pub fn load(w: &mut Weights, prefix: &str, inp: i64, out: i64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.take(&format!("{prefix}.weight"), &[out, inp])?,
            bias: Some(w.take(&format!("{prefix}.bias"), &[out])?),
        })
    }

    /// Load GPT-2's Conv1D, which stores the weight as `[in, out]`; it is transposed once here.
    pub fn load_conv1d(
        w: &mut Weights,
        prefix: &str,
        inp: i64,
        out: i64,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w
                .take(&format!("{prefix}.weight"), &[inp, out])?
                .transpose(0, 1)
                .contiguous(),
            bias: Some(w.take(&format!("{prefix}.bias"), &[out])?),
        })
    }

    /// Stack layers that read the same input into one (outputs concatenated in order), so that
    /// one matmul replaces several.
    pub fn fuse(parts: &[Linear]) -> Self {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        Self {
            weight: Tensor::cat(&weights, 0),
            bias: biases.map(|b| Tensor::cat(&b, 0)),
        }
    }

    /// Apply to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> u64 {
        tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.weight.device()
    }

    /// The same layer on `device` (itself, shallowly, where it is there already).
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            weight: self.weight.to_device(device),
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
            weight: rows(&self.weight),
            bias: self.bias.as_ref().map(rows),
        }
    }

    /// Tensor parallelism: the input features `start..start + len`, on `device`. The parts'
    /// outputs are summed, so the bias goes with one of them only: this one if `with_bias`.
    pub fn select_inputs(&self, start: i64, len: i64, with_bias: bool, device: Device) -> Self {
        Self {
            weight: self.weight.narrow(1, start, len).to_device(device),
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
        let mut out = vec![("weight", &self.weight)];
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
        Ok(Self {
            weight: get("weight")?
                .ok_or_else(|| ModelError::Checkpoint("a linear layer has no `weight`".into()))?,
            bias: get("bias")?,
        })
    }

    /// Let the weights go from memory (disk offload wrote them elsewhere).
    pub fn release(&mut self) {
        self.weight = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        self.bias = None;
    }
}
