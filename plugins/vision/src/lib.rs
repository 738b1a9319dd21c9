//! The vision plugin: TorchServe's `image_classifier` and `image_segmenter` handlers over a
//! TorchScript model.
//!
//! A request carries one image (the raw body, `curl -T photo.jpg`; a multipart `data`/`body`
//! field; or base64 in `{"data": ...}`) or several (KServe v1 `{"instances": [...]}`): JPEG,
//! PNG, WebP, BMP or GIF, decoded to RGB under a pixel cap. Each image goes through
//! torchvision's ImageNet preprocessing (resize the short side to 256 with Pillow's
//! resampling, center crop 224, scale to [0, 1], normalize), and the images of a batch run in
//! one forward pass. What the model returns decides the answer:
//!
//! - class scores `[N, C]`: the top `topk` classes with their softmax probabilities, named by
//!   `index_to_name.json`, as `{"tabby": 0.41, ...}` per image (TorchServe's
//!   `image_classifier`);
//! - a segmentation `[N, C, H, W]` (or torchvision's `{"out": ...}`): per pixel the top class
//!   and its probability, `[[[class, prob], ...], ...]` per image (TorchServe's
//!   `image_segmenter`), or, with `segmentation_format = "png"`, the class map as an 8-bit PNG.
//!
//! `[handler]` keys: `model_file` (default: the archive's serialized file, else `model.pt`),
//! `labels_file` (default `index_to_name.json`, optional), `task` (`"auto"`, the default,
//! `"classify"` or `"segment"`: check the model's output against it), `topk` (5), `resize`
//! (256; 0: keep the size), `crop` (224; 0: no crop), `mean` and `std` (ImageNet's),
//! `interpolation` (`bilinear`, `bicubic`, `lanczos`, `hamming` or `box`), `max_image_pixels`
//! (89,478,485, Pillow's `MAX_IMAGE_PIXELS`; larger images are refused from their header),
//! `segmentation_format` (`"torchserve"` or `"png"`), `optimize` (default: on the CPU; freeze
//! the module and run libtorch's `optimize_for_inference`).
//!
//! A bad image (not an image, truncated, too large) fails its own request with 400; the other
//! images of the batch are answered.

mod input;
pub mod resample;
pub mod transform;

use std::io::Cursor;

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};
use cresset_torch::tch::{CModule, Device, IValue, Kind, Tensor};
use serde_json::{json, Value};

pub use input::{decode, Framing};
pub use transform::Transform;

/// What the model is taken to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Decided by the output's shape.
    #[default]
    Auto,
    /// Class scores per image.
    Classify,
    /// Class scores per pixel.
    Segment,
}

/// How a segmentation is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentationFormat {
    /// Per pixel `[class, probability]`, as TorchServe's `image_segmenter` answers.
    #[default]
    Torchserve,
    /// The class map as an 8-bit grayscale PNG (one request's single image).
    Png,
}

/// `[handler]` as this plugin reads it (any other key is refused, naming it).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    model_file: Option<String>,
    labels_file: Option<String>,
    task: Option<Task>,
    topk: Option<u64>,
    resize: Option<u32>,
    crop: Option<u32>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
    interpolation: Option<resample::Filter>,
    max_image_pixels: Option<u64>,
    segmentation_format: Option<SegmentationFormat>,
    optimize: Option<bool>,
}

/// One request's preprocessed images.
pub struct Prepared {
    framing: Framing,
    /// The encoded images: decoded in `inference`, the batch's images in parallel.
    encoded: Vec<Vec<u8>>,
}

/// One request's per-image outputs, or its own error.
pub type Produced = Result<(Framing, Vec<Tensor>), PluginError>;

/// The vision handler.
pub struct VisionHandler {
    module: CModule,
    device: Device,
    labels: Option<Vec<String>>,
    task: Task,
    topk: i64,
    transform: Transform,
    max_pixels: u64,
    segmentation_format: SegmentationFormat,
    threads: u32,
    /// Forward passes run so far (the batching tests count them).
    pub forward_passes: u64,
}

impl VisionHandler {
    /// The preprocessing this handler applies.
    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// Decode and preprocess one image.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Tensor, PluginError> {
        let image = input::decode(bytes, self.max_pixels)?;
        Ok(self.transform.apply(&image))
    }

    /// Run images of one shape in one pass; the output rows, one per image.
    fn forward(&mut self, images: &[&Tensor]) -> Result<Vec<Tensor>, PluginError> {
        self.forward_passes += 1;
        let _inference = cresset_torch::InferenceMode::enter();
        let batch = Tensor::stack(images, 0).to_device(self.device);
        let output = self
            .module
            .forward_is(&[IValue::Tensor(batch)])
            .map_err(|e| {
                PluginError::invalid_input(format!("the model rejected the input: {e}"))
            })?;
        let scores = match output {
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
        Ok((0..images.len() as i64).map(|i| scores.get(i)).collect())
    }

    fn task_of(&self, output: &Tensor) -> Result<Task, PluginError> {
        let found = match output.dim() {
            1 => Task::Classify,
            3 => Task::Segment,
            _ => {
                return Err(PluginError::internal(format!(
                    "the model's output per image has shape {:?}: neither class scores [C] \
                     nor a segmentation [C, H, W]",
                    output.size()
                )))
            }
        };
        if self.task != Task::Auto && self.task != found {
            return Err(PluginError::internal(format!(
                "`handler.task` is {:?} but the model's output per image has shape {:?}",
                self.task,
                output.size()
            )));
        }
        Ok(found)
    }

    fn classes(&self, scores: &Tensor) -> Result<Value, PluginError> {
        let probs = scores.softmax(-1, Kind::Float).unsqueeze(0);
        let labels = self.labels.as_deref().unwrap_or_default();
        let mut rows = cresset_torch::torchscript::top_labels(&probs, self.topk, labels)?;
        Ok(rows.pop().unwrap_or(Value::Null))
    }

    /// Per pixel `[class, probability]` (TorchServe's `image_segmenter`).
    fn segmentation(scores: &Tensor) -> Result<Value, PluginError> {
        let probs = scores.softmax(0, Kind::Float);
        let (values, indices) = probs.max_dim(0, false);
        let pairs = Tensor::stack(&[indices.to_kind(Kind::Float), values], 2);
        Vec::<Vec<Vec<f32>>>::try_from(&pairs)
            .map(|rows| json!(rows))
            .map_err(internal)
    }

    fn class_map_png(scores: &Tensor) -> Result<Vec<u8>, PluginError> {
        let classes = scores.argmax(0, false).clamp(0, 255).to_kind(Kind::Uint8);
        let (h, w) = (classes.size()[0] as u32, classes.size()[1] as u32);
        let bytes = Vec::<u8>::try_from(classes.flatten(0, -1)).map_err(internal)?;
        let image = image::GrayImage::from_raw(w, h, bytes)
            .ok_or_else(|| PluginError::internal("class map size mismatch"))?;
        let mut out = Cursor::new(Vec::new());
        image
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(internal)?;
        Ok(out.into_inner())
    }
}

fn internal(e: impl std::fmt::Display) -> PluginError {
    PluginError::internal(e.to_string())
}

impl Handler for VisionHandler {
    const NAME: &'static str = "vision";
    const SUMMARY: &'static str =
        "image classification and segmentation on a TorchScript model (TorchServe's image_classifier and image_segmenter)";
    type Input = Prepared;
    type Output = Produced;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let config: Settings = settings::parse(&ctx.handler_config)?;
        let (module, device) =
            cresset_torch::torchscript::load_module(ctx, config.model_file.as_deref())?;
        // libtorch's optimize_for_inference: 1.4x (batch 1) to 1.6x (batch 8) on resnet18 on
        // the CPU, logits within 1e-5. A model it cannot optimize runs as it is.
        let module = if config.optimize.unwrap_or(device == Device::Cpu) {
            match cresset_torch::torchscript::optimize_for_inference(&module) {
                Ok(optimized) => optimized,
                Err(e) => {
                    tracing::warn!(model = %ctx.model_name, "optimize_for_inference failed, running the module as it is: {e}");
                    module
                }
            }
        } else {
            module
        };
        let labels =
            cresset_torch::torchscript::archive_labels(ctx, config.labels_file.as_deref())?;
        let side =
            |key: &str, value: Option<u32>, default: u32| -> Result<Option<u32>, PluginError> {
                match value.unwrap_or(default) {
                    0 => Ok(None),
                    n if n <= 8192 => Ok(Some(n)),
                    n => Err(PluginError::invalid_input(format!(
                        "`handler.{key}` must be from 0 (off) to 8192. Given: {n}"
                    ))),
                }
            };
        let imagenet = Transform::imagenet();
        let std = config.std.unwrap_or(imagenet.std);
        if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(PluginError::invalid_input(format!(
                "`handler.std` must be three positive numbers. Given: {std:?}"
            )));
        }
        let transform = Transform {
            resize: side("resize", config.resize, 256)?,
            crop: side("crop", config.crop, 224)?,
            filter: config.interpolation.unwrap_or(resample::Filter::Bilinear),
            mean: config.mean.unwrap_or(imagenet.mean),
            std,
        };
        let max_pixels = match config.max_image_pixels {
            None => 89_478_485,
            Some(n @ 1..=1_000_000_000) => n,
            Some(n) => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.max_image_pixels` must be from 1 to 1000000000. Given: {n}"
                )))
            }
        };
        tracing::info!(model = %ctx.model_name, ?device, labels = labels.as_ref().map(Vec::len), "vision model loaded");
        Ok(Self {
            module,
            device,
            labels,
            task: config.task.unwrap_or_default(),
            topk: settings::within("topk", config.topk, 5, 1 << 20)? as i64,
            transform,
            max_pixels,
            segmentation_format: config.segmentation_format.unwrap_or_default(),
            threads: ctx.assignment.intra_op_threads,
            forward_passes: 0,
        })
    }

    fn preprocess(&mut self, request: &Request) -> Result<Prepared, PluginError> {
        let (framing, encoded) = input::encoded_images(request)?;
        Ok(Prepared { framing, encoded })
    }

    fn inference(
        &mut self,
        batch: Vec<Prepared>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Produced>, PluginError> {
        let _threads = cresset_torch::threads::Batch::enter(self.threads);
        // Decode and preprocess every image of the batch on the instance's cores at once (the
        // forward pass that follows uses them all too): 8 photographs take half the time they
        // take one after another on two cores. A bad image fails its own request.
        let jobs: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(r, p)| (0..p.encoded.len()).map(move |i| (r, i)))
            .collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.threads.max(1) as usize);
        let mut prepared = parallel_map(&jobs, threads, |&(r, i)| {
            self.prepare(&batch[r].encoded[i]).map_err(|mut e| {
                if batch[r].framing == Framing::Instances {
                    e.message = format!("`instances[{i}]`: {}", e.message).into();
                }
                e
            })
        })
        .into_iter();
        let requests: Vec<Result<(Framing, Vec<Tensor>), PluginError>> = batch
            .iter()
            .map(|p| {
                let images: Result<Vec<Tensor>, PluginError> =
                    prepared.by_ref().take(p.encoded.len()).collect();
                images.map(|images| (p.framing, images))
            })
            .collect();
        // Images of one shape (all of them, with a crop) run together; a failed pass is retried
        // request by request, so a failure is its own request's.
        let all: Vec<&Tensor> = requests
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .flat_map(|(_, images)| images)
            .collect();
        let same_shape = all.windows(2).all(|w| w[0].size() == w[1].size());
        if same_shape && all.len() > 1 {
            if let Ok(mut rows) = self.forward(&all) {
                return Ok(requests
                    .into_iter()
                    .map(|r| {
                        let (framing, images) = r?;
                        let rest = rows.split_off(images.len());
                        Ok((framing, std::mem::replace(&mut rows, rest)))
                    })
                    .collect());
            }
        }
        Ok(requests
            .into_iter()
            .map(|r| {
                let (framing, images) = r?;
                let images: Vec<&Tensor> = images.iter().collect();
                let rows = if images.windows(2).all(|w| w[0].size() == w[1].size()) {
                    self.forward(&images)?
                } else {
                    images
                        .iter()
                        .map(|t| self.forward(&[t]).map(|mut r| r.remove(0)))
                        .collect::<Result<Vec<_>, _>>()?
                };
                Ok((framing, rows))
            })
            .collect())
    }

    fn postprocess(&mut self, output: Produced) -> Result<Response, PluginError> {
        let (framing, rows) = output?;
        let mut answers = Vec::with_capacity(rows.len());
        for row in &rows {
            let answer = match self.task_of(row)? {
                Task::Segment if self.segmentation_format == SegmentationFormat::Png => {
                    if framing == Framing::One {
                        return Ok(Response::ok("image/png", Self::class_map_png(row)?));
                    }
                    return Err(PluginError::invalid_input(
                        "`segmentation_format = \"png\"` answers one image per request; send \
                         the images one by one",
                    ));
                }
                Task::Segment => Self::segmentation(row)?,
                _ => self.classes(row)?,
            };
            answers.push(answer);
        }
        let body = match framing {
            Framing::One => answers.pop().unwrap_or(Value::Null),
            Framing::Instances => json!({ "predictions": answers }),
        };
        Response::json(&body)
    }
}

/// `f` over `items` on up to `threads` threads (this one included), in order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let mut parts = items.chunks(chunk);
    let mine = parts.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let others: Vec<_> = parts
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = mine.iter().map(&f).collect();
        for handle in others {
            match handle.join() {
                Ok(results) => out.extend(results),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

cresset_plugin_api::export_handler!(VisionHandler);
