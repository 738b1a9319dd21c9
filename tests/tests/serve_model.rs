//! `cresset serve --model PATH`: a model served as it lies on disk, the handler picked from
//! what is there: the default store's MiniLM as a bare HuggingFace folder (no manifest) and
//! its SmolLM2 GGUF file, each answering as the same model in its store archive does; and the
//! mistakes refused with reasons.

use std::path::Path;

use cresset_e2e::{cresset_bin, repo_root, Server};
use serde_json::{json, Value};

fn embedding(server: &Server, model: &str) -> Vec<f64> {
    let reply = server.post(
        &format!("/predictions/{model}"),
        "text/plain",
        b"A man is eating food.",
    );
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), server.log());
    reply.json()["embedding"]
        .as_array()
        .expect("an embedding")
        .iter()
        .filter_map(Value::as_f64)
        .collect()
}

#[test]
fn a_bare_huggingface_folder_is_served_by_the_nlp_handler() {
    // The store's MiniLM without its manifest and model config: what a HuggingFace download
    // holds.
    let dir = tempfile::tempdir().expect("tempdir");
    let bare = dir.path().join("all-MiniLM-L6-v2");
    std::fs::create_dir(&bare).expect("mkdir");
    let store = repo_root().join("model_store/minilm");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::os::unix::fs::symlink(store.join(file), bare.join(file)).expect("link");
    }
    let direct = Server::start(&["--model", bare.to_str().expect("utf-8")]);
    direct.wait_healthy();
    // Named after the folder.
    let ours = embedding(&direct, "all-MiniLM-L6-v2");
    let archived = Server::start(&["--models", "minilm"]);
    archived.wait_healthy();
    let theirs = embedding(&archived, "minilm");
    assert_eq!(ours.len(), 384);
    assert_eq!(ours.len(), theirs.len());
    let dot: f64 = ours.iter().zip(&theirs).map(|(a, b)| a * b).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cosine = dot / (norm(&ours) * norm(&theirs));
    assert!(cosine > 0.9999, "cosine {cosine}");
}

#[test]
fn a_gguf_file_is_served_by_the_gpt_handler() {
    let gguf = repo_root().join("model_store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start(&[
        "--model",
        gguf.to_str().expect("utf-8"),
        "--model-name",
        "smollm2",
    ]);
    server.wait_healthy();
    let reply = server.post_json(
        "/v1/chat/completions",
        &json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 24
        }),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let content = reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(content.contains("Paris"), "{content}");
    // Nothing was written beside the model, and no snapshot was kept.
    let beside: Vec<_> = std::fs::read_dir(gguf.parent().expect("folder"))
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cresset-snapshot"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
}

fn refused(args: &[&str]) -> String {
    let work = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(cresset_bin())
        .arg("serve")
        .args(args)
        .args(["--work-dir", work.path().to_str().expect("utf-8")])
        .args(["--disable-token-auth", "--inference-address", "127.0.0.1:0"])
        .args([
            "--management-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ])
        .current_dir(repo_root())
        .output()
        .expect("cresset serve");
    assert!(!out.status.success(), "{args:?} was served");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn what_cannot_be_served_directly_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "not a model").expect("write");
    let empty = dir.path().to_str().expect("utf-8");
    let err = refused(&["--model", empty]);
    assert!(err.contains("holds no model"), "{err}");
    let err = refused(&["--model", &format!("{empty}/notes.txt")]);
    assert!(err.contains("not a model file"), "{err}");
    let err = refused(&["--model", &format!("{empty}/missing")]);
    assert!(err.contains("no such file or folder"), "{err}");
    let err = refused(&["--model", empty, "--models", "echo"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = refused(&["--model", empty, "--model-name", "no spaces"]);
    assert!(err.contains("`model_name`"), "{err}");
    assert!(Path::new(empty).join("notes.txt").is_file());
}
