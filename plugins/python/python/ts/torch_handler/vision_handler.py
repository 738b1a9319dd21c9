"""`ts.torch_handler.vision_handler.VisionHandler`: the base of TorchServe's image handlers.
A request's image is its `data` or `body`: bytes of an image file (JPEG, PNG, ...), base64 of
one, or a nested list of numbers (already a tensor)."""

import base64
import io
from abc import ABC

import torch
from PIL import Image
from torchvision import transforms

from .base_handler import BaseHandler

#: ImageNet's preprocessing, as TorchServe's classifier and segmenter apply it.
IMAGENET = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


class VisionHandler(BaseHandler, ABC):
    image_processing = None

    def initialize(self, context):
        super().initialize(context)
        self.initialized = True
        if not context.system_properties.get("limit_max_image_pixels", True):
            Image.MAX_IMAGE_PIXELS = None

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            if isinstance(image, (bytearray, bytes)):
                image = self.image_processing(Image.open(io.BytesIO(image)))
            else:
                image = torch.FloatTensor(image)
            images.append(image)
        return torch.stack(images).to(self.device)
