//! # The Cresset plugin ABI
//!
//! A Cresset handler plugin is a `cdylib` that exports one *root module* ([`PluginMod`]) through
//! [`abi_stable`]. The host loads it at run time, checks that its layout and version are
//! compatible, and drives three levels of objects, as Triton's backend API does:
//!
//! * the **plugin** (the library's root module): [`PluginMod::describe`] and
//!   [`PluginMod::load_model`];
//! * the **model** ([`PluginModel`]): one loaded model version (weights, tokenizer, config);
//! * the **instance** ([`PluginInstance`]): one worker that owns its device state. The host gives
//!   each instance its own OS thread and never calls it from two threads at once.
//!
//! Finalisation is `Drop`, in reverse order: instances, then the model. Libraries are never
//! unloaded.
//!
//! ## Compatibility rules (read before changing this crate)
//!
//! 1. **The crate version is the ABI version.** Both versions are logged at load, and a plugin
//!    whose ABI major version differs from the host's is refused with an error naming both.
//!    Within a major version, abi_stable's layout check accepts a plugin whose prefix types
//!    are shorter or longer than the host's; items appended after a plugin was built read as
//!    `None` through their accessors, so hosts must handle their absence.
//! 2. **Append only.** Prefix types ([`PluginMod`], and the `#[sabi_trait]` vtables of
//!    [`PluginModel`], [`PluginInstance`], [`ResponseSink`] and [`HostServices`]) may only grow
//!    by *appending* fields or methods after the one marked `#[sabi(last_prefix_field)]`; move
//!    that marker to the new last item, and bump the **minor** version. Never reorder, remove,
//!    rename or retype an existing field, method or plain struct field.
//! 3. Plain `#[repr(C)]` data types ([`Request`], [`Response`], [`ModelSpec`], ...) are frozen
//!    for a major version. Growth goes through new methods on the traits above.
//! 4. Open sets of values ([`ErrorCode`], [`LogLevel`], [`MetricKind`], [`DeviceType`],
//!    [`Capabilities`]) are integer newtypes, not enums, so that new values can be added without
//!    a layout change. Receivers treat unknown values conservatively (an unknown error code is
//!    an internal error).
//! 5. **Panics never cross the boundary.** abi_stable aborts the process on an unwinding panic
//!    across `extern "C"`. The [`sdk`] wraps every entry point in `catch_unwind`; a plugin that
//!    does not use the SDK must do the same.
//! 6. This crate depends on `abi_stable` only (and, behind the `sdk` feature, `serde`,
//!    `serde_json` and `tracing-core`): never on a runtime such as tch, actix or tokio.
//! 7. **The SDK is not the ABI.** What the `sdk` feature adds for Rust authors (traits such as
//!    [`sdk::ModelHandler`] and [`sdk::StepHandler`], helpers, macros) compiles down to the same
//!    root module, so it may grow without a version change as long as nothing above moves and
//!    every handler written against an earlier SDK still builds unchanged (additive only: no
//!    new required items on an existing trait).
//!
//! ## Writing a plugin
//!
//! Most authors use the [`sdk`] (feature `sdk`): implement [`sdk::Handler`] (or
//! [`sdk::ModelHandler`], whose weights the instances share) and call [`export_handler!`], or
//! [`sdk::StepHandler`] and [`export_step_handler!`] for continuous batching. See the `sdk`
//! module for a complete example.

#![warn(missing_docs)]
// `#[sabi_trait]` expands to impl blocks inside consts; that is how abi_stable works.
#![allow(non_local_definitions)]

pub use abi_stable;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

#[cfg(feature = "sdk")]
pub mod sdk;

/// The ABI version of this crate (its package version).
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The file name a built-in plugin called `name` has on this platform
/// (`libcresset_plugin_<name>.so` on Linux).
pub fn plugin_file_name(name: &str) -> String {
    let stem = format!("cresset_plugin_{}", name.replace('-', "_"));
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

// ---------------------------------------------------------------------------------------------
// Open value sets
// ---------------------------------------------------------------------------------------------

/// Why a plugin call failed. The host maps each code to an HTTP status in one place.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// The request is malformed (HTTP 400).
    pub const INVALID_INPUT: Self = Self(1);
    /// Something the request names does not exist (HTTP 404).
    pub const NOT_FOUND: Self = Self(2);
    /// The plugin cannot serve now; the client may retry (HTTP 503).
    pub const UNAVAILABLE: Self = Self(3);
    /// The plugin does not implement this (HTTP 501).
    pub const UNSUPPORTED: Self = Self(4);
    /// A bug or an unexpected failure inside the plugin (HTTP 500).
    pub const INTERNAL: Self = Self(5);
    /// The request was cancelled, for example because the client went away.
    pub const CANCELLED: Self = Self(6);

    /// A short, stable name for the code (`"InvalidInput"`, ...); unknown codes are `"Internal"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::INVALID_INPUT => "InvalidInput",
            Self::NOT_FOUND => "NotFound",
            Self::UNAVAILABLE => "Unavailable",
            Self::UNSUPPORTED => "Unsupported",
            Self::CANCELLED => "Cancelled",
            _ => "Internal",
        }
    }
}

/// Severity of a log record sent to [`HostServices::log`].
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogLevel(pub u8);

impl LogLevel {
    /// Very verbose diagnostics.
    pub const TRACE: Self = Self(0);
    /// Diagnostics.
    pub const DEBUG: Self = Self(1);
    /// Normal operation.
    pub const INFO: Self = Self(2);
    /// Something unexpected that the plugin recovered from.
    pub const WARN: Self = Self(3);
    /// A failure.
    pub const ERROR: Self = Self(4);
}

/// The kind of a metric sent to [`HostServices::metric`].
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricKind(pub u8);

impl MetricKind {
    /// A monotonically increasing counter: the value is added.
    pub const COUNTER: Self = Self(0);
    /// A gauge: the value replaces the previous one.
    pub const GAUGE: Self = Self(1);
    /// A histogram: the value is one observation (seconds for latencies).
    pub const HISTOGRAM: Self = Self(2);
}

/// The kind of device an instance is assigned to.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceType(pub u8);

impl DeviceType {
    /// Run on the CPU.
    pub const CPU: Self = Self(0);
    /// Run on the GPUs named by [`InstanceAssignment::device_ids`].
    pub const GPU: Self = Self(1);
}

/// What a plugin can do beyond plain `execute` (a bit set).
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// No optional capability.
    pub const NONE: Self = Self(0);
    /// The plugin sends intermediate chunks through [`ResponseSink::send_chunk`].
    pub const STREAMING: Self = Self(1 << 0);
    /// [`PluginInstance::explain`] is implemented.
    pub const EXPLANATIONS: Self = Self(1 << 1);
    /// Requests may join a running batch. The host then calls
    /// [`PluginInstance::execute`] with the requests that arrived since its last call (possibly
    /// none), and calls again at once while any request is open: a request may stay open across
    /// calls, and indices number the instance's requests in the order given, across calls.
    /// Each call should do one scheduling step (for a decoder, one forward pass). The host keeps
    /// at most `batch_size` requests open per instance. Explanations still go through
    /// [`PluginInstance::explain`], one batch at a time.
    pub const CONTINUOUS_BATCHING: Self = Self(1 << 2);
    /// The model's instances share one copy of its weights (a
    /// [`SharedModel`](crate::sdk::SharedModel)), so another worker costs its activations,
    /// not another copy. Where a model config leaves `min_workers` and `max_workers` unset,
    /// the host starts one CPU worker per core (at most four) for such a plugin, and the
    /// busy ones divide the cores batch by batch; other plugins get one worker.
    pub const SHARED_WEIGHTS: Self = Self(1 << 3);

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the bits that are set, for logs and describe output.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Self::STREAMING, "streaming"),
            (Self::EXPLANATIONS, "explanations"),
            (Self::CONTINUOUS_BATCHING, "continuous_batching"),
            (Self::SHARED_WEIGHTS, "shared_weights"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.contains(*bit))
        .map(|(_, name)| name)
        .collect()
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// An error returned by a plugin: a code and a message for the client.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// A message for the client. Name the offending field in backticks and give the allowed and
    /// the given value, e.g. "`top_k` must be >= 1. Given: 0".
    pub message: RString,
}

impl PluginError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: RString::from(message.into()),
        }
    }
}

impl PluginError {
    /// A malformed request (HTTP 400).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::INVALID_INPUT, message)
    }
    /// An unexpected failure (HTTP 500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::INTERNAL, message)
    }
    /// Not implemented by this handler (HTTP 501).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UNSUPPORTED, message)
    }
    /// Something named by the request does not exist (HTTP 404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NOT_FOUND, message)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

impl std::error::Error for PluginError {}

/// A key and a value (headers, query parameters, metric labels).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key. Header names are lower-case.
    pub key: RString,
    /// The value.
    pub value: RString,
}

impl KeyValue {
    /// A pair from two strings.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into().into(),
            value: value.into().into(),
        }
    }
}

/// One inference request.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Request {
    /// The request id (also sent back to the client as `X-Request-Id`).
    pub id: RString,
    /// The body's media type, e.g. `application/json`; empty when the client gave none.
    pub content_type: RString,
    /// The body bytes (for multipart uploads: the `data` or `body` field).
    pub body: RVec<u8>,
    /// Request headers that matter to handlers (lower-case names).
    pub headers: RVec<KeyValue>,
    /// Query parameters, and the other fields of a multipart form.
    pub params: RVec<KeyValue>,
}

impl Request {
    /// The body as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The first query or form parameter with this name.
    pub fn param(&self, name: &str) -> Option<&str> {
        find(&self.params, name)
    }
}

fn find<'a>(pairs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str())
}

/// One response (final) or one chunk of a streamed response (intermediate).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status; 200 for success. Ignored for intermediate chunks.
    pub status: u16,
    /// The body's media type.
    pub content_type: RString,
    /// The body bytes.
    pub body: RVec<u8>,
    /// Extra response headers (ignored for intermediate chunks).
    pub headers: RVec<KeyValue>,
}

impl Response {
    /// A 200 response with this content type and body.
    pub fn ok(content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type: content_type.into().into(),
            body: RVec::from(body.into()),
            headers: RVec::new(),
        }
    }
}

/// What a plugin says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginDescription {
    /// The plugin's name, e.g. `torchscript`.
    pub name: RString,
    /// The plugin's own version.
    pub plugin_version: RString,
    /// The `cresset-plugin-api` version the plugin was built against.
    pub abi_version: RString,
    /// Optional capabilities.
    pub capabilities: Capabilities,
    /// One line for people.
    pub summary: RString,
}

/// What the host tells a plugin about the model to load.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ModelSpec {
    /// The model name.
    pub name: RString,
    /// The model version.
    pub version: RString,
    /// The folder holding the archive's files (read-only for the plugin).
    pub model_dir: RString,
    /// The `[handler]` table of `model-config.toml`, as a JSON object.
    pub handler_config_json: RString,
    /// The whole `model-config.toml`, as a JSON object.
    pub model_config_json: RString,
}

/// Where one instance runs.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct InstanceAssignment {
    /// The instance's index within its model version (0-based).
    pub index: u32,
    /// CPU or GPU.
    pub device_type: DeviceType,
    /// The GPUs this instance owns (empty for CPU). One id, or several for tensor parallelism.
    pub device_ids: RVec<i32>,
    /// How many intra-op threads this instance may use (set from the cores and the instance
    /// count; plugins that run a thread pool should respect it).
    pub intra_op_threads: u32,
}

// ---------------------------------------------------------------------------------------------
// Behaviour
// ---------------------------------------------------------------------------------------------

/// Services the host gives to plugins: logging, metrics.
///
/// Cheap to clone; safe to use from any thread.
#[sabi_trait]
pub trait HostServices: Send + Sync + Clone + 'static {
    /// Whether a record at `level` would be kept (so a plugin can skip formatting it).
    fn log_enabled(&self, level: LogLevel) -> bool;

    /// Emit a log record into the host's `tracing` subscriber. `target` is usually the Rust
    /// module path; `fields` are structured key/values.
    fn log(
        &self,
        level: LogLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RSlice<'_, KeyValue>,
    );

    /// Record a metric. `name` must match `[a-zA-Z_:][a-zA-Z0-9_:]*`; the host exports it with
    /// the model name and version as extra labels. Invalid names are dropped with a warning.
    #[sabi(last_prefix_field)]
    fn metric(
        &self,
        kind: MetricKind,
        name: RStr<'_>,
        help: RStr<'_>,
        labels: RSlice<'_, KeyValue>,
        value: f64,
    );
}

/// The host's services, as a plugin holds them.
pub type HostHandle = HostServices_TO<RArc<()>>;

/// Where an instance sends its responses.
///
/// For every request of a batch the plugin sends zero or more intermediate chunks and then
/// exactly one final response (or error). A request left without a final response when
/// `execute` returns is answered by the host with a 500.
#[sabi_trait]
pub trait ResponseSink {
    /// Send an intermediate chunk for request `index` (streaming). Returns `false` when the
    /// client has gone away: stop working on that request.
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool;

    /// Send the final response for request `index`. Later sends for that index are ignored.
    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>);

    /// Whether request `index` was cancelled (its client went away, or it timed out).
    #[sabi(last_prefix_field)]
    fn is_cancelled(&self, index: usize) -> bool;
}

/// A borrowed response sink, as `execute` receives it.
pub type SinkRef<'a> = ResponseSink_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// One loaded model version.
#[sabi_trait]
pub trait PluginModel: Send + Sync {
    /// Create one worker instance on the given device. Called once per worker, on the
    /// worker's own thread.
    fn new_instance(&self, assignment: &InstanceAssignment) -> RResult<InstanceBox, PluginError>;

    /// Model metadata for the describe API, as a JSON object (may be `{}`).
    #[sabi(last_prefix_field)]
    fn metadata_json(&self) -> RString;
}

/// A model as the host owns it.
pub type ModelBox = PluginModel_TO<'static, RBox<()>>;

/// One worker instance.
#[sabi_trait]
pub trait PluginInstance: Send {
    /// Handle a batch: send one final response per request through `sink`. (With
    /// [`Capabilities::CONTINUOUS_BATCHING`], one scheduling step: see there.)
    ///
    /// An `Err` means nothing in the batch was handled: the host answers every request that
    /// has no final response yet (every open request, with continuous batching) with this
    /// error.
    fn execute(
        &mut self,
        requests: RSlice<'_, Request>,
        sink: SinkRef<'_>,
    ) -> RResult<(), PluginError>;

    /// Explain a batch (for example feature attributions), with the same contract as
    /// `execute`. Plugins without the `EXPLANATIONS` capability return `UNSUPPORTED`.
    #[sabi(last_prefix_field)]
    fn explain(
        &mut self,
        requests: RSlice<'_, Request>,
        sink: SinkRef<'_>,
    ) -> RResult<(), PluginError>;
}

/// An instance as the host owns it.
pub type InstanceBox = PluginInstance_TO<'static, RBox<()>>;

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// Describe the plugin: name, versions, capabilities.
    pub describe: extern "C" fn() -> PluginDescription,

    /// Load one model version. Called once per registered version, on a loader thread.
    #[sabi(last_prefix_field)]
    pub load_model:
        extern "C" fn(spec: &ModelSpec, host: HostHandle) -> RResult<ModelBox, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "cresset_plugin";
    const NAME: &'static str = "cresset_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The exported symbol name that holds a library's root module header. The SDK's export macro
/// writes it as a literal (a `macro_rules!` macro cannot compute it), and a unit test checks
/// that the two agree.
#[doc(hidden)]
pub const ROOT_MODULE_SYMBOL: &str = abi_stable::library::ROOT_MODULE_LOADER_NAME;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_file_name_follows_the_platform() {
        assert_eq!(plugin_file_name("echo"), "libcresset_plugin_echo.so");
        assert_eq!(
            plugin_file_name("my-thing"),
            "libcresset_plugin_my_thing.so"
        );
    }

    #[test]
    fn unknown_error_codes_read_as_internal() {
        assert_eq!(ErrorCode(999).name(), "Internal");
        assert_eq!(ErrorCode::INVALID_INPUT.name(), "InvalidInput");
    }

    #[test]
    fn capability_names_list_the_set_bits() {
        let caps = Capabilities::STREAMING | Capabilities::EXPLANATIONS;
        assert_eq!(caps.names(), vec!["streaming", "explanations"]);
        assert!(!caps.contains(Capabilities::CONTINUOUS_BATCHING));
    }
}
