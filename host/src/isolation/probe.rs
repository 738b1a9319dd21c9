//! Opening a plugin library in a short-lived worker process (`cresset worker --describe FILE`),
//! for process isolation: `dlopen` runs a library's initialisers and its root module's
//! constructor, and in process mode none of the plugin's code runs in the server, so the host
//! learns the description (name, versions, capabilities) from a worker that opened it.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use abi_stable::std_types::RString;
use cresset_plugin_api::{Capabilities, PluginDescription};
use serde_json::{json, Value};

use super::proxy::describe_exit;
use crate::registry::{FailureKind, LoadError, LoadFailure};

/// How long opening a library may take.
const LIMIT: Duration = Duration::from_secs(120);

/// The worker's side: open the staged library at `path` and print its description (or the
/// loader's error, with its kind) as one JSON line on stdout. Returns the exit status.
pub fn run(path: &Path) -> i32 {
    let answer = match crate::loader::open_staged(path) {
        Ok(module) => {
            let d = (module.describe())();
            json!({"description": {
                "name": d.name.as_str(),
                "plugin_version": d.plugin_version.as_str(),
                "abi_version": d.abi_version.as_str(),
                "capabilities": d.capabilities.0,
                "summary": d.summary.as_str(),
            }})
        }
        Err(e) => {
            let e = LoadError::from(e);
            json!({"error": {"kind": e.kind().name(), "message": e.to_string()}})
        }
    };
    println!("{answer}");
    0
}

/// The host's side: the description of the staged library at `staged` (named `source` in
/// errors), from a worker process `exe` started for it. A worker that dies opening it is a
/// plugin fault of this version, not the server's end.
pub fn describe(exe: &Path, staged: &Path, source: &Path) -> Result<PluginDescription, LoadError> {
    let fail = |kind, message: String| LoadError::Worker(LoadFailure::new(kind, message));
    let mut child = Command::new(exe)
        .arg("worker")
        .arg("--describe")
        .arg(staged)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| LoadError::Host(format!("cannot start a worker process: {e}")))?;
    // Read while it runs: a library that prints much would otherwise block on a full pipe.
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut out = String::new();
            // One line of JSON; what a library prints beside it is kept up to a bound, and
            // the rest drained.
            let _ = (&mut stdout).take(1 << 20).read_to_string(&mut out);
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
            out
        })
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    FailureKind::PluginFault,
                    format!(
                        "opening plugin `{}` took longer than {} s in a worker process",
                        source.display(),
                        LIMIT.as_secs()
                    ),
                ));
            }
        }
    };
    let out = reader.and_then(|r| r.join().ok()).unwrap_or_default();
    if !status.success() {
        return Err(fail(
            FailureKind::PluginFault,
            format!(
                "opening plugin `{}` killed the worker process that opened it: it {} (the server is unaffected)",
                source.display(),
                describe_exit(status)
            ),
        ));
    }
    // The answer is the last line: a library's initialisers may print before it.
    let answer: Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    if let Some(error) = answer.get("error") {
        let kind = error["kind"]
            .as_str()
            .and_then(FailureKind::from_name)
            .unwrap_or(FailureKind::PluginFault);
        let message = error["message"].as_str().unwrap_or("unknown error");
        return Err(fail(kind, message.to_owned()));
    }
    let d = &answer["description"];
    let text = |key: &str| RString::from(d[key].as_str().unwrap_or_default());
    match d["capabilities"].as_u64() {
        Some(capabilities) => Ok(PluginDescription {
            name: text("name"),
            plugin_version: text("plugin_version"),
            abi_version: text("abi_version"),
            capabilities: Capabilities(capabilities),
            summary: text("summary"),
        }),
        None => Err(fail(
            FailureKind::Internal,
            format!(
                "a worker process gave no description of plugin `{}`",
                source.display()
            ),
        )),
    }
}
