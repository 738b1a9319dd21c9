//! Peak memory with disk offload, on the real SmolLM2-135M-Instruct in f32 (513 MiB of weights
//! once dequantized): loaded layer by layer with every decoder layer offloaded to disk, the
//! process's peak resident set (VmHWM, loading and generation together) stays below the
//! model's size plus a margin, the margin being what the process held before loading
//! (libtorch's runtime, measured). During generation the peak stays within what was resident
//! after loading, two layers (the one computing and the one read ahead) and 128 MiB. The same
//! model all in memory peaks above its size plus the margin, which shows the measure tells the
//! two apart.
//!
//! This file holds one test so that its process measures nothing else.

mod common;

use std::path::PathBuf;

use common::{expected, generate};

use cresset_plugin_accelerate::AccelerateHandler;
use cresset_plugin_api::sdk::testing::init_context;
use cresset_plugin_api::sdk::testing::step_instance;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// What generation may add above the weights it holds: libtorch's allocator and kernels'
/// scratch, the KV cache at 256 positions, the logits, the offload reads' buffers.
const GENERATION_MARGIN: u64 = 128 * MIB;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// The peak resident set so far, in bytes.
fn peak() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Start a new peak from the current resident set (Linux's clear_refs "5").
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
}

fn smollm2() -> PathBuf {
    PathBuf::from(std::env::var("CRESSET_CACHE").expect("CRESSET_CACHE is set by scripts/env.sh"))
        .join("assets/smollm2")
        .join(expected("llm")["smollm2"]["file"].as_str().expect("file"))
}

fn start(settings: Value) -> (AccelerateHandler, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("tempdir");
    let gguf = smollm2();
    std::os::unix::fs::symlink(&gguf, root.path().join("smollm2.gguf")).expect("link");
    let mut ctx = init_context(root.path(), settings);
    ctx.model_config = json!({"batch_size": 1});
    let h = step_instance::<AccelerateHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
    (h, root)
}

#[test]
fn disk_offload_keeps_peak_memory_below_the_model_size() {
    let settings = json!({
        "device_map": {"": "cpu", "model.layers": "disk"},
        "offload_folder": "offload",
        "low_cpu_mem_usage": true,
        "torch_dtype": "float32",
        "max_length": 256,
    });
    let before = status_kib("VmRSS:") * 1024;
    let (mut h, _root) = start(settings);
    let model_bytes: u64 = h.model().modules().iter().map(|m| m.bytes).sum();
    let resident = h.model().resident_bytes();
    let largest_layer = h
        .model()
        .modules()
        .iter()
        .filter(|m| m.layer.is_some())
        .map(|m| m.bytes)
        .max()
        .unwrap_or(0);
    let layers = h.model().config.layers as usize;
    assert_eq!(h.model().offloaded_layers().len(), layers);
    let after_load = status_kib("VmRSS:") * 1024;
    let load_peak = peak();
    reset_peak();
    let text = generate(&mut h, "The capital of France is", 16);
    let generation_peak = peak();
    let mib = |b: u64| b as f64 / MIB as f64;
    eprintln!(
        "SmolLM2 f32, {layers} layers on disk: model {:.0} MiB, resident weights {:.0} MiB, \
         largest layer {:.1} MiB; RSS before load {:.0} MiB, after load {:.0} MiB; \
         peak during load {:.0} MiB, during generation {:.0} MiB; text {text:?}",
        mib(model_bytes),
        mib(resident),
        mib(largest_layer),
        mib(before),
        mib(after_load),
        mib(load_peak),
        mib(generation_peak),
    );
    assert!(text.contains("Paris"), "{text:?}");
    // The stated margin is the runtime: what the process held before the model (libtorch's
    // code and data). Above it, the process never held as much as the model.
    let growth = load_peak.max(generation_peak).saturating_sub(before);
    assert!(
        growth < model_bytes,
        "the peak is {:.0} MiB above the runtime's {:.0} MiB; the model is {:.0} MiB",
        mib(growth),
        mib(before),
        mib(model_bytes)
    );
    // During generation: what was resident after loading, at most two offloaded layers at a
    // time (the one computing and the one read ahead), and the margin.
    let bound = after_load + 2 * largest_layer + GENERATION_MARGIN;
    assert!(
        generation_peak <= bound,
        "generation peaked at {:.0} MiB; the bound is {:.0} MiB",
        mib(generation_peak),
        mib(bound)
    );
    drop(h);
    // The same model with every layer in memory, dense (`quantize = "auto"` would keep the
    // file's Q4_1 blocks on an all-CPU map), peaks above the model's size.
    reset_peak();
    let (mut h, _root) = start(json!({
        "torch_dtype": "float32",
        "quantize": "none",
        "max_length": 256,
    }));
    assert!(h.model().offloaded_layers().is_empty());
    assert!(generate(&mut h, "The capital of France is", 16).contains("Paris"));
    let in_memory_peak = peak();
    eprintln!("all in memory: peak {:.0} MiB", mib(in_memory_peak));
    assert!(
        in_memory_peak.saturating_sub(before) > model_bytes,
        "in memory, the peak ({:.0} MiB above the runtime) should exceed the model ({:.0} MiB)",
        mib(in_memory_peak.saturating_sub(before)),
        mib(model_bytes)
    );
}
