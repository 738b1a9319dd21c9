//! `cresset-bench-llm`: SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized to f32) through the
//! `gpt` plugin in the real server, over the OpenAI-compatible API with streaming, against
//! HuggingFace transformers `generate()` on the same weights and threads, in one run:
//! time to first token, decode tokens/s of one stream, aggregate tokens/s of 8 concurrent
//! streams (continuous batching). llama.cpp is measured too when `llama-cpp-python` is
//! importable by `$CRESSET_LLAMA_CPP_PYTHON` (it has no wheel on the package index).
//!
//! Results go to the `llm` section of `BENCHMARKS.md`.

use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cresset_bench::{agent, cli, machine, smollm2_gguf, threads, venv_python, write_section};
use cresset_e2e::{dir_archive, repo_root, Server};
use serde_json::{json, Value};

/// A prompt that keeps a small model generating (it counts on), so that every run makes the
/// same number of tokens.
const PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
const NEW_TOKENS: u32 = 64;

/// One streamed completion: (time to first token, decode tokens/s, tokens).
fn stream(url: &str) -> (Duration, f64, u64) {
    let started = Instant::now();
    let response = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(
            json!({"model": "smollm2", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
                   "stream": true, "stream_options": {"include_usage": true}})
            .to_string(),
        )
        .expect("stream");
    let (mut first, mut last, mut tokens) = (None, started.elapsed(), 0u64);
    for line in std::io::BufReader::new(response.into_body().into_reader()).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data).expect("event");
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
        if event["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            first.get_or_insert(started.elapsed());
            last = started.elapsed();
        }
    }
    let first = first.unwrap_or(last);
    let rate = tokens.saturating_sub(1) as f64 / (last - first).as_secs_f64().max(1e-9);
    (first, rate, tokens)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (TTFT ms, decode tokens/s at batch 1, aggregate tokens/s at 8 streams, peak RSS MiB).
fn measure(gguf: &Path, runs: usize) -> (f64, f64, f64, f64) {
    let store = tempfile::tempdir().expect("tempdir");
    let dir = dir_archive(
        store.path(),
        "smollm2",
        "gpt",
        "min_workers = 1\nbatch_size = 8\nresponse_timeout_s = 300\n\n[handler]\nmax_seq_len = 512\n",
        &[],
    );
    let target = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if std::fs::hard_link(gguf, &target).is_err() {
        std::fs::copy(gguf, &target).expect("copy the GGUF");
    }
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "smollm2",
    ]);
    server.wait_healthy();
    let url = format!("{}/v1/completions", server.inference);
    stream(&url); // warm-up
    let solo: Vec<(Duration, f64, u64)> = (0..runs).map(|_| stream(&url)).collect();
    let ttft = median(solo.iter().map(|s| s.0.as_secs_f64() * 1000.0).collect());
    let decode = median(solo.iter().map(|s| s.1).collect());
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || stream(&url).2)
        })
        .collect();
    let total: u64 = clients.into_iter().map(|c| c.join().expect("client")).sum();
    let aggregate = total as f64 / started.elapsed().as_secs_f64();
    let rss = cresset_bench::peak_rss_mib(server.pid());
    (ttft, decode, aggregate, rss)
}

fn python_json(python: &Path, script: &str, args: &[String]) -> Option<Value> {
    let out = Command::new(python)
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn main() {
    let (quick, out) = cli();
    let runs = if quick { 1 } else { 3 };
    let gguf = smollm2_gguf();
    let python = venv_python();
    let args = vec![
        gguf.display().to_string(),
        threads().to_string(),
        PROMPT.to_owned(),
        NEW_TOKENS.to_string(),
    ];

    eprintln!("bench-llm: transformers baseline");
    let hf = python_json(&python, "bench/transformers_llm_baseline.py", &args)
        .expect("the transformers baseline ran");
    // The baseline must not vanish silently: no llama.cpp, no benchmark.
    let llama_python = std::env::var("CRESSET_LLAMA_CPP_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| {
            panic!("CRESSET_LLAMA_CPP_PYTHON is not set: run through `make bench`, which builds llama-cpp-python (scripts/setup-llama-cpp.sh)")
        });
    eprintln!("bench-llm: llama.cpp baseline");
    let llama_cpp = Some(
        python_json(Path::new(&llama_python), "bench/llama_cpp_baseline.py", &args)
            .expect("the llama.cpp baseline ran"),
    );

    eprintln!("bench-llm: cresset");
    let (ttft, decode, aggregate, rss) = measure(&gguf, runs);
    eprintln!("bench-llm: cresset with GOMP_SPINCOUNT=30000");
    std::env::set_var("GOMP_SPINCOUNT", "30000");
    let (spin_ttft, spin_decode, spin_aggregate, _) = measure(&gguf, runs);
    std::env::remove_var("GOMP_SPINCOUNT");

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut table = format!(
        "| | time to first token | decode tokens/s, 1 stream | aggregate tokens/s, 8 streams | 8 streams ÷ 1 |\n\
         | --- | ---: | ---: | ---: | ---: |\n\
         | Cresset gpt plugin, OpenAI API + SSE (default `OMP_WAIT_POLICY=PASSIVE`) | {ttft:.0} ms | {decode:.1} | {aggregate:.1} | {:.1}× |\n\
         | Cresset, `GOMP_SPINCOUNT=30000` | {spin_ttft:.0} ms | {spin_decode:.1} | {spin_aggregate:.1} | {:.1}× |\n\
         | transformers {} `generate()` (batch of 8 for the aggregate) | {:.0} ms | {:.1} | {:.1} | {:.1}× |\n",
        aggregate / decode,
        spin_aggregate / spin_decode,
        hf["transformers"].as_str().unwrap_or("?"),
        f(&hf, "ttft_s") * 1000.0,
        f(&hf, "decode_tps"),
        f(&hf, "aggregate8_tps"),
        f(&hf, "aggregate8_tps") / f(&hf, "decode_tps"),
    );
    let llama_line = match &llama_cpp {
        Some(v) => {
            table.push_str(&format!(
                "| llama.cpp (llama-cpp-python {}) on the Q4_1 GGUF as it is | {:.0} ms | {:.1} | – | |\n",
                v["version"].as_str().unwrap_or("?"),
                f(v, "ttft_s") * 1000.0,
                f(v, "decode_tps")
            ));
            "llama.cpp (llama-cpp-python built from its sdist by `scripts/setup-llama-cpp.sh`) runs the Q4_1\n\
             weights with its own quantized kernels and hand-written CPU code: it reads about a sixth of\n\
             the bytes per token that an f32 model does, and it is several times faster than both\n\
             Cresset and transformers here. Serving GGUF files without dequantizing (quantized matmuls\n\
             in libtorch) is the way to close that gap; it is not done.".to_owned()
        }
        None => "llama.cpp: not measured. `llama-cpp-python` has no wheel on the package index; building it from source here failed or was not attempted in this run (set `CRESSET_LLAMA_CPP_PYTHON` to a Python that can import it).".to_owned(),
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let doc = format!(
        "## LLM: SmolLM2-135M-Instruct generation (issue 6)\n\n\
         Measured by `make bench` (the program `bench/src/bin/llm.rs`){}. Machine: {}.\n\
         Weights: the Q4_1 GGUF, dequantized to f32 at load by both Cresset and transformers; {} threads;\n\
         greedy; the prompt `{PROMPT}` ({} tokens), {NEW_TOKENS} new tokens. Cresset is measured over\n\
         loopback HTTP with server-sent events (time to first token is from sending the request to the\n\
         first text event); transformers in-process. Median of {runs} runs. Server peak RSS {rss:.0} MiB.\n\n{table}\n\
         Targets: faster than transformers at batch 1 (decode tokens/s): default {}, with the short spin {}.\n\
         Aggregate throughput at 8 streams at least 3× batch 1: default {:.1}× ({}), short spin {:.1}× ({}).\n\n\
         {llama_line}\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        threads(),
        hf["prompt_tokens"],
        verdict(decode > f(&hf, "decode_tps")),
        verdict(spin_decode > f(&hf, "decode_tps")),
        aggregate / decode,
        verdict(aggregate >= 3.0 * decode),
        spin_aggregate / spin_decode,
        verdict(spin_aggregate >= 3.0 * spin_decode),
    );
    println!("{doc}");
    write_section(&out, "llm", &doc).expect("write BENCHMARKS.md");
}
