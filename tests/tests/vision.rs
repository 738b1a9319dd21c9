//! Images over HTTP: TorchServe users' `image_classifier`, `image_segmenter` and
//! `object_detector` archives, made
//! by the real `torch-model-archiver` from torchvision models (scripts/make_vision_fixtures.py),
//! register and answer real photographs sent as `curl -T`, as a multipart upload and as base64
//! JSON, the same answer each way; a Cresset archive of the same model answers the same.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use cresset_e2e::{
    assert_same_classes, curl, dir_archive, repo_root, torch_model_archiver, Server,
};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let dir = repo_root().join("tests/fixtures/generated/vision");
    assert!(
        dir.join("expected.json").is_file(),
        "run `make models` first"
    );
    dir
}

/// `torch-model-archiver` (the test venv's) on a fixture model, as a `.mar` in `export`.
fn mar(model: &str, name: &str, handler: &str, export: &Path) {
    mar_of(model, "model.pt", name, handler, export);
}

/// [`mar`] of the fixture model's `file` (`model.pt`, `model.pt2`, `model.onnx`).
fn mar_of(model: &str, file: &str, name: &str, handler: &str, export: &Path) {
    let src = fixtures().join(model);
    let mut args = vec!["--model-name", name, "--version", "1.0"];
    args.extend(["--serialized-file", file, "--handler", handler]);
    if src.join("index_to_name.json").is_file() {
        args.extend(["--extra-files", "index_to_name.json"]);
    }
    torch_model_archiver(&src, &args, export);
}

fn photo(name: &str) -> PathBuf {
    fixtures().join("photos").join(name)
}

fn parse(code: u16, body: &str) -> Value {
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn image_classifier_and_segmenter_archives_answer_photos_sent_every_way() {
    let store = tempfile::tempdir().expect("tempdir");
    mar("resnet18", "resnet", "image_classifier", store.path());
    mar("segmenter", "segmenter", "image_segmenter", store.path());
    mar("detector", "detector", "object_detector", store.path());
    // torchvision's own Faster R-CNN, as TorchServe's object_detector example serves it.
    mar("fasterrcnn", "fasterrcnn", "object_detector", store.path());
    // The same classifier as an AOTInductor package and as ONNX, archived the same way.
    mar_of(
        "resnet18",
        "model.pt2",
        "resnet_aoti",
        "image_classifier",
        store.path(),
    );
    mar_of(
        "resnet18",
        "model.onnx",
        "resnet_onnx",
        "image_classifier",
        store.path(),
    );
    // A Cresset archive of the same classifier, named by the `vision` plugin, top 3.
    let model = std::fs::read(fixtures().join("resnet18/model.pt")).expect("model");
    let labels = std::fs::read(fixtures().join("resnet18/index_to_name.json")).expect("labels");
    dir_archive(
        store.path(),
        "native",
        "vision",
        "[handler]\ntopk = 3\n",
        &[("model.pt", &model), ("index_to_name.json", &labels)],
    );
    // In f32 on every CPU (`dtype = "auto"` would be bf16 where the CPU has it), to compare
    // with torchvision's f32 answers; the bf16 path is checked in the plugin's tests.
    let server = Server::start_with_env(
        &[
            "--model-store",
            store.path().to_str().expect("utf-8"),
            "--models",
            "resnet=resnet.mar,segmenter=segmenter.mar,detector=detector.mar,\
             fasterrcnn=fasterrcnn.mar,resnet_aoti=resnet_aoti.mar,resnet_onnx=resnet_onnx.mar,\
             native",
        ],
        &[("CRESSET_CPU_BF16", "0")],
    );
    server.wait_healthy();
    let url = format!("{}/predictions/resnet", server.inference);
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("expected.json")).expect("expected.json"),
    )
    .expect("json");

    for name in [
        "chelsea.png",
        "chelsea.jpg",
        "rocket.jpg",
        "coffee_portrait.png",
    ] {
        let path = photo(name);
        let path = path.to_str().expect("utf-8");
        // `curl -T photo` (a PUT of the file), a multipart upload, and base64 JSON.
        let (code, body) = curl(&["-T", path], &url);
        let put = parse(code, &body);
        let (code, body) = curl(&["-F", &format!("data=@{path}")], &url);
        let form = parse(code, &body);
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(photo(name)).expect("read"));
        let reply = server.post_json("/predictions/resnet", &json!({ "data": b64 }));
        assert_eq!(reply.status, 200, "{}", reply.text());
        // The same answer each way (to float rounding: a batch may run on another number of
        // threads).
        assert_same_classes(&put, &form);
        assert_same_classes(&put, &reply.json());
        // torchvision's top-5, by name, most probable first.
        let mut ours: Vec<(String, f64)> = put
            .as_object()
            .expect("object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().expect("prob")))
            .collect();
        ours.sort_by(|a, b| b.1.total_cmp(&a.1));
        let want: Vec<String> = expected["photos"][name]["top5"]
            .as_array()
            .expect("top5")
            .iter()
            .map(|i| match i.as_u64().expect("index") {
                281 => "tabby".to_owned(),
                i => format!("class_{i}"),
            })
            .collect();
        let names: Vec<String> = ours.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, want, "{name}");
        // The AOTInductor and ONNX archives answer as the TorchScript one.
        for other in ["resnet_aoti", "resnet_onnx"] {
            let (code, body) = curl(
                &["-T", path],
                &format!("{}/predictions/{other}", server.inference),
            );
            assert_same_classes(&put, &parse(code, &body));
        }
    }

    // KServe v1: several images in one request, one prediction each.
    let b64 = |name: &str| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(photo(name)).expect("read"))
    };
    let reply = server.post_json(
        "/v1/models/resnet:predict",
        &json!({"instances": [{"data": b64("chelsea.png")}, {"data": b64("rocket.jpg")}]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (_, single) = curl(&["-T", photo("chelsea.png").to_str().expect("utf-8")], &url);
    // Batched, the convolutions round differently in the last bits.
    assert_same_classes(
        &reply.json()["predictions"][0],
        &serde_json::from_str::<Value>(&single).expect("json"),
    );

    // A bad image is a 400 that says why; the model goes on answering.
    let (code, body) = curl(
        &[
            "--data-binary",
            "not an image",
            "-H",
            "Content-Type: image/jpeg",
        ],
        &url,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not an image"), "{body}");
    let (code, _) = curl(&["-T", photo("chelsea.jpg").to_str().expect("utf-8")], &url);
    assert_eq!(code, 200);

    // The segmenter: per pixel [class, probability] over the 224 × 224 crop.
    let (code, body) = curl(
        &["-T", photo("chelsea.png").to_str().expect("utf-8")],
        &format!("{}/predictions/segmenter", server.inference),
    );
    let map = parse(code, &body);
    let rows = map.as_array().expect("rows");
    assert_eq!(rows.len(), 224);
    assert_eq!(rows[0].as_array().expect("row").len(), 224);
    assert_eq!(rows[0][0].as_array().expect("pixel").len(), 2);

    // The detector: objects over the threshold (0.5), `{label: box, "score": s}`.
    let (code, body) = curl(
        &["-T", photo("chelsea.jpg").to_str().expect("utf-8")],
        &format!("{}/predictions/detector", server.inference),
    );
    let objects = parse(code, &body);
    let objects = objects.as_array().expect("a list");
    assert!(!objects.is_empty(), "{body}");
    for object in objects {
        assert!(
            object["score"].as_f64().is_some_and(|s| s >= 0.5),
            "{object}"
        );
        let boxed = object
            .as_object()
            .expect("object")
            .iter()
            .find(|(k, _)| *k != "score")
            .map(|(k, v)| (k.clone(), v.as_array().map(Vec::len)));
        assert!(
            matches!(&boxed, Some((label, Some(4))) if label == "cat" || label == "dog"),
            "{object}"
        );
    }

    // Faster R-CNN loads (torchvision's nms and roi_align are in the process) and answers a
    // list per image; its random weights score nothing near the 0.5 threshold.
    let (code, body) = curl(
        &["-T", photo("rocket.jpg").to_str().expect("utf-8")],
        &format!("{}/predictions/fasterrcnn", server.inference),
    );
    assert_eq!(parse(code, &body), json!([]), "{body}");

    // The Cresset archive answers the .mar's top 3.
    let (code, body) = curl(
        &["-T", photo("chelsea.png").to_str().expect("utf-8")],
        &format!("{}/predictions/native", server.inference),
    );
    let native = parse(code, &body);
    let full = serde_json::from_str::<Value>(&single).expect("json");
    assert_eq!(native.as_object().expect("object").len(), 3);
    for (label, p) in native.as_object().expect("object") {
        let (p, q) = (p.as_f64().unwrap_or(f64::NAN), full[label].as_f64());
        assert!(
            q.is_some_and(|q| (p - q).abs() <= 1e-6),
            "{label}: {p} vs {q:?}"
        );
    }
}

/// SSDlite exported per image to ONNX and as an AOTInductor package, each archived by
/// `torch-model-archiver` with `--handler object_detector` (and a `model-config.yaml` that sets
/// the handler's `threshold` to 0, so that the random weights' detections show): both answer a
/// photograph sent with `curl -T` with the same objects.
#[test]
fn exported_detector_archives_answer_alike() {
    let store = tempfile::tempdir().expect("tempdir");
    let config = store.path().join("model-config.yaml");
    std::fs::write(&config, "handler:\n  threshold: 0.0\n").expect("write");
    let src = fixtures().join("ssdlite_export");
    for (file, name) in [("model.onnx", "ssd_onnx"), ("model.pt2", "ssd_aoti")] {
        let args = [
            "--model-name",
            name,
            "--version",
            "1.0",
            "--serialized-file",
            file,
            "--handler",
            "object_detector",
            "--extra-files",
            "index_to_name.json",
            "--config-file",
            config.to_str().expect("utf-8"),
        ];
        torch_model_archiver(&src, &args, store.path());
    }
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "ssd_onnx=ssd_onnx.mar,ssd_aoti=ssd_aoti.mar",
    ]);
    server.wait_healthy();
    let answer = |model: &str| -> Vec<(String, Vec<f64>, f64)> {
        let (code, body) = curl(
            &["-T", photo("chelsea.jpg").to_str().expect("utf-8")],
            &format!("{}/predictions/{model}", server.inference),
        );
        parse(code, &body)
            .as_array()
            .expect("a list")
            .iter()
            .map(|object| {
                let object = object.as_object().expect("object");
                let (label, bx) = object.iter().find(|(k, _)| *k != "score").expect("label");
                let bx = bx
                    .as_array()
                    .expect("box")
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                (label.clone(), bx, object["score"].as_f64().expect("score"))
            })
            .collect()
    };
    let (onnx, aoti) = (answer("ssd_onnx"), answer("ssd_aoti"));
    assert_eq!(onnx.len(), 20, "{onnx:?}");
    assert_eq!(onnx.len(), aoti.len());
    for (label, bx, score) in &onnx {
        assert!(label == "cat" || label == "dog", "{label}");
        assert!(
            aoti.iter().any(|(l, b, s)| l == label
                && (s - score).abs() <= 1e-4
                && b.iter().zip(bx).all(|(p, q)| (p - q).abs() <= 1e-2)),
            "{label} {bx:?} {score}: not in {aoti:?}"
        );
    }
}
