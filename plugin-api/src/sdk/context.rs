//! What handlers are given: the model version's context at load, the instance's at initialise,
//! host services, and the contexts through which a batch or a step answers.

use std::path::PathBuf;

use abi_stable::std_types::RSlice;
use serde_json::Value;

use crate::{
    DeviceType, HostHandle, InstanceAssignment, KeyValue, MetricKind, PluginError, Response,
    SinkRef,
};

/// What [`SharedModel::load`](super::SharedModel::load) gets: the model version, once, before
/// its first instance. It has no device: instances get theirs (`model_config` says which kinds
/// of device the version's instances will have).
#[derive(Debug, Clone)]
pub struct LoadContext {
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
    /// Host services (metrics).
    pub host: Host,
}

/// What an instance's `initialize` gets.
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
    /// The model version's context, as its [`SharedModel`](super::SharedModel) was loaded with.
    pub fn model_context(&self) -> LoadContext {
        LoadContext {
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            model_dir: self.model_dir.clone(),
            handler_config: self.handler_config.clone(),
            model_config: self.model_config.clone(),
            host: self.host.clone(),
        }
    }

    /// `cuda:N` for a GPU assignment, else `cpu`.
    pub fn device_name(&self) -> String {
        match self.assignment.device_ids.first() {
            Some(id) if self.assignment.device_type == DeviceType::GPU => format!("cuda:{id}"),
            _ => "cpu".to_owned(),
        }
    }
}

impl LoadContext {
    /// The context of an instance of this model on `assignment`.
    pub fn instance(&self, assignment: InstanceAssignment) -> InitContext {
        InitContext {
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            model_dir: self.model_dir.clone(),
            handler_config: self.handler_config.clone(),
            model_config: self.model_config.clone(),
            assignment,
            host: self.host.clone(),
        }
    }
}

/// Host services as handlers use them.
#[derive(Clone)]
pub struct Host {
    pub(super) handle: HostHandle,
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
    pub(super) positions: Vec<usize>,
}

impl<'s, 'a> BatchContext<'s, 'a> {
    pub(super) fn new(sink: &'s mut SinkRef<'a>, len: usize) -> Self {
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

/// What a step answers through: the sink, addressed by request index.
pub struct StepContext<'s, 'a> {
    pub(super) sink: &'s mut SinkRef<'a>,
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
