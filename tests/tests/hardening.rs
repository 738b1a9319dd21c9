//! The attacks of the hardening issue, each against the real server binary: hostile tar
//! headers, a plugin that kills the process while loading, drive-by uploads from web pages,
//! stalled request bodies, crash debris, multi-member gzip, and the smaller leaks.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use cresset_e2e::{archive_model, library, Server};

const MIB: u64 = 1024;

/// The host and port of a `http://host:port` base URL.
fn authority(base: &str) -> &str {
    base.trim_start_matches("http://")
}

/// Send raw bytes as one HTTP/1.1 request and read the whole answer: (status, body).
fn raw(base: &str, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(authority(base)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // A server that answers early (403, 431) may close before the whole body is sent.
    let _ = stream.write_all(request);
    read_answer(&mut stream)
}

fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// A request with these headers and body (`Connection: close` added).
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Call `base` with an `Authorization` header (as a client with the key would), to its own
/// `Host`: (status, body).
fn authorized(
    base: &str,
    method: &str,
    path: &str,
    authorization: &str,
    body: &[u8],
) -> (u16, String) {
    let own = authority(base).to_owned();
    raw(
        base,
        &request(
            method,
            path,
            &[("Host", own.as_str()), ("Authorization", authorization)],
            body,
        ),
    )
}

/// The key file's keys.
fn keys(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("keys")).expect("json")
}

/// A tar header block, ustar, with a good checksum.
fn tar_header(name: &str, flag: u8, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("short name");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::new(flag));
    h.set_cksum();
    *h.as_bytes()
}

/// Append a file entry to a tar stream.
fn tar_file(out: &mut impl Write, name: &str, data: &[u8]) {
    out.write_all(&tar_header(name, b'0', data.len() as u64))
        .expect("write");
    out.write_all(data).expect("write");
    let pad = (512 - data.len() % 512) % 512;
    out.write_all(&vec![0u8; pad]).expect("write");
}

fn manifest(name: &str, handler: &str) -> String {
    format!("[model]\nname = \"{name}\"\nversion = \"1.0\"\nhandler = \"{handler}\"\n")
}

/// A `.tar.gz` at `path` with a manifest for `handler` and these files, as one gzip member.
fn tgz(path: &Path, name: &str, handler: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    tar_file(&mut gz, "MANIFEST.toml", manifest(name, handler).as_bytes());
    for (file, data) in files {
        tar_file(&mut gz, file, data);
    }
    gz.write_all(&[0u8; 1024]).expect("end marker");
    let bytes = gz.finish().expect("gzip");
    std::fs::write(path, &bytes).expect("write archive");
    bytes
}

fn upload(server: &Server, query: &str, body: &[u8]) -> cresset_e2e::Reply {
    server.manage(
        "POST",
        &format!("/models?{query}"),
        "application/octet-stream",
        body,
    )
}

/// A `.tar.gz` whose first entry is a GNU long name (`L`) or pax record (`x`) holding `size`
/// bytes, the way the attack made it: small packed, huge unpacked.
fn extension_bomb(flag: u8, size: u64) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_header("././@LongLink", flag, size))
        .expect("write");
    let chunk = if flag == b'x' {
        // One pax record `<len> path=aaaa...\n` spanning the whole size.
        let prefix = format!("{size} path=");
        gz.write_all(prefix.as_bytes()).expect("write");
        let mut left = size - prefix.len() as u64 - 1;
        let block = vec![b'a'; 1 << 20];
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            gz.write_all(&block[..n]).expect("write");
            left -= n as u64;
        }
        gz.write_all(b"\n").expect("write");
        Vec::new()
    } else {
        vec![b'a'; 1 << 20]
    };
    if flag != b'x' {
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            gz.write_all(&chunk[..n]).expect("write");
            left -= n as u64;
        }
    }
    let pad = (512 - size % 512) % 512;
    gz.write_all(&vec![0u8; pad as usize]).expect("write");
    tar_file(
        &mut gz,
        "MANIFEST.toml",
        manifest("bomb", "echo").as_bytes(),
    );
    gz.write_all(&[0u8; 1024]).expect("end marker");
    gz.finish().expect("gzip")
}

#[test]
fn tar_extension_headers_cannot_blow_up_the_server() {
    let store = tempfile::tempdir().expect("tempdir");
    archive_model(store.path(), "echo", "1.0", "echo", "tgz");
    let server = Server::start(&[
        "--model-store",
        store.path().to_str().expect("utf-8"),
        "--models",
        "echo=echo.tar.gz",
        "--max-archive-unpacked-bytes",
        "104857600",
    ]);
    server.wait_healthy();
    let before = server.status_kib("VmRSS");
    let mut replies = Vec::new();
    for flag in [b'L', b'x'] {
        // 768 MiB of name in about a megabyte.
        let bomb = extension_bomb(flag, 768 << 20);
        assert!(bomb.len() < 8 << 20, "{} bytes packed", bomb.len());
        let reply = upload(&server, "synchronous=true", &bomb);
        replies.push((flag as char, reply.status, reply.text()));
    }
    let peak = server.status_kib("VmHWM");
    eprintln!(
        "tar extension bombs: VmRSS {} MiB at start, VmHWM {} MiB after",
        before / MIB,
        peak / MIB
    );
    assert!(
        peak < before + 512 * MIB,
        "peak {} MiB, start {} MiB",
        peak / MIB,
        before / MIB
    );
    for (flag, status, text) in replies {
        assert_eq!(status, 400, "{flag}: {text}");
        assert!(
            text.contains("extension header") && text.contains("65536"),
            "{flag}: {text}"
        );
    }
    // Nothing was registered, and the server serves.
    assert_eq!(server.manage("GET", "/models/bomb", "", b"").status, 404);
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"alive")
            .text(),
        "alive"
    );
}

#[test]
fn every_gzip_member_and_every_concatenated_archive_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Uploads are kept in the store: a store of its own, not the repository's.
    let server = Server::start(&["--model-store", dir.path().to_str().expect("utf-8")]);
    server.wait_healthy();
    let plugin = std::fs::read(library("plugin_echo")).expect("echo plugin");
    let handler = "handler/libcresset_plugin_echo.so";

    // One tar stream split over two gzip members (as pigz writes): the manifest in the first,
    // the bundled plugin it names in the second.
    let mut first = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    tar_file(
        &mut first,
        "MANIFEST.toml",
        manifest("split", handler).as_bytes(),
    );
    let mut second = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    tar_file(&mut second, handler, &plugin);
    second.write_all(&[0u8; 1024]).expect("end");
    let mut split = first.finish().expect("gzip");
    split.extend(second.finish().expect("gzip"));
    let reply = upload(&server, "synchronous=true", &split);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        server
            .post("/predictions/split", "text/plain", b"both")
            .text(),
        "both"
    );

    // `cat a.tar.gz b.tar.gz`: two whole archives, end markers and all.
    let a = tgz(&dir.path().join("a.tar.gz"), "cat", handler, &[]);
    let mut b = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    tar_file(&mut b, handler, &plugin);
    b.write_all(&[0u8; 10240]).expect("end and record padding");
    let mut cat = a;
    cat.extend(b.finish().expect("gzip"));
    let reply = upload(&server, "synchronous=true", &cat);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        server.post("/predictions/cat", "text/plain", b"too").text(),
        "too"
    );
}

/// An archive whose bundled library kills the process that loads it.
fn deadly_archive(dir: &Path, name: &str) -> Vec<u8> {
    let lib = std::fs::read(library("fixture_abort_on_load")).expect("fixture");
    tgz(
        &dir.join(format!("{name}.tar.gz")),
        name,
        "handler/libcresset_fixture_abort_on_load.so",
        &[("handler/libcresset_fixture_abort_on_load.so", &lib)],
    )
}

#[test]
fn a_registration_that_kills_the_server_is_not_replayed_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&store).expect("mkdir");
    let snapshot = dir.path().join("snapshot.json");
    let echo = archive_model(&store, "echo", "1.0", "echo", "tgz");
    let echo_name = echo
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let args = |extra: &'static [&'static str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--model-store",
            store.to_str().expect("utf-8"),
            "--work-dir",
            work.to_str().expect("utf-8"),
            "--snapshot-file",
            snapshot.to_str().expect("utf-8"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let start = |extra: &'static [&'static str]| {
        let owned = args(extra);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        Server::start(&refs)
    };

    let mut first = start(&[]);
    first.register(&format!("url={echo_name}&synchronous=true"));
    // The upload is acknowledged, then its library's constructor aborts the process.
    let deadly = deadly_archive(dir.path(), "deadly");
    let reply = upload(&first, "", &deadly);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let status = first
        .wait_exit(Duration::from_secs(30))
        .expect("the constructor's abort() killed the server");
    assert!(!status.success());

    // Each restart is healthy, serves echo, and shows the deadly registration as Failed with
    // the reason, without loading it (a load would kill it again).
    for restart in 0..3 {
        let mut server = start(&[]);
        server.wait_settled();
        let ping = server.get("/ping");
        assert_eq!(ping.status, 200, "restart {restart}: {}", ping.text());
        assert_eq!(
            server
                .post("/predictions/echo", "text/plain", b"alive")
                .text(),
            "alive"
        );
        let describe = server.manage("GET", "/models/deadly", "", b"");
        assert_eq!(describe.status, 200, "{}", describe.text());
        let version = &describe.json()[0];
        assert_eq!(version["state"], "Failed", "{version}");
        assert_eq!(version["failure"], "Crashed", "{version}");
        let error = version["error"].as_str().unwrap_or_default();
        assert!(error.contains("stopped while loading"), "{error}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(server.is_running(), "restart {restart} died");
        server.kill();
    }

    // Unregistering it clears it for good, and its kept archive with it.
    let server = start(&[]);
    server.wait_settled();
    assert_eq!(
        server.manage("DELETE", "/models/deadly", "", b"").status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept_archives(&store) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(kept_archives(&store), 0, "the upload is removed with it");
    drop(server);

    // A segfault in a plugin's initialize is the same kind of death.
    let mut server = start(&[]);
    server.wait_healthy();
    let panicky = std::fs::read(library("fixture_panicky")).expect("fixture");
    let segv = tgz(
        &dir.path().join("segv.tar.gz"),
        "segv",
        "handler/libcresset_fixture_panicky.so",
        &[
            ("handler/libcresset_fixture_panicky.so", &panicky),
            (
                "model-config.toml",
                b"[handler]\ncrash_in = \"initialize\"\ncrash = \"segfault\"\n",
            ),
        ],
    );
    let reply = upload(&server, "", &segv);
    assert_eq!(reply.status, 202, "{}", reply.text());
    server
        .wait_exit(Duration::from_secs(30))
        .expect("the segfault killed the server");
    let mut restarted = start(&[]);
    restarted.wait_settled();
    assert_eq!(restarted.get("/ping").status, 200);
    let version = &restarted.manage("GET", "/models/segv", "", b"").json()[0];
    assert_eq!(version["failure"], "Crashed", "{version}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(restarted.is_running());
    assert_eq!(
        restarted
            .post("/predictions/echo", "text/plain", b"x")
            .text(),
        "x"
    );
}

#[test]
fn a_clean_stop_in_the_middle_of_a_first_load_leaves_it_to_load_next_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let panicky = std::fs::read(library("fixture_panicky")).expect("fixture");
    tgz(
        &store.join("slow.tar.gz"),
        "slow",
        "handler/libcresset_fixture_panicky.so",
        &[
            ("handler/libcresset_fixture_panicky.so", &panicky),
            ("model-config.toml", b"[handler]\ninitialize_ms = 3000\n"),
        ],
    );
    let snapshot = dir.path().join("snapshot.json");
    let args = [
        "--model-store",
        store.to_str().expect("utf-8"),
        "--snapshot-file",
        snapshot.to_str().expect("utf-8"),
    ];
    let mut server = Server::start(&args);
    let reply = server.manage("POST", "/models?url=slow.tar.gz", "", b"");
    assert_eq!(reply.status, 202, "{}", reply.text());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.manage("GET", "/models/slow", "", b"").json()[0]["state"],
        "Loading"
    );
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("SIGTERM stops the server");
    assert!(status.success(), "{status:?}\n{}", server.log());
    // Not a crash: the next start loads it.
    let restarted = Server::start(&args);
    restarted.wait_healthy();
    assert_eq!(
        restarted
            .post("/predictions/slow", "text/plain", b"x")
            .text(),
        "ok"
    );
}

fn kept_archives(store: &Path) -> usize {
    std::fs::read_dir(store)
        .expect("store")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("upload-"))
        .count()
}

#[test]
fn web_pages_cannot_register_models_whether_tokens_are_on_or_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Tokens off, and a store of its own: were the drive-by accepted, its archive would be kept
    // there (and poison any server started on that store with `--models all`).
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    archive_model(&store, "echo", "1.0", "echo", "tgz");
    let mut server = Server::start(&[
        "--model-store",
        store.to_str().expect("utf-8"),
        "--models",
        "echo=echo.tar.gz",
    ]);
    server.wait_healthy();
    let deadly = deadly_archive(dir.path(), "driveby");
    let port = server
        .management
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let evil_host = format!("evil.example:{port}");
    let own_host = authority(&server.management).to_owned();
    // The attack: a cross-site "simple" request, and its DNS-rebinding variant.
    let attacks = [
        vec![
            ("Host", own_host.as_str()),
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain"),
        ],
        vec![
            ("Host", evil_host.as_str()),
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain"),
        ],
        vec![("Host", evil_host.as_str()), ("Content-Type", "text/plain")],
        vec![("Host", own_host.as_str()), ("Origin", "null")],
    ];
    for headers in &attacks {
        let (status, body) = raw(
            &server.management,
            &request("POST", "/models", headers, &deadly),
        );
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(
            body.contains("cross-origin") || body.contains("DNS rebinding"),
            "{body}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.is_running(), "the library's constructor ran");
    assert_eq!(server.manage("GET", "/models/driveby", "", b"").status, 404);
    // Reads are guarded too (a rebound page could read the model list).
    let (status, _) = raw(
        &server.management,
        &request("GET", "/models", &[("Host", evil_host.as_str())], b""),
    );
    assert_eq!(status, 403);
    let metrics_host = format!(
        "evil.example:{}",
        server.metrics.rsplit(':').next().expect("port")
    );
    let (status, _) = raw(
        &server.metrics,
        &request("GET", "/metrics", &[("Host", metrics_host.as_str())], b""),
    );
    assert_eq!(status, 403);
    // Tools that are not browsers are unaffected: localhost and the listener's own origin.
    let local = format!("localhost:{port}");
    let origin = format!("http://{own_host}");
    for headers in [
        vec![("Host", local.as_str())],
        vec![("Host", own_host.as_str()), ("Origin", origin.as_str())],
    ] {
        let (status, body) = raw(
            &server.management,
            &request("GET", "/models", &headers, b""),
        );
        assert_eq!(status, 200, "{headers:?}: {body}");
    }
    // The inference API is not guarded this way (it runs no code from the request).
    let (status, body) = raw(
        &server.inference,
        &request(
            "POST",
            "/predictions/echo",
            &[("Host", "evil.example"), ("Origin", "http://evil.example")],
            b"hi",
        ),
    );
    assert_eq!((status, body.as_str()), (200, "hi"));
}

#[test]
fn an_operator_configured_host_name_is_accepted() {
    let server = Server::start(&["--allowed-hosts", "cresset.internal"]);
    let port = server
        .management
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let named = format!("cresset.internal:{port}");
    let (status, body) = raw(
        &server.management,
        &request("GET", "/models", &[("Host", named.as_str())], b""),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_quick_start_keeps_the_management_key_and_says_how_to_use_it() {
    // `make serve`'s flags, read from the Makefile itself.
    let makefile =
        std::fs::read_to_string(cresset_e2e::repo_root().join("Makefile")).expect("Makefile");
    let serve = makefile
        .lines()
        .find(|l| l.contains("release/cresset\" serve"))
        .expect("the serve recipe");
    assert!(
        !serve.contains("--disable-token-auth"),
        "make serve turns every token off: {serve}"
    );
    assert!(serve.contains("--disable-inference-token-auth"), "{serve}");

    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("keys.json");
    let server = Server::start(&[
        "--models",
        "echo",
        "--key-file",
        key_file.to_str().expect("utf-8"),
        "--disable-inference-token-auth",
    ]);
    server.wait_healthy();
    // Inference is open; management needs the key, given with a lower-case scheme too.
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"open")
            .text(),
        "open"
    );
    assert_eq!(server.manage("GET", "/models", "", b"").status, 401);
    let keys = keys(&key_file);
    let key = keys["management"].as_str().expect("key");
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {key}");
        let (status, body) = authorized(&server.management, "GET", "/models", &auth, b"");
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    // The log says where the key is and gives a curl that reads it from there; pasted into a
    // shell, it works.
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("curl -H"))
        .unwrap_or_else(|| panic!("no curl line in the log:\n{log}"));
    assert!(line.contains(key_file.to_str().expect("utf-8")), "{line}");
    assert!(
        !line.contains(key),
        "the log must not carry the key: {line}"
    );
    let command = &line[line.find("curl -H").expect("curl")..];
    let command = command.split(" http://").next().expect("header part");
    let sh = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo {}", &command["curl -H ".len()..]))
        .output()
        .expect("sh");
    let header = String::from_utf8_lossy(&sh.stdout);
    assert!(header.contains(&format!("Bearer {key}")), "{header}");
}

#[test]
fn health_routes_name_no_model_when_tokens_are_on_and_no_answer_carries_a_host_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("secret-store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let key_file = dir.path().join("keys.json");
    // A model whose archive is broken: its error would name paths.
    std::fs::write(store.join("broken.tar.gz"), b"\x1f\x8bnot really").expect("write");
    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"not an ELF").expect("write");
    tgz(
        &store.join("badlib.tar.gz"),
        "badlib",
        "handler/garbage.so",
        &[("handler/garbage.so", b"not an ELF")],
    );
    let server = Server::start(&[
        "--model-store",
        store.to_str().expect("utf-8"),
        "--models",
        "broken=broken.tar.gz,badlib=badlib.tar.gz",
        "--key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    server.wait_settled();
    let ping = server.get("/ping");
    assert!(!ping.text().contains("broken"), "{}", ping.text());
    assert!(!ping.text().contains("badlib"), "{}", ping.text());
    assert_eq!(ping.json()["failed"], 2, "{}", ping.text());
    let ready = server.get("/v2/health/ready");
    assert!(!ready.text().contains("badlib"), "{}", ready.text());

    // With the key: the errors say what is wrong, without the store's or work folder's path.
    let keys = keys(&key_file);
    let inference_key = keys["inference"].as_str().expect("key");
    let management_key = keys["management"].as_str().expect("key");
    let store_text = store.to_string_lossy().into_owned();
    let (status, body) = authorized(
        &server.inference,
        "POST",
        "/predictions/badlib",
        &format!("Bearer {inference_key}"),
        b"x",
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not a loadable shared library"), "{body}");
    assert!(body.contains("<archive>/handler/garbage.so"), "{body}");
    assert!(
        !body.contains("/tmp/") && !body.contains(&store_text),
        "{body}"
    );
    let (status, body) = authorized(
        &server.management,
        "GET",
        "/models/broken",
        &format!("Bearer {management_key}"),
        b"",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("corrupt"), "{body}");
    assert!(body.contains("<model_store>/broken.tar.gz"), "{body}");
    assert!(!body.contains(&store_text), "{body}");
    // The log keeps the whole paths.
    assert!(server.log().contains(&store_text));
}

#[test]
fn a_multipart_body_that_crashed_the_form_parser_is_a_400() {
    // Found by fuzzing: actix-multipart 0.7 panicked on a line shorter than the boundary
    // marker, killing the HTTP worker thread and every connection on it.
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let own = authority(&server.inference).to_owned();
    for _ in 0..4 {
        let (status, body) = raw(
            &server.inference,
            &request(
                "POST",
                "/predictions/echo",
                &[
                    ("Host", own.as_str()),
                    ("Content-Type", "multipart/form-data; boundary=XyZ"),
                ],
                b"--X\ryZ\n--\nContent-Disposition: XyZ4\r\n--XyZ-~-~-\r\n",
            ),
        );
        assert_eq!(status, 400, "{body}");
    }
    assert_eq!(
        server
            .post("/predictions/echo", "text/plain", b"alive")
            .text(),
        "alive"
    );
}

#[test]
fn request_headers_over_8_kib_get_431_on_every_listener() {
    let server = Server::start(&["--models", "echo"]);
    server.wait_healthy();
    let big = "a".repeat(100 * 1024);
    for base in [&server.inference, &server.management, &server.metrics] {
        let own = authority(base).to_owned();
        let (status, body) = raw(
            base,
            &request(
                "GET",
                "/ping",
                &[("Host", own.as_str()), ("X-Big", &big)],
                b"",
            ),
        );
        assert_eq!(status, 431, "{base}: {body}");
    }
    let ok = "a".repeat(7 * 1024);
    let own = authority(&server.inference).to_owned();
    let (status, _) = raw(
        &server.inference,
        &request(
            "GET",
            "/ping",
            &[("Host", own.as_str()), ("X-Fine", &ok)],
            b"",
        ),
    );
    assert_eq!(status, 200);
}

/// Open a connection, send a request's head and part of its body, and leave it stalled.
fn stall(base: &str, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(authority(base)).expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\npartial",
        authority(base)
    );
    stream.write_all(head.as_bytes()).expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
}

#[test]
fn stalled_bodies_neither_hold_the_concurrency_permits_nor_their_connections() {
    // Only the concurrency cap of the attack; the body caps and timeout are the defaults.
    let server = Server::start(&["--models", "echo", "--max-concurrent-requests", "8"]);
    server.wait_healthy();
    let began = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..12)
        .map(|_| stall(&server.inference, "/predictions/echo"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Twelve bodies stalled in transit, more than `max_concurrent_requests`: everyone else is
    // still served.
    for i in 0..5 {
        let reply = server.post("/predictions/echo", "text/plain", format!("{i}").as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Each stalled body is refused once it made no progress for the idle timeout (10 s by
    // default), not held for a fixed total.
    for stream in &mut stalled {
        let (status, body) = read_answer(stream);
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("body_idle_timeout"), "{body}");
    }
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(25),
        "{waited:?}"
    );
}

#[test]
fn bodies_in_transit_have_their_own_cap() {
    let server = Server::start(&[
        "--models",
        "echo",
        "--max-bodies-in-transit",
        "2",
        "--body-idle-timeout",
        "5",
    ]);
    server.wait_healthy();
    let _held: Vec<TcpStream> = (0..2)
        .map(|_| stall(&server.inference, "/predictions/echo"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let reply = server.post("/predictions/echo", "text/plain", b"third");
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert!(
        reply.text().contains("max_bodies_in_transit"),
        "{}",
        reply.text()
    );
}

fn names_in(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn crash_debris_is_swept_at_start_up_and_refused_archives_are_not_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&store).expect("mkdir");
    archive_model(&store, "echo", "1.0", "echo", "tgz");
    let args: Vec<String> = [
        "--model-store",
        store.to_str().expect("utf-8"),
        "--work-dir",
        work.to_str().expect("utf-8"),
        "--models",
        "echo=echo.tar.gz",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();

    // Killed twice: once while an upload is half written, once with a model extracted.
    let server = Server::start(&refs);
    server.wait_healthy();
    let mut upload_stream = TcpStream::connect(authority(&server.management)).expect("connect");
    let head = format!(
        "POST /models HTTP/1.1\r\nHost: {}\r\nContent-Length: 10000000\r\n\r\n",
        authority(&server.management)
    );
    upload_stream.write_all(head.as_bytes()).expect("send");
    upload_stream.write_all(&[0x1f, 0x8b]).expect("send");
    upload_stream.write_all(&vec![7u8; 1 << 20]).expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    while names_in(&store, ".").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(names_in(&store, ".").len(), 1, "the upload is on disk");
    server.kill();
    let second = Server::start(&refs);
    second.wait_healthy();
    assert!(
        names_in(&store, ".").is_empty(),
        "the half upload was removed"
    );
    let runs = names_in(&work, "run-");
    assert_eq!(
        runs.len(),
        1,
        "only the live server's scratch folder: {runs:?}"
    );
    second.kill();
    assert_eq!(
        names_in(&work, "run-").len(),
        1,
        "a killed server leaves its folder"
    );
    let third = Server::start(&refs);
    third.wait_healthy();
    assert_eq!(names_in(&work, "run-").len(), 1, "swept again");
    assert!(!runs.contains(&names_in(&work, "run-")[0]), "a new folder");

    // Refused archives are not kept: a corrupt upload, and one that fails to load.
    let reply = upload(&third, "synchronous=true", b"\x1f\x8b\x08\x00garbage");
    assert_eq!(reply.status, 400, "{}", reply.text());
    let garbage = tgz(
        &dir.path().join("garbage.tar.gz"),
        "garbage",
        "handler/x.so",
        &[("handler/x.so", b"not a library")],
    );
    let reply = upload(&third, "synchronous=true", &garbage);
    assert_eq!(reply.status, 400, "{}", reply.text());
    let reply = upload(&third, "", &garbage);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !names_in(&store, "upload-").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        names_in(&store, "upload-").is_empty(),
        "{:?}",
        names_in(&store, "")
    );
    // A load that fails asynchronously stays visible until unregistered.
    let describe = third.manage("GET", "/models/garbage", "", b"");
    assert_eq!(describe.json()[0]["state"], "Failed");
}

#[test]
fn load_failures_are_answered_by_whose_fault_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path();
    let panicky = std::fs::read(library("fixture_panicky")).expect("fixture");
    tgz(
        &store.join("panics.tar.gz"),
        "panics",
        "handler/libcresset_fixture_panicky.so",
        &[
            ("handler/libcresset_fixture_panicky.so", &panicky),
            (
                "model-config.toml",
                b"[handler]\npanic_in = \"initialize\"\n",
            ),
        ],
    );
    tgz(
        &store.join("nobuiltin.tar.gz"),
        "nobuiltin",
        "vision_not_here",
        &[],
    );
    tgz(
        &store.join("notlib.tar.gz"),
        "notlib",
        "handler/x.so",
        &[("handler/x.so", b"text")],
    );
    let server = Server::start(&["--model-store", store.to_str().expect("utf-8")]);
    let call = |name: &str| {
        let r = server.manage(
            "POST",
            &format!("/models?url={name}.tar.gz&synchronous=true"),
            "",
            b"",
        );
        (r.status, r.json())
    };
    let (status, body) = call("panics");
    assert_eq!(status, 500, "a plugin that panics while loading: {body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("panicked"),
        "{body}"
    );
    let (status, body) = call("nobuiltin");
    assert_eq!(status, 500, "a missing built-in plugin: {body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown handler"),
        "{body}"
    );
    let (status, body) = call("notlib");
    assert_eq!(
        status, 400,
        "a bad bundled library is the archive's fault: {body}"
    );
    // None of them is kept.
    for name in ["panics", "nobuiltin", "notlib"] {
        assert_eq!(
            server
                .manage("GET", &format!("/models/{name}"), "", b"")
                .status,
            404
        );
    }
}

#[test]
fn unregistered_versions_leave_no_metric_series_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path();
    archive_model(store, "cycled", "1.0", "echo", "tgz");
    let server = Server::start(&["--model-store", store.to_str().expect("utf-8")]);
    for round in 0..5 {
        server.register("url=cycled.tar.gz&synchronous=true");
        for _ in 0..3 {
            assert_eq!(
                server
                    .post("/predictions/cycled", "text/plain", b"x")
                    .status,
                200
            );
        }
        assert_eq!(
            server
                .post("/predictions/cycled/9.9", "text/plain", b"x")
                .status,
            404
        );
        let metrics = server.metrics_text();
        assert!(metrics.contains("model=\"cycled\""), "round {round}");
        assert_eq!(
            server.manage("DELETE", "/models/cycled", "", b"").status,
            200
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = server.metrics_text();
            if !metrics.contains("cycled") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: stale series\n{metrics}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

type Lines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

/// A server with the panicky fixture as model `slow` and this shutdown grace, streaming
/// `body` (`stream:N:MS`) to `curl -N` in the background once the first chunk has arrived:
/// the server, its store's folder, curl, and the rest of curl's output line by line.
fn streaming(grace: &str, body: &str) -> (Server, tempfile::TempDir, std::process::Child, Lines) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let panicky = std::fs::read(library("fixture_panicky")).expect("fixture");
    tgz(
        &store.join("slow.tar.gz"),
        "slow",
        "handler/libcresset_fixture_panicky.so",
        &[("handler/libcresset_fixture_panicky.so", &panicky)],
    );
    let server = Server::start(&[
        "--model-store",
        store.to_str().expect("utf-8"),
        "--models",
        "slow=slow.tar.gz",
        "--shutdown-grace",
        grace,
        "--grpc-address",
        "127.0.0.1:0",
    ]);
    server.wait_healthy();
    let url = format!("{}/predictions/slow", server.inference);
    let mut curl = std::process::Command::new("curl")
        .args([
            "-sN",
            "--data-binary",
            body,
            "-H",
            "Content-Type: text/plain",
            &url,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let stdout = curl.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("chunk-0")
    );
    (server, dir, curl, lines)
}

/// SIGTERM with a stream in flight: readiness turns not ready at once and new requests get
/// 503 (over gRPC too: not ready, UNAVAILABLE), while the stream runs to its end; then the
/// server exits 0, well within the grace.
#[test]
fn sigterm_lets_a_stream_in_flight_finish_and_refuses_new_requests() {
    // Six chunks, 300 ms apart: about two seconds.
    let (mut server, _dir, mut curl, lines) = streaming("20", "stream:12:300");
    let signalled = Instant::now();
    server.terminate();
    // Not ready at once (ping and the v2 readiness), and new requests are refused. `kill`
    // returns before the server has seen the signal: the first ping may still come first.
    let ping = loop {
        let ping = server.get("/ping");
        if ping.status != 200 || signalled.elapsed() > Duration::from_millis(500) {
            break ping;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(ping.status, 500, "{}", ping.text());
    assert_eq!(ping.json()["draining"], true, "{}", ping.text());
    assert_eq!(server.get("/v2/health/ready").status, 503);
    let refused = server.post("/predictions/slow", "text/plain", b"x");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains("shutting down"),
        "{}",
        refused.text()
    );
    assert!(signalled.elapsed() < Duration::from_secs(1));
    // The gRPC listener says the same: not ready, and inference UNAVAILABLE.
    let script = r#"
import sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
c = g.InferenceServerClient(url=sys.argv[1])
assert c.is_server_live() and not c.is_server_ready()
x = g.InferInput("x", [1], "BYTES")
x.set_data_from_numpy(np.array([b"x"], dtype=object))
try:
    c.infer("slow", [x])
    raise SystemExit("inference was taken while draining")
except InferenceServerException as e:
    assert "UNAVAILABLE" in str(e.status()), e
print("ok")
"#;
    let out = std::process::Command::new(cresset_e2e::venv_bin("python"))
        .args(["-c", script])
        .arg(server.grpc.as_deref().expect("grpc address"))
        .output()
        .expect("python");
    assert!(
        String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The stream runs to its end.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(
        rest,
        (1..12)
            .map(|k| format!("chunk-{k}"))
            .chain(["done".to_owned()])
            .collect::<Vec<_>>(),
        "{}",
        server.log()
    );
    assert!(curl.wait().expect("curl").success());
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("the server exits after the stream");
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "{:?}",
        signalled.elapsed()
    );
}

/// SIGINT stops the server the same way; a stream longer than the grace period is cut when it
/// ends, and the server still exits 0.
#[test]
fn sigint_stops_cleanly_and_the_grace_period_bounds_the_wait() {
    // Forty chunks, 300 ms apart: twelve seconds, far past the grace.
    let (mut server, _dir, mut curl, lines) = streaming("1", "stream:40:300");
    let signalled = Instant::now();
    server.interrupt();
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits when the grace is over");
    assert!(status.success(), "{status:?}\n{}", server.log());
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(
        server.log().contains("grace period is over"),
        "{}",
        server.log()
    );
    // The cut stream never ends with `done`.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(!rest.iter().any(|l| l == "done"), "{rest:?}");
    let _ = curl.wait();
}
