//! `cresset-bench-llm`: SmolLM2-135M-Instruct (the default store's Q4_1 GGUF) through the `gpt`
//! plugin in the real server, over the OpenAI-compatible API with streaming, its weights held
//! four ways (int4 as the file has them, int8 quantized at load, bf16 and f32 dense), against
//! llama.cpp on the same file and HuggingFace transformers `generate()` on the same weights and
//! threads, in one run: time to first token, decode tokens/s of one stream, aggregate tokens/s
//! of 8 concurrent streams (continuous batching), and the resident memory of the weights.
//! llama.cpp is `llama-cpp-python`, built by `scripts/setup-llama-cpp.sh` and named by
//! `$CRESSET_LLAMA_CPP_PYTHON`; without it the benchmark fails.
//!
//! Results go to the `llm` section of `BENCHMARKS.md`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cresset_bench::{
    cli, concurrently, machine, proc_status_mib, smollm2_gguf, stream_completion, threads,
    venv_python, write_section,
};
use cresset_e2e::{dir_archive, repo_root, Server};
use cresset_torch::decoder::{Decoder, LoadOptions, Quantize};
use cresset_torch::gguf::Gguf;
use cresset_torch::quant::QuantizedWeight;
use cresset_torch::tch::{self, Device, Kind, Tensor};
use serde_json::{json, Value};

/// A prompt that keeps a small model generating (it counts on), so that every run makes the
/// same number of tokens.
const PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
const NEW_TOKENS: u32 = 64;

/// Client `i`'s prompt when every client asks something different: the count from `i + 1`
/// (`i = 0` gives [`PROMPT`]).
fn counting_from(i: usize) -> String {
    let numbers: Vec<String> = (1..=10).map(|j| (i + j).to_string()).collect();
    format!("{},", numbers.join(", "))
}

/// One streamed completion of `prompt`: (time to first token, decode tokens/s, tokens).
fn stream(url: &str, prompt: &str) -> (Duration, f64, u64) {
    let s = stream_completion(
        url,
        &json!({"model": "smollm2", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}}),
    );
    let rate = s.tokens.saturating_sub(1) as f64 / (s.last - s.first).as_secs_f64().max(1e-9);
    (s.first, rate, s.tokens)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One way of holding SmolLM2's weights, served and loaded.
struct Variant {
    /// The table's row label.
    label: &'static str,
    /// `[handler]` lines of the archive.
    handler: &'static str,
    /// The same choice for an in-process load (weights resident memory).
    load: fn() -> LoadOptions,
}

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            label: "Cresset int4: the GGUF's Q4_1 blocks as they are, on the block kernel (the default: `quantize` and `dtype` \"auto\")",
            handler: "",
            load: || {
                let mut o = LoadOptions::new(Kind::Float, Device::Cpu);
                o.keep_gguf_quantization = true;
                o
            },
        },
        Variant {
            label: "Cresset int8 per channel, quantized at load (`quantize = \"int8\"`)",
            handler: "quantize = \"int8\"\n",
            load: || {
                let mut o = LoadOptions::new(Kind::Float, Device::Cpu);
                o.quantize = Some(Quantize::Int8);
                o
            },
        },
        Variant {
            label: "Cresset bf16 dense (`quantize = \"none\"`, `dtype = \"bfloat16\"`)",
            handler: "quantize = \"none\"\ndtype = \"bfloat16\"\n",
            load: || LoadOptions::new(Kind::BFloat16, Device::Cpu),
        },
        Variant {
            label: "Cresset f32 dense (`quantize = \"none\"`, `dtype = \"float32\"`)",
            handler: "quantize = \"none\"\ndtype = \"float32\"\n",
            load: || LoadOptions::new(Kind::Float, Device::Cpu),
        },
    ]
}

/// One variant served: TTFT ms, decode tokens/s at 1 stream, aggregate tokens/s at 8 streams
/// of the same prompt and of 8 different prompts.
struct Served {
    ttft_ms: f64,
    decode: f64,
    aggregate: f64,
    aggregate_distinct: f64,
}

impl Served {
    /// The table row of `label`, the ratios to llama.cpp's `llama` tokens/s, `resident` the
    /// last two cells (weights resident and its ratio to the file; `" | "` when not measured).
    fn row(&self, label: &str, llama: f64, resident: &str) -> String {
        format!(
            "| {label} | {:.0} ms | {:.1} | {:.2}× | {:.1} | {:.2}× | {:.1} | {:.2}× | {resident} |\n",
            self.ttft_ms,
            self.decode,
            self.decode / llama,
            self.aggregate,
            self.aggregate / llama,
            self.aggregate_distinct,
            self.aggregate_distinct / llama,
        )
    }
}

/// `run`'s result with `var=value` in this process's environment (which the servers and probes
/// it starts inherit), the variable removed after.
fn with_env<T>(var: &str, value: &str, run: impl FnOnce() -> T) -> T {
    eprintln!("bench-llm: int4 with {var}={value}");
    std::env::set_var(var, value);
    let out = run();
    std::env::remove_var(var);
    out
}

fn measure(gguf: &Path, handler: &str, runs: usize) -> Served {
    let store = tempfile::tempdir().expect("tempdir");
    let dir = dir_archive(
        store.path(),
        "smollm2",
        "gpt",
        &format!(
            "min_workers = 1\nbatch_size = 8\nresponse_timeout_s = 300\n\n[handler]\nmax_seq_len = 512\n{handler}"
        ),
        &[],
    );
    cresset_bench::link_or_copy(gguf, &dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "smollm2",
    ]);
    server.wait_healthy();
    let url = format!("{}/v1/completions", server.inference);
    stream(&url, PROMPT); // warm-up
    let solo: Vec<(Duration, f64, u64)> = (0..runs).map(|_| stream(&url, PROMPT)).collect();
    let ttft_ms = median(solo.iter().map(|s| s.0.as_secs_f64() * 1000.0).collect());
    let decode = median(solo.iter().map(|s| s.1).collect());
    // Eight clients at once: tokens over the wall time from the first request to the last
    // answer, prefill included.
    let aggregate = |distinct: bool| {
        let (tokens, wall) = concurrently(8, |i| {
            let prompt = if distinct {
                counting_from(i)
            } else {
                PROMPT.to_owned()
            };
            stream(&url, &prompt).2
        });
        tokens.iter().sum::<u64>() as f64 / wall.as_secs_f64()
    };
    Served {
        ttft_ms,
        decode,
        aggregate: median((0..runs).map(|_| aggregate(false)).collect()),
        aggregate_distinct: median((0..runs).map(|_| aggregate(true)).collect()),
    }
}

/// In a child process (`--weights-rss N`): the resident memory the weights of variant `N` add
/// to a process that has libtorch's runtime up already (VmRSS after the load minus before), in
/// MiB, with the decoder's own count of its bytes.
fn weights_rss(gguf: &Path, variant: usize) -> (f64, f64) {
    let out = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--weights-rss",
            &variant.to_string(),
            &gguf.display().to_string(),
        ])
        .output()
        .expect("run the weights probe");
    assert!(
        out.status.success(),
        "the weights probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the probe prints JSON");
    (
        v["rss_mib"].as_f64().unwrap_or(f64::NAN),
        v["counted_mib"].as_f64().unwrap_or(f64::NAN),
    )
}

/// The child side of [`weights_rss`].
fn weights_probe(variant: usize, gguf: &Path) {
    tch::set_num_threads(threads() as i32);
    let _guard = tch::no_grad_guard();
    // Bring libtorch's runtime (and the kernels every variant uses) up first.
    let x = Tensor::ones([8, 64], (Kind::Float, Device::Cpu));
    let warm =
        QuantizedWeight::int4_from_dense(&Tensor::ones([64, 64], (Kind::Float, Device::Cpu)), 32)
            .expect("a warm-up weight");
    let _ = warm.forward(&x).sum(Kind::Float).double_value(&[]);
    let _ = x
        .to_kind(Kind::BFloat16)
        .matmul(&x.to_kind(Kind::BFloat16).tr())
        .sum(Kind::Float)
        .double_value(&[]);
    let file = Gguf::open(gguf).expect("open the GGUF");
    cresset_torch::release_freed_memory();
    let before = proc_status_mib("self", "VmRSS:");
    let mut opts = (variants()[variant].load)();
    opts.low_cpu_mem_usage = true;
    let model = Decoder::load_gguf_with(&file, &opts).expect("load");
    drop(file);
    cresset_torch::release_freed_memory();
    let after = proc_status_mib("self", "VmRSS:");
    println!(
        "{}",
        json!({"rss_mib": after - before, "counted_mib": model.resident_bytes() as f64 / 1048576.0})
    );
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
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("--weights-rss") {
        let variant = args.next().and_then(|v| v.parse().ok()).expect("a variant");
        let gguf = args.next().expect("a GGUF path");
        return weights_probe(variant, Path::new(&gguf));
    }
    let (quick, out) = cli();
    let runs = if quick { 1 } else { 3 };
    let gguf = smollm2_gguf();
    let gguf_mib = std::fs::metadata(&gguf).expect("the GGUF").len() as f64 / 1048576.0;
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
    let mut llama_args = args.clone();
    llama_args.push(runs.to_string());
    let llama = python_json(
        Path::new(&llama_python),
        "bench/llama_cpp_baseline.py",
        &llama_args,
    )
    .expect("the llama.cpp baseline ran");
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (llama_ttft, llama_decode) = (f(&llama, "ttft_s") * 1000.0, f(&llama, "decode_tps"));

    let mut table = String::from(
        "| | time to first token | decode tokens/s, 1 stream | ÷ llama.cpp | aggregate tokens/s, 8 streams | 8 streams ÷ llama.cpp's 1 | 8 streams, 8 different prompts | ÷ llama.cpp's 1 | weights resident (decoder's count) | ÷ GGUF file |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut default = None;
    for (i, v) in variants().iter().enumerate() {
        eprintln!("bench-llm: {}", v.label);
        let (rss, counted) = weights_rss(&gguf, i);
        let served = measure(&gguf, v.handler, runs);
        table.push_str(&served.row(
            v.label,
            llama_decode,
            &format!("{rss:.0} MiB ({counted:.0}) | {:.2}×", rss / gguf_mib),
        ));
        default.get_or_insert((served, rss));
    }
    let (int4, int4_rss) = default.expect("the default variant ran");
    // The OpenMP wait before issue 13: threads sleep between parallel regions.
    let spin = with_env("OMP_WAIT_POLICY", "PASSIVE", || measure(&gguf, "", runs));
    table.push_str(&spin.row(
        "Cresset int4 with `OMP_WAIT_POLICY=PASSIVE` (the server's default before issue 13)",
        llama_decode,
        " | ",
    ));
    // Decode steps op by op (rotary, cache write and attention as some thirty libtorch calls
    // per layer), as before the fused decode attention.
    let op_by_op = with_env("CRESSET_FUSED_DECODE", "0", || measure(&gguf, "", runs));
    table.push_str(&op_by_op.row(
        "Cresset int4 with decode steps op by op (`CRESSET_FUSED_DECODE=0`: the default before the fused decode attention)",
        llama_decode,
        " | ",
    ));
    // The same file on libtorch's int4 (layers) and int8 (head) kernels instead of the block
    // kernel, in the same run.
    let (torch_kernels, (torch_rss, torch_counted)) = with_env("CRESSET_BLOCK_KERNEL", "0", || {
        let rss = weights_rss(&gguf, 0);
        (measure(&gguf, "", runs), rss)
    });
    table.push_str(&torch_kernels.row(
        "Cresset int4 on libtorch's int4 and int8 kernels (`CRESSET_BLOCK_KERNEL=0`: the default before the block kernel)",
        llama_decode,
        &format!(
            "{torch_rss:.0} MiB ({torch_counted:.0}) | {:.2}×",
            torch_rss / gguf_mib
        ),
    ));
    table.push_str(&format!(
        "| transformers {} `generate()`, f32 dequantized (batch of 8 for the aggregate) | {:.0} ms | {:.1} | {:.2}× | {:.1} | {:.2}× | – | | | |\n",
        hf["transformers"].as_str().unwrap_or("?"),
        f(&hf, "ttft_s") * 1000.0,
        f(&hf, "decode_tps"),
        f(&hf, "decode_tps") / llama_decode,
        f(&hf, "aggregate8_tps"),
        f(&hf, "aggregate8_tps") / llama_decode,
    ));
    table.push_str(&format!(
        "| llama.cpp (llama-cpp-python {}, portable build) on the Q4_1 GGUF as it is | {llama_ttft:.0} ms | {llama_decode:.1} | 1.00× | – | | – | | | |\n",
        llama["version"].as_str().unwrap_or("?"),
    ));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let doc = format!(
        "## LLM: SmolLM2-135M-Instruct generation (issues 6 and 13)\n\n\
         Measured by `make bench` (the program `bench/src/bin/llm.rs`){}. Machine: {}.\n\
         Weights: the default store's Q4_1 GGUF ({gguf_mib:.1} MiB); the dense and int8 rows dequantize it at load\n\
         (the same weights an f32 safetensors export of it holds). {} threads; greedy; the prompt `{PROMPT}`\n\
         ({} tokens), {NEW_TOKENS} new tokens. Cresset is measured over loopback HTTP with server-sent\n\
         events (time to first token is from sending the request to the first text event), with one\n\
         instance of 8 KV-cache slots; the baselines in-process. Median of {runs} runs (llama.cpp's too). The aggregate is\n\
         the tokens of 8 clients streaming at once over the wall time from the first request to the last\n\
         answer, prefill included: all 8 with the same prompt (the issue's measure: Cresset computes the\n\
         shared prompt once, see README, Scheduling), and 8 different prompts (counting from 1 to 8:\n\
         no two begin alike, so each is computed whole). \"Weights resident\"\n\
         is what loading adds to a process's resident set once libtorch is up (VmRSS after minus before,\n\
         the GGUF file closed), next to the decoder's own count of its tensors' bytes.\n\n{table}\n\
         Targets (issue 13), for the default int4 row: decode at 1 stream ≥ 0.6× llama.cpp: {:.2}× ({});\n\
         time to first token no worse than llama.cpp's: {:.0} ms vs {llama_ttft:.0} ms ({});\n\
         aggregate at 8 streams ≥ 2× llama.cpp's single stream: {:.2}× ({}; with 8 different prompts {:.2}×);\n\
         weights resident ≤ 1.5× the GGUF file: {:.2}× ({}).\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        threads(),
        hf["prompt_tokens"],
        int4.decode / llama_decode,
        verdict(int4.decode >= 0.6 * llama_decode),
        int4.ttft_ms,
        verdict(int4.ttft_ms <= llama_ttft),
        int4.aggregate / llama_decode,
        verdict(int4.aggregate >= 2.0 * llama_decode),
        int4.aggregate_distinct / llama_decode,
        int4_rss / gguf_mib,
        verdict(int4_rss <= 1.5 * gguf_mib),
    );
    println!("{doc}");
    write_section(&out, "llm", &doc).expect("write BENCHMARKS.md");
}
