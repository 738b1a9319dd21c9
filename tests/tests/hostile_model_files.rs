//! Model files built to exhaust the server's memory while their headers are parsed (issue 12's
//! attack run): a GGUF whose metadata is four huge `u8` arrays, and a safetensors file whose
//! header is one ~100 MiB shape list. Each is registered for the `gpt` handler on a real
//! server; the load must fail with an error naming the file and the problem, the server's peak
//! resident memory must stay within 512 MiB of what it was before, and it must go on serving.
//! The files are written at test time (nothing big is committed).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use cresset_e2e::{dir_archive, Server};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// How far the peak may rise above the resident set of the idle server. Loading the `gpt`
/// plugin and libtorch alone takes about 340 MiB of it.
const PEAK_ALLOWANCE_MIB: u64 = 512;

/// A GGUF file of `total` bytes: no tensors, and four metadata keys each holding an array of
/// about `total / 4` `u8` elements (the attack file, as the attack run wrote it).
fn write_gguf_of_u8_arrays(path: &Path, total: u64) {
    let mut out = BufWriter::new(File::create(path).expect("create gguf"));
    let header = 24;
    let per_key_overhead = 8 + 1 + 4 + 4 + 8; // key length, key, type, element type, count
    let count = (total - header) / 4 - per_key_overhead;
    let chunk = vec![0x41u8; MIB as usize];
    let mut bytes: Vec<u8> = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes()); // tensors
    bytes.extend(4u64.to_le_bytes()); // metadata keys
    for key in ["a", "b", "c", "d"] {
        bytes.extend((key.len() as u64).to_le_bytes());
        bytes.extend(key.as_bytes());
        bytes.extend(9u32.to_le_bytes()); // array
        bytes.extend(0u32.to_le_bytes()); // of u8
        bytes.extend(count.to_le_bytes());
        out.write_all(&bytes).expect("write gguf");
        bytes.clear();
        let mut left = count;
        while left > 0 {
            let n = left.min(MIB);
            out.write_all(&chunk[..n as usize]).expect("write gguf");
            left -= n;
        }
    }
    out.flush().expect("flush gguf");
}

/// A safetensors file whose header, of about `header_bytes`, is one tensor with a shape list of
/// about `header_bytes / 2` ones (the attack file).
fn write_safetensors_with_a_long_shape(path: &Path, header_bytes: u64) {
    let head = br#"{"w":{"dtype":"U8","data_offsets":[0,1],"shape":[1"#;
    let tail = br#"]}}"#;
    let ones = (header_bytes - head.len() as u64 - tail.len() as u64) / 2;
    let len = head.len() as u64 + 2 * ones + tail.len() as u64;
    let mut out = BufWriter::new(File::create(path).expect("create safetensors"));
    out.write_all(&len.to_le_bytes()).expect("write");
    out.write_all(head).expect("write");
    let chunk = b",1".repeat(MIB as usize / 2);
    let mut left = ones;
    while left > 0 {
        let n = left.min(MIB / 2);
        out.write_all(&chunk[..2 * n as usize]).expect("write");
        left -= n;
    }
    out.write_all(tail).expect("write");
    out.write_all(&[0]).expect("write"); // the one byte of data
    out.flush().expect("flush safetensors");
}

/// The `describe` answer for `name`'s only version once it has left `Loading`.
fn settled_description(server: &Server, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let reply = server.manage("GET", &format!("/models/{name}"), "", b"");
        assert_eq!(reply.status, 200, "{}", reply.text());
        let version = reply.json()[0].clone();
        if version["state"] != "Loading" {
            return version;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still loading after 300 s\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serve a store holding `echo` and the archive `hostile` (gpt handler, `files` written by
/// `write`); register `hostile` once the server is healthy, and check that its load fails with
/// an error containing every one of `needles`, at a bounded cost in memory, and that the server
/// still answers.
fn hostile_load_fails_cheaply(files: &[(&str, &[u8])], write: impl Fn(&Path), needles: &[&str]) {
    let store = tempfile::tempdir().expect("tempdir");
    dir_archive(store.path(), "echo", "echo", "min_workers = 1\n", &[]);
    let archive = dir_archive(
        store.path(),
        "hostile",
        "gpt",
        "min_workers = 1\nmax_workers = 1\n[handler]\nmax_seq_len = 64\n",
        files,
    );
    write(&archive);

    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "echo",
    ]);
    server.wait_healthy();
    let before = server.status_kib("VmRSS") / 1024;

    let reply = server.manage("POST", "/models?url=hostile", "", b"");
    assert_eq!(reply.status, 202, "{}", reply.text());
    let version = settled_description(&server, "hostile");
    let peak = server.status_kib("VmHWM") / 1024;
    eprintln!(
        "hostile_model_files: VmRSS {before} MiB when healthy, VmHWM {peak} MiB after the load \
         ({} MiB more); state {}, error {}",
        peak.saturating_sub(before),
        version["state"],
        version["error"]
    );

    assert_eq!(version["state"], "Failed", "{version}");
    // A hostile checkpoint is the archive's fault, not the server's.
    assert_eq!(version["failure"], "BadModel", "{version}");
    assert!(
        peak < before + PEAK_ALLOWANCE_MIB,
        "parsing the hostile file raised the peak resident set from {before} MiB to {peak} MiB \
         (allowed: {PEAK_ALLOWANCE_MIB} MiB more)"
    );
    let error = version["error"].as_str().unwrap_or_default();
    for needle in needles {
        assert!(
            error.contains(needle),
            "the error misses {needle:?}: {error}"
        );
    }

    // The server goes on: healthy (the failed version is listed, and does not hold readiness),
    // and the other model serves.
    let ping = server.get("/ping");
    assert_eq!(ping.status, 200, "{}", ping.text());
    assert!(
        ping.json()["failed"]
            .as_array()
            .is_some_and(|f| f.iter().any(|m| m == "hostile/1.0")),
        "{}",
        ping.text()
    );
    let echo = server.post("/predictions/echo", "text/plain", b"still here");
    assert_eq!(
        (echo.status, echo.text().as_str()),
        (200, "still here"),
        "{}",
        server.log()
    );
}

#[test]
fn a_gguf_of_huge_metadata_arrays_fails_to_load_without_exhausting_memory() {
    // 64 MiB of four u8 arrays: 2.1 GiB of resident memory when every element was a `Value`.
    hostile_load_fails_cheaply(
        &[],
        |dir| write_gguf_of_u8_arrays(&dir.join("hostile.gguf"), 64 * MIB),
        &["hostile.gguf", "metadata `a`", "array elements"],
    );
}

/// A Llama `config.json` that gets the `gpt` handler as far as the checkpoint's header.
fn llama_config() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
    .to_string()
}

#[test]
fn a_safetensors_header_of_one_long_shape_fails_to_load_without_exhausting_memory() {
    // A 100 MiB header (the old cap): 4.4 GiB when it was parsed into a `serde_json::Value`.
    let config = llama_config();
    hostile_load_fails_cheaply(
        &[("config.json", config.as_bytes())],
        |dir| write_safetensors_with_a_long_shape(&dir.join("model.safetensors"), 100 * MIB - 16),
        &["model.safetensors", "header"],
    );
}

#[test]
fn a_long_shape_within_the_header_cap_is_refused_at_its_ninth_dimension() {
    // Just under the 32 MiB cap: the parse reads the entry as it goes and stops at the ninth
    // dimension of the 16 million.
    let config = llama_config();
    hostile_load_fails_cheaply(
        &[("config.json", config.as_bytes())],
        |dir| write_safetensors_with_a_long_shape(&dir.join("model.safetensors"), 32 * MIB - 64),
        &["model.safetensors", "tensor `w`", "more than 8 dimensions"],
    );
}
