//! The Kubernetes manifests under `deploy/kserve/` parse, and every flag and port they use is
//! one `cresset serve` has: a renamed flag or a moved port fails here, not in a cluster.

use cresset_e2e::{cresset_bin, repo_root};
use serde_json::Value;

fn manifest(name: &str) -> Value {
    let path = repo_root().join("deploy/kserve").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn kserve_manifests_parse_and_use_only_flags_and_ports_cresset_has() {
    let help = std::process::Command::new(cresset_bin())
        .args(["serve", "--help"])
        .output()
        .expect("cresset serve --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).into_owned();

    let runtime = manifest("servingruntime.yaml");
    assert_eq!(runtime["kind"], "ServingRuntime");
    let formats: Vec<&str> = runtime["spec"]["supportedModelFormats"]
        .as_array()
        .expect("formats")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(formats, ["pytorch", "huggingface", "gguf"]);
    assert_eq!(
        runtime["spec"]["protocolVersions"],
        serde_json::json!(["v1", "v2", "grpc-v2"])
    );
    let container = &runtime["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[0], "serve");
    let mut addresses = Vec::new();
    for arg in &args[1..] {
        let flag = arg.split('=').next().expect("flag");
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "`{flag}` is not a flag of `cresset serve`:\n{help}"
        );
        if let Some(port) = arg
            .split_once('=')
            .and_then(|(_, v)| v.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
        {
            addresses.push((flag, port));
        }
    }
    assert!(args.contains(&"--model=/mnt/models"));
    // Every declared port is one a listener binds, on all interfaces; probes hit the HTTP one.
    let port_of = |flag: &str| {
        addresses
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|(_, p)| i64::from(*p))
            .unwrap_or_else(|| panic!("{flag} is not set"))
    };
    let ports = container["ports"].as_array().expect("ports");
    for port in ports {
        let number = port["containerPort"].as_i64().expect("port");
        assert!(
            [
                port_of("--inference-address"),
                port_of("--grpc-address"),
                port_of("--metrics-address")
            ]
            .contains(&number),
            "port {number} is no listener's"
        );
    }
    let named = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_i64())
    };
    assert_eq!(
        named("h2c"),
        Some(port_of("--grpc-address")),
        "gRPC's port is h2c"
    );
    assert_eq!(named("http1"), Some(port_of("--inference-address")));
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"].as_i64(),
            Some(port_of("--inference-address")),
            "{probe}"
        );
    }
    assert_eq!(
        runtime["spec"]["annotations"]["prometheus.kserve.io/port"].as_str(),
        Some(port_of("--metrics-address").to_string().as_str())
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );

    let service = manifest("inferenceservice.yaml");
    assert_eq!(service["kind"], "InferenceService");
    assert_eq!(
        service["spec"]["predictor"]["model"]["runtime"],
        runtime["metadata"]["name"]
    );
    let hpa = manifest("hpa-queue-depth.yaml");
    let metrics: Vec<&str> = hpa["spec"]["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(|m| m["pods"]["metric"]["name"].as_str())
        .collect();
    assert_eq!(
        metrics,
        ["cresset_queue_depth", "cresset_running_sequences"]
    );
}
