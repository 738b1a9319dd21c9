"""Drive Cresset with NVIDIA's tritonclient over the Open Inference Protocol, REST and gRPC.

Usage: triton_client.py HTTP_HOST:PORT GRPC_HOST:PORT MODEL INPUTS_JSON

Checks server liveness, readiness and metadata, the model's readiness and metadata, and runs
the model on the FP32 tensor in INPUTS_JSON (a nested list, [N, F]) four ways: HTTP with JSON
tensors, HTTP with binary tensors (the binary tensor extension), gRPC with typed contents and
gRPC with raw contents. Prints one JSON object: the output of each way, as lists.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_url, grpc_url, model, inputs_json = sys.argv[1:5]
x = np.array(json.loads(inputs_json), dtype=np.float32)

http = httpclient.InferenceServerClient(url=http_url)
grpc = grpcclient.InferenceServerClient(url=grpc_url)

for client in (http, grpc):
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), f"{model} not ready"
assert not http.is_model_ready("no_such_model")

meta = http.get_server_metadata()
assert meta["name"] == "cresset", meta
gmeta = grpc.get_server_metadata()
assert gmeta.name == "cresset", gmeta
model_meta = http.get_model_metadata(model)
assert model_meta["name"] == model, model_meta
gmodel_meta = grpc.get_model_metadata(model)
assert gmodel_meta.name == model and list(gmodel_meta.versions), gmodel_meta

answers = {}

# HTTP, JSON tensors in and out.
inp = httpclient.InferInput("input0", list(x.shape), "FP32")
inp.set_data_from_numpy(x, binary_data=False)
result = http.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("output0", binary_data=False)])
answers["http_json"] = result.as_numpy("output0").tolist()
assert result.get_response()["model_name"] == model

# HTTP, binary tensors in and out (tritonclient's default).
inp = httpclient.InferInput("input0", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = http.infer(model, [inp])
answers["http_binary"] = result.as_numpy("output0").tolist()

# gRPC, raw contents (what set_data_from_numpy sends).
ginp = grpcclient.InferInput("input0", list(x.shape), "FP32")
ginp.set_data_from_numpy(x)
gresult = grpc.infer(model, [ginp], request_id="triton-1")
answers["grpc_raw"] = gresult.as_numpy("output0").tolist()
response = gresult.get_response()
assert response.model_name == model and response.id == "triton-1", response

# gRPC, typed contents (fp32_contents), built as a raw request message.
from tritonclient.grpc import service_pb2  # noqa: E402

request = service_pb2.ModelInferRequest(model_name=model)
tensor = request.inputs.add()
tensor.name = "input0"
tensor.datatype = "FP32"
tensor.shape.extend(x.shape)
tensor.contents.fp32_contents.extend(x.flatten().tolist())
typed = grpc._client_stub.ModelInfer(request)
answers["grpc_typed"] = (
    np.frombuffer(typed.raw_output_contents[0], dtype=np.float32)
    .reshape(list(typed.outputs[0].shape))
    .tolist()
)

# A bad request is an error with the reason, over both.
try:
    request = service_pb2.ModelInferRequest(model_name=model)
    t = request.inputs.add()
    t.name, t.datatype = "input0", "FP32"
    t.shape.extend([3])
    request.raw_input_contents.append(np.zeros([2], dtype=np.float32).tobytes())
    grpc._client_stub.ModelInfer(request)
    raise SystemExit("a raw input of the wrong size was accepted")
except Exception as e:  # grpc.RpcError
    assert "INVALID_ARGUMENT" in str(e.code()) and "not the 12" in e.details(), e
try:
    grpc.infer("no_such_model", [ginp])
    raise SystemExit("an unknown model answered")
except grpcclient.InferenceServerException as e:
    assert "NOT_FOUND" in str(e.status()), e

print(json.dumps(answers))
