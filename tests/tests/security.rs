//! Token authorization: separate inference and management keys from a 0600 key file, 401 for a
//! missing or wrong token, open health routes; and a hostile upload that leaves the server
//! healthy.

use std::os::unix::fs::MetadataExt;

use cresset_e2e::Server;

fn call(method: &str, url: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = match (method, token) {
        ("GET", Some(t)) => agent
            .get(url)
            .header("authorization", &format!("Bearer {t}"))
            .call(),
        ("GET", None) => agent.get(url).call(),
        ("POST", Some(t)) => agent
            .post(url)
            .header("authorization", &format!("Bearer {t}"))
            .send(&b"hi"[..]),
        ("POST", None) => agent.post(url).send(&b"hi"[..]),
        _ => panic!("unsupported"),
    }
    .expect("call");
    let www = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (
        response.status().as_u16(),
        response.body_mut().read_to_string().unwrap_or_default(),
        www,
    )
}

#[test]
fn tokens_guard_every_api_but_health_and_each_key_opens_only_its_own_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("keys.json");
    let server = Server::start(&[
        "--models",
        "echo",
        "--key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        std::fs::metadata(&key_file).expect("key file").mode() & 0o777,
        0o600
    );
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).expect("read")).expect("json");
    let (inference, management) = (
        keys["inference"].as_str().expect("key"),
        keys["management"].as_str().expect("key"),
    );
    assert_ne!(inference, management);

    // Health needs no token.
    server.wait_healthy();
    let predict = format!("{}/predictions/echo", server.inference);
    let (status, body, www) = call("POST", &predict, None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("UnauthorizedException"), "{body}");
    assert_eq!(www.as_deref(), Some("Bearer"));
    assert_eq!(
        call("POST", &predict, Some("wrong-token-of-some-length")).0,
        401
    );
    assert_eq!(
        call("POST", &predict, Some(management)).0,
        401,
        "the management key must not open inference"
    );
    let (status, body, _) = call("POST", &predict, Some(inference));
    assert_eq!((status, body.as_str()), (200, "hi"));

    let models = format!("{}/models", server.management);
    assert_eq!(call("GET", &models, None).0, 401);
    assert_eq!(
        call("GET", &models, Some(inference)).0,
        401,
        "the inference key must not open management"
    );
    assert_eq!(call("GET", &models, Some(management)).0, 200);

    let metrics = format!("{}/metrics", server.metrics);
    assert_eq!(call("GET", &metrics, None).0, 401);
    assert_eq!(call("GET", &metrics, Some(management)).0, 200);

    // The same keys are used after a restart.
    drop(server);
    let again = Server::start(&[
        "--models",
        "echo",
        "--key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    again.wait_healthy();
    assert_eq!(
        call(
            "POST",
            &format!("{}/predictions/echo", again.inference),
            Some(inference)
        )
        .0,
        200
    );
}

/// The gRPC listener takes the inference key as `authorization: Bearer` metadata, as REST takes
/// the header: without it (or with the management key) every call is UNAUTHENTICATED.
#[test]
fn grpc_calls_need_the_inference_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("keys.json");
    let server = Server::start(&[
        "--models",
        "echo",
        "--key-file",
        key_file.to_str().expect("utf-8"),
        "--grpc-address",
        "127.0.0.1:0",
    ]);
    server.wait_healthy();
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).expect("read")).expect("json");
    let script = r#"
import sys
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
url, inference, management = sys.argv[1:4]
c = g.InferenceServerClient(url=url)
for headers in (None, {"authorization": "Bearer " + management}):
    try:
        c.is_model_ready("echo", headers=headers)
        raise SystemExit(f"answered with {headers}")
    except InferenceServerException as e:
        assert "UNAUTHENTICATED" in str(e.status()), e
assert c.is_model_ready("echo", headers={"authorization": "Bearer " + inference})
assert c.is_server_live(headers={"authorization": "bearer " + inference})
print("ok")
"#;
    let out = std::process::Command::new(cresset_e2e::venv_bin("python"))
        .args(["-c", script])
        .arg(server.grpc.as_deref().expect("grpc address"))
        .arg(keys["inference"].as_str().expect("key"))
        .arg(keys["management"].as_str().expect("key"))
        .output()
        .expect("python");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
