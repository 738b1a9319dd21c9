"""The bridge between Cresset's `python` plugin and a TorchServe handler: loads the handler
the way TorchServe does and runs its batches in TorchServe's request shape.

`_cresset` is the plugin's own module: `chunk(idx, body, content_type)` sends an intermediate
chunk of a request's answer (False once its client has gone), `metric(kind, name, value,
labels)` records a metric, `log(level, message)` a log record."""

import importlib
import json
import logging
import os
import sys

import _cresset
from ts.context import Context, Metrics, RequestProcessor
from ts.utils.util import PredictionException, list_classes_from_module


class _Log(logging.Handler):
    def emit(self, record):
        try:
            _cresset.log(record.levelno, self.format(record))
        except Exception:  # a log record must never fail a request
            pass


def _metric(kind, name, value, labels):
    try:
        _cresset.metric(kind, name, value, list(labels.items()))
    except Exception as e:  # a metric must never fail a request
        logging.getLogger(__name__).warning("metric %s dropped: %s", name, e)


def encode(value, content_type):
    """An answer (or chunk) as bytes and its content type, as TorchServe sends it."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), content_type or "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    return json.dumps(value).encode("utf-8"), content_type or "application/json"


def decode(content_type, body):
    """A request body as TorchServe hands it to handlers: JSON parsed, text decoded, anything
    else (and JSON or text that does not parse, as TorchServe does) a bytearray."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json" and body:
        try:
            return json.loads(body.decode("utf-8"))
        except ValueError as e:
            logging.getLogger(__name__).warning("a JSON body did not parse (%s): passed as bytes", e)
    elif kind.startswith("text/"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as e:
            logging.getLogger(__name__).warning("a text body is not UTF-8 (%s): passed as bytes", e)
    return bytearray(body)


def _failed(code, kind, message, n):
    body = json.dumps({"code": code, "type": kind, "message": message}).encode("utf-8")
    return [(code, "application/json", [], body)] * n


_runtime = None


def model_yaml_config(path, fallback_json):
    """TorchServe's `context.model_yaml_config`: the archive's `model-config.yaml`, read with
    PyYAML as TorchServe reads it; without PyYAML (or a file), the server's reading of it."""
    if path:
        try:
            import yaml
        except ImportError:
            return json.loads(fallback_json)
        with open(path) as f:
            return yaml.safe_load(f) or {}
    return json.loads(fallback_json)


def send_chunk(idx, item, context=None):
    """An intermediate chunk of request `idx`'s answer (`ts.protocol`'s streaming call)."""
    ctx = context or (_runtime and _runtime.context)
    content_type = ctx.get_response_content_type(idx) if ctx and ctx.request_processor else None
    body, content_type = encode(item, content_type)
    return _cresset.chunk(idx, body, content_type)


class Runtime:
    """One model's handler in this worker process."""

    def __init__(self, model_name, model_dir, manifest, handler, batch_size, gpu_id, yaml_config):
        global _runtime
        logging.basicConfig(level=logging.INFO, handlers=[_Log()], force=True)
        # Handler modules and model files import from the archive's folder.
        sys.path.insert(0, model_dir)
        self.context = Context(
            model_name, model_dir, manifest, batch_size, gpu_id, "0.12.0",
            metrics=Metrics(_metric), model_yaml_config=yaml_config,
        )
        module_name, _, function = handler.partition(":")
        module_name = os.path.basename(module_name)
        if module_name.endswith(".py"):
            module_name = module_name[:-3]
        if os.path.isfile(os.path.join(model_dir, module_name + ".py")):
            module = importlib.import_module(module_name)
        else:
            # One of TorchServe's built-in handlers, by its name (`image_classifier`, ...).
            module = importlib.import_module("ts.torch_handler." + module_name)
        if function:
            # A module-level function: TorchServe calls it once with no data to initialise.
            self._entry = getattr(module, function)
            self._entry(None, self.context)
        else:
            classes = list_classes_from_module(module)
            if len(classes) != 1:
                names = [c.__name__ for c in classes]
                raise ValueError(
                    f"{module_name}.py must define exactly one handler class (it defines {names}); "
                    f"or name a function: `{module_name}:function`"
                )
            service = classes[0]()
            service.initialize(self.context)
            self._entry = service.handle
        _runtime = self

    def run(self, requests, explain):
        """Run one batch: `requests` as (id, content_type, body, headers, params) tuples;
        returns one (status, content_type, headers, body) per request."""
        ctx = self.context
        batch, ids, processors = [], {}, []
        try:
            for i, (rid, content_type, body, headers, params) in enumerate(requests):
                header = dict(headers)
                if explain:
                    header["explain"] = "True"
                ids[i] = rid
                processors.append(RequestProcessor(header))
                # The query parameters and other form fields, as TorchServe passes them (but
                # the server's own), and the body under its form field's name.
                row = {k: v for k, v in params if not k.startswith("cresset-")}
                field = dict(params).get("cresset-body-field", "body")
                row[field] = decode(content_type, body)
                batch.append(row)
            ctx.request_ids, ctx.request_processor = ids, processors
            ctx.metrics.request_ids = ids
            results = self._entry(batch, ctx)
        except PredictionException as e:
            return _failed(int(e.error_code), "PredictionException", e.message, len(requests))
        except Exception as e:
            # As TorchServe answers: 507 when out of memory, else 503; the traceback is logged.
            logging.getLogger(__name__).exception("the handler failed")
            out_of_memory = isinstance(e, MemoryError) or "out of memory" in str(e)
            code = 507 if out_of_memory else 503
            message = f"Prediction failed: {type(e).__name__}: {e}"
            return _failed(code, "InternalServerException", message, len(requests))
        if not isinstance(results, (list, tuple)) or len(results) != len(requests):
            got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
            message = f"the handler answered {got} for a batch of {len(requests)} requests: it must return one answer per request"
            logging.getLogger(__name__).error(message)
            return _failed(503, "InternalServerException", message, len(requests))
        answers = []
        for i, value in enumerate(results):
            body, content_type = encode(value, ctx.get_response_content_type(i))
            status, _phrase = ctx.get_response_status(i)
            headers = [(str(k), str(v)) for k, v in ctx.get_response_headers(i).items() if str(k).lower() != "content-type"]
            answers.append((int(status), content_type, headers, body))
        return answers
