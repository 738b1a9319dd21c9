//! Registrations survive restarts, and a SIGKILL at any moment loses none that was acknowledged.
//! (A registration whose first load was still under way at the kill comes back `Failed` with
//! `failure: Crashed`, not loaded: the kill may have been the load's doing.)

use std::path::Path;
use std::time::{Duration, Instant};

use cresset_e2e::{archive_model, Server};

fn archive(store: &Path, name: &str, version: &str) -> String {
    let file = format!("{name}-{version}.tar.gz");
    let path = archive_model(store, name, version, "echo", "tgz");
    std::fs::rename(path, store.join(&file)).expect("rename");
    file
}

fn start(store: &Path, snapshot: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--model-store",
        store.to_str().expect("utf-8"),
        "--snapshot-file",
        snapshot.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn acknowledged_registrations_survive_a_sigkill_in_the_middle_of_a_burst() {
    let store = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("snapshot.json");
    let files: Vec<(String, String)> = (0..12)
        .map(|i| {
            (
                format!("m{i}"),
                archive(store.path(), &format!("m{i}"), "1.0"),
            )
        })
        .collect();
    let server = start(store.path(), &snapshot, &[]);
    let management = server.management.clone();

    let (tx, rx) = std::sync::mpsc::channel();
    let burst: Vec<_> = files
        .into_iter()
        .enumerate()
        .map(|(i, (name, file))| {
            let synchronous = i % 2 == 0;
            let url = format!("{management}/models?url={file}&synchronous={synchronous}");
            let tx = tx.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(15 * i as u64));
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                if let Ok(r) = agent.post(&url).send(&b""[..]) {
                    if matches!(r.status().as_u16(), 200 | 202) {
                        let _ = tx.send((name, synchronous));
                    }
                }
            })
        })
        .collect();
    drop(tx);
    // Kill mid-burst, once two registrations are acknowledged: others are in flight or unsent.
    let mut acknowledged: Vec<(String, bool)> = Vec::new();
    while acknowledged.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(name) => acknowledged.push(name),
            Err(_) => panic!("fewer than two registrations were acknowledged"),
        }
    }
    server.kill();
    for t in burst {
        let _ = t.join();
    }
    acknowledged.extend(rx.iter());

    eprintln!(
        "{} of 12 registrations were acknowledged before the SIGKILL",
        acknowledged.len()
    );
    assert!(
        !acknowledged.is_empty(),
        "the kill came before any registration was acknowledged"
    );

    let restarted = start(store.path(), &snapshot, &[]);
    restarted.wait_settled();
    assert_eq!(restarted.get("/ping").status, 200);
    for (name, synchronous) in &acknowledged {
        let described = restarted.manage("GET", &format!("/models/{name}"), "", b"");
        assert_eq!(described.status, 200, "{name} was acknowledged but is gone");
        let version = &described.json()[0];
        if version["state"] == "Failed" {
            // Only a registration answered 202 can have been loading when the server died.
            assert!(
                !synchronous,
                "{name} was loaded when acknowledged: {version}"
            );
            assert_eq!(version["failure"], "Crashed", "{version}");
            continue;
        }
        let reply = restarted.post(&format!("/predictions/{name}"), "text/plain", b"back");
        assert_eq!(
            (reply.status, reply.text()),
            (200, "back".to_owned()),
            "{name}: {version}"
        );
    }
    let log = restarted.log();
    assert!(log.contains("restoring registrations"), "{log}");
}

#[test]
fn default_version_and_worker_counts_survive_a_restart_unless_snapshots_are_off() {
    let store = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("snapshot.json");
    let v1 = archive(store.path(), "m", "1.0");
    let v2 = archive(store.path(), "m", "2.0");
    let server = start(store.path(), &snapshot, &[]);
    for file in [&v1, &v2] {
        server.register(&format!("url={file}&synchronous=true"));
    }
    assert_eq!(
        server
            .manage("PUT", "/models/m/2.0/set-default", "", b"")
            .status,
        200
    );
    assert_eq!(
        server
            .manage(
                "PUT",
                "/models/m/2.0?min_worker=2&max_worker=3&synchronous=true",
                "",
                b""
            )
            .status,
        200
    );
    server.kill();

    let restarted = start(store.path(), &snapshot, &[]);
    restarted.wait_healthy();
    let all = restarted.manage("GET", "/models/m/all", "", b"").json();
    let all = all.as_array().expect("versions");
    assert_eq!(all.len(), 2);
    let v2 = all
        .iter()
        .find(|v| v["modelVersion"] == "2.0")
        .expect("2.0");
    assert_eq!(v2["isDefault"], true);
    assert_eq!(
        (v2["minWorkers"].as_u64(), v2["maxWorkers"].as_u64()),
        (Some(2), Some(3))
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while restarted.manage("GET", "/models/m/2.0", "", b"").json()[0]["workers"]
        .as_array()
        .map(Vec::len)
        != Some(2)
    {
        assert!(
            Instant::now() < deadline,
            "2.0 did not come back with 2 workers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        restarted
            .post("/predictions/m", "text/plain", b"x")
            .header("x-model-version"),
        Some("2.0")
    );
    // Unregistering is persisted too.
    assert_eq!(
        restarted.manage("DELETE", "/models/m/1.0", "", b"").status,
        200
    );
    restarted.kill();
    let again = start(store.path(), &snapshot, &[]);
    again.wait_healthy();
    assert_eq!(again.manage("GET", "/models/m/1.0", "", b"").status, 404);
    again.kill();

    let fresh = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--snapshot-file",
        snapshot.to_str().expect("utf-8"),
        "--no-config-snapshot",
    ]);
    assert_eq!(
        fresh.manage("GET", "/models", "", b"").json()["models"],
        serde_json::json!([])
    );
}

#[test]
fn an_uploaded_archive_is_kept_in_the_store_and_restored_after_a_crash() {
    let build = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("snapshot.json");
    let file = archive(build.path(), "uploaded", "3.0");
    let bytes = std::fs::read(build.path().join(file)).expect("read");
    let server = start(store.path(), &snapshot, &[]);
    let r = server.manage(
        "POST",
        "/models?synchronous=true",
        "application/octet-stream",
        &bytes,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    server.kill();
    let restarted = start(store.path(), &snapshot, &[]);
    restarted.wait_healthy();
    let reply = restarted.post("/predictions/uploaded", "text/plain", b"kept");
    assert_eq!((reply.status, reply.text()), (200, "kept".to_owned()));
    assert_eq!(reply.header("x-model-version"), Some("3.0"));
}

#[test]
fn the_snapshot_wins_over_models_and_keeps_registrations_whose_archive_is_missing() {
    let store = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let snapshot = state.path().join("snapshot.json");
    let a = archive(store.path(), "a", "1.0");
    let b = archive(store.path(), "b", "1.0");
    let models = format!("a={a},b={b}");
    let server = start(store.path(), &snapshot, &["--models", &models]);
    server.wait_healthy();
    assert_eq!(server.manage("DELETE", "/models/a", "", b"").status, 200);
    server.kill();

    // The same command line again: the unregistered model stays unregistered.
    let moved = state.path().join("b-away.tar.gz");
    std::fs::rename(store.path().join(&b), &moved).expect("move b away");
    let restarted = start(store.path(), &snapshot, &["--models", &models]);
    restarted.wait_settled();
    assert_eq!(
        restarted.post("/predictions/a", "text/plain", b"x").status,
        404
    );
    // b's archive is gone: it is Failed, and still registered.
    let r = restarted.post("/predictions/b", "text/plain", b"x");
    assert_eq!(r.status, 503, "{}", r.text());
    restarted.kill();

    std::fs::rename(&moved, store.path().join(&b)).expect("move b back");
    let healed = start(store.path(), &snapshot, &["--models", &models]);
    healed.wait_healthy();
    assert_eq!(
        healed.post("/predictions/b", "text/plain", b"back").text(),
        "back"
    );
}
