//! The host services handed to plugins: logging into our `tracing` subscriber, and metrics.

use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RStr};
use cresset_plugin_api::{HostHandle, HostServices, KeyValue, LogLevel, MetricKind};

use crate::metrics::Metrics;

/// Services for one model version: its logs and metrics carry its name and version.
#[derive(Clone)]
pub struct PluginServices {
    model: Arc<str>,
    version: Arc<str>,
    metrics: Arc<Metrics>,
}

impl PluginServices {
    /// The handle passed to `load_model`.
    pub fn handle(model: &str, version: &str, metrics: Arc<Metrics>) -> HostHandle {
        let services = Self {
            model: model.into(),
            version: version.into(),
            metrics,
        };
        HostHandle::from_ptr(RArc::new(services), TD_Opaque)
    }
}

fn fields_text(fields: &[KeyValue]) -> String {
    fields
        .iter()
        .map(|kv| format!("{}={}", kv.key, kv.value))
        .collect::<Vec<_>>()
        .join(" ")
}

impl HostServices for PluginServices {
    fn log_enabled(&self, level: LogLevel) -> bool {
        match level {
            LogLevel::TRACE => tracing::enabled!(target: "cresset::plugin", tracing::Level::TRACE),
            LogLevel::DEBUG => tracing::enabled!(target: "cresset::plugin", tracing::Level::DEBUG),
            LogLevel::INFO => tracing::enabled!(target: "cresset::plugin", tracing::Level::INFO),
            LogLevel::WARN => tracing::enabled!(target: "cresset::plugin", tracing::Level::WARN),
            _ => tracing::enabled!(target: "cresset::plugin", tracing::Level::ERROR),
        }
    }

    fn log(
        &self,
        level: LogLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RSlice<'_, KeyValue>,
    ) {
        let (model, version, target) = (&*self.model, &*self.version, target.as_str());
        let fields = fields_text(fields.as_slice());
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "cresset::plugin", $lvl, model, version, plugin_target = target, fields = %fields, "{}", message.as_str())
            };
        }
        match level {
            LogLevel::TRACE => emit!(tracing::Level::TRACE),
            LogLevel::DEBUG => emit!(tracing::Level::DEBUG),
            LogLevel::INFO => emit!(tracing::Level::INFO),
            LogLevel::WARN => emit!(tracing::Level::WARN),
            _ => emit!(tracing::Level::ERROR),
        }
    }

    fn metric(
        &self,
        kind: MetricKind,
        name: RStr<'_>,
        help: RStr<'_>,
        labels: RSlice<'_, KeyValue>,
        value: f64,
    ) {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        if let Err(e) = self.metrics.plugin_metric(
            kind,
            name.as_str(),
            help.as_str(),
            &self.model,
            &self.version,
            &labels,
            value,
        ) {
            tracing::warn!(model = %self.model, version = %self.version, "dropped a plugin metric: {e}");
        }
    }
}
