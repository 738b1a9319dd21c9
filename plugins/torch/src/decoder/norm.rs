//! The one normalisation layer of the crate: RMSNorm (Llama) or LayerNorm, with or without a
//! bias (GPT-2, BLOOM and the encoders), over the last dimension.

use tch::{Device, Kind, Tensor};

use super::linear::tensor_bytes;
use crate::weights::Weights;
use crate::ModelError;

/// Which normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NormKind {
    /// `x / rms(x) · weight`.
    Rms,
    /// `(x − mean) / std · weight + bias`.
    Layer,
}

/// A norm over the last dimension, with its weight (and bias, for a LayerNorm that has one).
pub struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    size: i64,
}

impl Norm {
    /// RMSNorm with `weight`.
    pub fn rms(weight: Tensor, eps: f64) -> Self {
        Self::new(NormKind::Rms, weight, None, eps)
    }

    /// LayerNorm with `weight` and, if any, `bias`.
    pub fn layer(weight: Tensor, bias: Option<Tensor>, eps: f64) -> Self {
        Self::new(NormKind::Layer, weight, bias, eps)
    }

    /// A LayerNorm from `{prefix}.weight` and `{prefix}.bias` (both required).
    pub fn load_layer_norm(
        w: &mut Weights,
        prefix: &str,
        size: i64,
        eps: f64,
    ) -> Result<Self, ModelError> {
        let weight = w.take(&format!("{prefix}.weight"), &[size])?;
        let bias = w.take(&format!("{prefix}.bias"), &[size])?;
        Ok(Self::layer(weight, Some(bias), eps))
    }

    fn new(kind: NormKind, weight: Tensor, bias: Option<Tensor>, eps: f64) -> Self {
        let size = weight.size().last().copied().unwrap_or(0);
        Self {
            kind,
            weight,
            bias,
            eps,
            size,
        }
    }

    /// Apply over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self.kind {
            NormKind::Layer => x.layer_norm(
                [self.size],
                Some(&self.weight),
                self.bias.as_ref(),
                self.eps,
                true,
            ),
            NormKind::Rms if x.kind() == Kind::Float => {
                // libtorch's fused kernel: one op instead of five.
                x.rms_norm([self.size], Some(&self.weight), self.eps)
            }
            NormKind::Rms => {
                // In f32, then back, as transformers does for half types.
                let kind = x.kind();
                let xf = x.to_kind(Kind::Float);
                let variance =
                    xf.pow_tensor_scalar(2)
                        .mean_dim([-1i64].as_slice(), true, Kind::Float);
                let normed = (xf * (variance + self.eps).rsqrt()).to_kind(kind);
                &self.weight * normed
            }
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> u64 {
        tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.weight.device()
    }

    /// The same norm on `device`.
    pub fn to_device(self, device: Device) -> Self {
        Self {
            weight: self.weight.to_device(device),
            bias: self.bias.map(|b| b.to_device(device)),
            ..self
        }
    }
}
