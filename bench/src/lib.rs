//! What the benchmark programs share: machine description, percentiles, an HTTP agent, peak
//! RSS, a streamed completion, and writing one section of `BENCHMARKS.md` without touching the
//! others.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sentences the MiniLM benchmarks embed.
pub const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse across the open field near the old farm house.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods while the rain kept falling on them.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
];

/// Requests per second from one client per body, each sending its body to `url` one request
/// after another, for `seconds` (after a second of warm-up).
pub fn throughput(url: &str, bodies: &[String], seconds: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = bodies
        .iter()
        .map(|body| {
            let (stop, count, failed, url, body) = (
                stop.clone(),
                count.clone(),
                failed.clone(),
                url.to_owned(),
                body.clone(),
            );
            std::thread::spawn(move || {
                let http = agent();
                while !stop.load(Ordering::Relaxed) {
                    let ok = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.as_str())
                        .is_ok_and(|r| r.status().as_u16() == 200);
                    if ok { &count } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = count.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let done = (count.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let failed = failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "{failed} requests to {url} failed");
    done
}

/// `f(0)`, ..., `f(n - 1)` on `n` threads at once (clients of a server): their results, and the
/// wall time from the start to the last one's end.
pub fn concurrently<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> (Vec<T>, Duration) {
    let started = Instant::now();
    let results = std::thread::scope(|scope| {
        let f = &f;
        let clients: Vec<_> = (0..n).map(|i| scope.spawn(move || f(i))).collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect()
    });
    (results, started.elapsed())
}

/// Put `src` at `dst` (an archive being made): a hard link where the file system allows one,
/// else a copy.
pub fn link_or_copy(src: &Path, dst: &Path) {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
    }
}

/// What a streamed OpenAI completion gave: when its first and last non-empty text arrived
/// (from sending the request), and the completion tokens its usage counts.
pub struct Streamed {
    pub first: Duration,
    pub last: Duration,
    pub tokens: u64,
}

/// POST `body` (a completion request with `"stream": true` and usage asked for) to `url` and
/// read its server-sent events to the end.
pub fn stream_completion(url: &str, body: &serde_json::Value) -> Streamed {
    let started = Instant::now();
    let response = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("stream");
    let (mut first, mut last, mut tokens) = (None, started.elapsed(), 0u64);
    for event in cresset_e2e::sse_events(response.into_body().into_reader()) {
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
    Streamed {
        first: first.unwrap_or(last),
        last,
        tokens,
    }
}

/// The programs' flags: `--quick` (short runs) and `--out FILE` (default `BENCHMARKS.md` at
/// the repository root).
pub fn cli() -> (bool, PathBuf) {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| cresset_e2e::repo_root().join("BENCHMARKS.md"));
    (quick, out)
}

/// The p-th percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// An HTTP agent that returns error statuses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A field of `/proc/<process>/status` given in kB (`VmHWM:`, `VmRSS:`), in MiB; `process` is
/// a pid or `self`.
pub fn proc_status_mib(process: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A process's peak resident memory (`VmHWM`) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    proc_status_mib(&pid.to_string(), "VmHWM:")
}

/// Every core: the server gives its one instance all of them (intra-op threads = cores /
/// instances), and the baselines get as many.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `rel` under the asset cache (`$CRESSET_CACHE`, set by `make bench`).
pub fn cached(rel: &str) -> PathBuf {
    PathBuf::from(
        std::env::var("CRESSET_CACHE").expect("CRESSET_CACHE is set (run through `make bench`)"),
    )
    .join(rel)
}

/// The SmolLM2-135M-Instruct GGUF of the default store (fetched by `make models`).
pub fn smollm2_gguf() -> PathBuf {
    let gguf = cached("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "run `make models` first");
    gguf
}

/// The Python of the test venv (transformers and the other baselines).
pub fn venv_python() -> PathBuf {
    std::env::var("CRESSET_VENV")
        .map(|v| PathBuf::from(v).join("bin/python"))
        .unwrap_or_else(|_| "python3".into())
}

/// The machine and versions, for the report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {memory}; {rustc}; libtorch 2.11.0 (CPU); cresset {}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Replace the section `name` of the Markdown file at `path` (the text between
/// `<!-- begin NAME -->` and `<!-- end NAME -->`), or append it; other sections are kept.
/// A new file starts with a `# Benchmarks` title.
pub fn write_section(path: &Path, name: &str, content: &str) -> std::io::Result<()> {
    let begin = format!("<!-- begin {name} -->");
    let end = format!("<!-- end {name} -->");
    let block = format!("{begin}\n{}\n{end}", content.trim_end());
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + end.len()..]),
        _ => format!("{}\n\n{block}\n", old.trim_end()),
    };
    std::fs::write(path, new)
}
