"""Drive Cresset over TorchServe's own gRPC APIs with stubs compiled from TorchServe's own
definitions: `inference.proto`, `management.proto` (and the `google/rpc/status.proto` they use)
as TorchServe 0.12.0 ships them inside its frontend (`ts/frontend/model-server.jar`), compiled
here by grpcio-tools, as TorchServe's own example client (ts_scripts/torchserve_grpc_client.py)
is meant to be used.

Usage: torchserve_grpc_client.py JAR INFERENCE_HOST:PORT MANAGEMENT_HOST:PORT MAR_URL [KEY_FILE]

With the model of MAR_URL (the test plugin `fixture_panicky`, which answers "ok", streams
"stream:N" as N chunks and panics on "panic", which fails that request alone), it registers
the model, lists, describes and scales it, predicts, streams, runs a bidirectional stream of
three requests, sets the default version and unregisters it; every answer is checked here,
and a JSON object of what was seen is printed for the Rust test. With KEY_FILE (the server's
keys), calls without a key or with the other API's key are first checked to be refused, then
every call carries its API's key as `authorization: Bearer` metadata.
"""

import json
import pathlib
import sys
import tempfile
import time
import zipfile

import grpc
from grpc_tools import protoc

jar, inference_addr, management_addr, mar_url = sys.argv[1:5]
keys = json.loads(pathlib.Path(sys.argv[5]).read_text()) if len(sys.argv) > 5 else None
scratch = tempfile.TemporaryDirectory()
out = pathlib.Path(scratch.name)
with zipfile.ZipFile(jar) as z:
    for name in ["proto/inference.proto", "proto/management.proto", "google/rpc/status.proto"]:
        target = out / "src" / name.removeprefix("proto/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(name))
well_known = pathlib.Path(protoc.__file__).parent / "_proto"
for proto in ["inference.proto", "management.proto", "google/rpc/status.proto"]:
    code = protoc.main(
        [
            "protoc",
            f"-I{out / 'src'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
    )
    assert code == 0, f"protoc {proto}: {code}"
sys.path.insert(0, str(out))
import inference_pb2  # noqa: E402
import inference_pb2_grpc  # noqa: E402
import management_pb2  # noqa: E402
import management_pb2_grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402



class Keyed:
    """A stub whose calls carry `key` as `authorization: Bearer` metadata."""

    def __init__(self, stub, key):
        self.stub, self.key = stub, key

    def __getattr__(self, name):
        call = getattr(self.stub, name)
        if self.key is None:
            return call
        return lambda *a, **kw: call(*a, metadata=[("authorization", f"Bearer {self.key}")], **kw)


raw_inference = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(inference_addr))
raw_management = management_pb2_grpc.ManagementAPIsServiceStub(
    grpc.insecure_channel(management_addr)
)
seen = {}
if keys:
    # Without a key, or with the other API's, calls are refused before anything runs.
    for call, request, wrong in [
        (raw_inference.Predictions, inference_pb2.PredictionsRequest(model_name="x"), "management"),
        (raw_management.ListModels, management_pb2.ListModelsRequest(), "inference"),
    ]:
        for metadata in ([], [("authorization", f"Bearer {keys[wrong]}")]):
            try:
                call(request, metadata=metadata)
                raise AssertionError(f"{call} answered with {metadata}")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    # The key is checked before the message is read: a call past the server's message cap
    # (1 MiB in the test) without a key is refused as unauthenticated, not as too large.
    try:
        raw_inference.Predictions(
            inference_pb2.PredictionsRequest(model_name="x", input={"data": b"x" * (2 << 20)})
        )
        raise AssertionError("a 2 MiB call without a key answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    seen["unauthenticated"] = True
inference = Keyed(raw_inference, keys and keys["inference"])
management = Keyed(raw_management, keys and keys["management"])

# Ping needs no key, as GET /ping does not.
health = json.loads(raw_inference.Ping(empty_pb2.Empty()).health)
assert health["status"] == "Healthy", health
seen["ping"] = health

# A change answers its status as text, a description or list as JSON, as TorchServe's does.
reply = management.RegisterModel(
    management_pb2.RegisterModelRequest(url=mar_url, initial_workers=1, synchronous=True)
)
seen["register"] = reply.msg
listed = json.loads(management.ListModels(management_pb2.ListModelsRequest(limit=10)).msg)
assert [m["modelName"] for m in listed["models"]] == ["faulty"], listed
described = json.loads(
    management.DescribeModel(management_pb2.DescribeModelRequest(model_name="faulty")).msg
)
assert described[0]["modelName"] == "faulty" and described[0]["minWorkers"] == 1, described
seen["scale"] = management.ScaleWorker(
    management_pb2.ScaleWorkerRequest(model_name="faulty", min_worker=2, synchronous=True)
).msg
described = json.loads(
    management.DescribeModel(management_pb2.DescribeModelRequest(model_name="faulty")).msg
)
assert described[0]["minWorkers"] == 2 and len(described[0]["workers"]) == 2, described

# Predictions: `data` is the body, as a form's `data` field.
answer = inference.Predictions(
    inference_pb2.PredictionsRequest(model_name="faulty", input={"data": b"x"})
)
assert answer.prediction == b"ok", answer
answer = inference.Predictions(
    inference_pb2.PredictionsRequest(
        model_name="faulty", model_version="1.0", input={"body": b"x"}
    )
)
assert answer.prediction == b"ok", answer
chunks = [
    r.prediction
    for r in inference.StreamPredictions(
        inference_pb2.PredictionsRequest(model_name="faulty", input={"data": b"stream:3"})
    )
]
assert chunks == [b"chunk-0\n", b"chunk-1\n", b"chunk-2\n", b"done"], chunks
seen["stream"] = [c.decode() for c in chunks]


def requests():
    yield inference_pb2.PredictionsRequest(
        model_name="faulty", input={"data": b"stream:2"}, sequence_id="seq-a"
    )
    yield inference_pb2.PredictionsRequest(
        model_name="nobody", input={"data": b"x"}, sequence_id="seq-b"
    )
    yield inference_pb2.PredictionsRequest(
        model_name="faulty", input={"data": b"panic"}, sequence_id="seq-c"
    )
    yield inference_pb2.PredictionsRequest(
        model_name="faulty", input={"data": b"x"}, sequence_id="seq-d"
    )


bidi = []
for r in inference.StreamPredictions2(requests()):
    bidi.append(
        {
            "sequence_id": r.sequence_id,
            "prediction": r.prediction.decode(),
            "code": r.status.code if r.HasField("status") else 0,
        }
    )
seen["bidi"] = bidi
assert [b["sequence_id"] for b in bidi] == [
    "seq-a", "seq-a", "seq-a", "seq-b", "seq-c", "seq-d"
], bidi
assert [b["prediction"] for b in bidi] == ["chunk-0\n", "chunk-1\n", "done", "", "", "ok"], bidi
assert bidi[3]["code"] == grpc.StatusCode.NOT_FOUND.value[0], bidi
assert bidi[4]["code"] == grpc.StatusCode.INTERNAL.value[0], bidi

# A stream whose client goes away while its answer is being made gives its in-flight permit
# back at once (the server allows one request in flight): the next call is taken (and waits for
# the worker), not refused with RESOURCE_EXHAUSTED for the seconds the first one had left.
call = inference.StreamPredictions(
    inference_pb2.PredictionsRequest(model_name="faulty", input={"data": b"sleep:3000"})
)
time.sleep(0.3)
call.cancel()
started = time.monotonic()
for attempt in range(50):
    try:
        answer = inference.Predictions(
            inference_pb2.PredictionsRequest(model_name="faulty", input={"data": b"x"})
        )
        break
    except grpc.RpcError as e:
        # The cancel reaches the server a moment later.
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        time.sleep(0.02)
else:
    raise AssertionError("a cancelled stream kept its permit")
assert answer.prediction == b"ok", answer
seen["cancelled_stream_released_after"] = attempt

# Errors carry gRPC codes.
for request, code in [
    (inference_pb2.PredictionsRequest(model_name="nobody", input={"data": b"x"}),
     grpc.StatusCode.NOT_FOUND),
    (inference_pb2.PredictionsRequest(model_name="faulty", input={"data": b"panic"}),
     grpc.StatusCode.INTERNAL),
]:
    try:
        inference.Predictions(request)
        raise AssertionError(f"{request} answered")
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        seen.setdefault("errors", []).append([e.code().name, e.details()])

seen["set_default"] = management.SetDefault(
    management_pb2.SetDefaultRequest(model_name="faulty", model_version="1.0")
).msg
seen["unregister"] = management.UnregisterModel(
    management_pb2.UnregisterModelRequest(model_name="faulty", model_version="1.0")
).msg
try:
    inference.Predictions(inference_pb2.PredictionsRequest(model_name="faulty", input={"data": b"x"}))
    raise AssertionError("an unregistered model answered")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
print(json.dumps(seen))
