//! `cresset-bench-nlp`: sentence embeddings with all-MiniLM-L6-v2, sentences per second at
//! batch 1 and batch 8, through the nlp plugin in the real server (loopback HTTP), against
//! HuggingFace transformers on the same weights, with the same number of threads, in one run.
//!
//! - batch 1: one sentence per request, one request at a time;
//! - batch 8: eight sentences in one request (`{"text": [...]}`), one request at a time;
//! - also: single-sentence requests from 8 concurrent clients, which the server batches.
//!
//! The baseline (`bench/transformers_baseline.py`) runs first, alone, then the server. Results
//! go to the `nlp` section of `BENCHMARKS.md`. Run it with `make bench`.

#[path = "nlp/cold_start.rs"]
mod cold_start;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cresset_bench::{
    agent, cached, cli, machine, peak_rss_mib, threads, throughput, venv_python, write_section,
    SENTENCES,
};
use cresset_e2e::{dir_archive, repo_root, Server};
use serde_json::{json, Value};

fn rate(seconds: f64, mut call: impl FnMut() -> usize) -> f64 {
    for _ in 0..3 {
        call();
    }
    let start = Instant::now();
    let mut done = 0;
    while start.elapsed().as_secs_f64() < seconds {
        done += call();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// Sentences per second through a fresh server: (batch 1, batch 8, 8 concurrent clients),
/// and the server's peak RSS in MiB.
fn measure(minilm: &Path, seconds: f64) -> (f64, f64, f64, f64) {
    let (_store, server) = serve(
        minilm,
        &["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "minilm",
        "min_workers = 1\nbatch_size = 8\njob_queue_size = 1000\nresponse_timeout_s = 60\n\n[handler]\nmode = \"feature_extraction\"\nmax_length = 256\ntruncation = true\ndtype = \"float32\"\n",
        &[],
    );
    let url = format!("{}/predictions/minilm", server.inference);
    let http = agent();
    let send = |body: Value| -> usize {
        let reply = http
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .expect("request");
        assert_eq!(reply.status().as_u16(), 200);
        1
    };
    let mut i = 0;
    let batch1 = rate(seconds, || {
        i = (i + 1) % SENTENCES.len();
        send(json!({"text": SENTENCES[i]}))
    });
    let batch8 = rate(seconds, || 8 * send(json!({"text": SENTENCES})));
    // Eight clients, one sentence each: the server's dynamic batching.
    let bodies: Vec<String> = (0..8)
        .map(|c| json!({"text": SENTENCES[c]}).to_string())
        .collect();
    let concurrent = throughput(&url, &bodies, seconds);
    let rss = peak_rss_mib(server.pid());
    (batch1, batch8, concurrent, rss)
}

/// A server on a fresh store holding one directory archive `name` (nlp handler) made of
/// `files` hard-linked from `src`, with `config` as its `model-config.toml`, started with `env`
/// added to its environment.
fn serve(
    src: &Path,
    files: &[&str],
    name: &str,
    config: &str,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, Server) {
    let store = tempfile::tempdir().expect("tempdir");
    let dir = dir_archive(store.path(), name, "nlp", config, &[]);
    for f in files {
        cresset_bench::link_or_copy(&src.join(f), &dir.join(f));
    }
    let server = Server::start_with_env(
        &[
            "--model-store",
            store.path().to_str().expect("utf-8"),
            "--models",
            name,
        ],
        env,
    );
    server.wait_healthy();
    (store, server)
}

/// Another process keeping one core busy while it lives (the co-tenant case).
struct BusyCore(std::process::Child);

impl BusyCore {
    fn start() -> Self {
        Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("start a busy loop"),
        )
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Item 9 of issue 13: the OpenMP wait policy and workers × threads, on MiniLM at 1 and 32
/// clients, alone and beside a process that keeps one core busy.
fn threads_section(minilm: &Path, seconds: f64, quick: bool) -> String {
    let files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let handler = "[handler]\nmode = \"feature_extraction\"\nmax_length = 256\ntruncation = true\ndtype = \"float32\"\n";
    // `None`: the config leaves the workers to the server (one per core for the nlp plugin).
    let settings: [(&str, Option<u32>, &[(&str, &str)]); 5] = [
        ("default: workers unset (one per core), threads per batch, bounded spin (`GOMP_SPINCOUNT=30000`)", None, &[]),
        ("1 worker × 2 threads, bounded spin", Some(1), &[]),
        ("1 worker × 2 threads, `OMP_WAIT_POLICY=PASSIVE` (the old default)", Some(1), &[("OMP_WAIT_POLICY", "PASSIVE")]),
        ("1 worker × 2 threads, `GOMP_SPINCOUNT=300000` (libgomp's own default)", Some(1), &[("GOMP_SPINCOUNT", "300000")]),
        ("2 workers × 1 thread (`intra_op_threads = 1`)", Some(2), &[("CRESSET_INTRA_OP_THREADS", "1")]),
    ];
    let body = json!({"text": SENTENCES[3]});
    let mut rows = Vec::new();
    for (label, workers, env) in settings {
        eprintln!("bench-nlp: threads: {label}");
        let workers = workers
            .map(|w| format!("min_workers = {w}\nmax_workers = {w}\n"))
            .unwrap_or_default();
        let config = format!(
            "{workers}batch_size = 8\njob_queue_size = 1000\nresponse_timeout_s = 60\n\n{handler}"
        );
        let (_store, server) = serve(minilm, &files, "minilm", &config, env);
        let url = format!("{}/predictions/minilm", server.inference);
        let mut cells = Vec::new();
        for busy in [false, true] {
            let _busy = busy.then(BusyCore::start);
            for clients in [1, 32] {
                cells.push(throughput(&url, &vec![body.to_string(); clients], seconds));
            }
        }
        rows.push((label, cells));
    }
    let best: Vec<f64> = (0..4)
        .map(|i| rows.iter().map(|r| r.1[i]).fold(0.0, f64::max))
        .collect();
    let mut table = String::from(
        "| requests/s (one sentence each) | 1 client | 32 clients | 1 client, a core busy | 32 clients, a core busy |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (label, cells) in &rows {
        let cells: Vec<String> = cells
            .iter()
            .zip(&best)
            .map(|(v, b)| format!("{v:.0} ({:.0}%)", 100.0 * v / b))
            .collect();
        table.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
    }
    let within: Vec<bool> = rows[0]
        .1
        .iter()
        .zip(&best)
        .map(|(v, b)| *v >= 0.9 * b)
        .collect();
    format!(
        "## NLP: threads and the OpenMP wait policy (issue 13, item 9)\n\n\
         Measured by `make bench` (`bench/src/bin/nlp.rs`){}. Machine: {}.\n\
         all-MiniLM-L6-v2 (f32) served by the nlp plugin, one sentence per request, {seconds:.0} s per cell after 1 s of\n\
         warm-up; \"a core busy\" runs a shell busy loop beside the server. Percentages are of the best\n\
         setting in the column.\n\n{table}\n\
         Target: the default within 10% of the best setting in every column: {}.\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        if within.iter().all(|w| *w) { "met".to_owned() } else {
            format!("NOT met (columns {:?})", within.iter().enumerate().filter(|(_, w)| !**w).map(|(i, _)| i + 1).collect::<Vec<_>>())
        }
    )
}

/// 64 short texts for the accuracy comparison of f32 and `auto`.
fn review_texts() -> Vec<String> {
    let subjects = [
        "The film",
        "This phone",
        "The hotel",
        "Our dinner",
        "The book",
        "The update",
        "That concert",
        "The service",
    ];
    let verdicts = [
        "was wonderful from start to finish",
        "broke after two days",
        "was fine, nothing special",
        "made me laugh and cry",
        "was a waste of money",
        "exceeded every expectation",
        "felt far too long",
        "is the best I have had in years",
    ];
    subjects
        .iter()
        .flat_map(|s| verdicts.iter().map(move |v| format!("{s} {v}.")))
        .collect()
}

/// Issue 13, items 4 and 5: BERT-base in f32 and `dtype = "auto"` with two workers, and what a
/// second worker costs in memory.
/// The BERT-base-shaped classifier's folder (made once, cached).
fn bert_base_dir(minilm: &Path) -> PathBuf {
    let dir = cached("bench/bert-base-random");
    let made = Command::new(venv_python())
        .arg(repo_root().join("bench/make_bert_base.py"))
        .arg(&dir)
        .arg(minilm)
        .status()
        .expect("run make_bert_base.py");
    assert!(made.success(), "make_bert_base.py failed");
    dir
}

fn bert_base_section(minilm: &Path, seconds: f64, quick: bool) -> String {
    let dir = bert_base_dir(minilm);
    let files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let body = json!({"text": SENTENCES[3]});
    let texts = review_texts();
    let mut rows = Vec::new();
    let mut answers: Vec<Vec<Value>> = Vec::new();
    for (label, workers, dtype) in [
        ("f32, 1 worker × 2 threads", 1, "float32"),
        ("f32, 2 workers × 1 thread", 2, "float32"),
        ("`auto`, 2 workers × 1 thread", 2, "auto"),
    ] {
        eprintln!("bench-nlp: bert-base: {label}");
        let config = format!(
            "min_workers = {workers}\nmax_workers = {workers}\nbatch_size = 8\njob_queue_size = 1000\nresponse_timeout_s = 120\n\n[handler]\nmode = \"sequence_classification\"\nmax_length = 128\ntruncation = true\ndtype = \"{dtype}\"\n"
        );
        let (_store, server) = serve(&dir, &files, "bert", &config, &[]);
        let url = format!("{}/predictions/bert", server.inference);
        let mut got = Vec::new();
        for chunk in texts.chunks(8) {
            let reply = agent()
                .post(&url)
                .header("content-type", "application/json")
                .send(json!({ "text": chunk }).to_string())
                .expect("classify");
            let v: Value = serde_json::from_reader(reply.into_body().into_reader()).expect("JSON");
            got.extend(v.as_array().cloned().unwrap_or_default());
        }
        answers.push(got);
        let c1 = throughput(&url, &[body.to_string()], seconds);
        let c32 = throughput(&url, &vec![body.to_string(); 32], seconds);
        let rss = cresset_bench::proc_status_mib(&server.pid().to_string(), "VmRSS:");
        rows.push((label, c1, c32, rss));
    }
    // f32 (2 workers) against auto on the same texts.
    let (f32s, autos) = (&answers[1], &answers[2]);
    let agree = f32s
        .iter()
        .zip(autos)
        .filter(|(a, b)| a["label"] == b["label"])
        .count();
    let max_diff = f32s
        .iter()
        .zip(autos)
        .map(|(a, b)| {
            (a["score"].as_f64().unwrap_or(f64::NAN) - b["score"].as_f64().unwrap_or(f64::NAN))
                .abs()
        })
        .fold(0.0, f64::max);
    let mut table = String::from(
        "| BERT-base, sequence classification | 1 client (req/s) | 32 clients (req/s) | server RSS after the runs |\n| --- | ---: | ---: | ---: |\n",
    );
    for (label, c1, c32, rss) in &rows {
        table.push_str(&format!(
            "| {label} | {c1:.1} | {c32:.1} | {rss:.0} MiB |\n"
        ));
    }
    let (one, f32_2, auto_2) = (&rows[0], &rows[1], &rows[2]);
    let speedup = (auto_2.1 / f32_2.1, auto_2.2 / f32_2.2);
    let bf16 = cresset_torch::layers::cpu_has_native_bf16();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    format!(
        "## NLP: BERT-base in f32 and `dtype = \"auto\"`, one weight copy for two workers (issue 13, items 4 and 5)\n\n\
         Measured by `make bench` (`bench/src/bin/nlp.rs`){}. Machine: {} (native bf16: {}).\n\
         A BERT-base-shaped classifier (12 layers, hidden 768, random weights, seeded:\n\
         `bench/make_bert_base.py`), one sentence of 14 words per request, {seconds:.0} s per cell after 1 s of warm-up.\n\
         `auto` runs in {} here.\n\n{table}\n\
         `auto` ÷ f32 with two workers: {:.2}× at 1 client, {:.2}× at 32 clients (target ≥ 1.5× where the CPU has\n\
         native bf16: {}). Accuracy on 64 fixed review sentences: the same label for {agree} of 64, largest score\n\
         difference {max_diff:.4}.\n\
         Two workers' RSS ÷ one worker's (f32): {:.2}× (target ≤ 1.15×: {}).\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        if bf16 { "yes" } else { "no" },
        if bf16 { "bf16" } else { "f32" },
        speedup.0,
        speedup.1,
        if bf16 { verdict(speedup.0 >= 1.5 && speedup.1 >= 1.5) } else { "not applicable" },
        f32_2.3 / one.3,
        verdict(f32_2.3 <= 1.15 * one.3),
    )
}

/// The MiniLM section: sentences per second at batch 1 and 8 against transformers.
fn minilm_section(minilm: &Path, seconds: f64, quick: bool) -> String {
    eprintln!("bench-nlp: transformers baseline");
    let baseline = Command::new(venv_python())
        .arg(repo_root().join("bench/transformers_baseline.py"))
        .arg(minilm)
        .arg(threads().to_string())
        .arg(seconds.to_string())
        .arg(json!(SENTENCES).to_string())
        .output()
        .expect("run the transformers baseline");
    assert!(
        baseline.status.success(),
        "baseline failed: {}",
        String::from_utf8_lossy(&baseline.stderr)
    );
    let baseline: Value = serde_json::from_slice(&baseline.stdout).expect("baseline JSON");

    eprintln!("bench-nlp: cresset");
    let (batch1, batch8, concurrent, rss) = measure(minilm, seconds);
    // The old default: OpenMP threads sleep between parallel regions.
    eprintln!("bench-nlp: cresset with OMP_WAIT_POLICY=PASSIVE");
    std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
    let (spin1, spin8, spin_concurrent, _) = measure(minilm, seconds);
    std::env::remove_var("OMP_WAIT_POLICY");

    let (b1, b8) = (
        baseline["batch1"].as_f64().unwrap_or(f64::NAN),
        baseline["batch8"].as_f64().unwrap_or(f64::NAN),
    );
    let verdict = |ours: f64, theirs: f64| if ours >= theirs { "met" } else { "NOT met" };
    let table = format!(
        "| | batch 1 (sentences/s) | batch 8 (sentences/s) | 8 clients × 1 sentence (sentences/s) |\n\
         | --- | ---: | ---: | ---: |\n\
         | Cresset nlp plugin, over HTTP (default: a bounded spin, `GOMP_SPINCOUNT=30000`) | {batch1:.1} | {batch8:.1} | {concurrent:.1} |\n\
         | Cresset nlp plugin, over HTTP, `OMP_WAIT_POLICY=PASSIVE` (the default before issue 13) | {spin1:.1} | {spin8:.1} | {spin_concurrent:.1} |\n\
         | transformers {} ({} attention), in-process | {b1:.1} | {b8:.1} | – |\n\
         | Cresset ÷ transformers (default) | {:.2}× | {:.2}× | |\n\
         | Cresset ÷ transformers (`OMP_WAIT_POLICY=PASSIVE`) | {:.2}× | {:.2}× | |\n",
        baseline["transformers"].as_str().unwrap_or("?"),
        baseline["attention"].as_str().unwrap_or("?"),
        batch1 / b1,
        batch8 / b8,
        spin1 / b1,
        spin8 / b8,
    );
    let doc = format!(
        "## NLP: sentence embeddings (issue 5)\n\n\
         Measured by `make bench` (the program `bench/src/bin/nlp.rs`){}. Machine: {}.\n\
         Model: all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden), f32, {} threads on both sides\n\
         (torch {} in the baseline). The same eight sentences (6 to 16 words) for both. Each\n\
         side tokenizes, runs the encoder, mean-pools and normalises; Cresset's numbers also\n\
         include HTTP and JSON on loopback, transformers' are in-process calls. Server peak RSS:\n\
         {rss:.0} MiB.\n\n{table}\n\
         Target: at least as fast as transformers eager at both batch sizes. With the server's\n\
         default (a bounded spin): batch 1 {}, batch 8 {}. With `OMP_WAIT_POLICY=PASSIVE`: batch 1 {},\n\
         batch 8 {}. Each op of a 6-layer encoder is small: with the threads asleep between ops\n\
         (`PASSIVE`) each pays a wake-up; the bounded spin bridges the gap from one op to the next and\n\
         then sleeps (see the threads section below).\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        threads(),
        baseline["torch"].as_str().unwrap_or("?"),
        verdict(batch1, b1),
        verdict(batch8, b8),
        verdict(spin1, b1),
        verdict(spin8, b8),
    );
    doc
}

/// The sections this run measures: `CRESSET_BENCH_SECTIONS` (a comma-separated subset of
/// `nlp`, `nlp-threads`, `nlp-bert-base` and `nlp-cold-start`), or all of them.
fn wanted(section: &str) -> bool {
    std::env::var("CRESSET_BENCH_SECTIONS")
        .map(|list| list.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

fn main() {
    let (quick, out) = cli();
    let minilm = cached("assets/all-minilm-l6-v2");
    assert!(
        minilm.join("model.safetensors").is_file(),
        "run `make models` first"
    );
    let sections: [(&str, &dyn Fn() -> String); 4] = [
        ("nlp", &|| {
            minilm_section(&minilm, if quick { 2.0 } else { 10.0 }, quick)
        }),
        ("nlp-threads", &|| {
            threads_section(&minilm, if quick { 2.0 } else { 5.0 }, quick)
        }),
        ("nlp-bert-base", &|| {
            bert_base_section(&minilm, if quick { 3.0 } else { 8.0 }, quick)
        }),
        ("nlp-cold-start", &|| {
            cold_start::section(&bert_base_dir(&minilm), quick)
        }),
    ];
    for (name, run) in sections {
        if wanted(name) {
            let doc = run();
            println!("{doc}");
            write_section(&out, name, &doc).expect("write BENCHMARKS.md");
        }
    }
    eprintln!("bench-nlp: wrote {}", out.display());
}
