"""`ts.torch_handler.image_segmenter`: TorchServe's built-in image segmenter (ImageNet
preprocessing; the class of every pixel of the model's `out`)."""

from .vision_handler import IMAGENET, VisionHandler


class ImageSegmenter(VisionHandler):
    image_processing = IMAGENET

    def postprocess(self, data):
        return data["out"].argmax(1).tolist()
