//! The `nlp-cold-start` section: how long a BERT-base model takes from process start to its
//! first answer, with the archive unpacked again (the archive cache off), unpacked into an
//! empty cache, and found in the cache; and what a registration of an archive already in the
//! cache adds to the same model's load from a folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cresset_bench::{agent, machine};
use cresset_e2e::{cresset_bin, Server};
use serde_json::json;

/// The model files and the config of the archive.
const CONFIG: &str = "min_workers = 1\nmax_workers = 1\nbatch_size = 1\nresponse_timeout_s = 120\n\n[handler]\nmode = \"sequence_classification\"\nmax_length = 128\ntruncation = true\n";

/// `bert.tar.gz` (and the same files as a folder, `bert-folder/`) in `store`.
fn make_archives(bert: &Path, store: &Path) -> PathBuf {
    let src = store.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    for f in files {
        std::fs::copy(bert.join(f), src.join(f)).expect("copy model files");
    }
    std::fs::write(src.join("model-config.toml"), CONFIG).expect("config");
    let extra: Vec<String> = files
        .iter()
        .map(|f| src.join(f).to_string_lossy().into_owned())
        .collect();
    for (format, name) in [("tgz", "bert"), ("no-archive", "bert-folder")] {
        let out = Command::new(cresset_bin())
            .args([
                "archive",
                "--model-name",
                name,
                "--handler",
                "nlp",
                "--force",
            ])
            .arg("--archive-format")
            .arg(format)
            .arg("--extra-files")
            .arg(extra.join(","))
            .arg("--config-file")
            .arg(src.join("model-config.toml"))
            .arg("--export-path")
            .arg(store)
            .output()
            .expect("run cresset archive");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    store.join("bert.tar.gz")
}

/// Seconds from spawning the server (in `work`) until `/predictions/bert` first answers 200.
fn first_answer(store: &Path, work: &Path, cache_size: &str) -> f64 {
    let started = Instant::now();
    let server = Server::start(&[
        "--model-store",
        store.to_str().expect("utf-8"),
        "--models",
        "bert=bert.tar.gz",
        "--work-dir",
        work.to_str().expect("utf-8"),
        "--no-config-snapshot",
        "--archive-cache-size",
        cache_size,
    ]);
    let url = format!("{}/predictions/bert", server.inference);
    let http = agent();
    let body = json!({"text": "A man is riding a horse."}).to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ok = http
            .post(&url)
            .header("content-type", "application/json")
            .send(body.as_str())
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "no answer:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    stop(server);
    seconds
}

/// Stop a server and wait until it has exited.
fn stop(mut server: Server) {
    server.terminate();
    let _ = server.wait_exit(Duration::from_secs(60));
}

/// Seconds a synchronous registration of `archive` (under `name`) takes, and the seconds of it
/// the server logged as the model's load (plugin, model and worker: `model ready … seconds=`).
fn register(server: &Server, archive: &str, name: &str) -> (f64, f64) {
    let started = Instant::now();
    server.register(&format!(
        "url={archive}&model_name={name}&initial_workers=1&synchronous=true"
    ));
    let seconds = started.elapsed().as_secs_f64();
    let log = server.log();
    let load = log
        .lines()
        .filter(|l| l.contains("model ready") && l.contains(&format!("model={name} ")))
        .find_map(|l| {
            l.split("seconds=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no load time logged for {name}:\n{log}"));
    (seconds, load)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The section's text.
pub fn section(bert: &Path, quick: bool) -> String {
    let runs = if quick { 1 } else { 3 };
    let store = tempfile::tempdir().expect("tempdir");
    let archive = make_archives(bert, store.path());
    let archive_mib = std::fs::metadata(&archive).map_or(0, |m| m.len()) as f64 / (1 << 20) as f64;
    let mut off = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..runs {
        let work = tempfile::tempdir().expect("tempdir");
        off.push(first_answer(store.path(), work.path(), "0"));
        cold.push(first_answer(store.path(), work.path(), "17179869184"));
        warm.push(first_answer(store.path(), work.path(), "17179869184"));
    }
    // Registrations in a running server whose cache holds the archive: the archive again under
    // other names, against the same files as a folder (no unpacking at all).
    let work = tempfile::tempdir().expect("tempdir");
    let _ = first_answer(store.path(), work.path(), "17179869184");
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--work-dir",
        work.path().to_str().expect("utf-8"),
        "--no-config-snapshot",
    ]);
    server.wait_healthy();
    let mut cached = Vec::new();
    let mut cached_load = Vec::new();
    let mut overheads = Vec::new();
    let mut folder = Vec::new();
    for i in 0..runs.max(3) {
        let (seconds, load) = register(&server, "bert.tar.gz", &format!("cached{i}"));
        cached.push(seconds);
        cached_load.push(load);
        overheads.push(seconds - load);
        folder.push(register(&server, "bert-folder", &format!("folder{i}")).0);
    }
    stop(server);
    let (off, cold, warm) = (median(off), median(cold), median(warm));
    let (cached, cached_load, folder) = (median(cached), median(cached_load), median(folder));
    let overhead = median(overheads);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    format!(
        "## Cold start: BERT-base from a `.tar.gz` (issue 17, item 6)\n\n\
         Measured by `make bench` (`bench/src/bin/nlp/cold_start.rs`){}. Machine: {}.\n\
         The BERT-base-shaped classifier of the section above, archived by `cresset archive` as a\n\
         {archive_mib:.0} MiB `.tar.gz` (one worker, `dtype = \"auto\"`). Time from spawning `cresset serve\n\
         --models bert=bert.tar.gz` until the first prediction answers 200, median of {runs}.\n\n\
         | | process start to first answer |\n| --- | ---: |\n\
         | archive cache off (`--archive-cache-size 0`: unpacked on every start) | {off:.2} s |\n\
         | archive cache empty (unpacked into the cache) | {cold:.2} s |\n\
         | archive cache holding the archive (a restart) | {warm:.2} s |\n\n\
         Registration in a running server (`synchronous=true`, one worker), median of {}: the\n\
         archive already in the cache {cached:.3} s in all, of which the model's load (plugin, weights,\n\
         worker, as the server logs it) {cached_load:.3} s and the rest ({overhead:.3} s) the archive and the\n\
         registration; the same files as a folder archive in the store {folder:.3} s (a writable\n\
         folder's weights are copied into memory; the cache's read-only files are used in place).\n\n\
         Targets (issue 17): first answer from a warm cache ≤ 1 s: {warm:.2} s ({}); a registration of an\n\
         already-extracted archive ≤ 0.3 s plus its load: {overhead:.3} s ({}).\n",
        if quick { " with `--quick`" } else { "" },
        machine(),
        runs.max(3),
        verdict(warm <= 1.0),
        verdict(overhead <= 0.3),
    )
}
