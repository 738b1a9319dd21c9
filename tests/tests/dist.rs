//! `make dist` in a minimal Debian root: the tarball unpacked into a fresh copy of a
//! `debootstrap --variant=minbase` bookworm (no Python, no venv, no libtorch, no
//! LD_LIBRARY_PATH) serves, under chroot, the iris TorchScript model (the torchscript plugin
//! on libtorch) and the resnet18 ONNX model (the vision plugin on ONNX Runtime). A library the
//! distribution misses, or a run path into this machine's caches, fails here.
//!
//! `make test` builds both and passes their paths in `CRESSET_DIST` and `CRESSET_DEBIAN_ROOT`
//! (scripts/make-dist.sh, scripts/setup-debian-root.sh). It needs root, for chroot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cresset_e2e::{curl, repo_root};
use serde_json::Value;

fn env_path(name: &str) -> PathBuf {
    let path = std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests through `make test`"));
    PathBuf::from(path)
}

fn run(command: &mut Command) {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server running under chroot: killed (and the root removed) on drop.
struct Chrooted {
    child: Child,
    inference: String,
    log: PathBuf,
}

impl Drop for Chrooted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/proc` mounted in the root, as a container has it (the server finds its plugins beside
/// `/proc/self/exe`); unmounted on drop, before the root is removed.
struct Proc(PathBuf);

impl Proc {
    fn mount(root: &Path) -> Self {
        let at = root.join("proc");
        run(Command::new("mount").args(["-t", "proc", "proc"]).arg(&at));
        Self(at)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `cresset serve --model MODEL` inside `root`, with nothing of this machine's environment;
/// its log goes to `log`.
fn serve(root: &Path, bin: &str, model: &str, log: &Path) -> Chrooted {
    // Found here (the child's PATH below is the root's).
    let chroot = ["/usr/sbin/chroot", "/sbin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("chroot");
    let mut child = Command::new(chroot)
        .arg(root)
        .arg(bin)
        .args([
            "serve",
            "--model",
            model,
            "--disable-token-auth",
            "--work-dir",
            "/tmp/cresset",
        ])
        .args(["--inference-address", "127.0.0.1:0"])
        .args([
            "--management-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("chroot");
    let stdout = child.stdout.take().expect("stdout");
    let mut inference = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        if event["api"] == "inference" {
            inference = event["address"].as_str().map(|a| format!("http://{a}"));
        }
        if event["api"] == "metrics" {
            break;
        }
    }
    // The rest of its stdout, read so that it never blocks.
    std::thread::spawn(move || for _ in lines {});
    let Some(inference) = inference else {
        let _ = child.wait();
        panic!(
            "the distribution's server did not start in the Debian root:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    Chrooted {
        child,
        inference,
        log: log.to_owned(),
    }
}

/// Wait until `/ping` says healthy.
fn healthy(server: &Chrooted) {
    for _ in 0..300 {
        let (code, body) = curl(&[], &format!("{}/ping", server.inference));
        if code == 200 && body.contains("Healthy") && body.contains(r#""failed":[]"#) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!(
        "the distribution's server never became healthy:\n{}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
}

#[test]
fn the_distribution_serves_torchscript_and_onnx_models_in_a_bare_debian_root() {
    let tarball = env_path("CRESSET_DIST");
    let debian = env_path("CRESSET_DEBIAN_ROOT");
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    run(Command::new("cp").arg("-a").arg(&debian).arg(&root));
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(root.join("opt")));
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.gz"))
        .expect("tarball name")
        .to_owned();
    let bin = format!("/opt/{name}/bin/cresset");
    // Dropped before `work`: unmounted before the root is removed.
    let _proc = Proc::mount(&root);
    // No Python and no libtorch in the root but the distribution's own.
    assert!(!root.join("usr/bin/python3").exists());
    // The models: the default store's iris (TorchScript) and the vision fixtures' resnet18 as
    // ONNX with its labels.
    let srv = root.join("srv");
    std::fs::create_dir_all(srv.join("iris")).expect("mkdir");
    for file in ["model.pt", "index_to_name.json"] {
        std::fs::copy(
            repo_root().join("model_store/iris").join(file),
            srv.join("iris").join(file),
        )
        .expect("copy iris");
    }
    let vision = repo_root().join("tests/fixtures/generated/vision");
    std::fs::create_dir_all(srv.join("resnet18")).expect("mkdir");
    std::fs::copy(
        vision.join("resnet18/model.onnx"),
        srv.join("resnet18/model.onnx"),
    )
    .expect("copy resnet18 (run `make models`)");
    let photo = vision.join("photos/chelsea.jpg");

    // The iris folder (a model.pt and its labels, no manifest): the torchscript plugin.
    let iris = serve(&root, &bin, "/srv/iris", &work.path().join("iris.log"));
    healthy(&iris);
    let (code, body) = curl(
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"data": [[5.1, 3.5, 1.4, 0.2]]}"#,
        ],
        &format!("{}/predictions/iris", iris.inference),
    );
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    let probabilities: f64 = answer[0]
        .as_object()
        .expect("labels and probabilities")
        .values()
        .filter_map(Value::as_f64)
        .sum();
    assert!(
        body.contains("setosa") && (probabilities - 1.0).abs() < 1e-4,
        "{body}"
    );
    drop(iris);

    let resnet = serve(
        &root,
        &bin,
        "/srv/resnet18/model.onnx",
        &work.path().join("resnet.log"),
    );
    healthy(&resnet);
    let (code, body) = curl(
        &["-T", photo.to_str().expect("utf-8")],
        &format!("{}/predictions/model", resnet.inference),
    );
    assert_eq!(code, 200, "{body}");
    let classes: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(classes.as_object().map(|o| o.len()), Some(5), "{body}");
    drop(resnet);
}
