//! The `python` plugin: a TorchServe `handler.py` run unchanged in an embedded CPython.
//!
//! The handler is loaded as TorchServe loads it (a module with one handler class, whose
//! `initialize(context)` runs once and whose `handle(data, context)` gets each batch, or a
//! `module:function` entry point), with the `ts` compatibility package this plugin ships
//! (`ts.context.Context`, `ts.torch_handler.base_handler.BaseHandler`, `ts.utils.util`,
//! `ts.protocol.otf_message_handler.send_intermediate_predict_response`). Requests arrive in
//! TorchServe's shape: a list of dicts whose `body` is parsed JSON, text, or a bytearray, with
//! the query parameters beside it.
//!
//! The host always runs this plugin in process isolation: one interpreter per worker process,
//! so workers share no GIL, and a handler that crashes its interpreter costs its own requests.
//!
//! `[handler]` settings read here: `entry` (the handler file or `module:function`; a `.mar`'s
//! manifest names it), `python` and `python_home` (see [`interpreter`]). Every other key is the
//! handler's own, as in TorchServe (`context.model_yaml_config`).

use std::cell::Cell;
use std::sync::OnceLock;

use cresset_plugin_api::sdk::{BatchContext, Handler, Host, InitContext};
use cresset_plugin_api::{Capabilities, KeyValue, PluginError, Request, Response};
use pyo3::prelude::*;

pub mod interpreter;

/// One request, owned, in the pieces the bridge takes.
pub struct Call {
    id: String,
    content_type: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    params: Vec<(String, String)>,
}

fn pairs(items: &[KeyValue]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

impl From<&Request> for Call {
    fn from(r: &Request) -> Self {
        Self {
            id: r.id.to_string(),
            content_type: r.content_type.to_string(),
            body: r.body.to_vec(),
            headers: pairs(&r.headers),
            params: pairs(&r.params),
        }
    }
}

/// The handler of one model in this worker process.
pub struct PythonHandler {
    runtime: Py<PyAny>,
}

/// Where the host's services are, for the bridge's metric calls.
static HOST: OnceLock<Host> = OnceLock::new();

thread_local! {
    /// The batch running on this thread, while the handler runs: where `chunk` sends.
    static BATCH: Cell<Option<*mut BatchContext<'static, 'static>>> = const { Cell::new(None) };
}

/// Makes `ctx` the target of `chunk` until dropped.
struct Streaming;

impl Streaming {
    fn begin(ctx: &mut BatchContext<'_, '_>) -> Self {
        let ptr = ctx as *mut BatchContext<'_, '_> as *mut BatchContext<'static, 'static>;
        BATCH.with(|b| b.set(Some(ptr)));
        Self
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        BATCH.with(|b| b.set(None));
    }
}

/// `_cresset.chunk(idx, body, content_type)`: an intermediate chunk of request `idx`'s
/// answer. False when its client has gone (or no batch is running).
#[pyfunction]
fn chunk(idx: usize, body: Vec<u8>, content_type: String) -> bool {
    match BATCH.with(Cell::get) {
        // SAFETY: set by `Streaming::begin` from a live `&mut BatchContext` that the running
        // call does not touch until the handler returns, and cleared (on drop) before it is
        // used again; this runs on that thread, inside that call.
        Some(ctx) => unsafe { (*ctx).send_chunk(idx, Response::ok(content_type, body)) },
        None => false,
    }
}

/// `_cresset.log(level, message)`: a record of Python's `logging`, into the server's log.
#[pyfunction]
fn log(level: u32, message: &str) {
    match level {
        0..=10 => tracing::debug!(target: "handler.py", "{message}"),
        11..=20 => tracing::info!(target: "handler.py", "{message}"),
        21..=30 => tracing::warn!(target: "handler.py", "{message}"),
        _ => tracing::error!(target: "handler.py", "{message}"),
    }
}

/// `_cresset.metric(kind, name, value, labels)`: a metric of `context.metrics`, as
/// `cresset_ts_<name>`.
#[pyfunction]
fn metric(kind: &str, name: &str, value: f64, labels: Vec<(String, String)>) {
    let Some(host) = HOST.get() else { return };
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let name = format!("ts_{clean}");
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let help = "A metric the TorchServe handler recorded";
    match kind {
        "counter" => host.counter(&name, help, &labels, value),
        _ => host.gauge(&name, help, &labels, value),
    }
}

/// A Python exception as a message: its type, text and the end of its traceback.
fn describe(py: Python<'_>, e: &PyErr) -> String {
    let traceback = py
        .import("traceback")
        .and_then(|t| t.call_method1("format_exception", (e.value(py),)))
        .and_then(|lines| lines.extract::<Vec<String>>().map_err(PyErr::from))
        .map(|lines| lines.concat())
        .unwrap_or_else(|_| e.to_string());
    let text = traceback.trim_end();
    // The end says where and what: keep it, within a bound.
    let start = text.char_indices().rev().nth(3000).map_or(0, |(i, _)| i);
    text[start..].to_owned()
}

impl PythonHandler {
    fn run(
        &mut self,
        batch: Vec<Call>,
        explain: bool,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Response>, PluginError> {
        let n = batch.len();
        let _streaming = Streaming::begin(ctx);
        Python::attach(|py| {
            let requests: Vec<_> = batch
                .into_iter()
                .map(|c| (c.id, c.content_type, c.body, c.headers, c.params))
                .collect();
            let answers = self
                .runtime
                .call_method1(py, "run", (requests, explain))
                .map_err(|e| {
                    PluginError::internal(format!("the handler failed: {}", describe(py, &e)))
                })?;
            let answers: Vec<(u16, String, Vec<(String, String)>, Vec<u8>)> =
                answers.extract(py).map_err(|e: PyErr| {
                    PluginError::internal(format!("the bridge answered badly: {e}"))
                })?;
            if answers.len() != n {
                return Err(PluginError::internal(format!(
                    "the bridge answered {} of {n} requests",
                    answers.len()
                )));
            }
            Ok(answers
                .into_iter()
                .map(|(status, content_type, headers, body)| {
                    let mut response = Response::ok(content_type, body);
                    response.status = status;
                    response.headers = headers
                        .into_iter()
                        .map(|(k, v)| KeyValue::new(k, v))
                        .collect::<Vec<_>>()
                        .into();
                    response
                })
                .collect())
        })
    }
}

fn text_setting<'a>(ctx: &'a InitContext, key: &str) -> Result<Option<&'a str>, PluginError> {
    match ctx.handler_config.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            PluginError::invalid_input(format!("`{key}` must be a string. Given: {v}"))
        }),
    }
}

impl Handler for PythonHandler {
    const NAME: &'static str = "python";
    const SUMMARY: &'static str =
        "TorchServe handler.py files run unchanged in an embedded CPython (process isolation)";
    const CAPABILITIES: Capabilities =
        Capabilities(Capabilities::STREAMING.0 | Capabilities::EXPLANATIONS.0);

    type Input = Call;
    type Output = Response;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let _ = HOST.set(ctx.host.clone());
        let python = interpreter::chosen_python(text_setting(ctx, "python")?);
        interpreter::start(&python, text_setting(ctx, "python_home")?)?;
        let serialized = ctx.model_config["serialized_file"].as_str();
        let manifest = interpreter::manifest(
            &ctx.model_dir,
            &ctx.model_name,
            &ctx.model_version,
            serialized,
            text_setting(ctx, "entry")?.unwrap_or("handler.py"),
        );
        let entry = match text_setting(ctx, "entry")? {
            Some(entry) => entry.to_owned(),
            None => manifest["model"]["handler"]
                .as_str()
                .unwrap_or("handler.py")
                .to_owned(),
        };
        let batch_size = ctx.model_config["batch_size"].as_u64().unwrap_or(1);
        let gpu_id = (ctx.assignment.device_type == cresset_plugin_api::DeviceType::GPU)
            .then(|| ctx.assignment.device_ids.first().copied())
            .flatten();
        let yaml = interpreter::yaml_config(&ctx.model_dir, &manifest);
        let fallback = serde_json::json!({ "handler": ctx.handler_config }).to_string();
        let model_dir = ctx.model_dir.to_string_lossy().into_owned();
        Python::attach(|py| {
            let fail = |e: PyErr| {
                PluginError::invalid_input(format!(
                    "the handler `{entry}` could not be loaded: {}",
                    describe(py, &e)
                ))
            };
            let bridge = py.import("cresset_runtime").map_err(fail)?;
            let json = py.import("json").map_err(fail)?;
            let manifest = json
                .call_method1("loads", (manifest.to_string(),))
                .map_err(fail)?;
            let yaml = bridge
                .call_method1(
                    "model_yaml_config",
                    (yaml.map(|p| p.to_string_lossy().into_owned()), fallback),
                )
                .map_err(fail)?;
            let runtime = bridge
                .getattr("Runtime")
                .and_then(|class| {
                    class.call1((
                        ctx.model_name.as_str(),
                        model_dir.as_str(),
                        manifest,
                        entry.as_str(),
                        batch_size,
                        gpu_id,
                        yaml,
                    ))
                })
                .map_err(fail)?;
            tracing::info!(entry = %entry, "TorchServe handler initialised");
            Ok(Self {
                runtime: runtime.unbind(),
            })
        })
    }

    fn preprocess(&mut self, request: &Request) -> Result<Call, PluginError> {
        Ok(Call::from(request))
    }

    fn inference(
        &mut self,
        batch: Vec<Call>,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Response>, PluginError> {
        self.run(batch, false, ctx)
    }

    fn postprocess(&mut self, output: Response) -> Result<Response, PluginError> {
        Ok(output)
    }

    fn explain(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        let calls = requests.iter().map(Call::from).collect();
        match self.run(calls, true, ctx) {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); requests.len()],
        }
    }
}

cresset_plugin_api::export_handler!(PythonHandler);
