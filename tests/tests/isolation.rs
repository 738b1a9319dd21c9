//! Process isolation over real HTTP: instances in worker processes, which crash (abort,
//! segfault, SIGKILL from outside) without taking the server or any other model with them.

use std::time::{Duration, Instant};

use cresset_e2e::{bundled_archive, library, metric_value as metric, post_in_background, Server};

const PROCESS: &str = "isolation = \"process\"\nmin_workers = 1\nmax_workers = 4\n";

fn panicky(root: &std::path::Path, name: &str, config: &str) -> String {
    bundled_archive(root, name, &library("fixture_panicky"), config)
}

fn describe(server: &Server, model: &str) -> serde_json::Value {
    server
        .manage("GET", &format!("/models/{model}"), "", b"")
        .json()[0]
        .clone()
}

/// The pid the model's worker answers `pid` with.
fn worker_pid(server: &Server, model: &str) -> u32 {
    let reply = server.post(&format!("/predictions/{model}"), "text/plain", b"pid");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.text().parse().expect("a pid")
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Wait until `pid` has died, every thread of it (a zombie, or gone): SIGKILL takes effect
/// only once each thread leaves an uninterruptible sleep (a page fault on a mapped model, on
/// a loaded machine), and until the last one has, the server cannot see the death.
fn wait_dead(pid: u32) {
    let state = |stat: &str| {
        // The state follows the command name's closing parenthesis.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|t| t.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let living = threads.iter().any(|t| {
            let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
            state(&stat).is_some_and(|s| s != 'Z' && s != 'X')
        });
        if !living {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} did not die");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_crashing_worker_process_costs_its_own_request_only() {
    let root = tempfile::tempdir().expect("tempdir");
    let crashy = panicky(root.path(), "crashy", PROCESS);
    let steady = panicky(root.path(), "steady", "");
    let server = Server::start(&["--models", &format!("{crashy},{steady}")]);
    server.wait_healthy();

    let first = worker_pid(&server, "crashy");
    assert_ne!(
        first,
        server.pid(),
        "the instance runs in a process of its own"
    );
    assert_eq!(worker_pid(&server, "steady"), server.pid());
    let d = describe(&server, "crashy");
    assert_eq!(d["isolation"], "process");
    assert_eq!(d["workers"][0]["pid"], first, "{d}");
    assert!(
        d["workers"][0]["memoryUsage"].as_u64().unwrap_or(0) > 1 << 20,
        "{d}"
    );

    // Streams, logs and metrics cross the process boundary as they do in process.
    let reply = server.post("/predictions/crashy", "text/plain", b"stream:3");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "chunk-0\nchunk-1\nchunk-2\ndone");
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("panicky fixture instance initialised")
                && l.contains("cresset::plugin")
                && l.contains("crashy")),
        "{log}"
    );

    // Each way to die: the affected request fails with the cause, the server and the other
    // model go on, and the next request is answered by a new process.
    let mut pid = first;
    for (body, cause) in [("segfault", "SIGSEGV"), ("abort", "SIGABRT")] {
        let reply = server.post("/predictions/crashy", "text/plain", body.as_bytes());
        assert_eq!(reply.status, 500, "{body}: {}", reply.text());
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(cause), "{body}: {message}");
        assert!(message.contains(&format!("pid {pid}")), "{message}");
        assert_eq!(
            server
                .post("/predictions/steady", "text/plain", b"x")
                .text(),
            "ok"
        );
        let next = worker_pid(&server, "crashy");
        assert_ne!(next, pid);
        assert!(!alive(pid), "the dead process was reaped");
        pid = next;
    }
    // Killed from outside in the middle of a request.
    let url = format!("{}/predictions/crashy", server.inference);
    let busy = post_in_background(url, b"sleep:5000");
    std::thread::sleep(Duration::from_millis(500));
    kill(pid);
    assert_eq!(busy.join().expect("client"), 500);
    pid = worker_pid(&server, "crashy");
    // Killed while idle: no request is lost, the next one waits for the new process.
    kill(pid);
    wait_dead(pid);
    let reply = server.post("/predictions/crashy", "text/plain", b"x");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(server.get("/ping").status, 200);

    let d = describe(&server, "crashy");
    assert_eq!(d["state"], "Ready", "{d}");
    assert_eq!(d["workers"][0]["restarts"], 4, "{d}");
    assert!(
        d["workers"][0]["lastExit"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGKILL"),
        "{d}"
    );
    let metrics = server.metrics_text();
    assert_eq!(
        metric(
            &metrics,
            "cresset_worker_restarts_total{model=\"crashy\",version=\"1.0\"}"
        ),
        Some(4.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "cresset_worker_memory_bytes{model=\"crashy\",version=\"1.0\",worker=\"0\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{metrics}"
    );
}

#[test]
fn a_client_that_goes_away_cancels_its_request_inside_the_worker_process() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &panicky(root.path(), "crashy", PROCESS)]);
    server.wait_healthy();
    // curl gives up after half a second; the plugin, polling `is_cancelled` in its own
    // process, sees it and counts it in a metric that crosses back to the host.
    let url = format!("{}/predictions/crashy", server.inference);
    let _ = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "0.5",
            "--data-binary",
            "wait-cancel",
            &url,
        ])
        .status()
        .expect("curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.metrics_text();
        if metric(&metrics, "cresset_fixture_cancelled_total") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "never cancelled: {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workers_scale_in_processes_of_their_own_and_unregistering_ends_them() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &panicky(root.path(), "crashy", PROCESS)]);
    server.wait_healthy();
    let reply = server.manage(
        "PUT",
        "/models/crashy?min_worker=3&synchronous=true",
        "",
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let d = describe(&server, "crashy");
    let pids: Vec<u32> = d["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert_eq!(pids.len(), 3, "{d}");
    let distinct: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "{d}");
    assert!(pids.iter().all(|p| alive(*p) && *p != server.pid()));
    let reply = server.manage("DELETE", "/models/crashy", "", b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "worker processes outlived their version"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_version_whose_workers_keep_dying_turns_failed_and_the_server_lives() {
    let root = tempfile::tempdir().expect("tempdir");
    // One that dies in every initialize (a segfault), one that dies on request twice.
    let deadly = panicky(
        root.path(),
        "deadly",
        &format!("{PROCESS}max_crashes = 3\n[handler]\ncrash_in = \"initialize\"\ncrash = \"segfault\"\n"),
    );
    let fragile = panicky(
        root.path(),
        "fragile",
        &format!("{PROCESS}max_crashes = 2\n"),
    );
    let steady = panicky(root.path(), "steady", "");
    let server = Server::start(&["--models", &format!("{deadly},{fragile},{steady}")]);
    server.wait_settled();

    let d = describe(&server, "deadly");
    assert_eq!(d["state"], "Failed", "{d}");
    let error = d["error"].as_str().unwrap_or_default();
    assert!(error.contains("died 3 times"), "{error}");
    assert!(
        error.contains("SIGSEGV") && error.contains("while loading"),
        "{error}"
    );

    let reply = server.post("/predictions/fragile", "text/plain", b"abort");
    assert_eq!(reply.status, 500, "{}", reply.text());
    worker_pid(&server, "fragile");
    let reply = server.post("/predictions/fragile", "text/plain", b"abort");
    assert_eq!(reply.status, 500, "{}", reply.text());
    let d = describe(&server, "fragile");
    assert_eq!(d["state"], "Failed", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap_or_default()
            .contains("died 2 times"),
        "{d}"
    );
    let reply = server.post("/predictions/fragile", "text/plain", b"x");
    assert_eq!(reply.status, 503, "{}", reply.text());

    assert_eq!(
        server
            .post("/predictions/steady", "text/plain", b"x")
            .text(),
        "ok"
    );
}

#[test]
fn a_hot_swap_between_process_isolated_versions_fails_no_request() {
    let store = tempfile::tempdir().expect("tempdir");
    let lib = std::fs::read(library("fixture_panicky")).expect("fixture");
    let handler = "handler/libcresset_fixture_panicky.so";
    for (dir, version) in [("swap-v1", "1.0"), ("swap-v2", "2.0")] {
        let path =
            cresset_e2e::dir_archive(store.path(), dir, handler, PROCESS, &[(handler, &lib)]);
        let manifest = format!(
            "[model]\nname = \"swap\"\nversion = \"{version}\"\nhandler = \"{handler}\"\nabi_version = \"1.0.0\"\n"
        );
        std::fs::write(path.join("MANIFEST.toml"), manifest).expect("manifest");
    }
    let server = Server::start(&["--model-store", store.path().to_str().expect("utf-8")]);
    server.register("url=swap-v1&synchronous=true&initial_workers=2");
    let old_pids: Vec<u64> = describe(&server, "swap")["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    assert_eq!(old_pids.len(), 2);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = cresset_e2e::keep_posting(
        &format!("{}/predictions/swap", server.inference),
        b"x",
        3,
        &stop,
    );
    std::thread::sleep(Duration::from_millis(300));
    server.register("url=swap-v2&synchronous=true&initial_workers=2");
    let r = server.manage("PUT", "/models/swap/2.0/set-default", "", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.manage("DELETE", "/models/swap/1.0", "", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for client in clients {
        for (status, version, body) in client.join().expect("client") {
            assert_eq!(
                status, 200,
                "a request failed during the swap: {version} {body}"
            );
            versions.insert(version);
        }
    }
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), ["1.0", "2.0"]);
    // The old version's worker processes end once it has drained.
    let deadline = Instant::now() + Duration::from_secs(20);
    while old_pids.iter().any(|p| alive(*p as u32)) {
        assert!(
            Instant::now() < deadline,
            "v1's worker processes outlived it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn in_process_mode_even_opening_the_library_happens_in_a_worker() {
    let store = tempfile::tempdir().expect("tempdir");
    let steady = panicky(store.path(), "steady", "");
    for (name, fixture) in [
        ("deadly", "fixture_abort_on_load"),
        ("mismatch", "fixture_abi_mismatch"),
    ] {
        bundled_archive(store.path(), name, &library(fixture), PROCESS);
    }
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        &steady,
    ]);
    server.wait_healthy();
    // A library whose initialiser aborts kills only the worker that opened it.
    let r = server.manage("POST", "/models?url=deadly&synchronous=true", "", b"");
    assert_eq!(r.status, 500, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("SIGABRT"), "{message}");
    assert!(message.contains("the server is unaffected"), "{message}");
    // A library built for another ABI is the archive's fault, as in thread mode.
    let r = server.manage("POST", "/models?url=mismatch&synchronous=true", "", b"");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("plugin ABI"), "{}", r.text());
    assert_eq!(
        server
            .post("/predictions/steady", "text/plain", b"x")
            .text(),
        "ok"
    );
}

/// Greedy text of a streamed completion (the SSE events' pieces, joined).
fn streamed(server: &Server, prompt: &str, max_tokens: u32) -> String {
    let url = format!("{}/v1/completions", server.inference);
    let body = serde_json::json!({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .post(&url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("stream starts");
    if response.status() != 200 {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        panic!(
            "{}: {text}\nserver log:\n{}",
            response.status(),
            server.log()
        );
    }
    cresset_e2e::sse_events(response.into_body().into_reader())
        .map(|event| {
            event["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The `gpt` plugin batches continuously (request numbers run on across calls, and a new
/// worker process numbers its own from 0): in process isolation, two streams that overlap give
/// their solo runs' tokens, before and after the worker is killed.
#[test]
fn continuous_batching_streams_cross_the_process_boundary_and_survive_a_restart() {
    let store = tempfile::tempdir().expect("tempdir");
    let src = cresset_e2e::repo_root().join("model_store/smollm2");
    let dir = store.path().join("smollm2");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for file in ["MANIFEST.toml", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        if std::fs::hard_link(src.join(file), dir.join(file)).is_err() {
            std::fs::copy(src.join(file), dir.join(file)).expect("copy");
        }
    }
    let config = std::fs::read_to_string(src.join("model-config.toml")).expect("config");
    std::fs::write(
        dir.join("model-config.toml"),
        format!("isolation = \"process\"\n{config}"),
    )
    .expect("config");
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "smollm2",
    ]);
    server.wait_healthy();
    let (long, short) = (
        "Once upon a time, in a small village,",
        "The three primary colors are",
    );
    let long_solo = streamed(&server, long, 24);
    let short_solo = streamed(&server, short, 8);
    assert!(!long_solo.is_empty() && !short_solo.is_empty());
    let together = || {
        std::thread::scope(|scope| {
            let other = scope.spawn(|| streamed(&server, short, 8));
            let first = streamed(&server, long, 24);
            (first, other.join().expect("second stream"))
        })
    };
    assert_eq!(together(), (long_solo.clone(), short_solo.clone()));
    let pid = describe(&server, "smollm2")["workers"][0]["pid"]
        .as_u64()
        .expect("a worker pid") as u32;
    kill(pid);
    wait_dead(pid);
    assert_eq!(together(), (long_solo.clone(), short_solo.clone()));
    let d = describe(&server, "smollm2");
    assert_eq!(d["workers"][0]["restarts"], 1, "{d}");
    assert_ne!(d["workers"][0]["pid"], pid, "{d}");
    // Killed in the middle of a stream: that stream is cut short, and the next requests (whose
    // numbers run on in the server while the new process numbers its own from 0) are whole.
    let pid = d["workers"][0]["pid"].as_u64().expect("a worker pid") as u32;
    let cut = std::thread::scope(|scope| {
        let stream = scope.spawn(|| {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let body = serde_json::json!({"model": "smollm2", "prompt": long, "max_tokens": 400, "temperature": 0, "stream": true});
            agent
                .post(format!("{}/v1/completions", server.inference))
                .header("content-type", "application/json")
                .send(body.to_string())
                .map(|r| cresset_e2e::sse_events(r.into_body().into_reader()).count())
                .unwrap_or(0)
        });
        std::thread::sleep(Duration::from_millis(300));
        kill(pid);
        stream.join().expect("stream")
    });
    assert!(cut < 400, "the stream went on: {cut} events");
    assert_eq!(together(), (long_solo, short_solo));
}
