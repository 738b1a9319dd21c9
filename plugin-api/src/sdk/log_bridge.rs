//! The plugin's `tracing` events → the host's subscriber. A `cdylib` carries its own copy of
//! `tracing-core`, so without this bridge a plugin's logs would go nowhere.

use std::sync::OnceLock;

use abi_stable::std_types::{RSlice, RStr};

use crate::{HostHandle, KeyValue, LogLevel};

thread_local! {
    /// The host of the model whose handler code runs on this thread now, so that log records
    /// carry the right model even when several models share one plugin library.
    static CURRENT_HOST: std::cell::RefCell<Option<HostHandle>> = const { std::cell::RefCell::new(None) };
}

/// Run `f` with `host` as this thread's current host (restoring the previous one after).
pub(super) fn with_host<T>(host: &HostHandle, f: impl FnOnce() -> T) -> T {
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
pub(super) fn install_log_bridge(host: &HostHandle) {
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
