"""`ts.torch_handler.base_handler.BaseHandler`: TorchServe's handler skeleton. `handle` runs
`preprocess`, `inference` and `postprocess` (or `explain_handle` when the request asks for an
explanation); `initialize` picks the device, loads a TorchScript file, or an eager model from
its class in `modelFile` and a state dict, and reads `index_to_name.json`."""

import abc
import importlib
import logging
import os
import time

import torch

from ..utils.util import list_classes_from_module, load_label_mapping

logger = logging.getLogger(__name__)


class BaseHandler(abc.ABC):
    """The base of TorchServe's handlers; subclass it and override the steps you need."""

    def __init__(self):
        self.model = None
        self.mapping = None
        self.device = None
        self.initialized = False
        self.context = None
        self.model_pt_path = None
        self.manifest = None
        self.map_location = None
        self.explain = False
        self.target = 0
        self.profiler_args = {}

    def initialize(self, context):
        """Load the model: the device from `gpu_id` (CUDA when available), then the
        `serializedFile` as TorchScript, or, with a `modelFile`, its one `nn.Module` class
        with the serialized state dict."""
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.map_location = "cuda"
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.map_location = "cpu"
            self.device = torch.device("cpu")
        self.manifest = context.manifest
        self.model_yaml_config = context.model_yaml_config
        model_dir = properties.get("model_dir")
        model = self.manifest.get("model", {})
        serialized_file = model.get("serializedFile")
        self.model_pt_path = os.path.join(model_dir, serialized_file) if serialized_file else None
        model_file = model.get("modelFile")
        if model_file:
            self.model = self._load_pickled_model(model_dir, model_file, self.model_pt_path)
            self.model.to(self.device)
        elif self.model_pt_path is not None:
            self.model = self._load_torchscript_model(self.model_pt_path)
        else:
            raise RuntimeError("the manifest names no serializedFile to load")
        self.model.eval()
        logger.debug("model file %s loaded", self.model_pt_path)
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def _load_torchscript_model(self, model_pt_path):
        return torch.jit.load(model_pt_path, map_location=self.device)

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        if not os.path.isfile(os.path.join(model_dir, model_file)):
            raise RuntimeError(f"the model file {model_file} is missing")
        module = importlib.import_module(model_file.split(".")[0])
        classes = list_classes_from_module(module)
        if len(classes) != 1:
            raise ValueError(f"expected one class as the model definition, found {classes}")
        model = classes[0]()
        if model_pt_path:
            state_dict = torch.load(model_pt_path, map_location=self.device, weights_only=True)
            model.load_state_dict(state_dict)
        return model

    def preprocess(self, data):
        return torch.as_tensor(data, device=self.device)

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return self.model(data.to(self.device), *args, **kwargs)

    def postprocess(self, data):
        return data.tolist()

    def handle(self, data, context):
        """The entry point: one batch of requests (a list of dicts) in, one answer per request
        out. Records `HandlerTime` in milliseconds."""
        start = time.time()
        self.context = context
        data_preprocess = self.preprocess(data)
        if not self._is_explain():
            output = self.postprocess(self.inference(data_preprocess))
        else:
            output = self.explain_handle(data_preprocess, data)
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def explain_handle(self, data_preprocess, raw_data):
        """An explanation of the first request (its `data` or `body`, and `target`) from
        `get_insights`, which a subclass provides."""
        inputs, target = None, 0
        row = raw_data[0]
        if isinstance(row, dict):
            inputs = row.get("data") or row.get("body")
            target = row.get("target") or 0
        return self.get_insights(data_preprocess, inputs, target)

    def get_insights(self, tensor_data, raw_data, target):
        raise NotImplementedError("this handler has no explanations: implement get_insights")

    def _is_explain(self):
        if self.context and self.context.get_request_header(0, "explain") == "True":
            self.explain = True
            return True
        return False

    def describe_handle(self):
        return None
