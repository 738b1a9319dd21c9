//! `cresset-bench-offload`: SmolLM2-135M-Instruct in f32 through the `accelerate` handler with
//! its decoder layers all in memory, half on disk and all on disk, against HuggingFace
//! transformers + Accelerate with the same `device_map`s, on the same safetensors checkpoint
//! and threads, in one run. Also the time to load and the peak resident set with
//! `low_cpu_mem_usage` off and on.
//!
//! The checkpoint is the package-index GGUF dequantized to f32 by transformers and written as
//! safetensors (`bench/accelerate_baseline.py convert`), cached under `$CRESSET_CACHE/bench`.
//! Every configuration runs in its own process (this program re-runs itself with `--child`),
//! so that each peak resident set (`VmHWM`) is that configuration's alone. Cresset is measured
//! in-process through the handler (no HTTP), as transformers is.
//!
//! Results go to the `offload` section of `BENCHMARKS.md`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use cresset_bench::{
    cached, cli, machine, proc_status_mib, smollm2_gguf, threads, venv_python, write_section,
};
use cresset_e2e::repo_root;
use cresset_plugin_accelerate::AccelerateHandler;
use cresset_plugin_api::sdk::testing::{init_context, request, step_instance, step_one};
use serde_json::{json, Value};

const PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
const PLACEMENTS: [&str; 3] = ["memory", "half_disk", "disk"];

fn status_mib(field: &str) -> f64 {
    proc_status_mib("self", field)
}

/// The accelerate settings of a placement: every layer on the CPU, the second half on disk,
/// or every layer on disk.
fn settings(placement: &str, layers: usize, low_cpu: bool) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(String::new(), json!("cpu"));
    let first_on_disk = match placement {
        "half_disk" => layers / 2,
        "disk" => 0,
        _ => layers,
    };
    for l in first_on_disk..layers {
        map.insert(format!("model.layers.{l}"), json!("disk"));
    }
    json!({"device_map": map, "offload_folder": "offload", "low_cpu_mem_usage": low_cpu,
           "torch_dtype": "float32", "max_length": 512})
}

/// One configuration, in this (child) process: prints JSON like the Python baseline's.
fn child(checkpoint: &Path, placement: &str, low_cpu: bool, new_tokens: usize) {
    let before = status_mib("VmRSS:");
    let root = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(checkpoint).expect("checkpoint") {
        let path = entry.expect("entry").path();
        std::os::unix::fs::symlink(&path, root.path().join(path.file_name().expect("name")))
            .expect("link");
    }
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("config.json")).expect("config"),
    )
    .expect("JSON");
    let layers = config["num_hidden_layers"].as_u64().expect("layers") as usize;
    let mut ctx = init_context(root.path(), settings(placement, layers, low_cpu));
    ctx.model_config = json!({"batch_size": 1});
    let started = Instant::now();
    let mut h =
        step_instance::<AccelerateHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
    let load_s = started.elapsed().as_secs_f64();
    let load_peak = status_mib("VmHWM:");
    let tokenizer = cresset_torch::load_tokenizer(checkpoint).expect("tokenizer");
    let mut generate = |n: usize| -> (f64, usize) {
        let body = json!({"data": PROMPT, "max_new_tokens": n}).to_string();
        let started = Instant::now();
        let response = step_one(&mut h, request("application/json", body), 100_000)
            .unwrap_or_else(|e| panic!("{}", e.message));
        let elapsed = started.elapsed().as_secs_f64();
        let text: Value = serde_json::from_slice(&response.body).expect("JSON");
        let text = text["generated_text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let tokens = tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().len())
            .unwrap_or(0);
        (elapsed, tokens)
    };
    generate(2); // warm-up
    let (ttft, _) = generate(1);
    let (total, produced) = generate(new_tokens);
    let json = json!({
        "load_s": load_s, "rss_before_mib": before, "load_peak_mib": load_peak,
        "peak_mib": status_mib("VmHWM:"), "ttft_s": ttft,
        "decode_tps": (produced.max(2) - 1) as f64 / (total - ttft).max(1e-9),
        "tokens": produced,
    });
    println!("{json}");
}

fn run_child(args: &[String]) -> Value {
    let out = Command::new(std::env::current_exe().expect("exe"))
        .arg("--child")
        .args(args)
        .output()
        .expect("child runs");
    assert!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("child JSON")
}

fn python_json(python: &Path, args: &[String]) -> Value {
    let out = Command::new(python)
        .arg(repo_root().join("bench/accelerate_baseline.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "accelerate_baseline.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or(Value::Null)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(
            Path::new(&args[2]),
            &args[3],
            args[4] == "true",
            args[5].parse().expect("tokens"),
        );
        return;
    }
    let (quick, out) = cli();
    let new_tokens: usize = if quick { 16 } else { 64 };
    let gguf = smollm2_gguf();
    let python = venv_python();
    let checkpoint = cached("bench/smollm2-f32");
    if !checkpoint.join("model.safetensors").is_file() {
        eprintln!("bench-offload: writing the f32 safetensors checkpoint");
        python_json(
            &python,
            &[
                "convert".into(),
                gguf.display().to_string(),
                checkpoint.display().to_string(),
            ],
        );
    }
    let ckpt = checkpoint.display().to_string();
    let common = |placement: &str, low_cpu: bool| -> Vec<String> {
        vec![
            ckpt.clone(),
            placement.to_owned(),
            low_cpu.to_string(),
            new_tokens.to_string(),
        ]
    };
    let hf = |placement: &str, low_cpu: bool| -> Value {
        python_json(
            &python,
            &[
                "run".into(),
                ckpt.clone(),
                placement.into(),
                low_cpu.to_string(),
                threads().to_string(),
                PROMPT.into(),
                new_tokens.to_string(),
            ],
        )
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut placement_rows = String::new();
    let mut versions = String::new();
    for placement in PLACEMENTS {
        eprintln!("bench-offload: {placement}");
        let ours = run_child(&common(placement, true));
        let theirs = hf(placement, true);
        versions = format!(
            "transformers {}, accelerate {}, torch {}",
            theirs["transformers"].as_str().unwrap_or("?"),
            theirs["accelerate"].as_str().unwrap_or("?"),
            theirs["torch"].as_str().unwrap_or("?")
        );
        placement_rows.push_str(&format!(
            "| {} | {:.1} | {:.0} ms | {:.0} MiB | {:.1} | {:.0} ms | {:.0} MiB | {:.2}× |\n",
            match placement {
                "memory" => "all in memory",
                "half_disk" => "half on disk (layers 15–29)",
                _ => "all on disk (30 layers)",
            },
            f(&ours, "decode_tps"),
            f(&ours, "ttft_s") * 1000.0,
            f(&ours, "peak_mib") - f(&ours, "rss_before_mib"),
            f(&theirs, "decode_tps"),
            f(&theirs, "ttft_s") * 1000.0,
            f(&theirs, "peak_mib") - f(&theirs, "rss_before_mib"),
            f(&ours, "decode_tps") / f(&theirs, "decode_tps"),
        ));
    }
    let mut load_rows = String::new();
    for (placement, low_cpu) in [
        ("memory", false),
        ("memory", true),
        ("disk", false),
        ("disk", true),
    ] {
        eprintln!("bench-offload: load, {placement}, low_cpu_mem_usage {low_cpu}");
        let ours = run_child(&common(placement, low_cpu));
        let theirs = hf(placement, low_cpu);
        load_rows.push_str(&format!(
            "| {} | {low_cpu} | {:.2} s | {:.0} MiB | {:.2} s | {:.0} MiB |\n",
            if placement == "memory" {
                "all in memory"
            } else {
                "all on disk"
            },
            f(&ours, "load_s"),
            f(&ours, "load_peak_mib") - f(&ours, "rss_before_mib"),
            f(&theirs, "load_s"),
            f(&theirs, "load_peak_mib") - f(&theirs, "rss_before_mib"),
        ));
    }
    let doc = format!(
        "## Device maps and disk offload: SmolLM2-135M-Instruct in f32 (issue 7)\n\n\
         Measured by `make bench` (the program `bench/src/bin/offload.rs`){}. Machine: {}.\n\
         Baseline: {versions}, `from_pretrained(device_map=…, offload_folder=…)`. Both load the same\n\
         f32 safetensors checkpoint (513 MiB of weights; the package-index GGUF dequantized by\n\
         transformers), run greedy on {} threads from the prompt `{PROMPT}`, {new_tokens} new tokens,\n\
         in-process (Cresset through the `accelerate` handler, without HTTP), each configuration in a\n\
         process of its own. \"Peak above start\" is the process's peak resident set minus its\n\
         resident set before loading (libtorch's runtime for Cresset; Python, torch and transformers\n\
         for the baseline).\n\n\
         ### Tokens/s by placement (`low_cpu_mem_usage` on)\n\n\
         | placement | Cresset decode tok/s | Cresset TTFT | Cresset peak above start | transformers decode tok/s | transformers TTFT | transformers peak above start | Cresset ÷ transformers |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n{placement_rows}\n\
         ### Loading\n\n\
         Time to load (checkpoint read, converted, placed or offloaded) and the peak resident set\n\
         during loading. transformers memory-maps safetensors and loads lazily, so its load time\n\
         and load peak leave out weights that are first read at the first forward pass.\n\n\
         | placement | `low_cpu_mem_usage` | Cresset load | Cresset load peak above start | transformers load | transformers load peak above start |\n\
         | --- | --- | ---: | ---: | ---: | ---: |\n{load_rows}",
        if quick { " with `--quick`" } else { "" },
        machine(),
        threads(),
    );
    println!("{doc}");
    write_section(&out, "offload", &doc).expect("write BENCHMARKS.md");
}
