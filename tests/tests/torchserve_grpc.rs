//! TorchServe's own gRPC APIs (`InferenceAPIsService` on the gRPC listener,
//! `ManagementAPIsService` on the gRPC management listener), driven by a Python client whose
//! stubs grpcio-tools compiles from TorchServe 0.12.0's own `inference.proto` and
//! `management.proto`, taken from its frontend jar (tests/torchserve_grpc_client.py): register,
//! list, describe, scale, predict, stream, a bidirectional stream, set-default and unregister,
//! with the keys on; and the same model seen over REST afterwards.

use std::path::PathBuf;

use cresset_e2e::{bundled_archive, curl, library, repo_root, torchserve_venv, Server};
use serde_json::Value;

/// TorchServe's frontend jar, from the TorchServe venv (scripts/setup-torchserve.sh).
fn torchserve_jar() -> PathBuf {
    let venv = torchserve_venv();
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .expect("the venv's lib")
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/ts/frontend/model-server.jar"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no ts/frontend/model-server.jar under {}", lib.display()))
}

#[test]
fn torchserves_grpc_clients_work_unchanged() {
    let store = tempfile::tempdir().expect("tempdir");
    // An archive of the store, registered by name over gRPC (`url`).
    bundled_archive(store.path(), "faulty", &library("fixture_panicky"), "");
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("keys.json");
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--key-file",
        key_file.to_str().expect("utf-8"),
        "--grpc-address",
        "127.0.0.1:0",
        "--grpc-management-address",
        "127.0.0.1:0",
        // One request in flight: a cancelled stream must give its permit back.
        "--max-concurrent-requests",
        "1",
        // A 1 MiB message cap: a larger call without a key must be refused for the key.
        "--max-request-size",
        "1048576",
    ]);
    server.wait_healthy();
    let out = std::process::Command::new(cresset_e2e::venv_bin("python"))
        .arg(repo_root().join("tests/torchserve_grpc_client.py"))
        .arg(torchserve_jar())
        .arg(server.grpc.as_deref().expect("grpc address"))
        .arg(
            server
                .grpc_management
                .as_deref()
                .expect("grpc management address"),
        )
        .arg("faulty")
        .arg(&key_file)
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "the TorchServe gRPC client failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(seen["unauthenticated"], true);
    assert_eq!(
        seen["register"],
        "Model \"faulty\" Version: 1.0 registered with 1 initial workers"
    );
    assert_eq!(
        seen["scale"],
        "Workers scaled to 2 for model: faulty, version: 1.0"
    );
    assert_eq!(
        seen["set_default"],
        "Default version successfully updated for model \"faulty\" to \"1.0\""
    );
    assert_eq!(
        seen["stream"],
        serde_json::json!(["chunk-0\n", "chunk-1\n", "chunk-2\n", "done"])
    );
    let errors = seen["errors"].as_array().expect("errors");
    assert_eq!(errors[0][0], "NOT_FOUND", "{errors:?}");
    assert_eq!(errors[1][0], "INTERNAL", "{errors:?}");
    assert!(
        errors[1][1]
            .as_str()
            .is_some_and(|m| m.contains("asked to panic")),
        "{errors:?}"
    );
    assert_eq!(seen["unregister"], "Model \"faulty\" unregistered");
    // The model is gone over REST too.
    let keys: Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).expect("keys")).expect("json");
    let bearer = format!(
        "Authorization: Bearer {}",
        keys["management"].as_str().expect("management key")
    );
    let (code, listed) = curl(&["-H", &bearer], &format!("{}/models", server.management));
    assert_eq!(code, 200, "{listed}");
    assert_eq!(
        serde_json::from_str::<Value>(&listed).expect("json")["models"],
        serde_json::json!([])
    );
}
