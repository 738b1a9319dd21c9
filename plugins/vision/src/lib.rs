//! The vision plugin: TorchServe's `image_classifier`, `image_segmenter` and `object_detector`
//! handlers over a TorchScript model, an AOTInductor package (`.pt2`) or an ONNX model (the
//! last two on the CPU).
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
//!   `image_segmenter`), or, with `segmentation_format = "png"`, the class map as an 8-bit PNG;
//! - a detector (a module that takes a list of images, as scripted torchvision detectors do;
//!   or an AOTInductor or ONNX model that takes one image `[3, H, W]` and answers boxes, labels
//!   and scores, as torchvision's detectors exported per image do): the objects scoring at
//!   least `threshold` (0.5), `[{"dog": [x1, y1, x2, y2], "score": s},
//!   ...]` per image (TorchServe's `object_detector`). A detector's images are only scaled to
//!   [0, 1] (`ToTensor`), as TorchServe's handler does; the model resizes and normalizes them.
//!   torchvision's detectors run on the `torchvision::nms` and `torchvision::roi_align` that
//!   `cresset-torch` registers.
//!
//! `[handler]` keys: `model_file` (default: the archive's serialized file, else `model.pt`),
//! `format` (`"auto"`, the default: told by the file; `"torchscript"`, `"aoti"`, `"onnx"`),
//! `labels_file` (default `index_to_name.json`, optional), `task` (`"auto"`, the default,
//! `"classify"`, `"segment"` or `"detect"`: check the model against it), `topk` (5), `resize`
//! (256; 0: keep the size), `crop` (224; 0: no crop), `mean` and `std` (ImageNet's),
//! `interpolation` (`bilinear`, `bicubic`, `lanczos`, `hamming` or `box`), `max_image_pixels`
//! (89,478,485, Pillow's `MAX_IMAGE_PIXELS`; larger images are refused from their header),
//! `segmentation_format` (`"torchserve"` or `"png"`), `optimize` (default: on the CPU; freeze
//! the module and run libtorch's `optimize_for_inference`; not for detectors), `dtype`
//! (`"auto"`, the default: bf16 for a TorchScript classifier or segmenter on a CPU with native
//! bf16 arithmetic, AVX512-BF16 or AMX, else f32; `"float32"`, `"bfloat16"`, `"float16"`;
//! AOTInductor, ONNX and detectors run in f32), `threshold` (0.5, detectors).
//!
//! A bad image (not an image, truncated, too large) fails its own request with 400; the other
//! images of the batch are answered.

mod answer;
mod input;
mod model;
pub mod resample;
pub mod transform;

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};
use cresset_torch::layers::Dtype;
use cresset_torch::model_file::{Format, FormatKey, Runner};
use cresset_torch::tch::{Device, Kind, Tensor};
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
    /// Objects: boxes, labels and scores per image.
    Detect,
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
    format: Option<FormatKey>,
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
    dtype: Option<String>,
    threshold: Option<f64>,
}

/// One request's preprocessed images.
pub struct Prepared {
    framing: Framing,
    /// The encoded images: decoded in `inference`, the batch's images in parallel.
    encoded: Vec<Vec<u8>>,
}

/// One request's per-image outputs, or its own error.
pub type Produced = Result<(Framing, Vec<Row>), PluginError>;

pub use model::Row;

/// The vision handler.
pub struct VisionHandler {
    model: model::Model,
    labels: Option<Vec<String>>,
    task: Task,
    topk: i64,
    transform: Transform,
    max_pixels: u64,
    segmentation_format: SegmentationFormat,
    threshold: f64,
    threads: u32,
    /// Threads decoding a batch's images: the instance's, at most the cores (found once: the
    /// count reads the process's CPU affinity and cgroup quota).
    decode_threads: usize,
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

    /// Run preprocessed images (from [`Self::prepare`]) through the model, counted: one pass,
    /// or passes of the batch an AOTInductor or ONNX model was checked with.
    pub fn forward(&mut self, images: &[&Tensor]) -> Result<Vec<Row>, PluginError> {
        self.forward_passes += 1;
        self.model.run(images)
    }

    /// The dtype the model runs in (`handler.dtype`, `"auto"` resolved).
    pub fn dtype(&self) -> Kind {
        self.model.kind()
    }

    /// Whether the model is a detector (it takes a list of images).
    pub fn is_detector(&self) -> bool {
        self.model.detector
    }

    fn task_of(&self, row: &Row) -> Result<Task, PluginError> {
        let found = match row {
            Row::Detections { .. } => Task::Detect,
            Row::Scores(t) if t.dim() == 1 => Task::Classify,
            Row::Scores(t) if t.dim() == 3 => Task::Segment,
            Row::Scores(t) => {
                return Err(PluginError::internal(format!(
                    "the model's output per image has shape {:?}: neither class scores [C] \
                     nor a segmentation [C, H, W]",
                    t.size()
                )))
            }
        };
        if self.task != Task::Auto && self.task != found {
            return Err(PluginError::internal(format!(
                "`handler.task` is {:?} but the model answers as a {found:?} model",
                self.task
            )));
        }
        Ok(found)
    }
}

impl Handler for VisionHandler {
    const NAME: &'static str = "vision";
    const SUMMARY: &'static str =
        "image classification, segmentation and object detection on a TorchScript, AOTInductor or ONNX model (TorchServe's image_classifier, image_segmenter and object_detector)";
    type Input = Prepared;
    type Output = Produced;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let config: Settings = settings::parse(&ctx.handler_config)?;
        let (path, format) =
            cresset_torch::model_file::resolve(ctx, config.model_file.as_deref(), config.format)?;
        let (probed, device) = match format {
            Format::TorchScript => {
                let (module, device) = cresset_torch::torchscript::load_path(ctx, &path)?;
                (model::Model::new(module, device), device)
            }
            Format::Aoti | Format::Onnx => {
                let fail = |e: String| {
                    PluginError::invalid_input(format!(
                        "cannot load {} as {format:?}: {e}",
                        path.display()
                    ))
                };
                let (runner, device) = Runner::load(ctx, &path, format)?;
                let _threads =
                    cresset_torch::threads::Batch::enter(ctx.assignment.intra_op_threads);
                // A model that takes one image `[3, H, W]` is a detector (torchvision's,
                // exported per image); one that takes `[N, 3, H, W]` classifies or segments.
                let first = match &runner {
                    Runner::Aoti(package) => package.inputs.as_ref().and_then(|s| s.first()),
                    _ => None,
                };
                let detector = match &runner {
                    Runner::Onnx(onnx) => onnx.inputs.first().is_some_and(|i| i.shape.len() == 3),
                    _ => first.is_some_and(|spec| spec.min_rank() == 3),
                };
                if detector {
                    (
                        model::Model::compiled_detector(runner).map_err(fail)?,
                        device,
                    )
                } else {
                    // The preprocessed image's shape.
                    let side = i64::from(config.crop.filter(|&c| c > 0).unwrap_or(224));
                    // A package exported with a static batch of 1 runs one image a pass.
                    let mut static_batch = None;
                    if let Some(spec) = first {
                        let ours = [1, 3, side, side];
                        static_batch = spec.dims.iter().find(|(i, _)| *i == 0).map(|&(_, n)| n);
                        let differs = spec.dims.iter().any(|&(i, n)| ours.get(i) != Some(&n));
                        // Without a crop the images keep their own sizes, which a package with
                        // static heights and widths would not take.
                        if config.crop == Some(0) && spec.dims.iter().any(|&(i, _)| i >= 2) {
                            return Err(fail(
                                "the package takes images of one static size: keep a crop \
                                 (`handler.crop`)"
                                    .into(),
                            ));
                        }
                        if spec.dtype != "float32" || differs || spec.min_rank() != 4 {
                            return Err(fail(format!(
                                "the package takes {} input of static sizes {:?} (dimension, \
                                 size); the preprocessing makes float32 [N, 3, {side}, {side}] \
                                 (`handler.crop`; a static batch must be 1, else export it with \
                                 a dynamic batch)",
                                spec.dtype, spec.dims
                            )));
                        }
                    }
                    let batch = match static_batch {
                        Some(_) => 1,
                        None => ctx
                            .model_config
                            .get("batch_size")
                            .and_then(serde_json::Value::as_u64)
                            .unwrap_or(1) as usize,
                    };
                    let model =
                        model::Model::compiled(runner, &[3, side, side], batch).map_err(fail)?;
                    (model, device)
                }
            }
        };
        let task = config.task.unwrap_or_default();
        match (task, probed.detector) {
            (Task::Detect, false) => {
                return Err(PluginError::invalid_input(
                    "`handler.task` is \"detect\" but the model does not take a list of images, \
                     as detectors do",
                ))
            }
            (Task::Classify | Task::Segment, true) => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.task` is {task:?} but the model is a detector (it takes a list of \
                     images)"
                )))
            }
            _ => {}
        }
        let detector = probed.detector;
        let dtype = Dtype::parse(config.dtype.as_deref().unwrap_or("auto"))
            .map_err(|e| PluginError::invalid_input(format!("`handler.dtype`: {e}")))?;
        // A TorchScript classifier or segmenter runs in bf16 by default on a CPU with native
        // bf16 (resnet18 on 2 cores with AMX: 1.7x faster than optimized f32 at batch 1, 3x at
        // batch 8; the accuracy cost is in BENCHMARKS.md). Compiled formats keep the dtype they
        // were compiled for; detectors (box arithmetic, NMS) stay in f32.
        let compiled = !matches!(format, Format::TorchScript);
        let kind = match dtype {
            Dtype::Auto if compiled || detector => Kind::Float,
            Dtype::Auto => dtype.resolve(device, false),
            Dtype::Fixed(Kind::Float) => Kind::Float,
            Dtype::Fixed(kind) if compiled || detector => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.dtype` {kind:?} is for TorchScript classifiers and segmenters; \
                     {} runs in float32",
                    if detector {
                        "a detector"
                    } else {
                        "an AOTInductor or ONNX model"
                    }
                )))
            }
            Dtype::Fixed(kind) => kind,
        };
        let probed = probed.in_dtype(kind);
        // libtorch's optimize_for_inference: 1.4x (batch 1) to 1.6x (batch 8) on resnet18 on
        // the CPU, logits within 1e-5. A model it cannot optimize runs as it is. Detectors (with
        // their control flow) run as scripted.
        let (model, failed) = probed.optimized(config.optimize.unwrap_or(device == Device::Cpu));
        if let Some(e) = failed {
            tracing::warn!(model = %ctx.model_name, "optimize_for_inference failed, running the module as it is: {e}");
        }
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
        // Classifiers and segmenters: ImageNet's preprocessing; detectors: `ToTensor` alone.
        let (resize, crop, mean, std) = if detector {
            (0, 0, [0.0; 3], [1.0; 3])
        } else {
            let imagenet = Transform::imagenet();
            (256, 224, imagenet.mean, imagenet.std)
        };
        let std = config.std.unwrap_or(std);
        if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(PluginError::invalid_input(format!(
                "`handler.std` must be three positive numbers. Given: {std:?}"
            )));
        }
        let transform = Transform {
            resize: side("resize", config.resize, resize)?,
            crop: side("crop", config.crop, crop)?,
            filter: config.interpolation.unwrap_or(resample::Filter::Bilinear),
            mean: config.mean.unwrap_or(mean),
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
        let threshold = match config.threshold {
            None => 0.5,
            Some(t) if (0.0..=1.0).contains(&t) => t,
            Some(t) => {
                return Err(PluginError::invalid_input(format!(
                    "`handler.threshold` must be a number from 0 to 1. Given: {t}"
                )))
            }
        };
        tracing::info!(model = %ctx.model_name, ?device, ?kind, detector, labels = labels.as_ref().map(Vec::len), "vision model loaded");
        Ok(Self {
            model,
            labels,
            task,
            topk: settings::within("topk", config.topk, 5, 1 << 20)? as i64,
            transform,
            max_pixels,
            segmentation_format: config.segmentation_format.unwrap_or_default(),
            threshold,
            threads: ctx.assignment.intra_op_threads,
            decode_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(ctx.assignment.intra_op_threads.max(1) as usize),
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
        let mut prepared = parallel_map(&jobs, self.decode_threads, |&(r, i)| {
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
        let batchable = self.model.detector || all.windows(2).all(|w| w[0].size() == w[1].size());
        if batchable && all.len() > 1 {
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
                let rows = if self.model.detector
                    || images.windows(2).all(|w| w[0].size() == w[1].size())
                {
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
        let labels = self.labels.as_deref().unwrap_or_default();
        let mut answers = Vec::with_capacity(rows.len());
        for row in &rows {
            let answer = match (self.task_of(row)?, row) {
                (Task::Segment, Row::Scores(scores))
                    if self.segmentation_format == SegmentationFormat::Png =>
                {
                    if framing == Framing::One {
                        return Ok(Response::ok("image/png", answer::class_map_png(scores)?));
                    }
                    return Err(PluginError::invalid_input(
                        "`segmentation_format = \"png\"` answers one image per request; send \
                         the images one by one",
                    ));
                }
                (Task::Segment, Row::Scores(scores)) => answer::segmentation(scores)?,
                (_, Row::Scores(scores)) => {
                    cresset_torch::torchscript::top_classes(scores, self.topk, labels)?
                }
                (
                    _,
                    Row::Detections {
                        boxes,
                        labels: classes,
                        scores,
                    },
                ) => answer::detections(boxes, classes, scores, self.threshold, labels)?,
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
