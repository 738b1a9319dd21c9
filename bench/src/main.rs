//! `cresset-bench`: the serving benchmark.
//!
//! For each model (echo, and a compute-bound TorchScript MLP) it measures, in one run:
//! - the real server over loopback HTTP: cold start (process start until `/ping` is healthy and
//!   the first prediction is answered), p50/p99 latency at concurrency 1, throughput at
//!   concurrency 32 with batching (`batch_size` 8) and without (`batch_size` 1), peak RSS;
//! - the baseline: the same plugin loaded in-process through the same loader, called with no
//!   HTTP: p50 of one call, and throughput of batches of 8.
//!
//! It prints a table and writes it to `BENCHMARKS.md` (`--out` to change, `--quick` for short
//! runs). Run it with `make bench`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice};
use cresset::loader::PluginLoader;
use cresset::metrics::Metrics;
use cresset::services::PluginServices;
use cresset_bench::{agent, cli, machine, peak_rss_mib, percentile, write_section};
use cresset_e2e::{dir_archive, profile_dir, repo_root, Server};
use cresset_plugin_api::{
    plugin_file_name, DeviceType, InstanceAssignment, ModelSpec, PluginError, Request, Response,
    ResponseSink, SinkRef,
};

struct Settings {
    latency_requests: usize,
    throughput_seconds: f64,
}

struct Workload {
    label: &'static str,
    handler: &'static str,
    model_file: Option<PathBuf>,
    content_type: &'static str,
    body: Vec<u8>,
}

#[derive(Default)]
struct Row {
    label: String,
    cold_start_ms: f64,
    p50_us: f64,
    p99_us: f64,
    inproc_p50_us: f64,
    rps_unbatched: f64,
    rps_batched: f64,
    inproc_rps_batched: f64,
    peak_rss_mib: f64,
}

/// A store with two archives of the workload: `b1` (batch_size 1) and `b8` (batch_size 8).
fn make_store(root: &Path, w: &Workload) {
    for (name, batch) in [("b1", 1), ("b8", 8)] {
        let config = format!("min_workers = 1\nbatch_size = {batch}\njob_queue_size = 1000\nresponse_timeout_s = 60\n");
        let dir = dir_archive(root, name, w.handler, &config, &[]);
        if let Some(model) = &w.model_file {
            cresset_bench::link_or_copy(model, &dir.join("model.pt"));
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, w: &Workload) -> u16 {
    match agent
        .post(url)
        .header("content-type", w.content_type)
        .send(&w.body[..])
    {
        Ok(mut r) => {
            let _ = r.body_mut().read_to_vec();
            r.status().as_u16()
        }
        Err(_) => 0,
    }
}

fn latency(server: &Server, w: &Workload, n: usize) -> (f64, f64) {
    let url = format!("{}/predictions/b1", server.inference);
    let agent = agent();
    for _ in 0..(n / 10).max(5) {
        post(&agent, &url, w);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        assert_eq!(post(&agent, &url, w), 200, "{} failed", w.label);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

fn throughput(server: &Server, model: &str, w: &Workload, clients: usize, seconds: f64) -> f64 {
    let url = format!("{}/predictions/{model}", server.inference);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, stop, done, failed) =
                (url.clone(), stop.clone(), done.clone(), failed.clone());
            let (content_type, body) = (w.content_type, w.body.clone());
            std::thread::spawn(move || {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    let ok = agent
                        .post(&url)
                        .header("content-type", content_type)
                        .send(&body[..])
                        .map(|mut r| {
                            let _ = r.body_mut().read_to_vec();
                            r.status().as_u16() == 200
                        })
                        .unwrap_or(false);
                    if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Warm up, then count.
    std::thread::sleep(Duration::from_secs_f64(seconds / 4.0));
    let (start_count, start) = (done.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let rps = (done.load(Ordering::Relaxed) - start_count) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{model}: requests failed under load"
    );
    rps
}

/// A sink that keeps nothing: the baseline pays for the plugin call alone.
struct NullSink;

impl ResponseSink for NullSink {
    fn send_chunk(&mut self, _: usize, _: Response) -> bool {
        true
    }
    fn send_final(&mut self, _: usize, result: RResult<Response, PluginError>) {
        if let RResult::RErr(e) = result {
            panic!("the in-process call failed: {e}");
        }
    }
    fn is_cancelled(&self, _: usize) -> bool {
        false
    }
}

/// The in-process baseline: the same plugin and archive, no HTTP. Returns (p50 of one call in
/// µs, requests per second in batches of 8).
fn in_process(store: &Path, w: &Workload, settings: &Settings) -> (f64, f64) {
    let work = tempfile::tempdir().expect("tempdir");
    let loader = PluginLoader::new(work.path().join("plugins"));
    let library = loader
        .load(&profile_dir().join(plugin_file_name(w.handler)))
        .expect("load the plugin");
    let dir = store.join("b8");
    let spec = ModelSpec {
        name: "inproc".into(),
        version: "1.0".into(),
        model_dir: dir.to_string_lossy().into_owned().into(),
        handler_config_json: "{}".into(),
        model_config_json: "{}".into(),
    };
    let host = PluginServices::handle("inproc", "1.0", Arc::new(Metrics::new()));
    let model = (library.module.expect("opened in this process").load_model())(&spec, host)
        .into_result()
        .expect("load_model");
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let assignment = InstanceAssignment {
        index: 0,
        device_type: DeviceType::CPU,
        device_ids: Default::default(),
        intra_op_threads: threads,
    };
    let mut instance = model
        .new_instance(&assignment)
        .into_result()
        .expect("new_instance");
    let request = Request {
        id: "bench".into(),
        content_type: w.content_type.into(),
        body: w.body.clone().into(),
        headers: Default::default(),
        params: Default::default(),
    };
    let mut call = |batch: &[Request]| {
        let mut sink = NullSink;
        instance
            .execute(
                RSlice::from_slice(batch),
                SinkRef::from_ptr(&mut sink, TD_Opaque),
            )
            .into_result()
            .expect("execute");
    };
    let one = [request.clone()];
    for _ in 0..(settings.latency_requests / 10).max(5) {
        call(&one);
    }
    let mut samples: Vec<f64> = (0..settings.latency_requests)
        .map(|_| {
            let t = Instant::now();
            call(&one);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let eight = vec![request; 8];
    let start = Instant::now();
    let mut served = 0u64;
    while start.elapsed().as_secs_f64() < settings.throughput_seconds {
        call(&eight);
        served += 8;
    }
    (
        percentile(&samples, 50.0),
        served as f64 / start.elapsed().as_secs_f64(),
    )
}

fn run(w: &Workload, settings: &Settings) -> Row {
    let store = tempfile::tempdir().expect("tempdir");
    make_store(store.path(), w);
    let store_arg = store.path().to_str().expect("utf-8").to_owned();

    let started = Instant::now();
    let server = Server::start(&[
        "--model-store",
        &store_arg,
        "--models",
        "b1,b8",
        "--log",
        "warn",
    ]);
    server.wait_healthy();
    assert_eq!(
        post(&agent(), &format!("{}/predictions/b1", server.inference), w),
        200
    );
    let cold_start_ms = started.elapsed().as_secs_f64() * 1e3;

    let (p50_us, p99_us) = latency(&server, w, settings.latency_requests);
    let rps_unbatched = throughput(&server, "b1", w, 32, settings.throughput_seconds);
    let rps_batched = throughput(&server, "b8", w, 32, settings.throughput_seconds);
    let peak_rss_mib = peak_rss_mib(server.pid());
    drop(server);

    let (inproc_p50_us, inproc_rps_batched) = in_process(store.path(), w, settings);
    Row {
        label: w.label.into(),
        cold_start_ms,
        p50_us,
        p99_us,
        inproc_p50_us,
        rps_unbatched,
        rps_batched,
        inproc_rps_batched,
        peak_rss_mib,
    }
}

fn main() {
    let (quick, out) = cli();
    let mlp = repo_root().join("tests/fixtures/generated/bench_mlp/model.pt");
    assert!(
        mlp.is_file(),
        "{} is missing: run `make models`",
        mlp.display()
    );
    let row_body: Vec<String> = (0..256)
        .map(|i| format!("{:.3}", (i as f32 * 0.37).sin()))
        .collect();
    let workloads = [
        Workload {
            label: "echo (16-byte body)",
            handler: "echo",
            model_file: None,
            content_type: "text/plain",
            body: b"0123456789abcdef".to_vec(),
        },
        Workload {
            label: "torchscript MLP 256-4096x3-10 (1 row)",
            handler: "torchscript",
            model_file: Some(mlp),
            content_type: "application/json",
            body: format!("{{\"data\": [[{}]]}}", row_body.join(",")).into_bytes(),
        },
    ];
    let rows: Vec<Row> = workloads
        .iter()
        .map(|w| {
            let settings = if w.handler == "echo" {
                Settings {
                    latency_requests: if quick { 300 } else { 3000 },
                    throughput_seconds: if quick { 1.0 } else { 4.0 },
                }
            } else {
                Settings {
                    latency_requests: if quick { 30 } else { 200 },
                    throughput_seconds: if quick { 2.0 } else { 8.0 },
                }
            };
            eprintln!("bench: {}", w.label);
            run(w, &settings)
        })
        .collect();

    let mut table = String::from(
        "| workload | cold start | p50 c=1 | p99 c=1 | in-process p50 | server overhead (p50 − in-process) | req/s c=32, batch 1 | req/s c=32, batch 8 | in-process req/s, batch 8 | batched vs in-process | peak RSS |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.0} ms | {:.0} µs | {:.0} µs | {:.1} µs | {:.0} µs | {:.0} | {:.0} | {:.0} | {:.0}% | {:.0} MiB |\n",
            r.label,
            r.cold_start_ms,
            r.p50_us,
            r.p99_us,
            r.inproc_p50_us,
            r.p50_us - r.inproc_p50_us,
            r.rps_unbatched,
            r.rps_batched,
            r.inproc_rps_batched,
            100.0 * r.rps_batched / r.inproc_rps_batched,
            r.peak_rss_mib,
        ));
    }
    let echo = &rows[0];
    let mlp = &rows[1];
    let overhead = echo.p50_us - echo.inproc_p50_us;
    let share = 100.0 * mlp.rps_batched / mlp.inproc_rps_batched;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let targets = format!(
        "Targets (issue 4): server overhead on echo under 200 µs: {overhead:.0} µs, {}. Batched\n\
         throughput at concurrency 32 on the TorchScript model at least 85% of the in-process batched\n\
         baseline: {share:.0}%, {}.\n",
        verdict(overhead < 200.0),
        verdict(share >= 85.0)
    );
    println!("{table}\n{targets}");
    let doc = format!(
        "## Serving overhead\n\n\
         Measured by `make bench` (the program `bench/src/main.rs`){}. Machine: {}.\n\n\
         The server runs on loopback with two models of each workload, `b1` (`batch_size` 1) and\n\
         `b8` (`batch_size` 8), one worker each; the load generator (32 client threads with\n\
         keep-alive connections) runs on the same machine and shares its cores. The in-process\n\
         baseline loads the same plugin library through the same loader and calls `execute`\n\
         directly, with no HTTP. Cold start is from process start until `/ping` is healthy and the\n\
         first prediction is answered. Peak RSS is the server's `VmHWM`.\n\n{table}\n{targets}\n\
         Notes:\n\n\
         - One run on a shared 2-core VM: expect run-to-run variation. Over the runs made while this\n\
           was written, the echo overhead ranged from about 117 to 190 µs (under the 200 µs target\n\
           every time, with little margin at the top), the in-process MLP baseline from 349 to 471\n\
           req/s, and the batched ratio from 88% to 107%.\n\
         - The server sets `OMP_WAIT_POLICY=PASSIVE` unless the operator set it. With libgomp's default\n\
           (threads spin between parallel regions), batched MLP throughput was 71% of in-process on\n\
           this machine: the spinning OpenMP threads starved the HTTP threads and the 32 client\n\
           threads, and a descheduled thread stalls a whole matmul. A short spin\n\
           (`GOMP_SPINCOUNT=30000`) measured between 83% and 89%. The in-process baseline keeps the\n\
           default, its best case.\n\
         - The in-process p50 of the MLP can exceed the server's: the baseline process spins and the\n\
           server does not, and single-row latency is dominated by the model.\n\
         - No TorchServe side-by-side yet: that comparison is still to be made.\n",
        if quick { " with `--quick` (short runs)" } else { "" },
        machine()
    );
    write_section(&out, "serving", &doc).expect("write BENCHMARKS.md");
    eprintln!("bench: wrote {}", out.display());
}
