//! The vision handler against torchvision on real photographs (scripts/make_vision_fixtures.py,
//! made by `make models`): the preprocessed tensors, the classifier's top-5 and the
//! segmenter's class maps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cresset_plugin_api::sdk::{testing, Handler};
use cresset_plugin_api::ErrorCode;
use cresset_plugin_vision::VisionHandler;
use cresset_torch::tch::{Kind, Tensor};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/generated/vision");
    assert!(
        dir.join("expected.json").is_file(),
        "run `make models` first"
    );
    dir
}

/// torchvision's tensors for the photographs (preprocessed inputs, segmentations, detections).
fn reference() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join("preprocessed.safetensors"))
        .expect("safetensors")
        .into_iter()
        .collect()
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).expect("read"))
        .expect("json")
}

fn photos() -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<String> = expected()["photos"]
        .as_object()
        .expect("photos")
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(fixtures().join("photos").join(&n)).expect("photo");
            (n, bytes)
        })
        .collect()
}

/// The handler for a fixture model, in f32 unless `config` names a dtype (the default, `auto`,
/// is bf16 on a CPU with native bf16: the comparisons with torchvision's f32 are in f32).
fn handler(model: &str, mut config: Value) -> VisionHandler {
    if config.get("dtype").is_none() {
        config["dtype"] = json!("float32");
    }
    VisionHandler::initialize(&testing::init_context(fixtures().join(model), config))
        .unwrap_or_else(|e| panic!("{}", e.message))
}

/// Every format decodes to PIL's pixels (JPEG through libjpeg-turbo's decoder, as PIL's), and
/// the resize is Pillow's to the byte, so the tensors are torchvision's.
#[test]
fn preprocessing_matches_torchvision_on_real_photographs() {
    let reference = reference();
    let h = handler("resnet18", json!({}));
    let mut report = Vec::new();
    for (name, bytes) in photos() {
        let ours = h
            .prepare(&bytes)
            .unwrap_or_else(|e| panic!("{name}: {}", e.message));
        let theirs = &reference[&name];
        assert_eq!(ours.size(), theirs.size(), "{name}");
        let diff = (&ours - theirs).abs().max().double_value(&[]);
        report.push(format!("{name}: {diff:.2e}"));
        // Exact: PIL's pixels (JPEG through the same libjpeg-turbo code) and Pillow's resize.
        assert!(diff <= 1e-6, "{name}: max abs diff {diff}");
    }
    eprintln!(
        "preprocessed tensors vs torchvision, max abs diff: {}",
        report.join(", ")
    );
}

fn top5(answer: &Value) -> Vec<(String, f64)> {
    let mut pairs: Vec<(String, f64)> = answer
        .as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().expect("prob")))
        .collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs
}

fn label(index: u64) -> String {
    if index == 281 {
        "tabby".into()
    } else {
        format!("class_{index}")
    }
}

/// Every class's probability, from a handler answering all 1000, against the softmax of
/// torchvision's logits.
#[test]
fn every_class_probability_matches_torchvision() {
    // Optimized (libtorch's optimize_for_inference, the default on the CPU) and as scripted.
    for optimize in [true, false] {
        let mut h = handler("resnet18", json!({"topk": 1000, "optimize": optimize}));
        every_probability_vs_torchvision(&mut h, &format!("optimize = {optimize}"));
    }
}

/// A classifier's answers for every photo (one request each) against the softmax of
/// torchvision's logits: all 1000 probabilities within 1e-6.
fn every_probability_vs_torchvision(h: &mut VisionHandler, what: &str) {
    let expected = expected();
    {
        for (name, bytes) in photos() {
            let logits: Vec<f64> = expected["photos"][&name]["logits"]
                .as_array()
                .expect("logits")
                .iter()
                .map(|v| v.as_f64().expect("logit"))
                .collect();
            let top = logits.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = logits.iter().map(|l| (l - top).exp()).sum();
            let run = testing::run(h, &[testing::request("", bytes)]);
            let body: Value =
                serde_json::from_slice(&run.finals[0].as_ref().expect("answered").body)
                    .expect("json");
            let answer = body.as_object().expect("object");
            assert_eq!(answer.len(), 1000, "{what}: {name}");
            let mut worst = 0f64;
            for (i, l) in logits.iter().enumerate() {
                let p = answer[&label(i as u64)].as_f64().expect("prob");
                worst = worst.max((p - (l - top).exp() / total).abs());
            }
            assert!(
                worst <= 1e-6,
                "{what}: {name}: probabilities differ by {worst}"
            );
        }
    }
}

#[test]
fn the_classifier_answers_torchvisions_top5_per_photo_and_batches_them_in_one_pass() {
    let expected = expected();
    let mut h = handler("resnet18", json!({}));
    let photos = photos();
    let requests: Vec<_> = photos
        .iter()
        .map(|(_, bytes)| testing::request("", bytes.clone()))
        .collect();
    let run = testing::run(&mut h, &requests);
    assert_eq!(h.forward_passes, 1, "one forward pass for the whole batch");
    for ((name, _), result) in photos.iter().zip(&run.finals) {
        let spec = &expected["photos"][name];
        let body: Value =
            serde_json::from_slice(&result.as_ref().expect("answered").body).expect("json");
        let ours = top5(&body);
        let want: Vec<String> = spec["top5"]
            .as_array()
            .expect("top5")
            .iter()
            .map(|i| label(i.as_u64().expect("index")))
            .collect();
        let names: Vec<String> = ours.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names, want,
            "{name}: top-5 (margin 5/6: {})",
            spec["margin_5_6"]
        );
        for ((_, p), q) in ours
            .iter()
            .zip(spec["top5_probs"].as_array().expect("probs"))
        {
            let q = q.as_f64().expect("prob");
            assert!((p - q).abs() <= 1e-6, "{name}: {p} vs {q}");
        }
    }
}

#[test]
fn a_bad_image_fails_alone_and_its_neighbours_are_answered() {
    let mut h = handler("resnet18", json!({"max_image_pixels": 200_000}));
    let photos = photos();
    let cat = &photos
        .iter()
        .find(|(n, _)| n == "chelsea.jpg")
        .expect("cat")
        .1;
    let big = &photos
        .iter()
        .find(|(n, _)| n == "motorcycle_left.png")
        .expect("motorcycle")
        .1;
    // A 50k × 50k PNG is a few hundred bytes of header and zeros: refused before decoding.
    let mut bomb = Vec::new();
    {
        let mut encoder = png_header(50_000, 50_000);
        bomb.append(&mut encoder);
    }
    let requests = [
        testing::request("image/jpeg", cat.clone()),
        testing::request("image/jpeg", cat[..cat.len() / 2].to_vec()),
        testing::request("image/png", bomb),
        testing::request("text/plain", "not an image"),
        testing::request("image/png", big.clone()),
        testing::request("image/jpeg", cat.clone()),
    ];
    let run = testing::run(&mut h, &requests);
    let answer = |i: usize| -> Value {
        serde_json::from_slice(&run.finals[i].as_ref().expect("answered").body).expect("json")
    };
    assert_eq!(answer(0), answer(5));
    for (i, want) in [
        (1, "truncated"),
        (2, "decompression bomb"),
        (3, "not an image"),
        (4, "max_image_pixels"),
    ] {
        let err = run.finals[i].as_ref().expect_err("refused");
        assert_eq!(err.code, ErrorCode::INVALID_INPUT, "{i}");
        assert!(err.message.contains(want), "{i}: {}", err.message);
    }
}

/// The start of a PNG of this size (8-bit RGB): its signature, IHDR, and a first IDAT chunk of
/// zlib-compressed zeros, which is what a decompression bomb looks like to a decoder before it
/// allocates.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut typed = kind.to_vec();
        typed.extend(data);
        out.extend(&typed);
        out.extend(crc32(&typed).to_be_bytes());
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    // A zlib stream header and a run of a stored-nothing deflate block: enough to start.
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9C, 0x63, 0x60, 0x18, 0x05, 0xA3, 0x60],
    );
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The segmenter's answer for one photo against torchvision's class map: how many pixels
/// differ (each only where torchvision's top two classes nearly tie) and the largest
/// probability difference elsewhere.
fn segmentation_vs_torchvision(
    h: &mut VisionHandler,
    reference: &HashMap<String, Tensor>,
    name: &str,
    bytes: &[u8],
) -> (usize, f64) {
    let run = testing::run(h, &[testing::request("", bytes.to_vec())]);
    let body: Value =
        serde_json::from_slice(&run.finals[0].as_ref().expect("answered").body).expect("json");
    // [224][224][class, prob], as TorchServe's image_segmenter answers.
    let rows = body.as_array().expect("rows");
    assert_eq!(rows.len(), 224, "{name}");
    let classes = Vec::<u8>::try_from(reference[&format!("segment_classes:{name}")].flatten(0, -1))
        .expect("classes");
    let probs = Vec::<f32>::try_from(reference[&format!("segment_probs:{name}")].flatten(0, -1))
        .expect("probs");
    let margins =
        Vec::<f32>::try_from(reference[&format!("segment_margins:{name}")].flatten(0, -1))
            .expect("margins");
    let (mut differ, mut worst) = (0usize, 0f64);
    for (y, row) in rows.iter().enumerate() {
        let row = row.as_array().expect("row");
        assert_eq!(row.len(), 224, "{name}");
        for (x, pixel) in row.iter().enumerate() {
            let at = y * 224 + x;
            if pixel[0].as_f64().expect("class") as u8 != classes[at] {
                // Only a near tie may go the other way: the optimized module's rounding
                // (about 1e-6) differs from eager PyTorch's.
                assert!(
                    margins[at] < 1e-4,
                    "{name}: pixel {x},{y} (lead {})",
                    margins[at]
                );
                differ += 1;
            } else {
                worst = worst.max((pixel[1].as_f64().expect("prob") - probs[at] as f64).abs());
            }
        }
    }
    (differ, worst)
}

#[test]
fn the_segmenter_answers_torchvisions_class_map() {
    let reference = reference();
    let mut h = handler("segmenter", json!({}));
    let mut report = Vec::new();
    for (name, bytes) in photos() {
        let (differ, worst) = segmentation_vs_torchvision(&mut h, &reference, &name, &bytes);
        report.push(format!("{name}: {differ} pixels differ, {worst:.1e}"));
        assert!(differ <= 5, "{name}: {differ} pixels differ");
        assert!(worst <= 1e-4, "{name}: {worst}");
    }
    eprintln!("segmentation vs torchvision: {}", report.join(", "));
    // The class map as a PNG: one gray level per class.
    let mut png = handler("segmenter", json!({"segmentation_format": "png"}));
    let (_, cat) = photos()
        .into_iter()
        .find(|(n, _)| n == "chelsea.png")
        .expect("cat");
    let run = testing::run(&mut png, &[testing::request("image/png", cat)]);
    let response = run.finals[0].as_ref().expect("answered");
    assert_eq!(response.content_type.as_str(), "image/png");
    let map = image::load_from_memory(&response.body)
        .expect("png")
        .to_luma8();
    assert_eq!((map.width(), map.height()), (224, 224));
    let want = Vec::<u8>::try_from(reference["segment_classes:chelsea.png"].flatten(0, -1))
        .expect("classes");
    let differ = map
        .into_raw()
        .iter()
        .zip(&want)
        .filter(|(a, b)| a != b)
        .count();
    assert!(differ <= 5, "{differ} pixels differ");
}

/// The classifier and the segmenter exported by the fixture script as an AOTInductor package
/// (`model.pt2`) and as ONNX (`model.onnx`): every class probability within 1e-6 of
/// torchvision's, and the class maps as torchvision's. With `batch_size = 4` the eleven photos
/// of one batch run in passes of at most four images (the batch the model was checked with at
/// load); the answers are the same.
#[test]
fn aoti_and_onnx_models_answer_as_torchvision() {
    let reference = reference();
    for file in ["model.pt2", "model.onnx"] {
        let mut h = handler("resnet18", json!({"model_file": file, "topk": 1000}));
        every_probability_vs_torchvision(&mut h, file);
        let mut ctx = testing::init_context(
            fixtures().join("resnet18"),
            json!({"model_file": file, "topk": 1000}),
        );
        ctx.model_config["batch_size"] = json!(4);
        let mut batched =
            VisionHandler::initialize(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
        let photos = photos();
        let requests: Vec<_> = photos
            .iter()
            .map(|(_, bytes)| testing::request("", bytes.clone()))
            .collect();
        let together = testing::run(&mut batched, &requests);
        for ((name, bytes), result) in photos.iter().zip(&together.finals) {
            let alone = testing::run(&mut h, &[testing::request("", bytes.clone())]);
            let a: Value =
                serde_json::from_slice(&result.as_ref().expect("answered").body).expect("json");
            let b: Value =
                serde_json::from_slice(&alone.finals[0].as_ref().expect("answered").body)
                    .expect("json");
            let worst = a
                .as_object()
                .expect("object")
                .iter()
                .map(|(k, p)| (p.as_f64().expect("p") - b[k].as_f64().expect("q")).abs())
                .fold(0f64, f64::max);
            assert!(
                worst <= 1e-6,
                "{file}: {name}: batched and alone differ by {worst}"
            );
        }
        let mut seg = handler("segmenter", json!({"model_file": file}));
        for (name, bytes) in photos {
            let (differ, worst) = segmentation_vs_torchvision(&mut seg, &reference, &name, &bytes);
            assert!(differ <= 5, "{file}: {name}: {differ} pixels differ");
            assert!(worst <= 1e-4, "{file}: {name}: {worst}");
        }
    }
}

/// Real weights: EfficientNet-Lite0 with its ImageNet-1k weights (from the package index,
/// pinned by sha256; scripts/make_real_classifier_fixtures.py traced it to TorchScript and
/// exported it to ONNX) names the photographs as PyTorch does, top 5 in order (the closest
/// two neighbours in any top 5 are 0.0097 apart in logits), probabilities within 1e-4: the cat
/// is a cat, the coffee espresso, the camera on its tripod a tripod.
#[test]
fn a_real_imagenet_classifier_names_the_photographs_as_pytorch_does() {
    let dir = fixtures().join("../effnet-lite0");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).expect("read"))
            .expect("json");
    for file in ["model.pt", "model.onnx"] {
        let config = json!({
            "model_file": file,
            "mean": expected["mean"],
            "std": expected["std"],
            "dtype": "float32",
        });
        let mut h = VisionHandler::initialize(&testing::init_context(&dir, config))
            .unwrap_or_else(|e| panic!("{file}: {}", e.message));
        let mut report = Vec::new();
        for (name, bytes) in photos() {
            let spec = &expected["photos"][&name];
            let run = testing::run(&mut h, &[testing::request("", bytes)]);
            let ours = top5(
                &serde_json::from_slice(&run.finals[0].as_ref().expect("answered").body)
                    .expect("json"),
            );
            let want: Vec<&str> = spec["top5"]
                .as_array()
                .expect("top5")
                .iter()
                .map(|v| v.as_str().expect("name"))
                .collect();
            let names: Vec<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, want, "{file}: {name}");
            for ((_, p), q) in ours
                .iter()
                .zip(spec["top5_probs"].as_array().expect("probs"))
            {
                let q = q.as_f64().expect("prob");
                assert!((p - q).abs() <= 1e-4, "{file}: {name}: {p} vs {q}");
            }
            report.push(format!("{name}: {}", names[0]));
            let top1 = names[0];
            if name.starts_with("chelsea") {
                assert!(
                    top1.ends_with(" cat") || top1 == "tabby",
                    "{file}: {name}: {top1}"
                );
            }
            if name.starts_with("coffee") {
                assert_eq!(top1, "espresso", "{file}: {name}");
            }
        }
        eprintln!("EfficientNet-Lite0 ({file}), top 1: {}", report.join(", "));
    }
}

/// bf16 (`dtype = "auto"` on a CPU with native bf16; named here so that every CPU runs it):
/// the real EfficientNet-Lite0 names each photograph's top class as PyTorch does in f32 where
/// f32's first two classes are not within 2 × BF16_PROB_TOLERANCE of each other, and its
/// top-5 probabilities stay within BF16_PROB_TOLERANCE of f32's. `auto` is bf16 exactly for
/// TorchScript classifiers and segmenters on such a CPU.
#[test]
fn bf16_keeps_the_real_classifiers_answers_and_auto_picks_it_where_the_cpu_has_it() {
    let dir = fixtures().join("../effnet-lite0");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).expect("read"))
            .expect("json");
    let config = json!({
        "model_file": "model.pt",
        "mean": expected["mean"],
        "std": expected["std"],
        "dtype": "bfloat16",
    });
    let mut h = VisionHandler::initialize(&testing::init_context(&dir, config))
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert_eq!(h.dtype(), Kind::BFloat16);
    let mut worst: f64 = 0.0;
    let mut agree = 0;
    let photos = photos();
    for (name, bytes) in &photos {
        let spec = &expected["photos"][name];
        let run = testing::run(&mut h, &[testing::request("", bytes.clone())]);
        let body: Value =
            serde_json::from_slice(&run.finals[0].as_ref().expect("answered").body).expect("json");
        let ours = top5(&body);
        // bf16 rounds the logits themselves (8 bits of mantissa: 0.0625 apart near 10), so
        // classes within a few thousandths of each other may trade places; a clear winner
        // stays the winner.
        let margin = spec["top5_probs"][0].as_f64().expect("prob")
            - spec["top5_probs"][1].as_f64().expect("prob");
        let same = ours[0].0 == spec["top5"][0].as_str().expect("name");
        assert!(
            same || margin < 2.0 * BF16_PROB_TOLERANCE,
            "{name}: {ours:?}"
        );
        agree += usize::from(same);
        // Each of PyTorch's top 5, by name, against what bf16 gives it (0 if it fell out).
        for (k, want) in spec["top5"].as_array().expect("top5").iter().enumerate() {
            let want = want.as_str().expect("name");
            let q = spec["top5_probs"][k].as_f64().expect("prob");
            let p = body[want].as_f64().unwrap_or(0.0);
            worst = worst.max((p - q).abs());
        }
    }
    eprintln!(
        "EfficientNet-Lite0 in bf16 on {} photographs: top 1 as f32 on {agree}, largest top-5 \
         probability difference {worst:.4}",
        photos.len()
    );
    assert!(worst <= BF16_PROB_TOLERANCE, "{worst}");
    // The same images in one batch answer as they do one by one.
    let requests: Vec<_> = photos
        .iter()
        .map(|(_, bytes)| testing::request("", bytes.clone()))
        .collect();
    let batched = testing::run(&mut h, &requests);
    for ((name, bytes), result) in photos.iter().zip(&batched.finals) {
        let alone = testing::run(&mut h, &[testing::request("", bytes.clone())]);
        let parse = |r: &Result<cresset_plugin_api::Response, _>| -> Value {
            serde_json::from_slice(&r.as_ref().expect("answered").body).expect("json")
        };
        assert_eq!(
            top5(&parse(result))[0].0,
            top5(&parse(&alone.finals[0]))[0].0,
            "{name}"
        );
    }

    // `auto`: bf16 for a TorchScript classifier where the CPU has it; compiled models and
    // detectors in f32 everywhere.
    let native = cresset_torch::layers::cpu_has_native_bf16();
    for (model, file, want) in [
        (
            "resnet18",
            "model.pt",
            if native { Kind::BFloat16 } else { Kind::Float },
        ),
        ("resnet18", "model.onnx", Kind::Float),
        ("resnet18", "model.pt2", Kind::Float),
        ("detector", "model.pt", Kind::Float),
    ] {
        let h = handler(model, json!({"model_file": file, "dtype": "auto"}));
        assert_eq!(h.dtype(), want, "{model}/{file}");
    }
}

/// How far bf16 may move a top-5 probability of the real classifier. bf16 keeps 8 bits of
/// mantissa: each value rounds by up to 2^-9 relative, and the logits themselves (about 10 in
/// size) land on a grid 0.0625 apart. A probability p moves by about p·Δlogit, so logits off by
/// one to two grid steps move p ≈ 0.4 by 0.025 to 0.05. Measured on the 11 photographs: 0.044
/// at most (the rocket's 0.364 became 0.409); top 1 as f32 on 7, the other four f32 near-ties
/// (the cat in three formats, 0.379 vs 0.375; the astronaut, 0.131 vs 0.124).
const BF16_PROB_TOLERANCE: f64 = 0.05;

/// The format is told by the file, or named; a file that is not what `format` names, or a
/// package whose input the preprocessing does not make, is refused at load with the reason.
#[test]
fn model_formats_are_found_or_named_and_checked_at_load() {
    let dir = fixtures().join("resnet18");
    for (config, want) in [
        (
            json!({"model_file": "model.pt2", "format": "onnx"}),
            "cannot load",
        ),
        (
            json!({"model_file": "model.onnx", "format": "aoti"}),
            "cannot load",
        ),
        (
            json!({"model_file": "model.pt2", "crop": 200}),
            "static sizes",
        ),
        (json!({"model_file": "model.pt2", "crop": 0}), "keep a crop"),
        (
            json!({"model_file": "model.onnx", "crop": 200}),
            "cannot load",
        ),
        (
            json!({"model_file": "model.pt2", "format": "tflite"}),
            "format",
        ),
    ] {
        let err = VisionHandler::initialize(&testing::init_context(&dir, config.clone()))
            .err()
            .unwrap_or_else(|| panic!("{config}: loaded"));
        assert_eq!(
            err.code,
            ErrorCode::INVALID_INPUT,
            "{config}: {}",
            err.message
        );
        assert!(err.message.contains(want), "{config}: {}", err.message);
    }
}

#[test]
fn settings_are_typed_and_checked() {
    let dir = fixtures().join("resnet18");
    for (config, want) in [
        (json!({"topk": 0}), "`handler.topk`"),
        (json!({"crop": 100_000}), "`handler.crop`"),
        (json!({"std": [0.2, 0.0, 0.2]}), "`handler.std`"),
        (json!({"interpolation": "cubic"}), "`handler.interpolation`"),
        (json!({"treshold": 0.5}), "unknown"),
        (json!({"mean": [0.5, 0.5]}), "`handler.mean`"),
        (json!({"dtype": "int3"}), "`handler.dtype`"),
        (
            json!({"model_file": "model.onnx", "dtype": "bfloat16"}),
            "runs in float32",
        ),
    ] {
        let err = VisionHandler::initialize(&testing::init_context(dir.clone(), config.clone()))
            .err()
            .expect("refused");
        assert!(err.message.contains(want), "{config}: {}", err.message);
    }
    // A classifier told it segments says so, naming the setting.
    let mut h = handler("resnet18", json!({"task": "segment"}));
    let (_, cat) = photos()
        .into_iter()
        .find(|(n, _)| n == "chelsea.png")
        .expect("cat");
    let run = testing::run(&mut h, &[testing::request("image/png", cat)]);
    let err = run.finals[0].as_ref().expect_err("refused");
    assert!(err.message.contains("`handler.task`"), "{}", err.message);
}

/// What a detector gave in Python for one photograph: boxes, labels, scores (`{prefix}_boxes:NAME`
/// and so on in the reference tensors).
type Detections = (Vec<Vec<f32>>, Vec<i64>, Vec<f32>);

fn detections_of(reference: &HashMap<String, Tensor>, prefix: &str, name: &str) -> Detections {
    let get = |what: &str| &reference[&format!("{prefix}_{what}:{name}")];
    (
        Vec::<Vec<f32>>::try_from(get("boxes")).expect("boxes"),
        Vec::<i64>::try_from(get("labels")).expect("labels"),
        Vec::<f32>::try_from(get("scores")).expect("scores"),
    )
}

/// The photographs the detectors were run on in Python, as requests.
fn detection_requests() -> (Vec<String>, Vec<cresset_plugin_api::Request>) {
    let names: Vec<String> = expected()["detected"]
        .as_array()
        .expect("detected")
        .iter()
        .map(|n| n.as_str().expect("name").to_owned())
        .collect();
    let photos = photos();
    let requests = names
        .iter()
        .map(|n| {
            let bytes = &photos.iter().find(|(p, _)| p == n).expect("photo").1;
            testing::request("", bytes.clone())
        })
        .collect();
    (names, requests)
}

/// A scripted detector in torchvision's detectors' shape (a list of images of any sizes in,
/// `(losses, [{"boxes", "labels", "scores"}])` out) on three photographs in one batch: its
/// detections, in TorchServe's `object_detector` shape, named by `index_to_name.json`.
#[test]
fn a_detector_answers_its_detections_in_torchserves_shape() {
    let reference = reference();
    let (names, requests) = detection_requests();
    for threshold in [0.0, 0.45] {
        let mut h = handler("detector", json!({ "threshold": threshold }));
        assert!(h.is_detector());
        let run = testing::run(&mut h, &requests);
        assert_eq!(h.forward_passes, 1, "one pass for images of three sizes");
        for (name, result) in names.iter().zip(&run.finals) {
            let body: Value =
                serde_json::from_slice(&result.as_ref().expect("answered").body).expect("json");
            let found = body.as_array().expect("a list of objects");
            let (boxes, labels, scores) = detections_of(&reference, "detect", name);
            // What torchvision's model gave, over the threshold, most confident first.
            let mut want: Vec<usize> = (0..scores.len())
                .filter(|&i| scores[i] as f64 >= threshold)
                .collect();
            want.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            assert_eq!(found.len(), want.len(), "{name} at {threshold}: {body}");
            for (object, &i) in found.iter().zip(&want) {
                let object = object.as_object().expect("object");
                let score = object["score"].as_f64().expect("score");
                assert!((score - scores[i] as f64).abs() <= 1e-6, "{name}: {score}");
                let label = ["", "cat", "dog"][labels[i] as usize];
                let bx: Vec<f64> = object[label]
                    .as_array()
                    .expect("box")
                    .iter()
                    .map(|v| v.as_f64().expect("coordinate"))
                    .collect();
                for (a, b) in bx.iter().zip(&boxes[i]) {
                    assert!(
                        (a - *b as f64).abs() <= 1e-4,
                        "{name}: {bx:?} vs {:?}",
                        boxes[i]
                    );
                }
            }
        }
    }
    // The task is checked against the model, both ways.
    for (model, task) in [("detector", "classify"), ("resnet18", "detect")] {
        let err = VisionHandler::initialize(&testing::init_context(
            fixtures().join(model),
            json!({ "task": task }),
        ))
        .err()
        .expect("refused");
        assert!(err.message.contains("`handler.task`"), "{}", err.message);
    }
}

/// torchvision's SSDlite and Faster R-CNN, scripted (they call `torchvision::nms` and
/// `torchvision::roi_align`, which Cresset registers itself): on three photographs in one pass,
/// the detections torchvision gives.
#[test]
fn torchvisions_ssdlite_and_faster_rcnn_load_and_answer_their_detections() {
    check_torchvision_detector("ssdlite", "ssd");
    check_torchvision_detector("fasterrcnn", "frcnn");
}

/// SSDlite exported per image to ONNX and as an AOTInductor package (`[3, H, W]` in; boxes,
/// labels, scores out): loaded as detectors, they give eager PyTorch's detections for the
/// three photographs (of three sizes), one request each or all in one batch; an image the
/// package was not compiled for (over 4096 pixels high) fails alone, with the package's bound.
#[test]
fn exported_detectors_answer_as_pytorch() {
    for file in ["model.onnx", "model.pt2"] {
        check_detector("ssdlite_export", file, "ssdx");
    }
    let mut h = handler(
        "ssdlite_export",
        json!({"model_file": "model.pt2", "threshold": 0.0}),
    );
    let tall = {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(64, 4100)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        png
    };
    let (_, mut requests) = detection_requests();
    requests.insert(1, testing::request("image/png", tall));
    let run = testing::run(&mut h, &requests);
    let err = run.finals[1].as_ref().expect_err("refused");
    assert!(err.message.contains("at most 4096"), "{}", err.message);
    for (i, answer) in run.finals.iter().enumerate() {
        assert!(i == 1 || answer.is_ok(), "{i}");
    }
}

fn check_torchvision_detector(model: &str, prefix: &str) {
    check_detector(model, "model.pt", prefix);
}

fn check_detector(model: &str, file: &str, prefix: &str) {
    let reference = reference();
    let (names, requests) = detection_requests();
    let mut h = handler(model, json!({"threshold": 0.0, "model_file": file}));
    // Labels are named by the model's index_to_name.json where it has one.
    let names_file = fixtures().join(model).join("index_to_name.json");
    let label_names: Value = std::fs::read(&names_file)
        .map(|b| serde_json::from_slice(&b).expect("labels"))
        .unwrap_or(json!({}));
    let label_of = |i: i64| {
        label_names[i.to_string()]
            .as_str()
            .map_or_else(|| i.to_string(), str::to_owned)
    };
    assert!(h.is_detector());
    let run = testing::run(&mut h, &requests);
    assert_eq!(h.forward_passes, 1);
    for (name, result) in names.iter().zip(&run.finals) {
        let body: Value =
            serde_json::from_slice(&result.as_ref().expect("answered").body).expect("json");
        let found = body.as_array().expect("a list of objects");
        let (boxes, labels, scores) = detections_of(&reference, prefix, name);
        assert_eq!(found.len(), boxes.len(), "{name}");
        // Most confident first; each of torchvision's detections found once, with its label,
        // box and score. Scores a few 1e-7 apart may trade places: the model's convolutions
        // round with the threads they run on.
        let parsed: Vec<(String, Vec<f64>, f64)> = found
            .iter()
            .map(|object| {
                let object = object.as_object().expect("object");
                let (label, bx) = object.iter().find(|(k, _)| *k != "score").expect("a label");
                let bx = bx
                    .as_array()
                    .expect("box")
                    .iter()
                    .map(|v| v.as_f64().expect("coordinate"))
                    .collect();
                (label.clone(), bx, object["score"].as_f64().expect("score"))
            })
            .collect();
        assert!(
            parsed.windows(2).all(|w| w[0].2 >= w[1].2),
            "{name}: not sorted"
        );
        let mut used = vec![false; parsed.len()];
        for i in 0..boxes.len() {
            let at = parsed
                .iter()
                .enumerate()
                .position(|(j, (label, bx, score))| {
                    !used[j]
                        && *label == label_of(labels[i])
                        && (score - scores[i] as f64).abs() <= 1e-5
                        && bx
                            .iter()
                            .zip(&boxes[i])
                            .all(|(a, b)| (a - *b as f64).abs() <= 1e-3)
                });
            let at = at.unwrap_or_else(|| {
                panic!("{model}/{file} on {name}: torchvision's detection #{i} is missing")
            });
            used[at] = true;
        }
    }
}
