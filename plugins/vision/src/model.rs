//! Running the model: a batch of preprocessed images in, one output per image. Classifiers
//! and segmenters take the images stacked (`[N, 3, H, W]`); detectors (torchvision's Faster
//! R-CNN, RetinaNet, SSD families, scripted) take a list of images of any sizes and answer
//! boxes, labels and scores per image.
//!
//! The model is TorchScript, an AOTInductor package or ONNX ([`Runner`]). A compiled classifier's
//! or segmenter's batch dimension is checked at load (a pass of one image against a pass of
//! `batch` images), because an AOTInductor package answers garbage outside the batch range it
//! was exported for; a compiled detector takes one image `[3, H, W]` a call.

use cresset_plugin_api::PluginError;
use cresset_torch::model_file::Runner;
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

/// The model and how it takes its input.
pub struct Model {
    runner: Runner,
    device: Device,
    /// Takes a list of images and answers detections.
    pub detector: bool,
    /// The most images one pass takes (AOTInductor and ONNX: the batch checked at load).
    pass_limit: usize,
    /// The dtype the model's weights and inputs are in (f32 unless [`Self::in_dtype`]).
    kind: Kind,
}

impl Model {
    /// `module` on `device`; whether it is a detector is found by asking it (a list of one
    /// small image: a classifier refuses the list by its signature, at once).
    pub fn new(module: CModule, device: Device) -> Self {
        let mut model = Self {
            runner: Runner::TorchScript(module),
            device,
            detector: true,
            pass_limit: usize::MAX,
            kind: Kind::Float,
        };
        let probe = Tensor::zeros([3, 64, 64], (Kind::Float, device));
        model.detector = model.detect(&[&probe]).is_ok();
        model
    }

    /// An AOTInductor or ONNX model (CPU), checked on `image_shape` (`[3, H, W]`, what the
    /// preprocessing makes): one image alone and `batch` images in one pass must answer alike.
    pub fn compiled(runner: Runner, image_shape: &[i64], batch: usize) -> Result<Self, String> {
        let mut model = Self {
            runner,
            device: Device::Cpu,
            detector: false,
            pass_limit: batch.max(1),
            kind: Kind::Float,
        };
        if let Runner::Onnx(onnx) = &model.runner {
            let input = onnx.inputs.first().ok_or("the ONNX model has no input")?;
            if onnx.inputs.len() != 1 || input.kind != Some(Kind::Float) || input.shape.len() != 4 {
                return Err(format!(
                    "the ONNX model must take one float tensor, [N, 3, H, W] (a classifier or \
                     segmenter) or [3, H, W] (a detector); it takes {:?}",
                    onnx.inputs
                ));
            }
            match input.shape[0] {
                1 => model.pass_limit = 1,
                n if n > 1 => {
                    return Err(format!(
                        "the ONNX model's batch is fixed at {n}: export it with a dynamic batch \
                         axis (dynamic_axes={{\"input\": {{0: \"batch\"}}}})"
                    ))
                }
                _ => {}
            }
        }
        let numel: i64 = image_shape.iter().product();
        let image = |seed: i64| {
            (Tensor::arange(numel, (Kind::Float, Device::Cpu)) * 0.37 + seed as f64)
                .sin()
                .view(image_shape)
        };
        let images: Vec<Tensor> = (0..model.pass_limit as i64).map(image).collect();
        let refs: Vec<&Tensor> = images.iter().collect();
        let one = model.pass(&refs[..1]).map_err(|e| e.message.to_string())?;
        if refs.len() > 1 {
            let all = model
                .pass(&refs)
                .map_err(|e| format!("a pass of {} images fails: {}", refs.len(), e.message))?;
            let (a, b) = (&one[0], &all[0]);
            let diff = (a - b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]).max(1.0);
            if diff.is_nan() || diff > 1e-3 * scale {
                return Err(format!(
                    "the model answers one image differently alone and in a batch of {} (max \
                     difference {diff:e}): export it with a dynamic batch dimension that covers \
                     the model's batch_size",
                    refs.len()
                ));
            }
        }
        Ok(model)
    }

    /// An AOTInductor or ONNX detector (CPU) that takes one image `[3, H, W]` and answers
    /// boxes, labels and scores (ONNX: the outputs so named, else the first three), checked
    /// on a small image.
    pub fn compiled_detector(runner: Runner) -> Result<Self, String> {
        let mut model = Self {
            runner,
            device: Device::Cpu,
            detector: true,
            pass_limit: 1,
            kind: Kind::Float,
        };
        let probe = Tensor::zeros([3, 64, 64], (Kind::Float, Device::Cpu));
        model.detect(&[&probe]).map_err(|e| {
            format!(
                "a detector must take one image [3, H, W] and answer boxes, labels and scores: {}",
                e.message
            )
        })?;
        Ok(model)
    }

    /// The dtype the model runs in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// This model with a TorchScript module's weights converted to `kind`, and its inputs
    /// converted to it (on the CPU, in the channels-last layout that oneDNN's reduced-precision
    /// convolutions take without a reorder: resnet18 in bf16 at batch 8, 2.2x faster than
    /// NCHW). Outputs are read back in f32. Compiled models keep their dtype.
    pub fn in_dtype(mut self, kind: Kind) -> Self {
        if let Runner::TorchScript(module) = &mut self.runner {
            if kind != Kind::Float {
                module.to(self.device, kind, false);
                self.kind = kind;
            }
        }
        self
    }

    /// This model with its TorchScript module frozen and optimized by libtorch's
    /// `optimize_for_inference` when `wanted` (and the model is not a detector); the model as
    /// it was, with why, when libtorch cannot.
    pub fn optimized(self, wanted: bool) -> (Self, Option<String>) {
        let Runner::TorchScript(module) = &self.runner else {
            return (self, None);
        };
        if !wanted || self.detector {
            return (self, None);
        }
        match cresset_torch::torchscript::optimize_for_inference(module) {
            Ok(module) => (
                Self {
                    runner: Runner::TorchScript(module),
                    ..self
                },
                None,
            ),
            Err(e) => (self, Some(e)),
        }
    }

    /// Run images, in passes of at most the model's pass limit: the output per image.
    pub fn run(&mut self, images: &[&Tensor]) -> Result<Vec<Row>, PluginError> {
        if self.detector {
            return self.detect(images);
        }
        let mut rows = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.pass_limit) {
            rows.extend(self.pass(chunk)?.into_iter().map(Row::Scores));
        }
        Ok(rows)
    }

    /// One pass of a classifier or segmenter: the scores per image.
    fn pass(&mut self, images: &[&Tensor]) -> Result<Vec<Tensor>, PluginError> {
        let mut batch = Tensor::stack(images, 0).to_device(self.device);
        if self.kind != Kind::Float {
            batch = batch.to_kind(self.kind);
            if self.device == Device::Cpu && batch.dim() == 4 {
                // NCHW sizes over NHWC memory: PyTorch's channels_last.
                batch = batch
                    .permute([0, 2, 3, 1])
                    .contiguous()
                    .permute([0, 3, 1, 2]);
            }
        }
        // torchvision's segmenters name their ONNX output `out`; classifiers have one.
        let index = match &self.runner {
            Runner::TorchScript(_) => return self.scripted(batch, images.len()),
            Runner::Onnx(onnx) => onnx.outputs.iter().position(|o| o.name == "out"),
            Runner::Aoti(_) => None,
        };
        let scores = self
            .runner
            .run(&[&batch], self.device)?
            .into_iter()
            .nth(index.unwrap_or(0))
            .ok_or_else(|| PluginError::internal("the model answered no output"))?;
        split_scores(scores, images.len())
    }

    /// A TorchScript classifier's or segmenter's scores per image for a batch of `n`.
    fn scripted(&mut self, batch: Tensor, n: usize) -> Result<Vec<Tensor>, PluginError> {
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
        split_scores(scores, n)
    }

    /// The module's forward on one input, under libtorch's InferenceMode. Its outputs are
    /// inference tensors: they are only read (copied, converted, split) afterwards.
    fn call(&mut self, input: IValue) -> Result<IValue, PluginError> {
        let Runner::TorchScript(module) = &mut self.runner else {
            return Err(PluginError::internal("not a TorchScript model"));
        };
        let _inference = cresset_torch::InferenceMode::enter();
        module
            .forward_is(&[input])
            .map_err(|e| PluginError::invalid_input(format!("the model rejected the input: {e}")))
    }

    /// A detector's pass: a TorchScript detector takes the images as a list and answers, as
    /// scripted torchvision detectors do, `(losses, [{"boxes", "labels", "scores"}, ...])` (or
    /// the list alone); a compiled one takes them one by one.
    fn detect(&mut self, images: &[&Tensor]) -> Result<Vec<Row>, PluginError> {
        if !matches!(self.runner, Runner::TorchScript(_)) {
            return images.iter().map(|image| self.detect_one(image)).collect();
        }
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
                detections(get("boxes")?, get("labels")?, get("scores")?)
            })
            .collect()
    }

    /// A compiled detector on one image.
    fn detect_one(&mut self, image: &Tensor) -> Result<Row, PluginError> {
        let names: Option<Vec<usize>> = match &self.runner {
            Runner::Onnx(onnx) => ["boxes", "labels", "scores"]
                .iter()
                .map(|n| onnx.outputs.iter().position(|o| o.name == *n))
                .collect(),
            _ => None,
        };
        let mut outputs: Vec<Option<Tensor>> = self
            .runner
            .run(&[image], Device::Cpu)?
            .into_iter()
            .map(Some)
            .collect();
        let order = names.unwrap_or_else(|| vec![0, 1, 2]);
        let mut take = |i: usize| {
            outputs
                .get_mut(order[i])
                .and_then(Option::take)
                .ok_or_else(not_detections)
        };
        let (boxes, labels, scores) = (take(0)?, take(1)?, take(2)?);
        detections(boxes, labels, scores)
    }
}

/// One image's detections, checked: `boxes` `[K, 4]`, `labels` and `scores` `[K]`.
fn detections(boxes: Tensor, labels: Tensor, scores: Tensor) -> Result<Row, PluginError> {
    let k = scores.size().first().copied().unwrap_or(-1);
    if boxes.size() != [k, 4] || labels.size() != [k] || scores.size() != [k] {
        return Err(PluginError::internal(format!(
            "the detector answered boxes {:?}, labels {:?} and scores {:?}: they must be \
             [K, 4], [K] and [K]",
            boxes.size(),
            labels.size(),
            scores.size()
        )));
    }
    Ok(Row::Detections {
        boxes: boxes.to_kind(Kind::Float),
        labels: labels.to_kind(Kind::Int64),
        scores: scores.to_kind(Kind::Float),
    })
}

/// A batch's scores `[n, ...]`, one tensor per image, on the CPU in f32.
fn split_scores(scores: Tensor, n: usize) -> Result<Vec<Tensor>, PluginError> {
    if scores.dim() == 0 || scores.size()[0] != n as i64 {
        return Err(PluginError::internal(format!(
            "the model answered {:?} for {n} images",
            scores.size()
        )));
    }
    let scores = scores.to_device(Device::Cpu).to_kind(Kind::Float);
    Ok((0..n as i64).map(|i| scores.get(i)).collect())
}

fn not_detections() -> PluginError {
    PluginError::internal(
        "the detector must answer a list of {\"boxes\", \"labels\", \"scores\"} per image",
    )
}
