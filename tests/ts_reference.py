"""Run a TorchServe handler as TorchServe 0.12's Python backend runs it, with TorchServe's own
`ts` package (the TorchServe venv of scripts/setup-torchserve.sh): the reference that Cresset's
python plugin is checked against (tests/tests/python_handlers.rs).

Reads JSON on stdin: {"model_dir": an unpacked .mar, "requests": [{"content_type", "body" (or
"body_base64"), "headers", and "field": the form field, "body" by default}]}, one batch. Prints JSON: {"answers": [{"status", "headers", "body"}], "chunks":
[[chunks of request 0], ...]}. Bodies are the handler's values: strings as they are, anything
else as JSON values."""

import base64
import importlib
import json
import os
import sys

from ts.context import Context, RequestProcessor
from ts.utils.util import list_classes_from_module


class NoMetrics:
    """TorchServe passes its metrics cache; no answer depends on it."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def main():
    spec = json.load(sys.stdin)
    model_dir = spec["model_dir"]
    sys.path.insert(0, model_dir)
    with open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    yaml_config = {}
    yaml_path = os.path.join(model_dir, manifest["model"].get("configFile", "model-config.yaml"))
    if os.path.exists(yaml_path):
        import yaml

        with open(yaml_path) as f:
            yaml_config = yaml.safe_load(f)
    requests = spec["requests"]
    context = Context(
        manifest["model"]["modelName"], model_dir, manifest, len(requests), None, "0.12.0",
        metrics=NoMetrics(), model_yaml_config=yaml_config,
    )
    handler = manifest["model"]["handler"]
    if handler.endswith(".py"):
        module = importlib.import_module(handler[: -len(".py")])
    else:
        # A built-in handler, by name, as TorchServe's model loader finds it.
        module = importlib.import_module("ts.torch_handler." + handler)
    chunks = [[] for _ in requests]

    def record(ret, req_id_map, message, code, context=None):
        for i, item in enumerate(ret):
            chunks[i].append(item)

    # TorchServe writes intermediate answers to its socket; here they are recorded.
    if hasattr(module, "send_intermediate_predict_response"):
        module.send_intermediate_predict_response = record
    (handler_class,) = list_classes_from_module(module)
    service = handler_class()
    service.initialize(context)

    data, processors = [], []
    for r in requests:
        body = base64.b64decode(r["body_base64"]) if "body_base64" in r else r["body"].encode("utf-8")
        if r["content_type"] == "application/json":
            value = json.loads(body)
        elif r["content_type"].startswith("text/"):
            value = body.decode("utf-8")
        else:
            value = bytearray(body)
        data.append({r.get("field", "body"): value})
        processors.append(RequestProcessor(r["headers"]))
    context.request_ids = {i: f"r{i}" for i in range(len(requests))}
    context.request_processor = processors
    out = service.handle(data, context)
    answers = [
        {
            "status": context.get_response_status(i)[0],
            "headers": context.get_response_headers(i),
            "body": value,
        }
        for i, value in enumerate(out)
    ]
    print(json.dumps({"answers": answers, "chunks": chunks}))


if __name__ == "__main__":
    main()
