//! Answers in TorchServe's shapes: the top classes of an image, the class of each pixel, the
//! objects found.

use std::io::Cursor;

use cresset_plugin_api::PluginError;
use cresset_torch::tch::{Kind, Tensor};
use serde_json::{json, Map, Value};

/// Per pixel `[class, probability]` (TorchServe's `image_segmenter`).
pub fn segmentation(scores: &Tensor) -> Result<Value, PluginError> {
    let probs = scores.softmax(0, Kind::Float);
    let (values, indices) = probs.max_dim(0, false);
    let pairs = Tensor::stack(&[indices.to_kind(Kind::Float), values], 2);
    Vec::<Vec<Vec<f32>>>::try_from(&pairs)
        .map(|rows| json!(rows))
        .map_err(internal)
}

/// The class of each pixel as an 8-bit grayscale PNG.
pub fn class_map_png(scores: &Tensor) -> Result<Vec<u8>, PluginError> {
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

/// The detections scoring at least `threshold`, most confident first, as
/// `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]` (TorchServe's `object_detector`).
pub fn detections(
    boxes: &Tensor,
    labels: &Tensor,
    scores: &Tensor,
    threshold: f64,
    names: &[String],
) -> Result<Value, PluginError> {
    let boxes = Vec::<Vec<f32>>::try_from(boxes).map_err(internal)?;
    let labels = Vec::<i64>::try_from(labels).map_err(internal)?;
    let scores = Vec::<f32>::try_from(scores).map_err(internal)?;
    if boxes.len() != labels.len() || boxes.len() != scores.len() {
        return Err(PluginError::internal(format!(
            "the detector answered {} boxes, {} labels and {} scores",
            boxes.len(),
            labels.len(),
            scores.len()
        )));
    }
    let mut found: Vec<(f32, Value)> = boxes
        .into_iter()
        .zip(labels)
        .zip(scores)
        .filter(|(_, score)| f64::from(*score) >= threshold)
        .map(|((bx, label), score)| {
            let mut object = Map::new();
            object.insert(
                cresset_torch::torchscript::label_name(names, label),
                json!(bx),
            );
            object.insert("score".into(), json!(score));
            (score, Value::Object(object))
        })
        .collect();
    found.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(Value::Array(found.into_iter().map(|(_, v)| v).collect()))
}

fn internal(e: impl std::fmt::Display) -> PluginError {
    PluginError::internal(e.to_string())
}
