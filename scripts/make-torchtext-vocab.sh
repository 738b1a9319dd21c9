#!/usr/bin/env bash
# Makes the committed torchtext 0.18 vocabulary fixture again (scripts/make_torchtext_vocab.py)
# in a throwaway venv of torch 2.3.0 and torchtext 0.18.0 from the package index (about 3 GB
# with torch's CUDA libraries). Not part of `make test`, which reads the committed file.
set -euo pipefail
. "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3.11 -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check --progress-bar off \
  torch==2.3.0 torchtext==0.18.0 "numpy<2" >&2
"$venv/bin/python" "$root/scripts/make_torchtext_vocab.py" "$root"
