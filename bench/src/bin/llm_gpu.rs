//! `cresset-bench-llm-gpu` (`make bench-gpu`): LLM decoding on a CUDA GPU, as issue 16 measures
//! it. A random-weight Llama with Llama-3.2-1B's body, a 32k vocabulary and an untied head
//! (`bench/gpu_llm_checkpoint.py`, made by the machine's own Python: no network needed) is
//! served by the `gpt` plugin in bf16 on `cuda:0` with 32 KV-cache slots of 512 positions, and
//! streamed to 1, 8 and 32 clients at once (OpenAI completions with server-sent events, greedy,
//! 128 new tokens, prompts of about 10 tokens): each concurrency twice, first with prompts the
//! server has not seen and then the same requests again (the first-sight penalty is their
//! ratio). transformers `generate()` runs on the same checkpoint and GPU in the same run, eager
//! and with a static cache and `torch.compile` (`bench/gpu_llm_transformers.py`).
//!
//! The Python is `$CRESSET_BENCH_PYTHON` (default `python3`), which must have torch and
//! transformers. Results go to the `gpu-llm` section of `BENCHMARKS.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cresset_bench::{cli, concurrently, stream_completion, write_section};
use cresset_e2e::{dir_archive, repo_root, Server};
use cresset_torch::tch;
use serde_json::{json, Value};

const NEW_TOKENS: u32 = 128;
const CONCURRENCY: [usize; 3] = [1, 8, 32];

/// One streamed completion: (time to first token, tokens).
fn stream(url: &str, prompt: &str) -> (Duration, u64) {
    let s = stream_completion(
        url,
        &json!({"model": "llama1b", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}}),
    );
    (s.first, s.tokens)
}

/// `n` clients at once, client `i` sending `prompt(i)`: aggregate tokens/s over the wall time
/// from the first request to the last answer, and the median time to first token.
fn round(url: &str, n: usize, prompt: impl Fn(usize) -> String + Sync) -> (f64, Duration) {
    let (results, wall) = concurrently(n, |i| stream(url, &prompt(i)));
    let tokens: u64 = results.iter().map(|r| r.1).sum();
    let mut firsts: Vec<Duration> = results.iter().map(|r| r.0).collect();
    firsts.sort();
    (tokens as f64 / wall.as_secs_f64(), firsts[firsts.len() / 2])
}

fn python() -> String {
    std::env::var("CRESSET_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn python_json(script: &str, args: &[String]) -> Value {
    let out = Command::new(python())
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script} printed no JSON: {e}"))
}

/// The checkpoint, made once into the cache folder.
fn checkpoint() -> PathBuf {
    let dir = std::env::var_os("CRESSET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("bench/llama-1b-body-random");
    let status = Command::new(python())
        .arg(repo_root().join("bench/gpu_llm_checkpoint.py"))
        .arg(&dir)
        .status()
        .expect("run the checkpoint maker");
    assert!(status.success(), "the checkpoint maker failed");
    dir
}

/// Serve the checkpoint and measure: per concurrency, (first round, repeat) tokens/s and the
/// one-stream times to first token.
fn cresset(dir: &Path) -> (Vec<(f64, f64)>, Duration, Duration) {
    let store = tempfile::tempdir().expect("tempdir");
    let archive = dir_archive(
        store.path(),
        "llama1b",
        "gpt",
        "min_workers = 1\nbatch_size = 32\ndevice_type = \"gpu\"\ndevice_ids = [0]\nresponse_timeout_s = 600\n\n[handler]\nmax_seq_len = 512\ndtype = \"bfloat16\"\n",
        &[],
    );
    for entry in std::fs::read_dir(dir).expect("checkpoint") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        cresset_bench::link_or_copy(&entry.path(), &archive.join(&name));
    }
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "llama1b",
    ]);
    server.wait_healthy();
    let url = format!("{}/v1/completions", server.inference);
    let mut rates = Vec::new();
    let (mut ttft_first, mut ttft_repeat) = (Duration::ZERO, Duration::ZERO);
    for n in CONCURRENCY {
        // Prompts this server has not seen, then the same again.
        let prompt = move |i: usize| format!("def handler_{n}_{i}(request, context):");
        let (first, first_ttft) = round(&url, n, prompt);
        let (repeat, repeat_ttft) = round(&url, n, prompt);
        if n == 1 {
            (ttft_first, ttft_repeat) = (first_ttft, repeat_ttft);
        }
        eprintln!("bench-llm-gpu: {n} streams: first {first:.0} tok/s, repeat {repeat:.0} tok/s");
        rates.push((first, repeat));
    }
    (rates, ttft_first, ttft_repeat)
}

fn main() {
    let (_quick, out) = cli();
    assert!(
        tch::Cuda::is_available(),
        "cresset-bench-llm-gpu needs a CUDA GPU (this machine has none)"
    );
    eprintln!("bench-llm-gpu: the checkpoint");
    let dir = checkpoint();
    eprintln!("bench-llm-gpu: Cresset");
    let (rates, ttft_first, ttft_repeat) = cresset(&dir);
    eprintln!("bench-llm-gpu: transformers");
    let hf = python_json(
        "bench/gpu_llm_transformers.py",
        &[dir.display().to_string(), NEW_TOKENS.to_string()],
    );
    let f = |k: &str, f: &str| hf[k][f].as_f64().unwrap_or(f64::NAN);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut table = String::from(
        "| | 1 stream | 8 streams (aggregate) | 32 streams (aggregate) | time to first token, 1 stream |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    table.push_str(&format!(
        "| Cresset, first request at that concurrency | {:.0} tok/s | {:.0} tok/s | {:.0} tok/s | {:.0} ms |\n",
        rates[0].0, rates[1].0, rates[2].0, ms(ttft_first)
    ));
    table.push_str(&format!(
        "| Cresset, the same request repeated | {:.0} tok/s | {:.0} tok/s | {:.0} tok/s | {:.0} ms |\n",
        rates[0].1, rates[1].1, rates[2].1, ms(ttft_repeat)
    ));
    table.push_str(&format!(
        "| transformers eager | {:.0} tok/s | {:.0} tok/s | {:.0} tok/s | {:.0} ms |\n",
        f("eager_1", "tokens_per_s"),
        f("eager_8", "tokens_per_s"),
        f("eager_32", "tokens_per_s"),
        f("eager_1", "ttft_s") * 1000.0
    ));
    table.push_str(&format!(
        "| transformers, static cache + `torch.compile` | {:.0} tok/s | | | {:.0} ms |\n",
        f("compiled_1", "tokens_per_s"),
        f("compiled_1", "ttft_s") * 1000.0
    ));
    let first_sight: Vec<String> = CONCURRENCY
        .iter()
        .zip(&rates)
        .map(|(n, (first, repeat))| format!("{n}: {:.2}×", repeat / first))
        .collect();
    let content = format!(
        "## LLM decoding on a GPU (`make bench-gpu`)\n\n\
         Machine: {gpu}; torch {torch}, transformers {tf}. A random-weight Llama with Llama-3.2-1B's body (hidden 2048, 16 layers, 32 heads, 8 key/value heads, FFN 8192), a 32k vocabulary and an untied head, bf16; `gpt` plugin with 32 slots of 512 positions; greedy, {NEW_TOKENS} new tokens, prompts of about 10 tokens, OpenAI completions with server-sent events. One run.\n\n{table}\n\
         Targets (issue 16): the first request at any concurrency within 1.2× of its repeat (repeat ÷ first: {first_sight}); one stream ≥ 1.5× transformers compiled ({:.2}×); 32 streams ≥ 1.5× transformers eager ({:.2}×).\n",
        rates[0].1 / f("compiled_1", "tokens_per_s"),
        rates[2].1 / f("eager_32", "tokens_per_s"),
        gpu = hf["gpu"].as_str().unwrap_or("?"),
        torch = hf["torch"].as_str().unwrap_or("?"),
        tf = hf["transformers"].as_str().unwrap_or("?"),
        first_sight = first_sight.join(", "),
    );
    println!("{content}");
    write_section(&out, "gpu-llm", &content).expect("write BENCHMARKS.md");
}
