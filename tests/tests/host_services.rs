//! What the host gives plugins and clients around a request: streaming, response timeouts,
//! cancellation, the log bridge and plugin metrics.

use std::time::{Duration, Instant};

use cresset_e2e::{bundled_archive, library, post_in_background, Server};

fn faulty(root: &std::path::Path, config: &str) -> String {
    bundled_archive(root, "faulty", &library("fixture_panicky"), config)
}

#[test]
fn intermediate_chunks_stream_before_the_final_response() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &faulty(root.path(), "")]);
    server.wait_healthy();
    let reply = server.post("/predictions/faulty", "text/plain", b"stream:3");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "chunk-0\nchunk-1\nchunk-2\ndone");
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
    assert_eq!(reply.header("x-model-version"), Some("1.0"));
}

#[test]
fn a_slow_response_gets_504_and_the_worker_goes_on() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&[
        "--models",
        &faulty(
            root.path(),
            "min_workers = 2\nmax_workers = 2\nresponse_timeout_s = 1\n",
        ),
    ]);
    server.wait_healthy();
    let started = Instant::now();
    let reply = server.post("/predictions/faulty", "text/plain", b"sleep:2500");
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["type"], "ResponseTimeoutException");
    assert!(
        started.elapsed() < Duration::from_millis(2400),
        "the timeout did not cut the wait short"
    );
    // The other worker answers now; once the slow one is done, both answer again.
    assert_eq!(
        server
            .post("/predictions/faulty", "text/plain", b"x")
            .text(),
        "ok"
    );
    std::thread::sleep(Duration::from_millis(1700));
    for _ in 0..4 {
        assert_eq!(
            server
                .post("/predictions/faulty", "text/plain", b"x")
                .text(),
            "ok"
        );
    }
}

#[test]
fn a_client_that_goes_away_sets_the_cancellation_flag_and_plugin_metrics_are_exported() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &faulty(root.path(), "")]);
    server.wait_healthy();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(300)))
        .build()
        .into();
    let result = agent
        .post(format!("{}/predictions/faulty", server.inference))
        .send(&b"wait-cancel"[..]);
    assert!(result.is_err(), "the client should have given up");
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = r#"cresset_fixture_cancelled_total{model="faulty",version="1.0"} 1"#;
    loop {
        let metrics = server.metrics_text();
        if metrics.contains(want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin never saw the cancellation:\n{metrics}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server
        .log()
        .contains("panicky fixture saw its client go away"));
    assert_eq!(
        server
            .post("/predictions/faulty", "text/plain", b"x")
            .text(),
        "ok"
    );
}

#[test]
fn plugin_tracing_events_reach_the_host_log_with_the_right_model_name() {
    let root = tempfile::tempdir().expect("tempdir");
    // Two models from the same library bytes: one plugin load, two models.
    let other = bundled_archive(root.path(), "other", &library("fixture_panicky"), "");
    let server = Server::start(&["--models", &format!("{},{other}", faulty(root.path(), ""))]);
    server.wait_healthy();
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicky fixture instance initialised"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines.iter().all(|l| l.contains("cresset::plugin")), "{log}");
    for model in ["faulty", "other"] {
        assert!(
            lines.iter().any(|l| l.contains(&format!("model={model}"))
                || l.contains(&format!("model=\"{model}\""))),
            "{model}: {log}"
        );
    }
}

/// Wait until the `faulty` model's description satisfies `ready`.
fn wait_for(server: &Server, what: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = server.manage("GET", "/models/faulty", "", b"").json();
        if ready(&d[0]) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {d}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric_value(metrics: &str, prefix: &str) -> f64 {
    cresset_e2e::metric_value(metrics, prefix)
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

#[test]
fn requests_over_the_global_concurrency_cap_get_429() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&[
        "--models",
        &faulty(root.path(), "min_workers = 2\nmax_workers = 2\n"),
        "--max-concurrent-requests",
        "2",
    ]);
    server.wait_healthy();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            post_in_background(
                format!("{}/predictions/faulty", server.inference),
                b"sleep:1500",
            )
        })
        .collect();
    // Both in flight: both workers busy.
    wait_for(&server, "two busy workers", |v| {
        v["workers"]
            .as_array()
            .is_some_and(|w| w.iter().filter(|w| w["status"] == "BUSY").count() == 2)
    });
    let reply = server.post("/predictions/faulty", "text/plain", b"x");
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.json()["type"], "TooManyRequestsException");
    for t in slow {
        assert_eq!(t.join().expect("thread"), 200);
    }
    assert_eq!(
        server
            .post("/predictions/faulty", "text/plain", b"x")
            .status,
        200
    );
}

#[test]
fn batching_is_observable_with_batch_size_8_and_16_clients() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &faulty(root.path(), "batch_size = 8\n")]);
    server.wait_healthy();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let url = format!("{}/predictions/faulty", server.inference);
            std::thread::spawn(move || {
                for _ in 0..4 {
                    let status = ureq::post(&url)
                        .send(&b"sleep:10"[..])
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let metrics = server.metrics_text();
    let sum = metric_value(
        &metrics,
        r#"cresset_batch_size_sum{model="faulty",version="1.0"}"#,
    );
    let count = metric_value(
        &metrics,
        r#"cresset_batch_size_count{model="faulty",version="1.0"}"#,
    );
    let singles = metric_value(
        &metrics,
        r#"cresset_batch_size_bucket{model="faulty",version="1.0",le="1"}"#,
    );
    assert_eq!(sum, 64.0, "every request was executed once");
    assert!(
        count < 64.0 && singles < count,
        "no batch larger than 1: {count} batches, {singles} of size 1"
    );
    assert!(sum / count > 1.5, "mean batch {}", sum / count);
    assert!(
        metrics.contains(r#"cresset_workers{model="faulty",state="READY",version="1.0"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cresset_queue_depth{model="faulty",version="1.0"} 0"#),
        "{metrics}"
    );
}

#[test]
fn a_full_queue_answers_503_and_latency_histograms_split_queue_execute_and_total() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &faulty(root.path(), "job_queue_size = 1\n")]);
    server.wait_healthy();
    let busy = post_in_background(
        format!("{}/predictions/faulty", server.inference),
        b"sleep:1200",
    );
    wait_for(&server, "busy", |v| v["workers"][0]["status"] == "BUSY");
    let queued = post_in_background(format!("{}/predictions/faulty", server.inference), b"x");
    wait_for(&server, "one queued", |v| v["queueDepth"] == 1);
    let reply = server.post("/predictions/faulty", "text/plain", b"x");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`job_queue_size`"),
        "{}",
        reply.text()
    );
    assert_eq!(busy.join().expect("busy"), 200);
    assert_eq!(queued.join().expect("queued"), 200);
    let metrics = server.metrics_text();
    for name in [
        "cresset_request_latency_seconds_count",
        "cresset_queue_latency_seconds_count",
        "cresset_inference_latency_seconds_count",
    ] {
        assert!(
            metric_value(
                &metrics,
                &format!(r#"{name}{{model="faulty",version="1.0"}}"#)
            ) >= 2.0,
            "{name}"
        );
    }
    let execute = metric_value(
        &metrics,
        r#"cresset_inference_latency_seconds_sum{model="faulty",version="1.0"}"#,
    );
    assert!(
        execute >= 1.2,
        "the 1.2 s execute is in the inference histogram: {execute}"
    );
    assert!(
        metrics.contains(
            r#"cresset_inference_requests_total{model="faulty",status="503",version="1.0"} 1"#
        ),
        "{metrics}"
    );
}
