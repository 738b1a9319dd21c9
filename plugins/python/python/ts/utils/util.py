"""`ts.utils.util`: the helpers TorchServe handlers commonly import."""

import importlib
import inspect
import itertools
import json
import logging
import os

logger = logging.getLogger(__name__)


class PredictionException(Exception):
    """Raised by a handler to answer its whole batch with `error_code` and `message`."""

    def __init__(self, message, error_code=500):
        self.message = message
        self.error_code = error_code
        super().__init__(message)

    def __str__(self):
        return f"{self.message} : {self.error_code}"


def list_classes_from_module(module, parent_class=None):
    """The classes defined in `module` (not imported into it), subclasses of `parent_class`
    if given, in source order."""
    classes = [
        cls
        for _, cls in inspect.getmembers(module, lambda m: inspect.isclass(m) and m.__module__ == module.__name__)
    ]
    if parent_class is not None:
        classes = [c for c in classes if issubclass(c, parent_class)]
    return classes


def load_label_mapping(mapping_file_path):
    """`index_to_name.json` as a dict of str -> label (or of str -> [id, label], ImageNet's
    shape, read as the label), or None when the file is missing."""
    if not os.path.isfile(mapping_file_path):
        logger.warning("%s is missing: inference output will not include class names", mapping_file_path)
        return None
    with open(mapping_file_path) as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict):
        raise Exception('index -> name JSON mapping should be in "class": "label" format.')
    # An older layout: the names as a list under "object_type_names".
    if isinstance(mapping.get("object_type_names"), list):
        return {str(k): v for k, v in enumerate(mapping["object_type_names"])}
    new_mapping = {}
    for key, value in mapping.items():
        new_value = value
        if isinstance(value, list):
            new_value = value[-1]
        if not isinstance(new_value, str):
            raise Exception("labels in index -> name mapping must be either str or List[str]")
        new_mapping[key] = new_value
    return new_mapping


def map_class_to_label(probs, mapping=None, lbl_classes=None):
    """`[{label: prob, ...}, ...]` for each row of `probs` (a list of lists), labels from
    `mapping` (or the class numbers as strings), classes `lbl_classes` (or 0..n)."""
    if not (isinstance(probs, list) and all(isinstance(pp, list) for pp in probs)):
        raise Exception("Convert classes to list before doing mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise Exception("Mapping must be a dict")
    if lbl_classes is None:
        lbl_classes = itertools.repeat(range(len(probs[0])), len(probs))
    return [
        {(mapping[str(lbl_class)] if mapping is not None else str(lbl_class)): prob for lbl_class, prob in zip(*row)}
        for row in zip(lbl_classes, probs)
    ]


def get_yaml_config(yaml_file_path):
    """A YAML file as a dict (needs PyYAML, as TorchServe does)."""
    import yaml

    with open(yaml_file_path) as f:
        return yaml.safe_load(f)


def check_valid_pt2_backend(backend):
    import torch._dynamo

    return backend in torch._dynamo.list_backends()


def get_module(name):
    return importlib.import_module(name)
