//! `cresset plan`: the device map of a real checkpoint as a dry run, from its headers.

use cresset_e2e::{cresset_bin, repo_root};

fn plan(args: &[&str]) -> (bool, String, String) {
    plan_with_env(args, &[])
}

fn plan_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(cresset_bin())
        .arg("plan")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run cresset plan");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plan_prints_the_map_bytes_per_device_and_whether_it_fits() {
    let model = repo_root().join("tests/fixtures/generated/llm/llama-gqa-untied");
    let model = model.to_str().expect("utf-8");
    let (ok, out, err) = plan(&[
        model,
        "--max-memory",
        "0=500KiB,1=500KiB,cpu=1MiB",
        "--max-length",
        "64",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("model.embed_tokens  →  cuda:0"), "{out}");
    assert!(out.contains("lm_head  →  cuda:1"), "{out}");
    assert!(out.contains("fits: yes"), "{out}");
    // Layers are whole and in order: the norm and head come after every layer.
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s} in {out}"));
    assert!(at("model.layers.0") < at("model.norm") && at("model.norm") < at("lm_head"));
    // Too small without disk: a clear error naming what is short.
    let (ok, _, err) = plan(&[model, "--max-memory", "cpu=100KiB"]);
    assert!(!ok);
    assert!(
        err.contains("does not fit") && err.contains("short") && err.contains("offload_folder"),
        "{err}"
    );
    // With disk offload allowed the rest goes to disk.
    let (ok, out, err) = plan(&[
        model,
        "--max-memory",
        "cpu=450KiB",
        "--max-length",
        "64",
        "--offload",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("model.layers.1 … model.layers.2  →  disk"),
        "{out}"
    );
    // Only layers go to disk: the norm and the untied head after them stay on the CPU.
    assert!(out.contains("lm_head  →  cpu"), "{out}");
    // When what cannot go to disk does not fit either, the error says so.
    let (ok, _, err) = plan(&[model, "--max-memory", "cpu=200KiB", "--offload"]);
    assert!(!ok);
    assert!(err.contains("only decoder layers go to disk"), "{err}");
}

#[test]
fn plan_reads_a_gguf_file_at_the_dtype_it_loads_in() {
    let store = repo_root().join("model_store/smollm2");
    let store = store.to_str().expect("utf-8");
    let (ok, out, err) = plan(&[
        store,
        "--max-memory",
        "cpu=300MiB",
        "--max-length",
        "256",
        "--offload",
    ]);
    assert!(ok, "{err}");
    // SmolLM2-135M: embeddings, 30 layers, the norm and the tied head; 513 MiB in f32.
    assert!(
        out.starts_with("33 modules, 513.1 MiB of weights in float32"),
        "{out}"
    );
    // Layers in order: the first ones on the CPU, the rest on disk.
    assert!(
        out.contains("model.layers.0 … model.layers.12  →  cpu"),
        "{out}"
    );
    assert!(
        out.contains("model.layers.13 … model.layers.29  →  disk"),
        "{out}"
    );
    // Dense in bfloat16 half the bytes, and then everything fits in the CPU budget.
    let (ok, out, err) = plan(&[
        store,
        "--max-memory",
        "cpu=400MiB",
        "--dtype",
        "bfloat16",
        "--quantize",
        "none",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("of weights in bfloat16"), "{out}");
    assert!(!out.contains("disk"), "{out}");
}

#[test]
fn plan_sizes_a_quantized_model_as_the_gpt_handler_holds_it() {
    let store = repo_root().join("model_store/smollm2");
    let store = store.to_str().expect("utf-8");
    // By default (`quantize = "auto"`, all on the CPU) the GGUF's blocks are kept. Where the
    // CPU runs the block kernel (AVX2, FMA, F16C): 4-bit block layers and the Q8_0 table as
    // 8-bit blocks that are the tied head too, the file's size; with libtorch's kernels
    // (`CRESSET_BLOCK_KERNEL=0`, or another CPU): int4 layers, the Q8_0 embeddings as stored and
    // an int8 copy of them as the tied head. f32 norms (`dtype = "auto"` keeps f32 activations
    // around quantized layers). The sizes equal the loaded model's
    // (plugins/torch/tests/quantized.rs).
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let blocks = has("avx2") && has("fma") && has("f16c");
    let (ok, out, err) = plan(&[store]);
    assert!(ok, "{err}");
    let want = if blocks { "93.8" } else { "119.2" };
    assert!(
        out.starts_with(&format!(
            "33 modules, {want} MiB of weights in the GGUF's quantized blocks (int4/int8) and float32"
        )),
        "{out}"
    );
    let (ok, out, err) = plan_with_env(&[store], &[("CRESSET_BLOCK_KERNEL", "0")]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(
            "33 modules, 119.2 MiB of weights in the GGUF's quantized blocks (int4/int8) and float32"
        ),
        "{out}"
    );
    // Quantized at load: int8 layers and head, f32 embeddings.
    let (ok, out, err) = plan(&[store, "--quantize", "int8"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("of weights in int8 (linear layers) and float32"),
        "{out}"
    );
    let (ok, out, err) = plan(&[store, "--quantize", "int4", "--group-size", "128"]);
    assert!(ok, "{err}");
    assert!(out.contains("int4 group 128 (linear layers)"), "{out}");
    // Quantized weights cannot go to disk; a bad value names the flag.
    let (ok, _, err) = plan(&[store, "--quantize", "int4", "--offload"]);
    assert!(!ok);
    assert!(err.contains("CPU only"), "{err}");
    let (ok, _, err) = plan(&[store, "--quantize", "int3"]);
    assert!(!ok);
    assert!(err.contains("quantize \"int3\""), "{err}");
}
