"""`ts.torch_handler.object_detector`: TorchServe's built-in object detector, for models that
return a list of `{"boxes", "labels", "scores"}` per image (torchvision's detection models in
eager mode): the boxes scoring at least `threshold` (0.5), each as `{label: [x1, y1, x2, y2],
"score": s}`."""

from torchvision import transforms

from .vision_handler import VisionHandler


class ObjectDetector(VisionHandler):
    image_processing = transforms.Compose([transforms.ToTensor()])
    threshold = 0.5

    def postprocess(self, data):
        result = []
        for row in data:
            keep = row["scores"] >= self.threshold
            boxes, labels, scores = (row[k][keep].tolist() for k in ("boxes", "labels", "scores"))
            result.append([
                {(self.mapping[str(label)] if self.mapping else str(label)): box, "score": score}
                for label, box, score in zip(labels, boxes, scores)
            ])
        return result
