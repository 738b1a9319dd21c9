"""`ts.torch_handler.image_classifier`: TorchServe's built-in image classifier (ImageNet
preprocessing; the top 5 classes with their softmax probabilities, named by
index_to_name.json)."""

import torch
import torch.nn.functional as F

from ..utils.util import map_class_to_label
from .vision_handler import IMAGENET, VisionHandler


class ImageClassifier(VisionHandler):
    topk = 5
    image_processing = IMAGENET

    def set_max_result_classes(self, topk):
        self.topk = topk

    def get_max_result_classes(self):
        return self.topk

    def postprocess(self, data):
        probs, classes = torch.topk(F.softmax(data, dim=1), self.topk, dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())
