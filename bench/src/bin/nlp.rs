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

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cresset_bench::{
    agent, cached, cli, machine, peak_rss_mib, threads, venv_python, write_section,
};
use cresset_e2e::{dir_archive, repo_root, Server};
use serde_json::{json, Value};

const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse across the open field near the old farm house.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods while the rain kept falling on them.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
];

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
    let store = tempfile::tempdir().expect("tempdir");
    let dir = dir_archive(
        store.path(),
        "minilm",
        "nlp",
        "min_workers = 1\nbatch_size = 8\njob_queue_size = 1000\nresponse_timeout_s = 60\n\n[handler]\nmode = \"feature_extraction\"\nmax_length = 256\ntruncation = true\n",
        &[],
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if std::fs::hard_link(minilm.join(f), dir.join(f)).is_err() {
            std::fs::copy(minilm.join(f), dir.join(f)).expect("copy model files");
        }
    }
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "minilm",
    ]);
    server.wait_healthy();
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
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (stop, count, url) = (stop.clone(), count.clone(), url.clone());
            std::thread::spawn(move || {
                let http = agent();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"text": SENTENCES[c]}).to_string();
                    if let Ok(r) = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body)
                    {
                        if r.status().as_u16() == 200 {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = count.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let concurrent =
        (count.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let rss = peak_rss_mib(server.pid());
    (batch1, batch8, concurrent, rss)
}

fn main() {
    let (quick, out) = cli();
    let seconds = if quick { 2.0 } else { 10.0 };
    let minilm = cached("assets/all-minilm-l6-v2");
    assert!(
        minilm.join("model.safetensors").is_file(),
        "run `make models` first"
    );

    eprintln!("bench-nlp: transformers baseline");
    let baseline = Command::new(venv_python())
        .arg(repo_root().join("bench/transformers_baseline.py"))
        .arg(&minilm)
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
    let (batch1, batch8, concurrent, rss) = measure(&minilm, seconds);
    // The operator's alternative on a machine whose cores serve only the model: a short
    // OpenMP spin instead of the server's default PASSIVE wait (README, "Configuration").
    eprintln!("bench-nlp: cresset with GOMP_SPINCOUNT=30000");
    std::env::set_var("GOMP_SPINCOUNT", "30000");
    let (spin1, spin8, spin_concurrent, _) = measure(&minilm, seconds);
    std::env::remove_var("GOMP_SPINCOUNT");

    let (b1, b8) = (
        baseline["batch1"].as_f64().unwrap_or(f64::NAN),
        baseline["batch8"].as_f64().unwrap_or(f64::NAN),
    );
    let verdict = |ours: f64, theirs: f64| if ours >= theirs { "met" } else { "NOT met" };
    let table = format!(
        "| | batch 1 (sentences/s) | batch 8 (sentences/s) | 8 clients × 1 sentence (sentences/s) |\n\
         | --- | ---: | ---: | ---: |\n\
         | Cresset nlp plugin, over HTTP (default: `OMP_WAIT_POLICY=PASSIVE`) | {batch1:.1} | {batch8:.1} | {concurrent:.1} |\n\
         | Cresset nlp plugin, over HTTP, `GOMP_SPINCOUNT=30000` | {spin1:.1} | {spin8:.1} | {spin_concurrent:.1} |\n\
         | transformers {} ({} attention), in-process | {b1:.1} | {b8:.1} | – |\n\
         | Cresset ÷ transformers (default) | {:.2}× | {:.2}× | |\n\
         | Cresset ÷ transformers (`GOMP_SPINCOUNT=30000`) | {:.2}× | {:.2}× | |\n",
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
         default OpenMP setting: batch 1 {}, batch 8 {}. With `GOMP_SPINCOUNT=30000`: batch 1 {},\n\
         batch 8 {}.\n\n\
         The default's margin is thin and moves from run to run (before the query, key and value\n\
         projections were fused, batch 8 measured 0.73× to 0.91×): the server makes libgomp's threads\n\
         sleep between parallel regions (`OMP_WAIT_POLICY=PASSIVE`, chosen in issue 4 because\n\
         spinning threads starved the HTTP and client threads sharing these 2 cores), and a 6-layer\n\
         encoder is many small ops that each pay a thread wake-up; transformers runs with libgomp's\n\
         default spin. With a short spin the plugin is clearly faster. The encoder fuses the query,\n\
         key and value projections into one matmul and uses libtorch's fused attention.\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        threads(),
        baseline["torch"].as_str().unwrap_or("?"),
        verdict(batch1, b1),
        verdict(batch8, b8),
        verdict(spin1, b1),
        verdict(spin8, b8),
    );
    println!("{doc}");
    write_section(&out, "nlp", &doc).expect("write BENCHMARKS.md");
    eprintln!("bench-nlp: wrote {}", out.display());
}
