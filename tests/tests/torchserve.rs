//! TorchServe users' artifacts: archives written by the real `torch-model-archiver` 0.12.0 (in
//! the test venv) in its `default` (`.mar`), `tgz` and `no-archive` formats, with a
//! `model-config.yaml` in TorchServe's keys, register from the store, by URL and by upload and
//! answer as the same model in a Cresset archive does (the default store's `iris`). What
//! Cresset cannot run (a TorchServe handler it lacks, packages to install) is a
//! 400 that says so, naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use cresset_e2e::{repo_root, serve_file, Server};
use serde_json::{json, Value};

/// `torch-model-archiver` from the test venv.
fn archiver() -> PathBuf {
    let path = cresset_e2e::venv_bin("torch-model-archiver");
    assert!(
        path.is_file(),
        "{} is missing: run `make models`",
        path.display()
    );
    path
}

/// Run `torch-model-archiver` in `work` on `iris.pt` as model `name` (version 1.0) into
/// `export`, with these further arguments; returns (success, its output).
fn archive(work: &Path, name: &str, export: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(archiver())
        .current_dir(work)
        .args(["--model-name", name, "--version", "1.0"])
        .args(["--serialized-file", "iris.pt", "--export-path"])
        .arg(export)
        .args(args)
        .output()
        .expect("run torch-model-archiver");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The iris TorchScript model, its labels and a `model-config.yaml` in `work`, with the
/// serialized file under a name of its own (`iris.pt`), as TorchServe users name theirs.
fn inputs(work: &Path) {
    let iris = repo_root().join("model_store/iris");
    std::fs::copy(iris.join("model.pt"), work.join("iris.pt")).expect("copy model.pt");
    std::fs::copy(
        iris.join("index_to_name.json"),
        work.join("index_to_name.json"),
    )
    .expect("copy labels");
    std::fs::write(
        work.join("model-config.yaml"),
        "# TorchServe frontend parameters\nminWorkers: 1\nmaxWorkers: 2\nbatchSize: 4\n\
         maxBatchDelay: 5\nresponseTimeout: 30\nstartupTimeout: 120\n\n\
         handler:\n  topk: 3\n",
    )
    .expect("write model-config.yaml");
}

/// Archive the iris inputs as `name` in `format` into `export`, with TorchServe's C++
/// TorchScript handler (served by Cresset's `torchscript` plugin).
fn archive_iris(work: &Path, export: &Path, name: &str, format: &str) {
    let (ok, text) = archive(
        work,
        name,
        export,
        &[
            "--handler",
            "TorchScriptHandler",
            "--runtime",
            "LSP",
            "--extra-files",
            "index_to_name.json",
            "--config-file",
            "model-config.yaml",
            "--archive-format",
            format,
        ],
    );
    assert!(ok, "torch-model-archiver {format}: {text}");
}

fn predict(server: &Server, model: &str) -> Value {
    let reply = server.post_json(
        &format!("/predictions/{model}"),
        &json!({"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}),
    );
    assert_eq!(reply.status, 200, "{model}: {}", reply.text());
    reply.json()
}

#[test]
fn archives_from_torch_model_archiver_register_from_the_store_by_url_and_by_upload() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    inputs(work.path());
    archive_iris(work.path(), store.path(), "iris_mar", "default");
    archive_iris(work.path(), store.path(), "iris_tgz", "tgz");
    archive_iris(work.path(), store.path(), "iris_dir", "no-archive");
    assert!(store.path().join("iris_mar.mar").is_file());
    assert!(store.path().join("iris_tgz.tar.gz").is_file());
    assert!(store
        .path()
        .join("iris_dir/MAR-INF/MANIFEST.json")
        .is_file());
    // The same model as a Cresset archive, for the expected answer.
    let reference = repo_root().join("model_store/iris");
    let link = store.path().join("iris");
    std::fs::create_dir(&link).expect("mkdir");
    for f in [
        "MANIFEST.toml",
        "model-config.toml",
        "model.pt",
        "index_to_name.json",
    ] {
        std::fs::copy(reference.join(f), link.join(f)).expect("copy iris");
    }

    // From the store: at start-up by name, and through the management API.
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "iris,iris_mar",
        "--allowed-urls",
        r"http://127\.0\.0\.1:\d+/models/.*",
    ]);
    server.wait_healthy();
    server.register("url=iris_tgz.tar.gz&synchronous=true");
    server.register("url=iris_dir&synchronous=true");
    let want = predict(&server, "iris");
    assert_eq!(want[0].as_object().map(|o| o.len()), Some(3), "{want}");
    for model in ["iris_mar", "iris_tgz", "iris_dir"] {
        assert_eq!(predict(&server, model), want, "{model}");
    }
    // By upload: the bytes of the .mar and of the tgz, under names of their own.
    for (file, name) in [("iris_mar.mar", "up_mar"), ("iris_tgz.tar.gz", "up_tgz")] {
        let bytes = std::fs::read(store.path().join(file)).expect("read the archive");
        let reply = server.manage(
            "POST",
            &format!("/models?model_name={name}&synchronous=true"),
            "application/octet-stream",
            &bytes,
        );
        assert_eq!(reply.status, 200, "{file}: {}", reply.text());
        assert_eq!(predict(&server, name), want, "{name}");
    }
    // By URL: the .mar downloaded from an allowed address into the store.
    let bytes = std::fs::read(store.path().join("iris_mar.mar")).expect("read the .mar");
    let url = serve_file(bytes, "iris.mar");
    server.register(&format!("url={url}&model_name=url_mar&synchronous=true"));
    assert_eq!(predict(&server, "url_mar"), want, "url_mar");
    // model-config.yaml's keys took effect, and what has no effect says so.
    let described = server.manage("GET", "/models/iris_mar", "", b"").json();
    let v = &described[0];
    assert_eq!(v["modelVersion"], "1.0", "{v}");
    assert_eq!(
        (v["minWorkers"].as_u64(), v["maxWorkers"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(v["batchSize"], 4, "{v}");
    assert_eq!(v["responseTimeout"], 30, "{v}");
    assert_eq!(v["plugin"]["name"], "torchscript", "{v}");
    let warnings = v["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{v}");
    assert!(warnings[0]
        .as_str()
        .is_some_and(|w| w.contains("startupTimeout")));
    assert!(server
        .log()
        .contains("`startupTimeout` (TorchServe) is accepted and has no effect"));
}

#[test]
fn what_cresset_cannot_run_is_refused_naming_the_handler_or_file() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    inputs(work.path());
    std::fs::write(work.path().join("requirements.txt"), "numpy\n").expect("write");
    let cases: [(&str, &[&str], &str); 2] = [
        (
            "base",
            &["--handler", "vllm_handler"],
            "`vllm_handler` has no Cresset counterpart",
        ),
        (
            "reqs",
            &[
                "--handler",
                "TorchScriptHandler",
                "--runtime",
                "LSP",
                "-r",
                "requirements.txt",
            ],
            "requirements.txt",
        ),
    ];
    for (name, handler, _) in &cases {
        let (ok, text) = archive(work.path(), name, store.path(), handler);
        assert!(ok, "torch-model-archiver {name}: {text}");
    }
    let server = Server::start(&["--model-store", store.path().to_str().expect("utf-8")]);
    server.wait_healthy();
    for (name, _, says) in cases {
        let reply = server.manage(
            "POST",
            &format!("/models?url={name}.mar&synchronous=true"),
            "",
            b"",
        );
        assert_eq!(reply.status, 400, "{name}: {}", reply.text());
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(says), "{name}: {message}");
        assert!(
            message.contains("MAR-INF/MANIFEST.json"),
            "{name}: {message}"
        );
    }
    // Nothing was kept, and the server goes on serving.
    let listed = server.manage("GET", "/models", "", b"").json();
    assert_eq!(listed["models"], json!([]), "{listed}");
    assert_eq!(server.get("/ping").status, 200);
}

/// Each archive's `MAR-INF/MANIFEST.json`, file names and whether every entry is stored
/// uncompressed, as Python's `zipfile` reads them.
fn read_with_python_zipfile(paths: &[PathBuf]) -> Value {
    let script = "import json, sys, zipfile\n\
        out = {}\n\
        for path in sys.argv[1:]:\n\
        \x20   z = zipfile.ZipFile(path)\n\
        \x20   out[path] = {\n\
        \x20       'manifest': json.loads(z.read('MAR-INF/MANIFEST.json')),\n\
        \x20       'names': sorted(z.namelist()),\n\
        \x20       'stored': all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist()),\n\
        \x20   }\n\
        print(json.dumps(out))\n";
    let out = Command::new(cresset_e2e::venv_bin("python"))
        .arg("-c")
        .arg(script)
        .args(paths)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn cresset_archive_writes_a_mar_in_torchserves_layout_that_both_servers_can_read() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    inputs(work.path());
    // torch-model-archiver's .mar of the same inputs, for the layout to match.
    archive_iris(work.path(), store.path(), "iris_ts", "default");
    let file = |name: &str| work.path().join(name).to_str().expect("utf-8").to_owned();
    for (format, name) in [("default", "iris_c"), ("zip-store", "iris_s")] {
        let (ok, out, err) = cresset_e2e::run_archiver(&[
            "--model-name",
            name,
            "-v",
            "1.0",
            "--serialized-file",
            &file("iris.pt"),
            "--handler",
            "torchscript",
            "--extra-files",
            &file("index_to_name.json"),
            "-c",
            &file("model-config.yaml"),
            "--archive-format",
            format,
            "--export-path",
            store.path().to_str().expect("utf-8"),
        ]);
        assert!(ok, "cresset archive {format}: {out}{err}");
        assert!(
            err.contains("`startupTimeout`"),
            "the warning is shown: {err}"
        );
    }
    let paths: Vec<PathBuf> = ["iris_ts", "iris_c", "iris_s"]
        .iter()
        .map(|n| store.path().join(format!("{n}.mar")))
        .collect();
    let read = read_with_python_zipfile(&paths);
    let entry = |i: usize| &read[paths[i].to_str().expect("utf-8")];
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    let (theirs, ours, stored) = (entry(0), entry(1), entry(2));
    // The same manifest fields as torch-model-archiver writes, for the same inputs.
    assert_eq!(keys(&ours["manifest"]), keys(&theirs["manifest"]));
    assert_eq!(
        keys(&ours["manifest"]["model"]),
        keys(&theirs["manifest"]["model"])
    );
    for field in [
        "modelName",
        "handler",
        "serializedFile",
        "configFile",
        "modelVersion",
    ] {
        if field != "modelName" {
            assert_eq!(
                ours["manifest"]["model"][field], theirs["manifest"]["model"][field],
                "{field}"
            );
        }
    }
    assert_eq!(ours["manifest"]["runtime"], "LSP");
    assert_eq!(ours["manifest"]["model"]["handler"], "TorchScriptHandler");
    // Every file torch-model-archiver puts at the root is there (ours adds MANIFEST.toml).
    let names = |v: &Value| -> Vec<String> {
        v["names"]
            .as_array()
            .expect("names")
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect()
    };
    for name in names(theirs) {
        assert!(
            names(ours).contains(&name),
            "{name} is missing: {:?}",
            names(ours)
        );
    }
    assert_eq!(ours["stored"], false);
    assert_eq!(stored["stored"], true, "zip-store stores");

    let server = Server::start(&["--model-store", store.path().to_str().expect("utf-8")]);
    server.wait_healthy();
    for model in ["iris_ts", "iris_c", "iris_s"] {
        server.register(&format!("url={model}.mar&synchronous=true"));
    }
    let want = predict(&server, "iris_ts");
    assert_eq!(predict(&server, "iris_c"), want);
    assert_eq!(predict(&server, "iris_s"), want);

    // What a Cresset archive cannot hold is refused, naming the flag.
    for (flag, says) in [
        ("--model-file", "Python model code"),
        ("-r", "installs nothing"),
    ] {
        let (ok, _, err) = cresset_e2e::run_archiver(&[
            "--model-name",
            "x",
            "--handler",
            "torchscript",
            flag,
            &file("iris.pt"),
            "--export-path",
            store.path().to_str().expect("utf-8"),
        ]);
        assert!(!ok && err.contains(says), "{flag}: {err}");
    }
}

/// GPT-fast's speculative-decoding `model-config.yaml`, as its docs give it (only the
/// `path/to/` placeholders point into the archive).
const GPT_FAST_SEED: &str = r#"# model-config.yaml for speculative decoding
minWorkers: 1
maxWorkers: 1
handler:
    model_path: "checkpoints/gpt_fast_7b"
    tokenizer_path: "checkpoints/tokenizer.model"
    compile: true
    speculative: true
    draft_model_path: "checkpoints/gpt_fast_68m"
    speculate_k: 5
    max_new_tokens: 256
    temperature: 0.8
    top_k: 200
"#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn gpt_fasts_seed_config_loads_unchanged_with_its_sentencepiece_tokenizer_and_speculates() {
    let spm = repo_root().join("tests/fixtures/generated/spm");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(spm.join("expected.json")).expect("run `make models`"),
    )
    .expect("JSON");
    let expected = &expected["gpt-fast"];
    let work = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    // GPT-fast's layout: a checkpoint folder per model and the SentencePiece model beside them.
    let checkpoints = work.path().join("checkpoints");
    copy_dir(
        &spm.join("gpt-fast/target"),
        &checkpoints.join("gpt_fast_7b"),
    );
    copy_dir(
        &spm.join("gpt-fast/draft"),
        &checkpoints.join("gpt_fast_68m"),
    );
    std::fs::copy(spm.join("bpe.model"), checkpoints.join("tokenizer.model")).expect("copy");
    // The seed as it is, and the same with one line more that asks for float32, for an exact
    // comparison with transformers (`dtype` "auto" may pick bfloat16 on this CPU).
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    for (name, config) in [
        ("gpt_fast", GPT_FAST_SEED.to_owned()),
        (
            "gpt_fast_f32",
            format!("{GPT_FAST_SEED}    dtype: float32\n"),
        ),
    ] {
        let file = work.path().join(format!("{name}.yaml"));
        std::fs::write(&file, config).expect("write");
        let (ok, _, err) = cresset_e2e::run_archiver(&[
            "--model-name",
            name,
            "--handler",
            "gpt",
            "--config-file",
            &path(&file),
            "--extra-files",
            &path(&checkpoints),
            "--archive-format",
            "default",
            "--export-path",
            &path(store.path()),
        ]);
        assert!(ok, "{err}");
    }

    let server = Server::start(&["--model-store", &path(store.path())]);
    server.wait_healthy();
    server.register("url=gpt_fast.mar&synchronous=true");
    server.register("url=gpt_fast_f32.mar&synchronous=true");
    let prompt = expected["prompt"].as_str().expect("prompt");
    let new = expected["greedy_ids"].as_array().expect("ids").len();
    let generate = |model: &str, body: Value| -> String {
        let reply = server.post_json(&format!("/predictions/{model}"), &body);
        assert_eq!(reply.status, 200, "{model}: {}", reply.text());
        reply.json()["generated_text"]
            .as_str()
            .expect("generated_text")
            .to_owned()
    };
    // Greedy in float32: the target's own tokens, the prompt read through the SentencePiece
    // model with BOS first, drafted five at a time and verified.
    assert_eq!(
        generate(
            "gpt_fast_f32",
            json!({"data": prompt, "max_new_tokens": new, "temperature": 0})
        ),
        expected["greedy_text"].as_str().expect("text"),
        "transformers' greedy tokens, as sentencepiece decodes them"
    );
    // The seed itself: greedy, and with its own defaults (temperature 0.8, top_k 200) for a
    // request that names none.
    let greedy = generate(
        "gpt_fast",
        json!({"data": prompt, "max_new_tokens": new, "temperature": 0}),
    );
    assert!(!greedy.is_empty());
    generate("gpt_fast", json!({"data": prompt, "max_new_tokens": 16}));
    // Speculation ran in both: their acceptance gauges are there and moved off zero.
    let metrics = server.metrics_text();
    let ratios: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("cresset_speculative_acceptance_ratio"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(ratios.len(), 2, "{metrics}");
    assert!(
        ratios.iter().all(|&r| r > 0.0 && r <= 1.0),
        "acceptance {ratios:?}"
    );
    // `compile` has no effect here, and the log says so once.
    assert_eq!(server.log().matches("`handler.compile`").count(), 2);
}
