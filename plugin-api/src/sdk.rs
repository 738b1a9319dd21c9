//! Helpers for plugin authors (feature `sdk`): a [`Handler`] trait in TorchServe's shape, the
//! [`export_handler!`](crate::export_handler) macro, JSON helpers and a bridge that sends the
//! plugin's `tracing` events to the host's log.
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "cresset-plugin-shout"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! cresset-plugin-api = { version = "1", features = ["sdk"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use cresset_plugin_api::sdk::{BatchContext, Handler, InitContext};
//! use cresset_plugin_api::{PluginError, Request, Response};
//!
//! /// Answers every request with its text body in upper case.
//! pub struct Shout {
//!     suffix: String,
//! }
//!
//! impl Handler for Shout {
//!     const NAME: &'static str = "shout";
//!     type Input = String;
//!     type Output = String;
//!
//!     // Called once per worker: load weights, read config.
//!     fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
//!         let suffix = ctx.handler_config["suffix"].as_str().unwrap_or("!").to_owned();
//!         Ok(Shout { suffix })
//!     }
//!
//!     // One request in, one model input out. An error fails this request alone (400).
//!     fn preprocess(&mut self, request: &Request) -> Result<String, PluginError> {
//!         request
//!             .text()
//!             .map(str::to_owned)
//!             .ok_or_else(|| PluginError::invalid_input("the body must be UTF-8 text"))
//!     }
//!
//!     // The whole batch at once.
//!     fn inference(&mut self, batch: Vec<String>, _ctx: &mut BatchContext<'_, '_>) -> Result<Vec<String>, PluginError> {
//!         Ok(batch.into_iter().map(|s| s.to_uppercase() + &self.suffix).collect())
//!     }
//!
//!     fn postprocess(&mut self, output: String) -> Result<Response, PluginError> {
//!         Ok(Response::ok("text/plain", output))
//!     }
//! }
//!
//! cresset_plugin_api::export_handler!(Shout);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release`, archive the `.so` with
//! `cresset archive --handler target/release/libcresset_plugin_shout.so ...`, and register it.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use serde_json::Value;

use crate::{
    Capabilities, DeviceType, ErrorCode, HostHandle, InstanceAssignment, InstanceBox, KeyValue,
    LogLevel, MetricKind, ModelBox, ModelSpec, PluginDescription, PluginError, PluginInstance,
    PluginMod, PluginModRef, PluginModel, Request, Response, SinkRef, ABI_VERSION,
};

impl Response {
    /// A 200 `application/json` response holding `value`.
    pub fn json(value: &impl serde::Serialize) -> Result<Self, PluginError> {
        serde_json::to_vec(value)
            .map(|body| Self::ok("application/json", body))
            .map_err(|e| PluginError::internal(format!("cannot serialize the response: {e}")))
    }
}

impl Request {
    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, PluginError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| PluginError::invalid_input(format!("the body is not valid JSON: {e}")))
    }
}

/// A TorchServe-shaped handler. One value of it lives in each worker instance.
///
/// The default [`Handler::handle`] runs `preprocess` on every request, `inference` once on the
/// requests that preprocessed, and `postprocess` on each output. A request whose
/// `preprocess` or `postprocess` fails gets its own error; its neighbours still succeed.
pub trait Handler: Sized + Send + 'static {
    /// The plugin's name (reported by `describe`).
    const NAME: &'static str;
    /// One line for people.
    const SUMMARY: &'static str = "";
    /// Optional capabilities (set `STREAMING` if you call [`BatchContext::send_chunk`]).
    const CAPABILITIES: Capabilities = Capabilities::NONE;

    /// One request's model input.
    type Input: Send;
    /// One request's model output.
    type Output: Send;

    /// Load what the worker needs (weights, tokenizer, config). Called on the worker's thread.
    fn initialize(ctx: &InitContext) -> Result<Self, PluginError>;

    /// Turn one request into a model input.
    fn preprocess(&mut self, request: &Request) -> Result<Self::Input, PluginError>;

    /// Run the model on a batch. Must return one output per input, in order.
    fn inference(
        &mut self,
        batch: Vec<Self::Input>,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Self::Output>, PluginError>;

    /// Turn one model output into a response.
    fn postprocess(&mut self, output: Self::Output) -> Result<Response, PluginError>;

    /// Handle a batch: one result per request, in order.
    fn handle(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        let mut results: Vec<Option<Result<Response, PluginError>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut inputs = Vec::with_capacity(requests.len());
        let mut positions = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            if ctx.is_cancelled(i) {
                results[i] = Some(Err(PluginError::new(ErrorCode::CANCELLED, "cancelled")));
                continue;
            }
            match self.preprocess(request) {
                Ok(input) => {
                    inputs.push(input);
                    positions.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !inputs.is_empty() {
            let outer = std::mem::replace(&mut ctx.positions, positions.clone());
            let outputs = self.inference(inputs, ctx);
            ctx.positions = outer;
            match outputs {
                Ok(outputs) if outputs.len() == positions.len() => {
                    for (i, output) in positions.into_iter().zip(outputs) {
                        results[i] = Some(self.postprocess(output));
                    }
                }
                Ok(outputs) => {
                    let e = PluginError::internal(format!(
                        "`{}` inference returned {} outputs for {} inputs",
                        Self::NAME,
                        outputs.len(),
                        positions.len()
                    ));
                    for i in positions {
                        results[i] = Some(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for i in positions {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PluginError::internal("no result: this is a bug"))))
            .collect()
    }

    /// Continuous batching, for handlers whose [`Handler::CAPABILITIES`] include
    /// [`Capabilities::CONTINUOUS_BATCHING`] (the SDK then calls this instead of
    /// [`Handler::handle`]). Admit the `new` requests (their indices are `first_index..`, counted
    /// across calls), run one scheduling step (for a decoder: one forward pass for every running
    /// sequence), and answer through `ctx` by index. A request may stay open across calls: the
    /// host calls again, with newly arrived requests or none, while any request is open. An
    /// `Err` answers every open request with that error.
    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        let _ = (new, first_index, ctx);
        Err(PluginError::unsupported(format!(
            "the `{}` handler does not implement continuous batching",
            Self::NAME
        )))
    }

    /// Explain a batch. The default says the handler has no explanations.
    fn explain(
        &mut self,
        requests: &[Request],
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        requests
            .iter()
            .map(|_| {
                Err(PluginError::unsupported(format!(
                    "the `{}` handler has no explanations",
                    Self::NAME
                )))
            })
            .collect()
    }
}

/// A batch entry point of a handler: [`Handler::handle`] or [`Handler::explain`].
pub type Entry<H> =
    fn(&mut H, &[Request], &mut BatchContext<'_, '_>) -> Vec<Result<Response, PluginError>>;

/// What [`Handler::initialize`] gets.
#[derive(Debug, Clone)]
pub struct InitContext {
    /// The model name.
    pub model_name: String,
    /// The model version.
    pub model_version: String,
    /// The folder holding the archive's files.
    pub model_dir: PathBuf,
    /// The `[handler]` table of `model-config.toml` (`{}` when absent).
    pub handler_config: Value,
    /// The whole `model-config.toml`.
    pub model_config: Value,
    /// Where this instance runs.
    pub assignment: InstanceAssignment,
    /// Host services (metrics).
    pub host: Host,
}

impl InitContext {
    /// `cuda:N` for a GPU assignment, else `cpu`.
    pub fn device_name(&self) -> String {
        match self.assignment.device_ids.first() {
            Some(id) if self.assignment.device_type == DeviceType::GPU => format!("cuda:{id}"),
            _ => "cpu".to_owned(),
        }
    }
}

/// Host services as handlers use them.
#[derive(Clone)]
pub struct Host {
    handle: HostHandle,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Host")
    }
}

impl Host {
    /// Add `value` to a counter.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.metric(MetricKind::COUNTER, name, help, labels, value);
    }
    /// Set a gauge.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.metric(MetricKind::GAUGE, name, help, labels, value);
    }
    /// Observe one histogram value.
    pub fn observe(&self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.metric(MetricKind::HISTOGRAM, name, help, labels, value);
    }
    fn metric(
        &self,
        kind: MetricKind,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let labels: Vec<KeyValue> = labels.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect();
        self.handle.metric(
            kind,
            name.into(),
            help.into(),
            RSlice::from_slice(&labels),
            value,
        );
    }
}

/// A batch in flight: streaming and cancellation for its requests.
///
/// Indices are positions in the slice the current call received: in `inference`, position `i`
/// is the `i`-th input, which the default `handle` maps back to its request.
pub struct BatchContext<'s, 'a> {
    sink: &'s mut SinkRef<'a>,
    positions: Vec<usize>,
}

impl<'s, 'a> BatchContext<'s, 'a> {
    fn new(sink: &'s mut SinkRef<'a>, len: usize) -> Self {
        Self {
            sink,
            positions: (0..len).collect(),
        }
    }

    fn request_index(&self, position: usize) -> usize {
        self.positions.get(position).copied().unwrap_or(usize::MAX)
    }

    /// Stream an intermediate chunk to the client of position `i`. Returns `false` when that
    /// client has gone away.
    pub fn send_chunk(&mut self, i: usize, chunk: Response) -> bool {
        let index = self.request_index(i);
        self.sink.send_chunk(index, chunk)
    }

    /// Whether the client of position `i` went away or timed out.
    pub fn is_cancelled(&self, i: usize) -> bool {
        self.sink.is_cancelled(self.request_index(i))
    }
}

/// Reading a handler's `[handler]` table ([`InitContext::handler_config`]) with errors that
/// name the key, as `handler.<key>`.
pub mod settings {
    use std::path::{Component, Path, PathBuf};

    use serde_json::Value;

    use crate::PluginError;

    fn bad(key: &str, wanted: &str, given: &Value) -> PluginError {
        PluginError::invalid_input(format!("`handler.{key}` must be {wanted}. Given: {given}"))
    }

    /// A string, if present.
    pub fn string<'a>(config: &'a Value, key: &str) -> Result<Option<&'a str>, PluginError> {
        match config.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(bad(key, "a string", v)),
        }
    }

    /// An integer from 1 to `max`, or `default` when absent.
    pub fn integer(
        config: &Value,
        key: &str,
        default: usize,
        max: usize,
    ) -> Result<usize, PluginError> {
        match config.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=max as u64).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| bad(key, &format!("an integer from 1 to {max}"), v)),
        }
    }

    /// A boolean, or `default` when absent.
    pub fn boolean(config: &Value, key: &str, default: bool) -> Result<bool, PluginError> {
        match config.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(key, "true or false", v)),
        }
    }

    /// The folder the setting `key` names inside `dir` (a path as [`path_inside`] takes it),
    /// or `dir` itself when it is not set: a checkpoint folder such as `model_path`.
    pub fn folder_inside(dir: &Path, config: &Value, key: &str) -> Result<PathBuf, PluginError> {
        path_inside(dir, key, string(config, key)?.unwrap_or("."))
    }

    /// The file `name` inside `dir` when given (the value of the setting `key`), else the only
    /// file in `dir` ending in `.{ext}`, or none. Several such files are an error asking for
    /// `key`.
    pub fn named_or_only_file(
        dir: &Path,
        key: &str,
        name: Option<&str>,
        ext: &str,
    ) -> Result<Option<PathBuf>, PluginError> {
        if let Some(name) = name {
            return path_inside(dir, key, name).map(Some);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| PluginError::internal(format!("cannot list {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        match found.len() {
            0 | 1 => Ok(found.pop()),
            n => Err(PluginError::invalid_input(format!(
                "the archive has {n} .{ext} files; name one in `handler.{key}`"
            ))),
        }
    }

    /// `rel` under `dir`, refusing absolute paths and `..` (a path must stay inside the
    /// archive).
    pub fn path_inside(dir: &Path, key: &str, rel: &str) -> Result<PathBuf, PluginError> {
        let path = Path::new(rel);
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(PluginError::invalid_input(format!(
                "`handler.{key}` must be a path inside the archive. Given: {rel:?}"
            )));
        }
        Ok(dir.join(path))
    }
}

/// What [`Handler::step`] answers through: the sink, addressed by request index.
pub struct StepContext<'s, 'a> {
    sink: &'s mut SinkRef<'a>,
}

impl StepContext<'_, '_> {
    /// Stream a chunk to request `index`. Returns `false` when its client has gone away.
    pub fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        self.sink.send_chunk(index, chunk)
    }

    /// Send the final response of request `index` (later sends are ignored).
    pub fn send_final(&mut self, index: usize, result: Result<Response, PluginError>) {
        self.sink.send_final(index, result.into());
    }

    /// Whether request `index`'s client went away or timed out.
    pub fn is_cancelled(&self, index: usize) -> bool {
        self.sink.is_cancelled(index)
    }
}

// ---------------------------------------------------------------------------------------------
// The ABI side: what `export_handler!` wires up.
// ---------------------------------------------------------------------------------------------

/// Run `f`, turning a panic into an `INTERNAL` error: panics must never cross the ABI.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.into(),
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            RResult::RErr(PluginError::internal(format!(
                "the handler panicked in {what}: {detail}"
            )))
        }
    }
}

#[doc(hidden)]
pub fn describe<H: Handler>(plugin_version: &str) -> PluginDescription {
    PluginDescription {
        name: H::NAME.into(),
        plugin_version: plugin_version.into(),
        abi_version: ABI_VERSION.into(),
        capabilities: H::CAPABILITIES,
        summary: H::SUMMARY.into(),
    }
}

#[doc(hidden)]
pub extern "C" fn load_model<H: Handler>(
    spec: &ModelSpec,
    host: HostHandle,
) -> RResult<ModelBox, PluginError> {
    guard("load_model", || {
        install_log_bridge(&host);
        let model = SdkModel::<H> {
            spec: spec.clone(),
            host: Host { handle: host },
            handler: PhantomData,
        };
        Ok(ModelBox::from_value(model, TD_Opaque))
    })
}

#[doc(hidden)]
pub fn root_module(
    describe: extern "C" fn() -> PluginDescription,
    load_model: extern "C" fn(&ModelSpec, HostHandle) -> RResult<ModelBox, PluginError>,
) -> PluginModRef {
    PluginMod {
        describe,
        load_model,
    }
    .leak_into_prefix()
}

fn parse_json(field: &str, text: &str) -> Result<Value, PluginError> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(text)
        .map_err(|e| PluginError::internal(format!("the host sent a bad `{field}`: {e}")))
}

struct SdkModel<H> {
    spec: ModelSpec,
    host: Host,
    handler: PhantomData<fn() -> H>,
}

impl<H: Handler> PluginModel for SdkModel<H> {
    fn new_instance(&self, assignment: &InstanceAssignment) -> RResult<InstanceBox, PluginError> {
        guard("initialize", || {
            let ctx = InitContext {
                model_name: self.spec.name.to_string(),
                model_version: self.spec.version.to_string(),
                model_dir: PathBuf::from(self.spec.model_dir.as_str()),
                handler_config: parse_json("handler_config_json", &self.spec.handler_config_json)?,
                model_config: parse_json("model_config_json", &self.spec.model_config_json)?,
                assignment: assignment.clone(),
                host: self.host.clone(),
            };
            let handler = with_host(&self.host.handle, || H::initialize(&ctx))?;
            Ok(InstanceBox::from_value(
                SdkInstance {
                    handler: Some(handler),
                    host: self.host.handle.clone(),
                    next_index: 0,
                },
                TD_Opaque,
            ))
        })
    }

    fn metadata_json(&self) -> RString {
        RString::from("{}")
    }
}

struct SdkInstance<H> {
    handler: Option<H>,
    host: HostHandle,
    /// Requests given to `step` so far: the index of the next one.
    next_index: usize,
}

impl<H: Handler> SdkInstance<H> {
    fn run(
        &mut self,
        what: &str,
        requests: RSlice<'_, Request>,
        mut sink: SinkRef<'_>,
        call: Entry<H>,
    ) -> RResult<(), PluginError> {
        let handler = match self.handler.as_mut() {
            Some(h) => h,
            None => return RResult::RErr(PluginError::internal("the instance was dropped")),
        };
        let host = &self.host;
        guard(what, || {
            let mut ctx = BatchContext::new(&mut sink, requests.len());
            let results = with_host(host, || call(handler, requests.as_slice(), &mut ctx));
            for (i, result) in results.into_iter().enumerate().take(requests.len()) {
                sink.send_final(i, result.into());
            }
            Ok(())
        })
    }
}

impl<H: Handler> PluginInstance for SdkInstance<H> {
    fn execute(
        &mut self,
        requests: RSlice<'_, Request>,
        mut sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        if !H::CAPABILITIES.contains(Capabilities::CONTINUOUS_BATCHING) {
            return self.run("handle", requests, sink, H::handle);
        }
        let Some(handler) = self.handler.as_mut() else {
            return RResult::RErr(PluginError::internal("the instance was dropped"));
        };
        let first_index = self.next_index;
        self.next_index += requests.len();
        let host = &self.host;
        guard("step", || {
            let mut ctx = StepContext { sink: &mut sink };
            with_host(host, || {
                handler.step(requests.as_slice(), first_index, &mut ctx)
            })
        })
    }

    fn explain(
        &mut self,
        requests: RSlice<'_, Request>,
        sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        self.run("explain", requests, sink, H::explain)
    }
}

impl<H> Drop for SdkInstance<H> {
    fn drop(&mut self) {
        let handler = self.handler.take();
        // A panicking destructor must not unwind into the host either.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            with_host(&self.host, move || drop(handler))
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// Logging bridge: the plugin's `tracing` events → the host's subscriber.
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// The host of the model whose handler code runs on this thread now, so that log records
    /// carry the right model even when several models share one plugin library.
    static CURRENT_HOST: std::cell::RefCell<Option<HostHandle>> = const { std::cell::RefCell::new(None) };
}

/// Run `f` with `host` as this thread's current host (restoring the previous one after).
fn with_host<T>(host: &HostHandle, f: impl FnOnce() -> T) -> T {
    let previous = CURRENT_HOST
        .try_with(|c| c.replace(Some(host.clone())))
        .ok()
        .flatten();
    struct Restore(Option<HostHandle>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            let _ = CURRENT_HOST.try_with(|c| c.replace(previous));
        }
    }
    let _restore = Restore(previous);
    f()
}

/// Install (once per plugin library) a global `tracing` dispatcher that forwards events to the
/// host. A `cdylib` carries its own copy of `tracing-core`, so without this a plugin's logs would
/// go nowhere. Events go to the current model's host (see [`with_host`]), else to the host of
/// the first model loaded from this library.
fn install_log_bridge(host: &HostHandle) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let bridge = LogBridge { host: host.clone() };
        let _ = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(bridge));
    });
}

struct LogBridge {
    host: HostHandle,
}

impl LogBridge {
    fn with_current<T>(&self, f: impl FnOnce(&HostHandle) -> T) -> T {
        let current = CURRENT_HOST.try_with(|c| c.borrow().clone()).ok().flatten();
        f(current.as_ref().unwrap_or(&self.host))
    }
}

fn level_of(level: &tracing_core::Level) -> LogLevel {
    match *level {
        tracing_core::Level::TRACE => LogLevel::TRACE,
        tracing_core::Level::DEBUG => LogLevel::DEBUG,
        tracing_core::Level::INFO => LogLevel::INFO,
        tracing_core::Level::WARN => LogLevel::WARN,
        _ => LogLevel::ERROR,
    }
}

#[derive(Default)]
struct FieldCollector {
    message: String,
    fields: Vec<KeyValue>,
}

impl tracing_core::field::Visit for FieldCollector {
    fn record_debug(&mut self, field: &tracing_core::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push(KeyValue::new(field.name(), format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &tracing_core::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.push(KeyValue::new(field.name(), value));
        }
    }
}

impl tracing_core::Subscriber for LogBridge {
    fn register_callsite(
        &self,
        _: &'static tracing_core::Metadata<'static>,
    ) -> tracing_core::subscriber::Interest {
        // Ask per event: the host's filter may change at run time.
        tracing_core::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &tracing_core::Metadata<'_>) -> bool {
        self.with_current(|host| host.log_enabled(level_of(metadata.level())))
    }
    fn new_span(&self, _: &tracing_core::span::Attributes<'_>) -> tracing_core::span::Id {
        // Spans are not forwarded (yet); events inside them are.
        tracing_core::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing_core::span::Id, _: &tracing_core::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing_core::span::Id, _: &tracing_core::span::Id) {}
    fn event(&self, event: &tracing_core::Event<'_>) {
        let mut collector = FieldCollector::default();
        event.record(&mut collector);
        let metadata = event.metadata();
        self.with_current(|host| {
            host.log(
                level_of(metadata.level()),
                RStr::from_str(metadata.target()),
                RStr::from_str(&collector.message),
                RSlice::from_slice(&collector.fields),
            )
        });
    }
    fn enter(&self, _: &tracing_core::span::Id) {}
    fn exit(&self, _: &tracing_core::span::Id) {}
}

/// Export a [`Handler`] as this library's plugin root module.
///
/// Use once per `cdylib` crate: `cresset_plugin_api::export_handler!(MyHandler);`
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        const _: () = {
            extern "C" fn cresset_describe() -> $crate::PluginDescription {
                // `describe` builds plain data and cannot panic in practice; still, never unwind.
                match ::std::panic::catch_unwind(|| {
                    $crate::sdk::describe::<$handler>(env!("CARGO_PKG_VERSION"))
                }) {
                    Ok(d) => d,
                    Err(_) => ::std::process::abort(),
                }
            }

            fn cresset_root_module() -> $crate::PluginModRef {
                $crate::sdk::root_module(cresset_describe, $crate::sdk::load_model::<$handler>)
            }

            extern "C" fn cresset_erased_root_module(
            ) -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(cresset_root_module)
            }

            // The symbol abi_stable's loader looks up (`abi_stable::library::ROOT_MODULE_LOADER_NAME`;
            // a unit test in cresset-plugin-api checks the literal).
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            static CRESSET_PLUGIN_ROOT: $crate::abi_stable::library::LibHeader = unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModRef>(
                    cresset_erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_export_macro_uses_abi_stables_symbol_name() {
        assert_eq!(
            crate::ROOT_MODULE_SYMBOL,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}

/// Helpers for unit-testing a [`Handler`] as a plain library, without the host or `dlopen`.
///
/// ```
/// # use cresset_plugin_api::sdk::{testing, Handler, BatchContext, InitContext};
/// # use cresset_plugin_api::{PluginError, Request, Response};
/// # struct Up;
/// # impl Handler for Up {
/// #     const NAME: &'static str = "up";
/// #     type Input = String; type Output = String;
/// #     fn initialize(_: &InitContext) -> Result<Self, PluginError> { Ok(Up) }
/// #     fn preprocess(&mut self, r: &Request) -> Result<String, PluginError> { Ok(r.text().unwrap_or("").to_owned()) }
/// #     fn inference(&mut self, b: Vec<String>, _: &mut BatchContext<'_, '_>) -> Result<Vec<String>, PluginError> { Ok(b.into_iter().map(|s| s.to_uppercase()).collect()) }
/// #     fn postprocess(&mut self, o: String) -> Result<Response, PluginError> { Ok(Response::ok("text/plain", o)) }
/// # }
/// let ctx = testing::init_context(std::env::temp_dir(), serde_json::json!({}));
/// let mut handler = Up::initialize(&ctx).unwrap();
/// let run = testing::run(&mut handler, &[testing::request("text/plain", "hi")]);
/// assert_eq!(run.finals[0].as_ref().unwrap().body.as_slice(), b"HI");
/// ```
pub mod testing {
    use super::*;
    use crate::HostServices;
    use abi_stable::std_types::RArc;

    #[derive(Clone)]
    struct QuietHost;

    impl HostServices for QuietHost {
        fn log_enabled(&self, _: LogLevel) -> bool {
            false
        }
        fn log(&self, _: LogLevel, _: RStr<'_>, _: RStr<'_>, _: RSlice<'_, KeyValue>) {}
        fn metric(&self, _: MetricKind, _: RStr<'_>, _: RStr<'_>, _: RSlice<'_, KeyValue>, _: f64) {
        }
    }

    /// Host services that drop logs and metrics.
    pub fn host() -> Host {
        Host {
            handle: HostHandle::from_ptr(RArc::new(QuietHost), TD_Opaque),
        }
    }

    /// An [`InitContext`] for model files in `model_dir`, on the CPU with one thread.
    pub fn init_context(model_dir: impl Into<PathBuf>, handler_config: Value) -> InitContext {
        InitContext {
            model_name: "test".into(),
            model_version: "1.0".into(),
            model_dir: model_dir.into(),
            handler_config,
            model_config: Value::Object(Default::default()),
            assignment: InstanceAssignment {
                index: 0,
                device_type: DeviceType::CPU,
                device_ids: Default::default(),
                intra_op_threads: 1,
            },
            host: host(),
        }
    }

    /// A request with this content type and body.
    pub fn request(content_type: &str, body: impl Into<Vec<u8>>) -> Request {
        Request {
            id: "test".into(),
            content_type: content_type.into(),
            body: body.into().into(),
            headers: Default::default(),
            params: Default::default(),
        }
    }

    /// What one batch produced: the chunks streamed to each request, and its final result.
    pub struct Run {
        /// Intermediate chunks, per request.
        pub chunks: Vec<Vec<Response>>,
        /// Final results, per request.
        pub finals: Vec<Result<Response, PluginError>>,
    }

    struct Collect {
        chunks: Vec<Vec<Response>>,
    }

    impl crate::ResponseSink for Collect {
        fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
            match self.chunks.get_mut(index) {
                Some(list) => {
                    list.push(chunk);
                    true
                }
                None => false,
            }
        }
        fn send_final(&mut self, _: usize, _: RResult<Response, PluginError>) {}
        fn is_cancelled(&self, _: usize) -> bool {
            false
        }
    }

    /// What a run of [`Handler::step`] calls produced, per request (in arrival order).
    pub struct StepRun {
        /// Intermediate chunks.
        pub chunks: Vec<Vec<Response>>,
        /// Final results (`None`: never answered).
        pub finals: Vec<Option<Result<Response, PluginError>>>,
        /// The step (call number) of each request's first chunk.
        pub first_chunk_step: Vec<Option<usize>>,
        /// The step of each request's final response.
        pub final_step: Vec<Option<usize>>,
    }

    struct Record {
        run: StepRun,
        step: usize,
    }

    impl crate::ResponseSink for Record {
        fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
            let step = self.step;
            match self.run.chunks.get_mut(index) {
                Some(list) => {
                    list.push(chunk);
                    self.run.first_chunk_step[index].get_or_insert(step);
                    true
                }
                None => false,
            }
        }
        fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
            if let Some(slot @ None) = self.run.finals.get_mut(index) {
                *slot = Some(result.into());
                self.run.final_step[index] = Some(self.step);
            }
        }
        fn is_cancelled(&self, _: usize) -> bool {
            false
        }
    }

    /// One request through a continuous-batching handler, from an idle start until it is
    /// answered: its final result (an internal error if `max_steps` calls did not answer it).
    pub fn step_one<H: Handler>(
        handler: &mut H,
        request: Request,
        max_steps: usize,
    ) -> Result<Response, PluginError> {
        run_steps(handler, &[(0, request)], max_steps)
            .finals
            .into_iter()
            .next()
            .flatten()
            .unwrap_or_else(|| {
                Err(PluginError::internal(format!(
                    "not answered in {max_steps} steps"
                )))
            })
    }

    /// Drive a continuous-batching handler as the host does: `arrivals` are `(step, request)`
    /// pairs (sorted by step); each call passes the requests arriving at that step, and calls
    /// continue while any request is unanswered (at most `max_steps`).
    pub fn run_steps<H: Handler>(
        handler: &mut H,
        arrivals: &[(usize, Request)],
        max_steps: usize,
    ) -> StepRun {
        let n = arrivals.len();
        let mut record = Record {
            run: StepRun {
                chunks: vec![Vec::new(); n],
                finals: (0..n).map(|_| None).collect(),
                first_chunk_step: vec![None; n],
                final_step: vec![None; n],
            },
            step: 0,
        };
        let mut given = 0;
        while record.step < max_steps {
            let new: Vec<Request> = arrivals[given..]
                .iter()
                .take_while(|(at, _)| *at <= record.step)
                .map(|(_, r)| r.clone())
                .collect();
            let first = given;
            given += new.len();
            if given == n && record.run.finals.iter().all(Option::is_some) {
                break;
            }
            let result = {
                let mut sink = SinkRef::from_ptr(&mut record, TD_Opaque);
                let mut ctx = StepContext { sink: &mut sink };
                handler.step(&new, first, &mut ctx)
            };
            if let Err(e) = result {
                for slot in record.run.finals.iter_mut().take(given) {
                    slot.get_or_insert_with(|| Err(e.clone()));
                }
            }
            record.step += 1;
        }
        record.run
    }

    /// Run one batch through `handler.handle`, as a worker would.
    pub fn run<H: Handler>(handler: &mut H, requests: &[Request]) -> Run {
        run_with(handler, requests, H::handle)
    }

    /// Run one batch through another entry point, such as [`Handler::explain`].
    pub fn run_with<H: Handler>(
        handler: &mut H,
        requests: &[Request],
        entry: super::Entry<H>,
    ) -> Run {
        let mut collect = Collect {
            chunks: requests.iter().map(|_| Vec::new()).collect(),
        };
        let finals = {
            let mut sink = SinkRef::from_ptr(&mut collect, TD_Opaque);
            let mut ctx = BatchContext::new(&mut sink, requests.len());
            entry(handler, requests, &mut ctx)
        };
        Run {
            chunks: collect.chunks,
            finals,
        }
    }
}
