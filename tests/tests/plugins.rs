//! Plugins side by side: panics stay inside their request, different plugins and two builds
//! of one plugin share a process, and a third-party plugin is archived and served.

use cresset_e2e::{
    bundled_archive, echo_reverse_library, library, repo_root, run_archiver, Server,
};
use serde_json::json;

#[test]
fn a_plugin_panic_fails_that_request_only_and_the_server_goes_on() {
    let root = tempfile::tempdir().expect("tempdir");
    let panicky = bundled_archive(root.path(), "panicky", &library("fixture_panicky"), "");
    let server = Server::start(&["--models", &format!("echo,{panicky}")]);
    server.wait_healthy();

    let reply = server.post("/predictions/panicky", "text/plain", b"panic");
    assert_eq!(reply.status, 500, "{}", reply.text());
    assert_eq!(reply.json()["type"], "PredictionException");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("panicked in handle"),
        "{}",
        reply.text()
    );

    // The next request to another model succeeds, and so does the next one to the same model.
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"alive")
            .text(),
        "alive"
    );
    assert_eq!(
        server
            .post("/predictions/panicky", "text/plain", b"fine")
            .text(),
        "ok"
    );
}

#[test]
fn different_plugins_and_two_builds_of_one_plugin_serve_side_by_side() {
    let root = tempfile::tempdir().expect("tempdir");
    // The reverse build lives at another path and has other bytes than the normal build.
    let reverse = std::fs::read(echo_reverse_library()).expect("read");
    assert_ne!(
        reverse,
        std::fs::read(library("plugin_echo")).expect("read")
    );
    let echo_b = bundled_archive(root.path(), "echo_b", &echo_reverse_library(), "");
    let server = Server::start(&["--models", &format!("echo,iris,{echo_b}")]);
    server.wait_healthy();

    for _ in 0..3 {
        assert_eq!(
            server
                .post("/predictions/echo", "text/plain", b"abc")
                .text(),
            "abc"
        );
        assert_eq!(
            server
                .post("/predictions/echo_b", "text/plain", b"abc")
                .text(),
            "cba"
        );
        let iris = server.post_json(
            "/predictions/iris",
            &json!({"data": [[5.1, 3.5, 1.4, 0.2]]}),
        );
        assert_eq!(iris.status, 200, "{}", iris.text());
        assert_eq!(iris.json()[0].as_object().map(|o| o.len()), Some(3));
    }
    let log = server.log();
    assert!(log.matches("loaded plugin library").count() >= 3, "{log}");
}

#[test]
fn a_third_party_plugin_is_archived_with_cresset_archive_and_served() {
    let plugin_source = repo_root().join("plugins/examples/greeter/src/lib.rs");
    let lines = std::fs::read_to_string(&plugin_source)
        .expect("read")
        .lines()
        .count();
    assert!(lines < 80, "the example plugin has {lines} lines");

    let out = tempfile::tempdir().expect("tempdir");
    let config = out.path().join("model-config.toml");
    std::fs::write(
        &config,
        "batch_size = 4\n[handler]\ngreeting = \"Bonjour\"\n",
    )
    .expect("write");
    let lib = library("plugin_greeter");
    let mut models = Vec::new();
    for format in ["tgz", "zip"] {
        let name = format!("greeter_{format}");
        let (ok, path, err) = run_archiver(&[
            "--model-name",
            &name,
            "--version",
            "2.1",
            "--handler",
            lib.to_str().expect("utf-8"),
            "--config-file",
            config.to_str().expect("utf-8"),
            "--archive-format",
            format,
            "--export-path",
            out.path().to_str().expect("utf-8"),
        ]);
        assert!(ok, "{err}");
        models.push(path);
    }
    let server = Server::start(&["--models", &models.join(",")]);
    server.wait_healthy();
    for name in ["greeter_tgz", "greeter_zip"] {
        let reply = server.post_json(&format!("/predictions/{name}"), &json!({"name": "Ada"}));
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json(), json!({"greeting": "Bonjour, Ada!"}));
        assert_eq!(reply.header("x-model-version"), Some("2.1"));
        let bad = server.post_json(&format!("/predictions/{name}"), &json!({"nom": "Ada"}));
        assert_eq!(bad.status, 400);
        assert_eq!(bad.json()["type"], "BadRequestException");
    }
}
