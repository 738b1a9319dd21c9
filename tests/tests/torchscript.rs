//! The TorchScript plugin against Python torch's outputs for the same inputs.

use cresset_e2e::{expected_json, repo_root, run_archiver, Server};
use serde_json::{json, Value};

fn max_abs_diff(a: &Value, b: &Value) -> f64 {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "shapes differ: {a} vs {b}");
            x.iter()
                .zip(y)
                .map(|(p, q)| max_abs_diff(p, q))
                .fold(0.0, f64::max)
        }
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs()
        }
        _ => panic!("not comparable: {a} vs {b}"),
    }
}

#[test]
fn logits_match_python_torch_within_1e_5() {
    let expected = expected_json();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &cresset_e2e::raw_iris_archive(dir.path())]);
    server.wait_healthy();
    let reply = server.post_json(
        "/predictions/iris_raw",
        &json!({"data": expected["iris"]["inputs"]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let diff = max_abs_diff(&reply.json()["data"], &expected["iris"]["logits"]);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

#[test]
fn labels_come_from_index_to_name_with_top_k_probabilities() {
    let expected = expected_json();
    let server = Server::start(&["--models", "iris"]);
    server.wait_healthy();
    let reply = server.post_json(
        "/predictions/iris",
        &json!({"data": expected["iris"]["inputs"]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let rows = reply.json();
    let names = ["setosa", "versicolor", "virginica"];
    let rows = rows.as_array().expect("a list per row");
    assert_eq!(rows.len(), 5);
    for (r, row) in rows.iter().enumerate() {
        let row = row.as_object().expect("label → probability");
        let labels: Vec<&String> = row.keys().collect();
        let want: Vec<&str> = expected["iris"]["top_indices"][r]
            .as_array()
            .expect("indices")
            .iter()
            .map(|i| names[i.as_u64().expect("index") as usize])
            .collect();
        assert_eq!(labels, want, "row {r}: labels in probability order");
        let probs: Vec<Value> = row.values().cloned().collect();
        let diff = max_abs_diff(
            &Value::Array(probs),
            &expected["iris"]["top_probabilities"][r],
        );
        assert!(diff <= 1e-5, "row {r}: max abs diff {diff}");
    }
}

#[test]
fn kserve_v2_inputs_with_two_tensors_and_tuple_outputs() {
    let expected = expected_json();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = repo_root().join("tests/fixtures/generated/two_inputs/model.pt");
    let (ok, path, err) = run_archiver(&[
        "--model-name",
        "two",
        "--handler",
        "torchscript",
        "--archive-format",
        "zip",
        "--serialized-file",
        model.to_str().expect("utf-8"),
        "--export-path",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    let server = Server::start(&["--models", &format!("two={path}")]);
    server.wait_healthy();
    let flat = |v: &Value| -> Vec<Value> {
        v.as_array()
            .expect("rows")
            .iter()
            .flat_map(|r| r.as_array().expect("row").clone())
            .collect()
    };
    let body = json!({
        "id": "req-7",
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": flat(&expected["two_inputs"]["x"])},
            {"name": "y", "shape": [2, 2], "datatype": "FP32", "data": expected["two_inputs"]["y"]},
        ]
    });
    let reply = server.post_json("/predictions/two", &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let out = reply.json();
    assert_eq!(out["id"], "req-7");
    assert_eq!(out["model_name"], "two");
    assert_eq!(out["outputs"][0]["shape"], json!([2, 2]));
    assert_eq!(out["outputs"][0]["datatype"], "FP32");
    let d0 = max_abs_diff(
        &out["outputs"][0]["data"],
        &Value::Array(flat(&expected["two_inputs"]["output0"])),
    );
    let d1 = max_abs_diff(
        &out["outputs"][1]["data"],
        &expected["two_inputs"]["output1"],
    );
    assert!(d0 <= 1e-5 && d1 <= 1e-5, "diffs {d0} {d1}");

    let bad =
        json!({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2]}]});
    let reply = server.post_json("/predictions/two", &bad);
    assert_eq!(reply.status, 400);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`inputs[0].data` must hold 6 values"));
}

#[test]
fn a_malformed_request_in_a_batch_fails_alone() {
    let expected = expected_json();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&["--models", &cresset_e2e::raw_iris_archive(dir.path())]);
    server.wait_healthy();
    let inputs = expected["iris"]["inputs"].clone();
    // Many concurrent requests, one of them with the wrong feature count: with batch_size 8
    // they share execute calls; only the bad one fails.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let url = format!("{}/predictions/iris_raw", server.inference);
            let body = if i == 5 {
                json!({"data": [[1.0, 2.0]]})
            } else {
                json!({"data": [inputs[i % 5].clone()]})
            };
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut r = agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .expect("POST");
                (
                    i,
                    r.status().as_u16(),
                    r.body_mut().read_to_string().unwrap_or_default(),
                )
            })
        })
        .collect();
    for handle in handles {
        let (i, status, body) = handle.join().expect("thread");
        if i == 5 {
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("the model rejected the input"), "{body}");
        } else {
            assert_eq!(status, 200, "request {i}: {body}");
            let got: Value = serde_json::from_str(&body).expect("json");
            let diff = max_abs_diff(&got["data"][0], &expected["iris"]["logits"][i % 5]);
            assert!(diff <= 1e-5, "request {i}: max abs diff {diff}");
        }
    }
    let reply = server.post_json("/predictions/iris_raw", &json!({"data": "nope"}));
    assert_eq!(reply.status, 400);
    assert!(reply.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`data`"));
}
