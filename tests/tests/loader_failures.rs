//! Every way a plugin can fail to load gives a clear error naming the file and both ABI
//! versions, and the server goes on serving the other models.

use cresset_e2e::{bundled_archive, dir_archive, library, Server};

const HOST_ABI: &str = "1.0.0";

fn message(server: &Server, model: &str) -> String {
    let reply = server.post(&format!("/predictions/{model}"), "text/plain", b"x");
    assert_eq!(reply.status, 503, "{model}: {}", reply.text());
    let body = reply.json();
    assert_eq!(body["type"], "ServiceUnavailableException");
    body["message"].as_str().expect("message").to_owned()
}

#[test]
fn each_loader_failure_has_its_own_clear_error_and_the_server_keeps_serving() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let garbage = r.join("garbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").expect("write");
    let models = [
        "echo".to_owned(),
        format!(
            "missing={}",
            dir_archive(r, "missing", "handler/libnothing.so", "", &[]).display()
        ),
        format!(
            "unknown_builtin={}",
            dir_archive(r, "unknown_builtin", "no_such_plugin", "", &[]).display()
        ),
        bundled_archive(r, "garbage", &garbage, ""),
        bundled_archive(r, "not_a_plugin", &library("fixture_not_a_plugin"), ""),
        bundled_archive(r, "abi_mismatch", &library("fixture_abi_mismatch"), ""),
        bundled_archive(r, "init_error", &library("fixture_init_error"), ""),
        bundled_archive(r, "init_panic", &library("fixture_init_panic"), ""),
        bundled_archive(
            r,
            "load_panic",
            &library("fixture_panicky"),
            "[handler]\npanic_in = \"initialize\"\n",
        ),
    ];
    let server = Server::start(&["--models", &models.join(",")]);
    server.wait_settled();

    // The good model answers.
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"still here")
            .text(),
        "still here"
    );

    let m = message(&server, "missing");
    assert!(
        m.contains("does not exist") && m.contains("libnothing.so") && m.contains(HOST_ABI),
        "{m}"
    );

    let m = message(&server, "unknown_builtin");
    assert!(
        m.contains("unknown handler `no_such_plugin`")
            && m.contains("libcresset_plugin_no_such_plugin.so"),
        "{m}"
    );

    let m = message(&server, "garbage");
    assert!(
        m.contains("is not a loadable shared library")
            && m.contains("garbage.so")
            && m.contains(HOST_ABI),
        "{m}"
    );

    let m = message(&server, "not_a_plugin");
    assert!(
        m.contains("not a Cresset plugin")
            && m.contains("libcresset_fixture_not_a_plugin.so")
            && m.contains(HOST_ABI),
        "{m}"
    );

    let m = message(&server, "abi_mismatch");
    assert!(
        m.contains("built against plugin ABI 2.0.0")
            && m.contains(&format!("this host speaks plugin ABI {HOST_ABI}"))
            && m.contains("libcresset_fixture_abi_mismatch.so"),
        "{m}"
    );

    let m = message(&server, "init_error");
    assert!(
        m.contains("failed to initialise")
            && m.contains("the licence file is missing")
            && m.contains("plugin ABI 1.0.0")
            && m.contains(&format!("host plugin ABI {HOST_ABI}"))
            && m.contains("libcresset_fixture_init_error.so"),
        "{m}"
    );

    let m = message(&server, "init_panic");
    assert!(
        m.contains("panicked while initialising")
            && m.contains("libcresset_fixture_init_panic.so")
            && m.contains(HOST_ABI),
        "{m}"
    );

    let m = message(&server, "load_panic");
    assert!(
        m.contains("a worker failed to start") && m.contains("panicked in initialize"),
        "{m}"
    );

    // The errors are in the log too. Failed models are listed by `/ping` but do not hold the
    // server's readiness: the models that loaded serve.
    let log = server.log();
    assert!(log.contains("built against plugin ABI 2.0.0"), "{log}");
    let ping = server.get("/ping");
    assert_eq!(ping.status, 200, "{}", ping.text());
    assert_eq!(ping.json()["status"], "Healthy");
    assert!(
        ping.json()["failed"]
            .as_array()
            .is_some_and(|f| f.iter().any(|m| m == "init_error/1.0")),
        "{}",
        ping.text()
    );
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"after")
            .text(),
        "after"
    );
}
