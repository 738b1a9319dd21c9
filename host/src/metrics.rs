//! Prometheus metrics, `cresset_` prefixed (see ARCHITECTURE.md for the names), plugins' own
//! included: a plugin's name without the prefix gets it.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The server's prefix, which every metric a plugin reports is under.
pub const PREFIX: &str = "cresset_";

/// A plugin's metric name under the server's prefix (kept as it is when it already is).
fn prefixed(name: &str) -> std::borrow::Cow<'_, str> {
    match name.starts_with(PREFIX) {
        true => name.into(),
        false => format!("{PREFIX}{name}").into(),
    }
}

/// The server's metrics, and the metrics plugins report.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `cresset_inference_requests_total{model,version,status}`.
    pub requests_total: IntCounterVec,
    /// `cresset_inference_latency_seconds{model,version}`: the plugin's `execute` of a batch.
    pub inference_latency: HistogramVec,
    /// `cresset_request_latency_seconds{model,version}`: a request from arrival to its answer.
    pub request_latency: HistogramVec,
    /// `cresset_queue_latency_seconds{model,version}`: from queueing to dispatch.
    pub queue_latency: HistogramVec,
    /// `cresset_batch_size{model,version}`.
    pub batch_size: HistogramVec,
    /// `cresset_model_load_seconds{model,version}`.
    pub model_load_seconds: HistogramVec,
    /// `cresset_queue_depth{model,version}` (set at scrape time).
    pub queue_depth: prometheus::IntGaugeVec,
    /// `cresset_workers{model,version,state}` (set at scrape time).
    pub workers: prometheus::IntGaugeVec,
    /// `cresset_worker_restarts_total{model,version}`: worker processes that died and were
    /// restarted (process isolation).
    pub worker_restarts: IntCounterVec,
    /// `cresset_worker_memory_bytes{model,version,worker}`: a worker process's resident memory
    /// (process isolation; set at scrape time).
    pub worker_memory: prometheus::IntGaugeVec,
    plugin: Mutex<HashMap<String, PluginMetric>>,
}

enum PluginMetric {
    Counter(CounterVec),
    Gauge(GaugeVec),
    Histogram(HistogramVec),
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &["model", "version"],
    )
    .expect("static histogram options are valid: this is a bug");
    registry
        .register(Box::new(h.clone()))
        .expect("metric names are unique: this is a bug");
    h
}

impl Metrics {
    /// A fresh registry with the server's metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "cresset_inference_requests_total",
                "Inference requests answered, by final status",
            ),
            &["model", "version", "status"],
        )
        .expect("static counter options are valid: this is a bug");
        registry
            .register(Box::new(requests_total.clone()))
            .expect("metric names are unique: this is a bug");
        let lat = LATENCY_BUCKETS.to_vec();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("static gauge options are valid: this is a bug");
            registry
                .register(Box::new(g.clone()))
                .expect("metric names are unique: this is a bug");
            g
        };
        let queue_depth = gauge(
            "cresset_queue_depth",
            "Requests waiting in a version's queue",
            &["model", "version"],
        );
        let workers = gauge(
            "cresset_workers",
            "Workers of a version by state",
            &["model", "version", "state"],
        );
        let worker_memory = gauge(
            "cresset_worker_memory_bytes",
            "Resident memory of a version's worker process",
            &["model", "version", "worker"],
        );
        let worker_restarts = IntCounterVec::new(
            Opts::new(
                "cresset_worker_restarts_total",
                "Worker processes that died and were restarted",
            ),
            &["model", "version"],
        )
        .expect("static counter options are valid: this is a bug");
        registry
            .register(Box::new(worker_restarts.clone()))
            .expect("metric names are unique: this is a bug");
        Self {
            queue_depth,
            workers,
            worker_restarts,
            worker_memory,
            inference_latency: histogram(
                &registry,
                "cresset_inference_latency_seconds",
                "Time the plugin took to execute a batch",
                lat.clone(),
            ),
            request_latency: histogram(
                &registry,
                "cresset_request_latency_seconds",
                "Time from a request's arrival to its answer",
                lat.clone(),
            ),
            queue_latency: histogram(
                &registry,
                "cresset_queue_latency_seconds",
                "Time a request waited in the queue",
                lat.clone(),
            ),
            batch_size: histogram(
                &registry,
                "cresset_batch_size",
                "Requests per execute call",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            model_load_seconds: histogram(
                &registry,
                "cresset_model_load_seconds",
                "Time to load a model version and start its workers",
                lat,
            ),
            requests_total,
            registry,
            plugin: Mutex::new(HashMap::new()),
        }
    }

    /// Count an answered inference request (its status code) and its latency.
    pub fn record_request(&self, model: &str, version: &str, status: u16, seconds: f64) {
        self.requests_total
            .with_label_values(&[model, version, &status.to_string()])
            .inc();
        self.request_latency
            .with_label_values(&[model, version])
            .observe(seconds);
    }

    /// Record a metric reported by a plugin. Returns an error message for an invalid name or
    /// a label set that differs from the first use of the name.
    pub fn plugin_metric(
        &self,
        kind: cresset_plugin_api::MetricKind,
        name: &str,
        help: &str,
        model: &str,
        version: &str,
        labels: &[(String, String)],
        value: f64,
    ) -> Result<(), String> {
        use cresset_plugin_api::MetricKind;
        let mut keys: Vec<&str> = vec!["model", "version"];
        keys.extend(labels.iter().map(|(k, _)| k.as_str()));
        let mut values: Vec<&str> = vec![model, version];
        values.extend(labels.iter().map(|(_, v)| v.as_str()));
        let help = if help.is_empty() { name } else { help };
        let full = prefixed(name);
        let name = full.as_ref();
        let mut map = self.plugin.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(name) {
            let opts = Opts::new(name, help);
            let metric = match kind {
                MetricKind::COUNTER => CounterVec::new(opts, &keys).map(PluginMetric::Counter),
                MetricKind::GAUGE => GaugeVec::new(opts, &keys).map(PluginMetric::Gauge),
                MetricKind::HISTOGRAM => HistogramVec::new(
                    HistogramOpts::from(opts).buckets(LATENCY_BUCKETS.to_vec()),
                    &keys,
                )
                .map(PluginMetric::Histogram),
                other => return Err(format!("unknown metric kind {}", other.0)),
            }
            .map_err(|e| format!("metric `{name}`: {e}"))?;
            let collector: Box<dyn prometheus::core::Collector> = match &metric {
                PluginMetric::Counter(m) => Box::new(m.clone()),
                PluginMetric::Gauge(m) => Box::new(m.clone()),
                PluginMetric::Histogram(m) => Box::new(m.clone()),
            };
            self.registry
                .register(collector)
                .map_err(|e| format!("metric `{name}`: {e}"))?;
            map.insert(name.to_owned(), metric);
        }
        let err = |e: prometheus::Error| format!("metric `{name}`: {e}");
        match (map.get(name), kind) {
            (Some(PluginMetric::Counter(m)), MetricKind::COUNTER) if value >= 0.0 => m.get_metric_with_label_values(&values).map_err(err)?.inc_by(value),
            (Some(PluginMetric::Gauge(m)), MetricKind::GAUGE) => m.get_metric_with_label_values(&values).map_err(err)?.set(value),
            (Some(PluginMetric::Histogram(m)), MetricKind::HISTOGRAM) => m.get_metric_with_label_values(&values).map_err(err)?.observe(value),
            _ => return Err(format!("metric `{name}` was first used with another kind, or a counter was given a negative value")),
        }
        Ok(())
    }

    /// Remove every series of `model`/`version` (built-in and plugin metrics), once the
    /// version is gone: an unregistered version must not leave series behind forever.
    pub fn forget(&self, model: &str, version: &str) {
        let plugin = self.plugin.lock().unwrap_or_else(|p| p.into_inner());
        for family in self.registry.gather() {
            for metric in family.get_metric() {
                let labels: HashMap<&str, &str> = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if labels.get("model") != Some(&model) || labels.get("version") != Some(&version) {
                    continue;
                }
                let removed = match family.name() {
                    "cresset_inference_requests_total" => self.requests_total.remove(&labels),
                    "cresset_inference_latency_seconds" => self.inference_latency.remove(&labels),
                    "cresset_request_latency_seconds" => self.request_latency.remove(&labels),
                    "cresset_queue_latency_seconds" => self.queue_latency.remove(&labels),
                    "cresset_batch_size" => self.batch_size.remove(&labels),
                    "cresset_model_load_seconds" => self.model_load_seconds.remove(&labels),
                    "cresset_queue_depth" => self.queue_depth.remove(&labels),
                    "cresset_workers" => self.workers.remove(&labels),
                    "cresset_worker_restarts_total" => self.worker_restarts.remove(&labels),
                    "cresset_worker_memory_bytes" => self.worker_memory.remove(&labels),
                    name => match plugin.get(name) {
                        Some(PluginMetric::Counter(m)) => m.remove(&labels),
                        Some(PluginMetric::Gauge(m)) => m.remove(&labels),
                        Some(PluginMetric::Histogram(m)) => m.remove(&labels),
                        None => Ok(()),
                    },
                };
                if let Err(e) = removed {
                    tracing::debug!(metric = family.name(), "cannot remove a series: {e}");
                }
            }
        }
    }

    /// The text exposition format: every family, or those named in `only` (TorchServe's
    /// `GET /metrics?name[]=...`).
    pub fn render(&self, only: &[String]) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        let mut families = self.registry.gather();
        if !only.is_empty() {
            families.retain(|f| only.iter().any(|n| n == f.name()));
        }
        let _ = encoder.encode_utf8(&families, &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
