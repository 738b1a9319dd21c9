//! Test fixture: a plugin that misbehaves on request, to test the host's defences.
//!
//! Bodies: `panic` panics in `inference`; `abort` and `segfault` kill the process that runs
//! it (as a broken native library would); `pid` answers that process's id; `sleep:MS` sleeps MS milliseconds; `stream:N` sends
//! N chunks then a final `done` (`stream:N:MS`: each chunk MS milliseconds after the last); `wait-cancel` waits (up to 20 s) for its client to go away,
//! then counts it in the metric `cresset_fixture_cancelled_total`. Anything else is answered
//! with `ok`. `[handler] panic_in = "initialize"` panics while a worker initialises;
//! `[handler] crash_in = "initialize"` kills the process there instead, with `crash = "abort"`
//! (the default) or `"segfault"`, as a broken native library would; `initialize_ms = N`
//! makes initialising take N milliseconds.

use std::time::{Duration, Instant};

use cresset_plugin_api::sdk::{BatchContext, Handler, Host, InitContext};
use cresset_plugin_api::{Capabilities, PluginError, Request, Response};

pub struct Panicky {
    host: Host,
}

impl Handler for Panicky {
    const NAME: &'static str = "panicky";
    const CAPABILITIES: Capabilities = Capabilities::STREAMING;
    type Input = String;
    type Output = String;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        if ctx.handler_config.get("panic_in").and_then(|v| v.as_str()) == Some("initialize") {
            panic!("panicky fixture: asked to panic in initialize");
        }
        if let Some(ms) = ctx
            .handler_config
            .get("initialize_ms")
            .and_then(|v| v.as_u64())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if ctx.handler_config.get("crash_in").and_then(|v| v.as_str()) == Some("initialize") {
            match ctx.handler_config.get("crash").and_then(|v| v.as_str()) {
                Some("segfault") => segfault(),
                _ => std::process::abort(),
            }
        }
        tracing::info!(
            index = ctx.assignment.index,
            "panicky fixture instance initialised"
        );
        Ok(Panicky {
            host: ctx.host.clone(),
        })
    }

    fn preprocess(&mut self, request: &Request) -> Result<String, PluginError> {
        Ok(request.text().unwrap_or_default().to_owned())
    }

    fn inference(
        &mut self,
        batch: Vec<String>,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<String>, PluginError> {
        let mut out = Vec::with_capacity(batch.len());
        for (i, command) in batch.iter().enumerate() {
            if command == "panic" {
                panic!("panicky fixture: asked to panic in inference");
            } else if command == "abort" {
                std::process::abort();
            } else if command == "segfault" {
                segfault();
            } else if command == "pid" {
                out.push(std::process::id().to_string());
            } else if let Some(ms) = command.strip_prefix("sleep:") {
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                out.push("ok".to_owned());
            } else if let Some(spec) = command.strip_prefix("stream:") {
                let (n, ms) = spec.split_once(':').unwrap_or((spec, "0"));
                for k in 0..n.parse().unwrap_or(0) {
                    std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                    ctx.send_chunk(i, Response::ok("text/plain", format!("chunk-{k}\n")));
                }
                out.push("done".to_owned());
            } else if command == "wait-cancel" {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !ctx.is_cancelled(i) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if ctx.is_cancelled(i) {
                    self.host.counter(
                        "cresset_fixture_cancelled_total",
                        "Requests seen cancelled",
                        &[],
                        1.0,
                    );
                    tracing::warn!("panicky fixture saw its client go away");
                }
                out.push("late".to_owned());
            } else {
                out.push("ok".to_owned());
            }
        }
        Ok(out)
    }

    fn postprocess(&mut self, output: String) -> Result<Response, PluginError> {
        Ok(Response::ok("text/plain", output))
    }
}

/// Die of SIGSEGV, as a bad pointer in native code does: a write to an unmapped address. (A
/// raised SIGSEGV is caught by Rust's stack-overflow handler, which returns; the faulting write
/// runs again under the default action and ends the process.)
fn segfault() -> ! {
    // SAFETY: none; this is the point. Page 1 is never mapped in a Linux process.
    unsafe {
        std::ptr::write_volatile(std::ptr::without_provenance_mut::<u8>(4096), 1);
    }
    std::process::abort()
}

cresset_plugin_api::export_handler!(Panicky);
