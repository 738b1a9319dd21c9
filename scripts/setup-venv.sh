#!/usr/bin/env bash
# Creates (once) the Python venv that supplies libtorch to the build and torch to the fixture
# scripts. Idempotent: a venv with a `.complete` marker is reused as it is.
set -euo pipefail
. "$(dirname "$0")/env.sh"

if [ -f "$CRESSET_VENV/.complete" ]; then
  exit 0
fi
echo "setup-venv: installing torch==$CRESSET_TORCH_VERSION into $CRESSET_VENV (several GB, once)" >&2
mkdir -p "$CRESSET_CACHE"
python3 -m venv "$CRESSET_VENV"
"$CRESSET_VENV/bin/pip" install --disable-pip-version-check --progress-bar off \
  "torch==$CRESSET_TORCH_VERSION" "numpy>=1.26,<3"
"$CRESSET_VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$CRESSET_TORCH_VERSION', torch.__version__"
touch "$CRESSET_VENV/.complete"
