//! Running the TorchScript module: a batch of preprocessed images in, one output per image.
//! Classifiers and segmenters take the images stacked (`[N, 3, H, W]`); detectors
//! (torchvision's Faster R-CNN, RetinaNet, SSD families, scripted) take a list of images of
//! any sizes and answer boxes, labels and scores per image.

use cresset_plugin_api::PluginError;
use cresset_torch::tch::{CModule, Device, IValue, Kind, Tensor};

/// One image's output.
pub enum Row {
    /// Class scores `[C]`, or per-pixel class scores `[C, H, W]`.
    Scores(Tensor),
    /// Detections: `boxes` `[K, 4]` (x1, y1, x2, y2 in the image's pixels), `labels` `[K]`,
    /// `scores` `[K]`.
    Detections {
        boxes: Tensor,
        labels: Tensor,
        scores: Tensor,
    },
}

/// The module and how it takes its input.
pub struct Model {
    module: CModule,
    device: Device,
    /// Takes a list of images and answers detections.
    pub detector: bool,
}

impl Model {
    /// `module` on `device`; whether it is a detector is found by asking it (a list of one
    /// small image: a classifier refuses the list by its signature, at once).
    pub fn new(module: CModule, device: Device) -> Self {
        let mut model = Self {
            module,
            device,
            detector: true,
        };
        let probe = Tensor::zeros([3, 64, 64], (Kind::Float, device));
        model.detector = model.detect(&[&probe]).is_ok();
        model
    }

    /// This model with its module frozen and optimized by libtorch's `optimize_for_inference`
    /// when `wanted` (and the model is not a detector); the model as it was, and why, when
    /// libtorch cannot.
    pub fn optimized(self, wanted: bool) -> Result<Self, (Self, String)> {
        if !wanted || self.detector {
            return Ok(self);
        }
        match cresset_torch::torchscript::optimize_for_inference(&self.module) {
            Ok(module) => Ok(Self { module, ..self }),
            Err(e) => Err((self, e)),
        }
    }

    /// Run images in one pass: the output per image.
    pub fn run(&mut self, images: &[&Tensor]) -> Result<Vec<Row>, PluginError> {
        if self.detector {
            return self.detect(images);
        }
        let batch = Tensor::stack(images, 0).to_device(self.device);
        let scores = match self.call(IValue::Tensor(batch))? {
            IValue::Tensor(t) => t,
            // torchvision's segmentation models answer {"out": ..., "aux": ...}.
            IValue::GenericDict(entries) => entries
                .into_iter()
                .find_map(|(k, v)| match (k, v) {
                    (IValue::String(k), IValue::Tensor(t)) if k == "out" => Some(t),
                    _ => None,
                })
                .ok_or_else(|| {
                    PluginError::internal("the model returned a dict without an `out` tensor")
                })?,
            IValue::Tuple(mut items) if !items.is_empty() => match items.swap_remove(0) {
                IValue::Tensor(t) => t,
                _ => {
                    return Err(PluginError::internal(
                        "the model's first output is not a tensor",
                    ))
                }
            },
            _ => {
                return Err(PluginError::internal(
                    "the model must return a tensor, a tuple of tensors or {\"out\": tensor}",
                ))
            }
        };
        if scores.dim() == 0 || scores.size()[0] != images.len() as i64 {
            return Err(PluginError::internal(format!(
                "the model answered {:?} for {} images",
                scores.size(),
                images.len()
            )));
        }
        let scores = scores.to_device(Device::Cpu).to_kind(Kind::Float);
        Ok((0..images.len() as i64)
            .map(|i| Row::Scores(scores.get(i)))
            .collect())
    }

    /// The module's forward on one input, under libtorch's InferenceMode. Its outputs are
    /// inference tensors: they are only read (copied, converted, split) afterwards.
    fn call(&mut self, input: IValue) -> Result<IValue, PluginError> {
        let _inference = cresset_torch::InferenceMode::enter();
        self.module
            .forward_is(&[input])
            .map_err(|e| PluginError::invalid_input(format!("the model rejected the input: {e}")))
    }

    /// A detector's pass: the images as a list; the answer, as scripted torchvision detectors
    /// give it, `(losses, [{"boxes", "labels", "scores"}, ...])` (or the list alone).
    fn detect(&mut self, images: &[&Tensor]) -> Result<Vec<Row>, PluginError> {
        let list = images.iter().map(|t| t.to_device(self.device)).collect();
        let items = match self.call(IValue::TensorList(list))? {
            IValue::Tuple(mut parts) if !parts.is_empty() => match parts.pop() {
                Some(IValue::GenericList(items)) => items,
                _ => return Err(not_detections()),
            },
            IValue::GenericList(items) => items,
            _ => return Err(not_detections()),
        };
        if items.len() != images.len() {
            return Err(PluginError::internal(format!(
                "the detector answered {} results for {} images",
                items.len(),
                images.len()
            )));
        }
        items
            .into_iter()
            .map(|item| {
                let IValue::GenericDict(entries) = item else {
                    return Err(not_detections());
                };
                let get = |name: &str| {
                    entries
                        .iter()
                        .find_map(|(k, v)| match (k, v) {
                            (IValue::String(k), IValue::Tensor(t)) if k == name => {
                                Some(t.to_device(Device::Cpu))
                            }
                            _ => None,
                        })
                        .ok_or_else(not_detections)
                };
                Ok(Row::Detections {
                    boxes: get("boxes")?.to_kind(Kind::Float),
                    labels: get("labels")?.to_kind(Kind::Int64),
                    scores: get("scores")?.to_kind(Kind::Float),
                })
            })
            .collect()
    }
}

fn not_detections() -> PluginError {
    PluginError::internal(
        "the detector must answer a list of {\"boxes\", \"labels\", \"scores\"} per image",
    )
}
