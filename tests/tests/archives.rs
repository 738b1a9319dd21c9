//! Hostile archives are refused before anything leaves the extraction folder, and
//! `cresset archive` behaves like torch-model-archiver.

use std::io::Write;
use std::path::{Path, PathBuf};

use cresset_e2e::{run_archiver, Server};

const MANIFEST: &str = "[model]\nname = \"m\"\nversion = \"1.0\"\nhandler = \"echo\"\n";

/// Append an entry with a raw name (the tar crate's safe setters refuse `..` and absolute
/// paths, which is exactly what these archives need).
fn raw_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(kind);
    header.set_cksum();
    tar.append(&header, data).expect("append");
}

fn tgz(
    path: &Path,
    level: flate2::Compression,
    build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<std::fs::File>>),
) -> PathBuf {
    let file = std::fs::File::create(path).expect("create");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(file, level));
    raw_entry(
        &mut tar,
        "MANIFEST.toml",
        tar::EntryType::Regular,
        "",
        MANIFEST.as_bytes(),
    );
    build(&mut tar);
    tar.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gz");
    path.to_owned()
}

#[test]
fn hostile_archives_are_refused_and_nothing_escapes() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let victim = r.join("victim");
    std::fs::create_dir_all(&victim).expect("mkdir");
    let absolute_target = victim.join("absolute-escape.txt");
    let regular = tar::EntryType::Regular;

    let absolute = tgz(&r.join("absolute.tar.gz"), Default::default(), |t| {
        raw_entry(
            t,
            absolute_target.to_str().expect("utf-8"),
            regular,
            "",
            b"owned",
        )
    });
    let dotdot = tgz(&r.join("dotdot.tar.gz"), Default::default(), |t| {
        raw_entry(
            t,
            "../../../../../../../../tmp/cresset-dotdot-escape.txt",
            regular,
            "",
            b"owned",
        )
    });
    let link = tgz(&r.join("link.tar.gz"), Default::default(), |t| {
        raw_entry(
            t,
            "escape",
            tar::EntryType::Symlink,
            victim.to_str().expect("utf-8"),
            b"",
        );
        raw_entry(t, "escape/through-link.txt", regular, "", b"owned");
    });
    let many = tgz(&r.join("many.tar.gz"), Default::default(), |t| {
        for i in 0..60 {
            raw_entry(t, &format!("f{i}.txt"), regular, "", b"x");
        }
    });
    let zeros = vec![0u8; 1 << 20];
    let bomb = tgz(&r.join("bomb.tar.gz"), flate2::Compression::best(), |t| {
        let size = 512u64 << 20;
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        let reader = std::io::Read::take(std::io::repeat(0), size);
        t.append_data(&mut header, "weights.bin", reader)
            .expect("append");
        let _ = &zeros;
    });
    // A zip with a `..` entry.
    let zip_path = r.join("zipslip.zip");
    {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).expect("create"));
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("MANIFEST.toml", options).expect("start");
        zip.write_all(MANIFEST.as_bytes()).expect("write");
        zip.start_file("../../zip-escape.txt", options)
            .expect("start");
        zip.write_all(b"owned").expect("write");
        zip.finish().expect("finish");
    }

    let spec = |name: &str, p: &Path| format!("{name}={}", p.display());
    let models = [
        "echo".to_owned(),
        spec("absolute", &absolute),
        spec("dotdot", &dotdot),
        spec("link", &link),
        spec("many", &many),
        spec("bomb", &bomb),
        spec("zipslip", &zip_path),
    ];
    let server = Server::start(&["--models", &models.join(","), "--max-archive-entries", "50"]);
    server.wait_settled();

    let expect = |model: &str, needle: &str| {
        let reply = server.post(&format!("/predictions/{model}"), "text/plain", b"x");
        assert_eq!(reply.status, 503, "{model}: {}", reply.text());
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(needle), "{model}: {message}");
        assert!(message.contains("cannot extract"), "{model}: {message}");
    };
    expect("absolute", "has an absolute path");
    expect("dotdot", "has a `..` component");
    expect("link", "which leaves the archive folder");
    expect("many", "more than 50 entries");
    expect("bomb", "decompression bomb");
    expect("zipslip", "has a `..` component");

    assert!(!absolute_target.exists());
    assert!(!victim.join("through-link.txt").exists());
    assert!(!Path::new("/tmp/cresset-dotdot-escape.txt").exists());
    assert!(!r.join("zip-escape.txt").exists());
    assert_eq!(
        server.post("/predictions/echo", "text/plain", b"ok").text(),
        "ok"
    );
}

#[test]
fn the_archiver_refuses_to_overwrite_without_force_and_is_reproducible() {
    let out = tempfile::tempdir().expect("tempdir");
    let extra = out.path().join("notes.txt");
    std::fs::write(&extra, "hello").expect("write");
    let args = |force: bool| {
        let mut a = vec![
            "--model-name".to_owned(),
            "e".into(),
            "--handler".into(),
            "echo".into(),
            "--extra-files".into(),
            extra.display().to_string(),
            "--export-path".into(),
            out.path().display().to_string(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let run = |a: Vec<String>| run_archiver(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, path, err) = run(args(false));
    assert!(ok, "{err}");
    let first = std::fs::read(&path).expect("read");
    let (ok, _, err) = run(args(false));
    assert!(!ok);
    assert!(err.contains("already exists: pass --force"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (ok, _, err) = run(args(true));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        first,
        "same inputs, same bytes"
    );
}

#[test]
fn the_archiver_checks_its_inputs_and_writes_plain_directories() {
    let out = tempfile::tempdir().expect("tempdir");
    let o = out.path().to_str().expect("utf-8");
    let bad_config = out.path().join("bad.toml");
    std::fs::write(&bad_config, "batch_sise = 4\n").expect("write");
    let (ok, _, err) = run_archiver(&[
        "--model-name",
        "e",
        "--handler",
        "echo",
        "--config-file",
        bad_config.to_str().expect("utf-8"),
        "--export-path",
        o,
    ]);
    assert!(!ok);
    assert!(
        err.contains("batch_sise") && err.contains("not a valid model-config.toml"),
        "{err}"
    );

    let (ok, _, err) = run_archiver(&[
        "--model-name",
        "e",
        "--handler",
        "./nowhere/lib.so",
        "--export-path",
        o,
    ]);
    assert!(!ok);
    assert!(err.contains("`--handler`"), "{err}");

    let (ok, _, err) = run_archiver(&[
        "--model-name",
        "../e",
        "--handler",
        "echo",
        "--export-path",
        o,
    ]);
    assert!(!ok);
    assert!(err.contains("`--model-name`"), "{err}");

    let (ok, path, err) = run_archiver(&[
        "--model-name",
        "plain",
        "--version",
        "3",
        "--handler",
        "echo",
        "--archive-format",
        "no-archive",
        "--export-path",
        o,
    ]);
    assert!(ok, "{err}");
    assert!(Path::new(&path).join("MANIFEST.toml").is_file());
    let server = Server::start(&["--models", &format!("plain={path}")]);
    server.wait_healthy();
    let reply = server.post("/predictions/plain", "text/plain", b"dir");
    assert_eq!((reply.status, reply.text()), (200, "dir".to_owned()));
    assert_eq!(reply.header("x-model-version"), Some("3"));
}

/// How many archives a server's log says it unpacked into the cache.
fn unpacked_into_cache(server: &Server) -> usize {
    server
        .log()
        .matches("unpacked an archive into the cache")
        .count()
}

#[test]
fn an_archive_is_unpacked_once_into_the_cache_and_reused_across_restarts() {
    let store = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    let store_arg = store.path().to_str().expect("utf-8");
    let work_arg = work.path().to_str().expect("utf-8");
    let data = store.path().join("data.bin");
    std::fs::write(&data, vec![42u8; 100_000]).expect("write");
    let (ok, _, err) = run_archiver(&[
        "--model-name",
        "m",
        "--handler",
        "echo",
        "--extra-files",
        data.to_str().expect("utf-8"),
        "--export-path",
        store_arg,
    ]);
    assert!(ok, "{err}");
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--model-store",
            store_arg,
            "--work-dir",
            work_arg,
            "--no-config-snapshot",
            "--models",
            "m=m.tar.gz",
        ];
        args.extend_from_slice(extra);
        let server = Server::start(&args);
        server.wait_healthy();
        assert_eq!(
            server.post("/predictions/m", "text/plain", b"hi").text(),
            "hi"
        );
        server
    };
    let stop = |mut server: Server| {
        server.terminate();
        assert!(server
            .wait_exit(std::time::Duration::from_secs(30))
            .is_some());
    };
    // First start: unpacked once; a second registration of the same bytes reuses it.
    let server = start(&[]);
    assert_eq!(unpacked_into_cache(&server), 1, "{}", server.log());
    server.register("url=m.tar.gz&model_name=again&synchronous=true");
    assert_eq!(
        server
            .post("/predictions/again", "text/plain", b"yo")
            .text(),
        "yo"
    );
    assert_eq!(unpacked_into_cache(&server), 1, "{}", server.log());
    let cache = work.path().join("archive-cache");
    let entries = || {
        std::fs::read_dir(&cache)
            .expect("the cache folder")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().len() == 64)
            .count()
    };
    assert_eq!(entries(), 1);
    stop(server);
    // A restart finds it.
    let server = start(&[]);
    assert_eq!(unpacked_into_cache(&server), 0, "{}", server.log());
    stop(server);
    // Damaged on disk (a file of the wrong size): unpacked again, and served right.
    let entry = std::fs::read_dir(&cache)
        .expect("read")
        .filter_map(Result::ok)
        .find(|e| e.file_name().len() == 64)
        .expect("an entry")
        .path();
    let file = entry.join("files/data.bin");
    std::fs::remove_file(&file).expect("rm");
    std::fs::write(&file, b"short").expect("write");
    let server = start(&[]);
    assert_eq!(unpacked_into_cache(&server), 1, "{}", server.log());
    assert!(
        server.log().contains("do not match their listing"),
        "{}",
        server.log()
    );
    stop(server);
    assert_eq!(std::fs::read(&file).expect("read").len(), 100_000);
    // With the cache off, nothing is unpacked into it.
    let server = start(&["--archive-cache-size", "0"]);
    assert_eq!(unpacked_into_cache(&server), 0, "{}", server.log());
    stop(server);
    assert_eq!(entries(), 1);
}
