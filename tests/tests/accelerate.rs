//! The accelerate handler served end to end: an archive made as TorchServe's Accelerate
//! example makes it (the checkpoint in `model/`, a `setup_config.json` beside it), built with
//! `cresset archive`, loaded by the real server with a device map that offloads the second of
//! BLOOM's two layers to disk (the plugin tests check where layers land),
//! answering over real HTTP as transformers does.

use cresset_e2e::{repo_root, run_archiver, Server};
use serde_json::{json, Value};

/// The BLOOM fixture: its checkpoint folder, prompt and transformers' 32 greedy tokens as text.
fn bloom() -> (std::path::PathBuf, String, String) {
    let fixtures = repo_root().join("tests/fixtures/generated/llm");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("expected.json")).expect("run `make models`"),
    )
    .expect("JSON");
    let spec = &expected["bloom-tiny"];
    let checkpoint = fixtures.join(spec["dir"].as_str().expect("dir"));
    let ids: Vec<u32> = spec["greedy_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    let want = tokenizers::Tokenizer::from_file(checkpoint.join("tokenizer.json"))
        .expect("tokenizer")
        .decode(&ids, true)
        .expect("decode");
    let prompt = spec["prompt"].as_str().expect("prompt").to_owned();
    (checkpoint, prompt, want)
}

/// The reference's `setup_config.json` in `dir`, with BLOOM's second layer on disk.
fn setup_config(dir: &std::path::Path) -> std::path::PathBuf {
    let setup = dir.join("setup_config.json");
    std::fs::write(
        &setup,
        json!({
            "revision": "main",
            "low_cpu_mem_usage": true,
            "device_map": {"": "cpu", "transformer.h.1": "disk"},
            "offload_folder": "offload",
            "offload_state_dict": true,
            "torch_dtype": "float32",
            "max_length": 64,
            "max_new_tokens": 32
        })
        .to_string(),
    )
    .expect("write setup_config.json");
    setup
}

#[test]
fn a_torchserve_style_bloom_archive_serves_with_layers_on_disk() {
    let (checkpoint, prompt, want) = bloom();
    // The reference's layout: model/ and setup_config.json.
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    for entry in std::fs::read_dir(&checkpoint).expect("fixture") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, model.join(path.file_name().expect("name"))).expect("copy");
    }
    let setup = setup_config(work.path());
    let out = work.path().join("store");
    std::fs::create_dir_all(&out).expect("mkdir");
    let (ok, path, err) = run_archiver(&[
        "--model-name",
        "bloom",
        "--handler",
        "accelerate",
        "--extra-files",
        &format!("{},{}", model.display(), setup.display()),
        "--archive-format",
        "tgz",
        "--export-path",
        out.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    let server = Server::start(&["--models", &format!("bloom={path}")]);
    server.wait_healthy();

    // TorchServe's call: the prompt as the raw body.
    let prompt = prompt.as_str();
    let reply = server.post("/predictions/bloom", "text/plain", prompt.as_bytes());
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["generated_text"], want.as_str());
    // The OpenAI-compatible API serves it too.
    let reply = server.post_json(
        "/v1/completions",
        &json!({"model": "bloom", "prompt": prompt, "max_tokens": 32, "temperature": 0}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["text"], want.as_str());
    // A bad request is a 400 naming the field, and the model goes on serving.
    let reply = server.post_json(
        "/predictions/bloom",
        &json!({"data": prompt, "max_new_tokens": "many"}),
    );
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("max_new_tokens"), "{}", reply.text());
    let reply = server.post("/predictions/bloom", "text/plain", prompt.as_bytes());
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn a_model_zip_in_the_archive_is_unpacked_as_the_model_folder() {
    let (checkpoint, prompt, want) = bloom();
    let work = tempfile::tempdir().expect("tempdir");
    // The reference ships the checkpoint as model.zip (files at its root), zipped here with
    // Python's zipfile.
    let zipped = work.path().join("model.zip");
    let status = std::process::Command::new(cresset_e2e::venv_bin("python"))
        .arg("-c")
        .arg(
            "import os, sys, zipfile\n\
             src, out = sys.argv[1], sys.argv[2]\n\
             with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:\n\
             \x20   for name in sorted(os.listdir(src)):\n\
             \x20       z.write(os.path.join(src, name), name)\n",
        )
        .arg(&checkpoint)
        .arg(&zipped)
        .status()
        .expect("run python");
    assert!(status.success());
    let setup = setup_config(work.path());
    let store = work.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let (ok, path, err) = run_archiver(&[
        "--model-name",
        "bloomzip",
        "--handler",
        "accelerate",
        "--extra-files",
        &format!("{},{}", zipped.display(), setup.display()),
        "--archive-format",
        "default",
        "--export-path",
        store.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    let server = Server::start(&["--model-store", store.to_str().expect("utf-8")]);
    server.wait_healthy();
    let bytes = std::fs::read(path.trim()).expect("read the .mar");
    let reply = server.manage(
        "POST",
        "/models?synchronous=true",
        "application/octet-stream",
        &bytes,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = server.post("/predictions/bloomzip", "text/plain", prompt.as_bytes());
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["generated_text"], want.as_str());
}
