//! The e2e harness: start the real `cresset` binary on ephemeral loopback ports, talk to it
//! over HTTP, stop it. Binaries and plugins come from the same cargo target dir as the test
//! executable (`make test` builds them first).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root: where this crate was built, or `CRESSET_REPO_ROOT` when set.
pub fn repo_root() -> PathBuf {
    // A build carried to another machine (scripts/device-bundle.sh) runs in a clone there.
    if let Some(root) = std::env::var_os("CRESSET_REPO_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `target/<profile>`: where this test executable, the server and the plugins were built.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>, or target/<profile>/<binary> for bench programs.
    let dir = exe.parent().expect("the executable has a folder");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>")
    } else {
        dir
    };
    dir.to_owned()
}

/// A file in the profile dir, which must exist.
fn built(relative: &str) -> PathBuf {
    let path = profile_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: build with `make build` (or run `make test`)",
        path.display()
    );
    path
}

/// The `cresset` binary: the one built beside the tests, or `CRESSET_E2E_SERVER` (to run the
/// suite against another build, such as the code before a fix).
pub fn cresset_bin() -> PathBuf {
    match std::env::var_os("CRESSET_E2E_SERVER") {
        Some(path) => PathBuf::from(path),
        None => built("cresset"),
    }
}

/// A built plugin library by crate name suffix, e.g. `plugin_echo` or `fixture_panicky`.
pub fn library(stem: &str) -> PathBuf {
    built(&format!("libcresset_{stem}.so"))
}

/// The `reverse` build of the echo plugin (made by `make build`).
pub fn echo_reverse_library() -> PathBuf {
    let path = profile_dir()
        .parent()
        .expect("target dir")
        .join("variants/libcresset_plugin_echo_reverse.so");
    assert!(
        path.exists(),
        "{} is missing: build with `make build`",
        path.display()
    );
    path
}

/// The generated reference outputs.
pub fn expected_json() -> serde_json::Value {
    let path = repo_root().join("tests/fixtures/generated/expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make models`", path.display()));
    serde_json::from_str(&text).expect("expected.json is JSON")
}

/// Write a directory archive: a manifest for `handler`, an optional model config, files.
pub fn dir_archive(
    root: &Path,
    name: &str,
    handler: &str,
    config: &str,
    files: &[(&str, &[u8])],
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let manifest = format!(
        "[model]\nname = \"{name}\"\nversion = \"1.0\"\nhandler = \"{handler}\"\nabi_version = \"1.0.0\"\n"
    );
    std::fs::write(dir.join("MANIFEST.toml"), manifest).expect("write manifest");
    std::fs::write(dir.join("model-config.toml"), config).expect("write config");
    for (file, bytes) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write file");
    }
    dir
}

/// A directory archive `name` whose handler is a copy of the plugin library `lib`, as a
/// `--models` entry (`name=dir`).
pub fn bundled_archive(root: &Path, name: &str, lib: &Path, config: &str) -> String {
    let bytes = std::fs::read(lib).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
    let file = lib
        .file_name()
        .expect("a library file name")
        .to_string_lossy()
        .into_owned();
    let handler = format!("handler/{file}");
    let dir = dir_archive(root, name, &handler, config, &[(&handler, &bytes)]);
    format!("{name}={}", dir.display())
}

/// A response, whatever its status.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// A header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT` of the inference API.
    pub inference: String,
    /// `http://127.0.0.1:PORT` of the metrics API.
    pub metrics: String,
    /// `http://127.0.0.1:PORT` of the management API.
    pub management: String,
    /// `127.0.0.1:PORT` of the gRPC listener, when the test asked for one (`--grpc-address`).
    pub grpc: Option<String>,
    /// `127.0.0.1:PORT` of the gRPC management listener, when the test asked for one
    /// (`--grpc-management-address`).
    pub grpc_management: Option<String>,
    log: Arc<Mutex<String>>,
    _work: tempfile::TempDir,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn into_reply(mut response: ureq::http::Response<ureq::Body>) -> Reply {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let mut body = Vec::new();
    response
        .body_mut()
        .as_reader()
        .read_to_end(&mut body)
        .expect("read body");
    Reply {
        status,
        headers,
        body,
    }
}

impl Server {
    /// Start `cresset serve` with these extra arguments (`--model-store` defaults to the repo's
    /// `model_store/`).
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// [`Server::start`] with these environment variables. The OpenMP wait variables of the
    /// test's own environment are not passed on: a server gets those `env` names only.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let work = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(cresset_bin());
        command
            .current_dir(repo_root())
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("GOMP_SPINCOUNT")
            .envs(env.iter().copied())
            .arg("serve")
            .args([
                "--inference-address",
                "127.0.0.1:0",
                "--metrics-address",
                "127.0.0.1:0",
                "--management-address",
                "127.0.0.1:0",
            ])
            .env_remove("CRESSET_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Each server gets its own work folder unless the test picks one (to restart in it).
        if !args.contains(&"--work-dir") {
            command.arg("--work-dir").arg(work.path());
        }
        // Each server keeps its own snapshot unless the test picks one (tests share model stores).
        if !args.contains(&"--snapshot-file") && !args.contains(&"--no-config-snapshot") {
            command
                .arg("--snapshot-file")
                .arg(work.path().join("snapshot.json"));
        }
        // Token auth is tested on its own; other tests run without it unless they bring keys.
        if !args.contains(&"--key-file") {
            command.arg("--disable-token-auth");
        }
        if !args.contains(&"--log") {
            command.args(["--log", "info,cresset::access=warn"]);
        }
        if !args.contains(&"--model-store") {
            command
                .arg("--model-store")
                .arg(repo_root().join("model_store"));
        }
        command.args(args);
        let mut child = command.spawn().expect("spawn cresset");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut inference, mut metrics, mut management) = (None, None, None);
        let (mut grpc, mut grpc_management) = (None, None);
        let want_grpc = args.contains(&"--grpc-address");
        let want_grpc_management = args.contains(&"--grpc-management-address");
        while inference.is_none()
            || metrics.is_none()
            || management.is_none()
            || (want_grpc && grpc.is_none())
            || (want_grpc_management && grpc_management.is_none())
        {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                _ => {
                    let _ = child.wait();
                    panic!(
                        "cresset exited before listening:\n{}",
                        log.lock().expect("log lock")
                    );
                }
            };
            let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let address = format!("http://{}", event["address"].as_str().unwrap_or_default());
            match event["api"].as_str() {
                Some("inference") => inference = Some(address),
                Some("metrics") => metrics = Some(address),
                Some("management") => management = Some(address),
                Some("grpc") => grpc = event["address"].as_str().map(str::to_owned),
                Some("grpc_management") => {
                    grpc_management = event["address"].as_str().map(str::to_owned)
                }
                _ => {}
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            inference: inference.expect("inference address"),
            metrics: metrics.expect("metrics address"),
            management: management.expect("management address"),
            grpc,
            grpc_management,
            log,
            _work: work,
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Wait until `/ping` is healthy with no model failed.
    pub fn wait_healthy(&self) -> &Self {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let reply = self.get("/ping");
            let failed = reply.json()["failed"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            assert!(
                !failed,
                "a model failed to load: {}\n{}",
                reply.text(),
                self.log()
            );
            if reply.status == 200 {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "not healthy after 120 s: {}\n{}",
                reply.text(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until no model is loading any more (whether it then failed or not). With the
    /// inference token on, `/ping` gives counts instead of names.
    pub fn wait_settled(&self) -> &Self {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ping = self.get("/ping").json();
            let loading = ping["models"]
                .as_object()
                .map(|m| m.values().any(|v| v == "Loading"))
                .unwrap_or(false)
                || ping["notReady"].as_u64().is_some_and(|n| n > 0);
            if !loading {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "models still loading after 120 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET a path of the inference API.
    pub fn get(&self, path: &str) -> Reply {
        into_reply(
            agent()
                .get(format!("{}{path}", self.inference))
                .call()
                .expect("GET"),
        )
    }

    /// GET the metrics page.
    pub fn metrics_text(&self) -> String {
        into_reply(
            agent()
                .get(format!("{}/metrics", self.metrics))
                .call()
                .expect("GET /metrics"),
        )
        .text()
    }

    /// POST a body with a content type.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Reply {
        self.post_with(path, content_type, &[], body)
    }

    /// POST a body with a content type and further headers.
    pub fn post_with(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut request = agent()
            .post(format!("{}{path}", self.inference))
            .header("content-type", content_type);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        into_reply(request.send(body).expect("POST"))
    }

    /// Call the management API: `method` on `path` (with its query), with an optional body.
    pub fn manage(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Reply {
        let url = format!("{}{path}", self.management);
        let agent = agent();
        let response = match method {
            "GET" => agent.get(&url).call(),
            "DELETE" => agent.delete(&url).call(),
            "PUT" => agent
                .put(&url)
                .header("content-type", content_type)
                .send(body),
            "POST" => agent
                .post(&url)
                .header("content-type", content_type)
                .send(body),
            other => panic!("unsupported method {other}"),
        };
        into_reply(response.expect("management call"))
    }

    /// Register through the management API with these query parameters, expecting 200.
    pub fn register(&self, query: &str) {
        let r = self.manage("POST", &format!("/models?{query}"), "", b"");
        assert_eq!(r.status, 200, "registering {query}: {}", r.text());
    }

    /// POST JSON.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.post(path, "application/json", body.to_string().as_bytes())
    }
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait up to `timeout` for the server to exit on its own; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    /// Ask the server to stop cleanly (SIGTERM).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Interrupt the server, as Ctrl-C does (SIGINT).
    pub fn interrupt(&self) {
        self.signal("INT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGKILL the server, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST `body` to `url` on a thread of its own; the handle gives the status (0 if the request
/// itself failed).
pub fn post_in_background(url: String, body: &'static [u8]) -> std::thread::JoinHandle<u16> {
    std::thread::spawn(move || {
        agent()
            .post(&url)
            .send(body)
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}

/// `cresset archive` a model with this handler into `dir`, and return the archive's path.
pub fn archive_model(
    dir: &Path,
    name: &str,
    version: &str,
    handler: &str,
    format: &str,
) -> PathBuf {
    let (ok, path, err) = run_archiver(&[
        "--model-name",
        name,
        "--version",
        version,
        "--handler",
        handler,
        "--archive-format",
        format,
        "--export-path",
        dir.to_str().expect("utf-8"),
        "--force",
    ]);
    assert!(ok, "{err}");
    PathBuf::from(path)
}

/// Run `cresset archive` with these arguments; returns (success, stdout, stderr).
pub fn run_archiver(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cresset_bin())
        .arg("archive")
        .args(args)
        .output()
        .expect("run cresset archive");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A one-file HTTP server on loopback, for registration by URL: answers the first four
/// requests with `bytes`. Returns the URL, `http://127.0.0.1:PORT/models/{name}`.
pub fn serve_file(bytes: Vec<u8>, name: &str) -> String {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    )
    .into_bytes();
    response.extend_from_slice(&bytes);
    serve_raw(response, name)
}

/// A loopback server that answers the first four requests with the raw bytes `response`.
/// Returns the URL, `http://127.0.0.1:PORT/models/{name}`.
pub fn serve_raw(response: Vec<u8>, name: &str) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(&response);
        }
    });
    format!("http://{address}/models/{name}")
}

/// The real `curl` with these arguments against `url`: (status, body).
pub fn curl(args: &[&str], url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A program of the test venv (`python`, `torch-model-archiver`), which `make models` fills.
pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var("CRESSET_VENV").expect("CRESSET_VENV is set by scripts/env.sh");
    Path::new(&venv).join("bin").join(name)
}

/// The TorchServe venv (TorchServe 0.12.0, its `ts` package and frontend jar), made once by
/// scripts/setup-torchserve.sh.
pub fn torchserve_venv() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/setup-torchserve.sh"))
        .output()
        .expect("run setup-torchserve.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `torch-model-archiver` (the test venv's), run in `dir` with `args`, writing into `export`.
pub fn torch_model_archiver(dir: &Path, args: &[&str], export: &Path) {
    let out = std::process::Command::new(venv_bin("torch-model-archiver"))
        .current_dir(dir)
        .args(args)
        .arg("--export-path")
        .arg(export)
        .output()
        .expect("run torch-model-archiver");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two classifier answers (`{"class": probability, ...}`) name the same classes with the same
/// probabilities, to 1e-6.
pub fn assert_same_classes(a: &serde_json::Value, b: &serde_json::Value) {
    assert_same_classes_within(a, b, 1e-6);
}

/// Two classifier answers name the same classes with the same probabilities, to `tolerance`.
pub fn assert_same_classes_within(a: &serde_json::Value, b: &serde_json::Value, tolerance: f64) {
    let (a, b) = (
        a.as_object().expect("object"),
        b.as_object().expect("object"),
    );
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (label, p) in a {
        let q = b.get(label).and_then(serde_json::Value::as_f64);
        assert!(
            q.is_some_and(|q| (p.as_f64().unwrap_or(f64::NAN) - q).abs() <= tolerance),
            "{label}: {p} vs {q:?}"
        );
    }
}

/// The default store's iris `model.pt` archived as `iris_raw` without labels (so the raw
/// logits come back), batch size 8: its `--models` argument.
pub fn raw_iris_archive(dir: &std::path::Path) -> String {
    let model = repo_root().join("model_store/iris/model.pt");
    let config = dir.join("model-config.toml");
    std::fs::write(&config, "batch_size = 8\nmax_workers = 1\n").expect("write config");
    let (ok, path, err) = run_archiver(&[
        "--model-name",
        "iris_raw",
        "--handler",
        "torchscript",
        "--serialized-file",
        model.to_str().expect("utf-8"),
        "--config-file",
        config.to_str().expect("utf-8"),
        "--export-path",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    format!("iris_raw={path}")
}

/// The value of the first series in a Prometheus text page whose line starts with `prefix`
/// (a name, or a name with its labels).
pub fn metric_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The JSON events of a server-sent event stream (`data: {...}` lines), read as they arrive,
/// up to `data: [DONE]` or the end.
pub fn sse_events(reader: impl Read) -> impl Iterator<Item = serde_json::Value> {
    BufReader::new(reader)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| line.strip_prefix("data: ").map(str::to_owned))
        .take_while(|data| data != "[DONE]")
        .map(|data| serde_json::from_str(&data).expect("an event's JSON"))
}

/// `clients` clients posting `body` (text) to `url` one request after another until `stop` is
/// set (a hot swap under load): each one's answers, as (status, `X-Model-Version`, body).
pub fn keep_posting(
    url: &str,
    body: &'static [u8],
    clients: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<(u16, String, String)>>> {
    (0..clients)
        .map(|_| {
            let (url, stop) = (url.to_owned(), stop.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = agent
                        .post(&url)
                        .header("content-type", "text/plain")
                        .send(body)
                        .expect("POST");
                    let reply = into_reply(r);
                    let version = reply.header("x-model-version").unwrap_or("").to_owned();
                    answers.push((reply.status, version, reply.text()));
                }
                answers
            })
        })
        .collect()
}
