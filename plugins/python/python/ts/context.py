"""`ts.context.Context`: what a handler learns about its model and the current batch."""

class RequestProcessor:
    """One request of a batch: its headers, and the status and headers of its answer."""

    def __init__(self, request_header):
        self._status_code = 200
        self._reason_phrase = None
        self._response_header = {}
        self._request_header = request_header

    def get_request_property(self, key):
        return self._request_header.get(key)

    def report_status(self, code, reason_phrase=None):
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self):
        return self._status_code

    def get_response_status_phrase(self):
        return self._reason_phrase

    def add_response_property(self, key, value):
        self._response_header[key] = value

    def get_response_headers(self):
        return self._response_header

    def get_response_header(self, key):
        return self._response_header.get(key)

    def get_request_properties(self):
        return self._request_header


class Metrics:
    """`context.metrics`: TorchServe's metric calls, recorded as Prometheus series of the
    model (`ts_<name>` with a `unit` label; counters as counters, times and sizes as gauges)."""

    def __init__(self, sink):
        self._sink = sink
        self.request_ids = None

    def _record(self, kind, name, value, unit, dimensions):
        # Dimensions are not kept: a series' label names are fixed once it exists.
        self._sink(kind, name, float(value), {"unit": unit or ""})

    def add_metric(self, name, value, unit="", idx=None, dimensions=None, metric_type=None):
        kind = "counter" if str(metric_type).lower().endswith("counter") else "gauge"
        self._record(kind, name, value, unit, dimensions)

    def add_counter(self, name, value, idx=None, dimensions=None):
        self._record("counter", name, value, "count", dimensions)

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=None):
        self._record("gauge", name, value, unit, dimensions)

    def add_size(self, name, value, idx=None, unit="MB", dimensions=None, metric_type=None):
        self._record("gauge", name, value, unit, dimensions)

    def add_percent(self, name, value, idx=None, dimensions=None, metric_type=None):
        self._record("gauge", name, value, "percent", dimensions)

    def add_error(self, name, value, dimensions=None):
        self._record("counter", name, 1, "error", dimensions)

    def add_metric_to_cache(self, name, unit="", dimension_names=None, metric_type=None):
        return _CachedMetric(self, name, unit, metric_type)

    def get_metric(self, name, metric_type=None):
        return _CachedMetric(self, name, "", metric_type)


class _CachedMetric:
    def __init__(self, metrics, name, unit, metric_type):
        self._metrics, self._name, self._unit, self._type = metrics, name, unit, metric_type

    def add_or_update(self, value, dimension_values=None, request_id=None):
        self._metrics.add_metric(self._name, value, self._unit, metric_type=self._type)

    def update(self, value, request_id=None, dimensions=None):
        self.add_or_update(value)


class Context:
    """Model metadata (manifest, system properties, the model's YAML config) and the current
    batch's requests (ids, headers) and answers (status, headers, content types)."""

    def __init__(self, model_name, model_dir, manifest, batch_size, gpu, mms_version,
                 limit_max_image_pixels=True, metrics=None, model_yaml_config=None):
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids = None
        self.request_processor = None
        self._metrics = metrics
        self._limit_max_image_pixels = limit_max_image_pixels
        self.model_yaml_config = model_yaml_config if model_yaml_config is not None else {}
        self.stopping_criteria = None
        self.cl_socket = None

    @property
    def system_properties(self):
        return self._system_properties

    @property
    def metrics(self):
        return self._metrics

    def get_request_id(self, idx=0):
        return self.request_ids.get(idx) if self.request_ids else None

    def get_request_header(self, idx, key):
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx):
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx, value):
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx):
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx):
        processor = self.request_processor[idx]
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_status(self, code=200, phrase="", idx=0):
        if self.request_processor is not None and self.request_processor[idx] is not None:
            self.request_processor[idx].report_status(code, reason_phrase=phrase)

    def set_all_response_status(self, code=200, phrase=""):
        for idx, _ in enumerate(self.request_processor or []):
            self.set_response_status(code, phrase, idx)

    def get_response_headers(self, idx):
        return self.request_processor[idx].get_response_headers()

    def set_response_header(self, idx, key, value):
        self.request_processor[idx].add_response_property(key, value)

    def get_sequence_id(self, idx):
        return self.get_request_header(idx, "ts_request_sequence_id")

    def __eq__(self, other):
        return isinstance(other, Context) and self.__dict__ == other.__dict__
