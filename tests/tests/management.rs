//! The management API: registration from the store, an upload or a URL; list, describe, scale,
//! set-default, unregister; and a hot swap under load that fails no request.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cresset_e2e::{
    archive_model, echo_reverse_library, library, post_in_background, serve_file, serve_raw, Server,
};
use serde_json::Value;

/// `cresset archive` into `store`; returns the archive's file name.
fn archive(store: &Path, name: &str, version: &str, handler: &str, format: &str) -> String {
    let path = archive_model(store, name, version, handler, format);
    path.file_name()
        .expect("file")
        .to_string_lossy()
        .into_owned()
}

/// A store with the panicky fixture archived as `name` 1.0, a server on it, and the model
/// registered.
fn panicky_model(name: &str) -> (tempfile::TempDir, Server) {
    let store = tempfile::tempdir().expect("tempdir");
    let lib = library("fixture_panicky");
    let file = archive(
        store.path(),
        name,
        "1.0",
        lib.to_str().expect("utf-8"),
        "tgz",
    );
    let server = store_server(store.path(), &[]);
    server.register(&format!("url={file}&synchronous=true"));
    (store, server)
}

fn store_server(store: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--model-store", store.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn describe(server: &Server, path: &str) -> Vec<Value> {
    let reply = server.manage("GET", path, "", b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().as_array().expect("a list").clone()
}

/// Wait until the version at `path` satisfies `ready` (polling its description).
fn wait_for(server: &Server, path: &str, what: &str, ready: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(&describe(server, path)[0]) {
        assert!(Instant::now() < deadline, "{path}: never {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_state(server: &Server, path: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = describe(server, path);
        if d[0]["state"] == want {
            return d[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{path} never became {want}: {:?}",
            d[0]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn register_describe_scale_and_unregister_a_model_from_the_store() {
    let store = tempfile::tempdir().expect("tempdir");
    let file = archive(store.path(), "e", "1.0", "echo", "tgz");
    let server = store_server(store.path(), &[]);

    let reply = server.manage(
        "POST",
        &format!("/models?url={file}&synchronous=true&initial_workers=1"),
        "",
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["status"],
        "Model \"e\" Version: 1.0 registered with 1 initial workers"
    );
    assert_eq!(
        server.post("/predictions/e", "text/plain", b"hello").text(),
        "hello"
    );

    let again = server.manage(
        "POST",
        &format!("/models?url={file}&synchronous=true"),
        "",
        b"",
    );
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.json()["type"], "ConflictStatusException");

    let d = describe(&server, "/models/e");
    assert_eq!(d.len(), 1);
    let v = &d[0];
    assert_eq!(
        (
            v["modelName"].as_str(),
            v["modelVersion"].as_str(),
            v["state"].as_str()
        ),
        (Some("e"), Some("1.0"), Some("Ready"))
    );
    assert_eq!(v["isDefault"], true);
    assert_eq!(v["modelUrl"], file.as_str());
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["workers"][0]["status"], "READY");
    assert_eq!(v["plugin"]["name"], "echo");
    assert_eq!(v["queueDepth"], 0);
    assert!(v["processMemoryUsage"].as_u64().unwrap_or(0) > 0);

    let scaled = server.manage(
        "PUT",
        "/models/e?min_worker=3&max_worker=4&synchronous=true",
        "",
        b"",
    );
    assert_eq!(scaled.status, 200, "{}", scaled.text());
    let v = &describe(&server, "/models/e/1.0")[0];
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        (v["minWorkers"].as_u64(), v["maxWorkers"].as_u64()),
        (Some(3), Some(4))
    );
    let down = server.manage(
        "PUT",
        "/models/e/1.0?min_worker=1&synchronous=true",
        "",
        b"",
    );
    assert_eq!(down.status, 200, "{}", down.text());
    assert_eq!(
        describe(&server, "/models/e")[0]["workers"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        server
            .post("/predictions/e", "text/plain", b"after scaling")
            .text(),
        "after scaling"
    );
    let bad = server.manage("PUT", "/models/e?min_worker=4&max_worker=2", "", b"");
    assert_eq!(bad.status, 400, "{}", bad.text());

    let list = server.manage("GET", "/models", "", b"").json();
    assert_eq!(list["models"][0]["modelName"], "e");

    let gone = server.manage("DELETE", "/models/e", "", b"");
    assert_eq!(gone.status, 200, "{}", gone.text());
    assert_eq!(
        server.post("/predictions/e", "text/plain", b"x").status,
        404
    );
    assert_eq!(server.manage("GET", "/models/e", "", b"").status, 404);
    assert_eq!(server.manage("DELETE", "/models/e", "", b"").status, 404);
}

#[test]
fn registration_errors_have_the_right_statuses() {
    let store = tempfile::tempdir().expect("tempdir");
    std::fs::write(store.path().join("junk.tar.gz"), b"not gzip at all").expect("write");
    let server = store_server(store.path(), &[]);
    let call = |path: &str| server.manage("POST", path, "", b"");

    let r = call("/models?url=missing.tar.gz");
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call("/models?url=../../etc/passwd");
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call("/models?url=/etc/passwd");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = call("/models?url=junk.tar.gz&synchronous=true");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = call("/models?url=https://example.com/model.tar.gz");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("allowed_urls"));
    let r = call("/models?url=x&batch_sise=4");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("batch_sise"), "{}", r.text());
    let file = archive(store.path(), "e", "1.0", "echo", "zip");
    let r = call(&format!("/models?url={file}&batch_size=0"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`batch_size`"));
    let r = call("/models");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server.manage("PUT", "/models/nope/1.0/set-default", "", b"");
    assert_eq!(r.status, 404, "{}", r.text());
    server.wait_healthy();
}

#[test]
fn archives_can_be_uploaded_raw_or_as_multipart_and_are_kept_in_the_store() {
    let build = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    let greeter = library("plugin_greeter");
    let file = archive(
        build.path(),
        "greeter",
        "1.0",
        greeter.to_str().expect("utf-8"),
        "tgz",
    );
    let bytes = std::fs::read(build.path().join(&file)).expect("read");
    let server = store_server(store.path(), &["--max-upload-size", "50000000"]);

    let r = server.manage(
        "POST",
        "/models?synchronous=true",
        "application/octet-stream",
        &bytes,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = server.post_json("/predictions/greeter", &serde_json::json!({"name": "Ada"}));
    assert_eq!(reply.json()["greeting"], "Hello, Ada!");
    let kept: Vec<String> = std::fs::read_dir(store.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        kept.iter()
            .any(|n| n.starts_with("upload-") && n.ends_with(".tar.gz")),
        "{kept:?}"
    );

    // The same archive as multipart, under another name.
    let mut body = b"--B\r\nContent-Disposition: form-data; name=\"data\"; filename=\"g.tar.gz\"\r\nContent-Type: application/gzip\r\n\r\n".to_vec();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(b"\r\n--B--\r\n");
    let r = server.manage(
        "POST",
        "/models?model_name=greeter2&synchronous=true",
        "multipart/form-data; boundary=B",
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        server
            .post_json("/predictions/greeter2", &serde_json::json!({"name": "Bo"}))
            .json()["greeting"],
        "Hello, Bo!"
    );

    let r = server.manage(
        "POST",
        "/models",
        "application/octet-stream",
        b"garbage bytes",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    server.wait_healthy();
}

#[test]
fn uploads_over_the_cap_get_413_and_hostile_uploads_400() {
    let store = tempfile::tempdir().expect("tempdir");
    let server = store_server(store.path(), &["--max-upload-size", "1000"]);
    let r = server.manage(
        "POST",
        "/models",
        "application/octet-stream",
        &vec![0x1f; 5000],
    );
    assert_eq!(r.status, 413, "{}", r.text());

    // A .tar.gz with a `..` entry.
    let mut raw = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut raw, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_old();
        let name = b"../escape.txt";
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append(&header, &b"owned"[..]).expect("append");
        tar.into_inner().expect("tar").finish().expect("gz");
    }
    let r = server.manage("POST", "/models", "application/octet-stream", &raw);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`..`"));
    server.wait_healthy();
}

#[test]
fn an_allowed_url_is_downloaded_into_the_store_and_registered() {
    let build = tempfile::tempdir().expect("tempdir");
    let file = archive(build.path(), "remote", "1.0", "echo", "tgz");
    let url = serve_file(
        std::fs::read(build.path().join(file)).expect("read"),
        "e.tar.gz",
    );
    let store = tempfile::tempdir().expect("tempdir");
    let server = store_server(
        store.path(),
        &["--allowed-urls", r"http://127\.0\.0\.1:\d+/models/.*"],
    );
    server.register(&format!("url={url}&synchronous=true"));
    assert_eq!(
        server
            .post("/predictions/remote", "text/plain", b"far")
            .text(),
        "far"
    );
    let forbidden = server.manage(
        "POST",
        "/models?url=http://127.0.0.1:1/elsewhere/x.tar.gz",
        "",
        b"",
    );
    assert_eq!(forbidden.status, 403, "{}", forbidden.text());
    // An allowed URL that redirects elsewhere is not followed.
    let redirect = serve_raw(
        b"HTTP/1.1 302 Found\r\nLocation: http://example.com/evil.tar.gz\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        "redirect.tar.gz",
    );
    let r = server.manage(
        "POST",
        &format!("/models?url={redirect}&synchronous=true"),
        "",
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("redirects are not followed"),
        "{}",
        r.text()
    );
}

#[test]
fn allowed_urls_are_matched_against_the_parsed_url_and_names_must_not_lead_inside() {
    let build = tempfile::tempdir().expect("tempdir");
    let file = archive(build.path(), "remote", "1.0", "echo", "tgz");
    let bytes = std::fs::read(build.path().join(file)).expect("read");
    let store = tempfile::tempdir().expect("tempdir");
    let call = |server: &Server, url: &str| {
        server.manage(
            "POST",
            &format!("/models?url={url}&synchronous=true"),
            "",
            b"",
        )
    };
    // User-info: the host of `http://good.example@127.0.0.1:PORT/...` is 127.0.0.1.
    let url = serve_file(bytes.clone(), "e.tar.gz");
    let sneaky = url.replacen("http://", "http://good.example@", 1);
    let server = store_server(store.path(), &["--allowed-urls", r"http://good\.example.*"]);
    let r = call(&server, &sneaky);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("user information"), "{}", r.text());
    drop(server);

    // Dot segments are resolved before the path is matched.
    let url = serve_file(bytes.clone(), "e.tar.gz");
    let escaped = url.replace("/models/", "/ok/../models/");
    let server = store_server(
        store.path(),
        &["--allowed-urls", r"http://127\.0\.0\.1:\d+/ok/.*"],
    );
    let r = call(&server, &escaped);
    assert_eq!(r.status, 403, "{}", r.text());
    drop(server);

    // A host given by name that resolves to loopback is refused by default...
    let url = serve_file(bytes.clone(), "e.tar.gz");
    let by_name = url.replace("127.0.0.1", "localhost");
    let server = store_server(
        store.path(),
        &["--allowed-urls", r"http://localhost:\d+/models/.*"],
    );
    let r = call(&server, &by_name);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("loopback, private or link-local"),
        "{}",
        r.text()
    );
    assert_eq!(server.manage("GET", "/models/remote", "", b"").status, 404);
    drop(server);
    // ...and allowed when the operator says so.
    let server = store_server(
        store.path(),
        &[
            "--allowed-urls",
            r"http://localhost:\d+/models/.*",
            "--allow-private-url-hosts",
        ],
    );
    let r = call(&server, &by_name);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_hot_swap_under_load_fails_no_request_and_frees_the_old_version() {
    let store = tempfile::tempdir().expect("tempdir");
    let v1 = archive(store.path(), "swap", "1.0", "echo", "tgz");
    // v2 is another build of the plugin (it answers reversed), bundled in its archive.
    let v2_dir = tempfile::tempdir().expect("tempdir");
    let v2 = archive(
        v2_dir.path(),
        "swap",
        "2.0",
        echo_reverse_library().to_str().expect("utf-8"),
        "tgz",
    );
    std::fs::copy(v2_dir.path().join(&v2), store.path().join("swap-v2.tar.gz")).expect("copy");
    let server = store_server(store.path(), &[]);
    server.register(&format!("url={v1}&synchronous=true&initial_workers=2"));

    let stop = Arc::new(AtomicBool::new(false));
    let clients = cresset_e2e::keep_posting(
        &format!("{}/predictions/swap", server.inference),
        b"abc",
        3,
        &stop,
    );

    std::thread::sleep(Duration::from_millis(300));
    let r = server.manage(
        "POST",
        "/models?url=swap-v2.tar.gz&synchronous=true&initial_workers=2",
        "",
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(300));
    let r = server.manage("PUT", "/models/swap/2.0/set-default", "", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    // The old default cannot be removed while it is the default; now it is not.
    let r = server.manage("DELETE", "/models/swap/1.0", "", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    let mut saw = (false, false);
    for client in clients {
        let answers = client.join().expect("client");
        let mut switched = false;
        for (status, version, body) in answers {
            total += 1;
            assert_eq!(
                status, 200,
                "a request failed during the swap: {version} {body}"
            );
            match version.as_str() {
                "1.0" => {
                    assert!(!switched, "v1 answered after v2 had answered this client");
                    assert_eq!(body, "abc");
                    saw.0 = true;
                }
                "2.0" => {
                    switched = true;
                    assert_eq!(body, "cba");
                    saw.1 = true;
                }
                other => panic!("unexpected version {other:?}"),
            }
        }
    }
    assert!(
        saw.0 && saw.1 && total > 50,
        "too little traffic to show a swap: {total} {saw:?}"
    );
    // v1's workers, instances and model were dropped, and then it is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .log()
        .contains("version drained; its instances and model were dropped")
    {
        assert!(
            Instant::now() < deadline,
            "v1 was never drained:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.manage("GET", "/models/swap/1.0", "", b"").status,
        404
    );
    let v = wait_state(&server, "/models/swap", "Ready");
    assert_eq!(v["modelVersion"], "2.0");
}

#[test]
fn the_default_version_cannot_be_removed_while_others_exist() {
    let store = tempfile::tempdir().expect("tempdir");
    archive(store.path(), "m", "1.0", "echo", "tgz");
    std::fs::rename(
        store.path().join("m.tar.gz"),
        store.path().join("m1.tar.gz"),
    )
    .expect("mv");
    archive(store.path(), "m", "2.0", "echo", "tgz");
    let server = store_server(store.path(), &[]);
    for file in ["m1.tar.gz", "m.tar.gz"] {
        let r = server.manage(
            "POST",
            &format!("/models?url={file}&synchronous=true"),
            "",
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let all = describe(&server, "/models/m/all");
    assert_eq!(all.len(), 2);
    assert_eq!(all.iter().filter(|v| v["isDefault"] == true).count(), 1);
    let r = server.manage("DELETE", "/models/m/1.0", "", b"");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        server.manage("DELETE", "/models/m/2.0", "", b"").status,
        200
    );
    assert_eq!(
        server.manage("DELETE", "/models/m/1.0", "", b"").status,
        200
    );
    assert_eq!(server.manage("GET", "/models/m", "", b"").status, 404);
}

#[test]
fn an_unregistered_version_is_described_as_draining_until_its_requests_finish() {
    let (_store, server) = panicky_model("slow");
    let in_flight = post_in_background(
        format!("{}/predictions/slow", server.inference),
        b"sleep:1500",
    );
    wait_for(&server, "/models/slow/1.0", "busy", |v| {
        v["workers"][0]["status"] == "BUSY"
    });
    assert_eq!(
        server.manage("DELETE", "/models/slow/1.0", "", b"").status,
        200
    );
    // New requests find no model; the one in flight finishes on the draining version.
    assert_eq!(
        server.post("/predictions/slow", "text/plain", b"x").status,
        404
    );
    let v = &describe(&server, "/models/slow/1.0")[0];
    assert_eq!(v["state"], "Draining");
    assert_eq!(in_flight.join().expect("request"), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.manage("GET", "/models/slow/1.0", "", b"").status != 404 {
        assert!(
            Instant::now() < deadline,
            "the version never finished draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scaling_to_zero_finishes_queued_work_and_a_version_without_workers_cannot_be_the_default() {
    let (_store, server) = panicky_model("z");
    let requests: Vec<_> = (0..3)
        .map(|_| post_in_background(format!("{}/predictions/z", server.inference), b"sleep:300"))
        .collect();
    // One request running, two queued behind it (two queued alone could be two of the three
    // before the worker took any, on a loaded machine: the third would come after the scaling).
    wait_for(&server, "/models/z/1.0", "busy with two queued", |v| {
        v["queueDepth"] == 2 && v["workers"][0]["status"] == "BUSY"
    });
    assert_eq!(
        server
            .manage(
                "PUT",
                "/models/z?min_worker=0&max_worker=1&synchronous=true",
                "",
                b""
            )
            .status,
        200
    );
    for r in requests {
        assert_eq!(
            r.join().expect("request"),
            200,
            "a queued request was stranded by scaling to zero"
        );
    }
    let r = server.post("/predictions/z", "text/plain", b"x");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("has no workers"));
    let r = server.manage("PUT", "/models/z/1.0/set-default", "", b"");
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        server
            .manage("PUT", "/models/z?min_worker=1&synchronous=true", "", b"")
            .status,
        200
    );
    assert_eq!(
        server.post("/predictions/z", "text/plain", b"x").text(),
        "ok"
    );
}

#[test]
fn the_model_list_is_paginated_and_asynchronous_scaling_answers_202() {
    let store = tempfile::tempdir().expect("tempdir");
    for name in ["a", "b", "c"] {
        archive(store.path(), name, "1.0", "echo", "tgz");
    }
    let server = store_server(store.path(), &["--models", "a.tar.gz,b.tar.gz,c.tar.gz"]);
    server.wait_healthy();
    let first = server.manage("GET", "/models?limit=2", "", b"").json();
    let names: Vec<&str> = first["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["modelName"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let token = first["nextPageToken"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let second = server
        .manage(
            "GET",
            &format!("/models?limit=2&next_page_token={token}"),
            "",
            b"",
        )
        .json();
    assert_eq!(second["models"][0]["modelName"], "c");
    assert!(second.get("nextPageToken").is_none(), "{second}");
    for bad in [
        "/models?limit=0",
        "/models?next_page_token=abc",
        "/models?next_page_token=18446744073709551615&limit=1000",
        "/models?pages=2",
    ] {
        let r = server.manage("GET", bad, "", b"");
        assert!(
            r.status == 400 || (r.status == 200 && r.json()["models"] == serde_json::json!([])),
            "{bad}: {} {}",
            r.status,
            r.text()
        );
    }

    let r = server.manage("PUT", "/models/b?min_worker=2&max_worker=2", "", b"");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["status"], "Processing worker updates...");
    wait_for(&server, "/models/b", "scaled to 2", |v| {
        v["workers"].as_array().map(Vec::len) == Some(2) && v["minWorkers"] == 2
    });
    let r = server.manage("PUT", "/models/nope?min_worker=1", "", b"");
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn describe_reports_each_workers_threads_and_how_openmp_threads_wait() {
    let store = tempfile::tempdir().expect("tempdir");
    let file = archive(store.path(), "e", "1.0", "echo", "tgz");
    let register = |server: &Server| {
        let reply = server.manage(
            "POST",
            &format!("/models?url={file}&synchronous=true&initial_workers=2"),
            "",
            b"",
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        describe(server, "/models/e")[0].clone()
    };
    // By default a bounded spin; the cores are divided among the workers.
    let server = store_server(store.path(), &["--intra-op-threads", "0"]);
    let body = register(&server);
    assert_eq!(body["openmpWait"]["GOMP_SPINCOUNT"], "30000", "{body}");
    assert_eq!(body["openmpWait"]["OMP_WAIT_POLICY"], Value::Null, "{body}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let workers = body["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert_eq!(w["intraOpThreads"], (cores / 2).max(1), "{body}");
    }
    drop(server);
    // An operator's own setting wins, and the server adds no spin count to it.
    let args = ["--model-store", store.path().to_str().expect("utf-8")];
    let server = Server::start_with_env(&args, &[("OMP_WAIT_POLICY", "PASSIVE")]);
    let body = register(&server);
    assert_eq!(body["openmpWait"]["OMP_WAIT_POLICY"], "PASSIVE", "{body}");
    assert_eq!(body["openmpWait"]["GOMP_SPINCOUNT"], Value::Null, "{body}");
}
