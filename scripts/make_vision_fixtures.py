"""Vision fixtures: real photographs in several formats and orientations, random-weight
torchvision models exported to TorchScript, and what torchvision gives for them.

Writes tests/fixtures/generated/vision/:
  photos/            the photographs: PNG and JPEG as shipped, a JPEG and a portrait PNG made
                     from them, a grayscale PNG, WebP, BMP and GIF copies of the cat
  resnet18/          model.pt (resnet18, weights=None, seed 0), index_to_name.json
  segmenter/         model.pt (deeplabv3_mobilenet_v3_large, weights=None, 21 classes)
  detector/          model.pt: a scripted detector in torchvision's detectors' shape (a list
                     of images in, boxes/labels/scores out), index_to_name.json; its detections
                     for three photos, batched, in preprocessed.safetensors
  ssdlite/           model.pt: torchvision's SSDlite (MobileNetV3, weights=None), scripted; its
                     detections for the same three photos, batched
  fasterrcnn/        model.pt: torchvision's Faster R-CNN (MobileNetV3 FPN 320, weights=None),
                     scripted; likewise
  ssdlite_export/    model.onnx, model.pt2: SSDlite with three classes (weights=None) exported
                     per image ([3, H, W] in; boxes, labels, scores out) to ONNX and as an
                     AOTInductor package; its detections for the three photos, one by one
  preprocessed.safetensors   per photo: torchvision's preprocessed tensor (Resize(256),
                     CenterCrop(224), ToTensor, Normalize, as TorchServe's handlers compute it),
                     and the segmenter's class, probability and lead over the runner-up
                     per pixel
  expected.json      per photo: the tensor's name, resnet18's logits and top-5 classes, the
                     margin between its 5th and 6th logits; the segmenter's class counts

Usage: make_vision_fixtures.py REPO_ROOT PHOTO_DIR
"""

import json
import pathlib
import sys

from typing import Dict, List, Tuple

import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

root = pathlib.Path(sys.argv[1])
photo_src = pathlib.Path(sys.argv[2])
out = root / "tests/fixtures/generated/vision"
photos = out / "photos"
photos.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# The photographs: as shipped, and re-encoded so that every format and orientation is covered.
shipped = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"]
for name in shipped:
    (photos / name).write_bytes((photo_src / name).read_bytes())
cat = Image.open(photo_src / "chelsea.png").convert("RGB")
cat.save(photos / "chelsea.jpg", quality=90)
cat.save(photos / "chelsea.webp", lossless=True)
cat.save(photos / "chelsea.bmp")
cat.convert("P", palette=Image.Palette.ADAPTIVE).save(photos / "chelsea.gif")
Image.open(photo_src / "coffee.png").convert("RGB").crop((100, 0, 380, 400)).save(
    photos / "coffee_portrait.png"
)
Image.open(photo_src / "camera.png").save(photos / "camera_gray.png")
names = sorted(p.name for p in photos.iterdir())

preprocess = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)
tensors = {}
for name in names:
    image = Image.open(photos / name).convert("RGB")
    tensors[name] = preprocess(image).contiguous()



def calibrated(model):
    """Random weights with batch-norm statistics measured on the photos: without this a
    random network answers nearly the same for every image (the segmenter, one class for
    every pixel), and a test could not tell images apart."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        model(torch.stack([tensors[n] for n in names]))
    return model.eval()


classifier = calibrated(torchvision.models.resnet18(weights=None))
(out / "resnet18").mkdir(exist_ok=True)
torch.jit.script(classifier).save(str(out / "resnet18/model.pt"))
labels = {str(i): f"class_{i}" for i in range(1000)}
labels["281"] = ["n02123045", "tabby"]  # TorchServe's two-item form
(out / "resnet18/index_to_name.json").write_text(json.dumps(labels))

segmenter = calibrated(
    torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False
    )
)
(out / "segmenter").mkdir(exist_ok=True)
torch.jit.script(segmenter).save(str(out / "segmenter/model.pt"))

# A detector in the shape TorchServe's object_detector serves (a scripted module that takes a
# list of images scaled to [0, 1] and answers (losses, [{"boxes", "labels", "scores"}]), as
# scripted torchvision detectors do). torchvision's own detectors call torchvision's C++ ops
# (nms, roi_align), which Cresset's process does not have, so this one is plain TorchScript:
# two boxes per image from its size, scored by its channel means.
class Detector(torch.nn.Module):
    def forward(
        self, images: List[torch.Tensor]
    ) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        out: List[Dict[str, torch.Tensor]] = []
        for image in images:
            h, w = float(image.shape[1]), float(image.shape[2])
            means = image.mean(dim=(1, 2))
            boxes = torch.tensor(
                [[0.0, 0.0, w, h], [0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h]]
            )
            out.append(
                {
                    "boxes": boxes + means[0],
                    "labels": torch.tensor([1, 2]),
                    "scores": torch.stack([means.max(), means.min()]),
                }
            )
        losses: Dict[str, torch.Tensor] = {}
        return losses, out


(out / "detector").mkdir(exist_ok=True)
scripted_detector = torch.jit.script(Detector())
scripted_detector.save(str(out / "detector/model.pt"))
(out / "detector/index_to_name.json").write_text(json.dumps({"1": "cat", "2": "dog"}))
detected = ["chelsea.jpg", "rocket.jpg", "coffee_portrait.png"]
with torch.inference_mode():
    images = [
        transforms.functional.to_tensor(Image.open(photos / n).convert("RGB")) for n in detected
    ]
    _, results = scripted_detector(images)
for n, r in zip(detected, results):
    tensors[f"detect_boxes:{n}"] = r["boxes"].clone()
    tensors[f"detect_labels:{n}"] = r["labels"].clone()
    tensors[f"detect_scores:{n}"] = r["scores"].clone()

def calibrated_detector(model):
    """A torchvision detector with its batch-norm statistics measured on the photographs (so
    that its random-weight answers depend on the image), in eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        batch, _ = model.transform(
            [transforms.functional.to_tensor(Image.open(photos / n).convert("RGB")) for n in names]
        )
        model.backbone(batch.tensors)
    return model.eval()


def torchvision_detector(model, folder, prefix):
    """A torchvision detector with random weights, calibrated, scripted into `folder`; its
    detections for the `detected` photos, in one batch, into the tensors as
    `{prefix}_boxes:NAME` and so on."""
    model = calibrated_detector(model)
    (out / folder).mkdir(exist_ok=True)
    scripted = torch.jit.script(model)
    scripted.save(str(out / folder / "model.pt"))
    with torch.inference_mode():
        _, results = scripted(images)
    for n, r in zip(detected, results):
        tensors[f"{prefix}_boxes:{n}"] = r["boxes"].clone()
        tensors[f"{prefix}_labels:{n}"] = r["labels"].clone()
        tensors[f"{prefix}_scores:{n}"] = r["scores"].clone()


# torchvision's own detectors call its C++ operators, which Cresset registers itself: SSDlite
# (`nms`) and Faster R-CNN (`nms` and `roi_align`). No score floor (a random model's scores are
# about 1/91).
torchvision_detector(
    torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, score_thresh=0.0, detections_per_img=50
    ),
    "ssdlite",
    "ssd",
)
torchvision_detector(
    torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=50
    ),
    "fasterrcnn",
    "frcnn",
)


# SSDlite exported per image, as ONNX and as an AOTInductor package: one image [3, H, W] in
# (any size from 32 to 4096), (boxes, labels, scores) out. Three classes (background, cat, dog)
# keep inductor's compile short: its code unrolls the per-class score filtering (91 classes
# take six minutes to compile on two cores, three take one). Its detections for the `detected`
# photos, one by one in eager PyTorch, go into the tensors as `ssdx_boxes:NAME` and so on.
class PerImage(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        result = self.model([image])[0]
        return result["boxes"], result["labels"], result["scores"]


def export_nms(boxes, scores, idxs, threshold):
    """torchvision's batched_nms without its size-dependent branches (`numel() == 0`,
    `numel() > 4000`), which torch.export cannot trace: the coordinate trick, on the
    torchvision::nms operator that Cresset registers."""
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (top + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, threshold)


ssdx = PerImage(
    calibrated_detector(
        torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3, score_thresh=0.0,
            detections_per_img=20,
        )
    )
).eval()
(out / "ssdlite_export").mkdir(exist_ok=True)
(out / "ssdlite_export/index_to_name.json").write_text(json.dumps({"1": "cat", "2": "dog"}))
example = images[0]
torch.onnx.export(
    ssdx,
    (example,),
    str(out / "ssdlite_export/model.onnx"),
    dynamo=False,
    opset_version=17,
    input_names=["images"],
    output_names=["boxes", "labels", "scores"],
    dynamic_axes={
        "images": {1: "height", 2: "width"},
        **{o: {0: "detections"} for o in ["boxes", "labels", "scores"]},
    },
)
import torchvision.ops.boxes as box_ops

traced_nms = box_ops.batched_nms
box_ops.batched_nms = export_nms
try:
    side = [torch.export.Dim(d, min=32, max=4096) for d in ("height", "width")]
    with torch.no_grad():
        program = torch.export.export(ssdx, (example,), dynamic_shapes=({1: side[0], 2: side[1]},))
    torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(out / "ssdlite_export/model.pt2"),
        inductor_configs={"cpp.dynamic_threads": True},
    )
finally:
    box_ops.batched_nms = traced_nms
with torch.inference_mode():
    for n, image in zip(detected, images):
        boxes, labels, scores = ssdx(image)
        tensors[f"ssdx_boxes:{n}"] = boxes.clone()
        tensors[f"ssdx_labels:{n}"] = labels.clone()
        tensors[f"ssdx_scores:{n}"] = scores.clone()

expected = {"photos": {}, "detected": detected}
with torch.inference_mode():
    for name in names:
        x = tensors[name].unsqueeze(0)
        logits = classifier(x)[0]
        probs = logits.softmax(-1)
        order = logits.argsort(descending=True)
        seg = segmenter(x)["out"][0]
        seg_probs = seg.softmax(0)
        values, classes = seg_probs.max(0)
        top2 = seg_probs.topk(2, dim=0).values
        tensors[f"segment_classes:{name}"] = classes.to(torch.uint8).contiguous()
        tensors[f"segment_probs:{name}"] = values.contiguous()
        tensors[f"segment_margins:{name}"] = (top2[0] - top2[1]).contiguous()
        expected["photos"][name] = {
            "size": list(Image.open(photos / name).size),
            "logits": logits.tolist(),
            "top5": order[:5].tolist(),
            "top5_probs": probs[order[:5]].tolist(),
            "margin_5_6": float(logits[order[4]] - logits[order[5]]),
            "segment_class_counts": torch.bincount(classes.flatten(), minlength=21).tolist(),
            "segment_prob_mean": float(values.mean()),
        }
save_file(tensors, str(out / "preprocessed.safetensors"))

# The classifier and the segmenter in the other formats the vision handlers load: ONNX (the
# TorchScript-based exporter, opset 17) and an AOTInductor package (torch.export with a dynamic
# batch, compiled by inductor for this machine's CPU), each with a dynamic batch dimension.
def export_formats(model, folder, output_names):
    example = torch.stack([tensors[n] for n in names[:2]])
    torch.onnx.export(
        model,
        (example,),
        str(out / folder / "model.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=output_names,
        dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in output_names}},
    )
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(out / folder / "model.pt2"),
        inductor_configs={"cpp.dynamic_threads": True},
    )


export_formats(classifier, "resnet18", ["logits"])
export_formats(segmenter, "segmenter", ["out"])

expected["versions"] = {
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "pillow": Image.__version__,
}
(out / "expected.json").write_text(json.dumps(expected, indent=1))
print(f"make_vision_fixtures: wrote {out}")
