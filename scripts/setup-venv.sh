#!/usr/bin/env bash
# Creates (once) the Python venv that supplies libtorch to the build and torch to the fixture
# scripts. Idempotent: a venv with a `.complete` marker is reused as it is.
set -euo pipefail
. "$(dirname "$0")/env.sh"

# The CUDA compiler-runtime headers (crt/*.h) that the wheels' cuda_runtime_api.h includes
# but nvidia-cuda-runtime does not ship: the build compiles the CUDA graph library against
# them (plugins/torch/build.rs). Headers only; the CUDA 13.0 series of torch's own runtime.
CUDA_CRT="nvidia-cuda-crt==13.0.88"
crt_stamp="$CRESSET_VENV/.cuda-crt-13.0.88"
install_crt() {
  if [ ! -f "$crt_stamp" ]; then
    "$CRESSET_VENV/bin/pip" install --disable-pip-version-check --progress-bar off --no-deps "$CUDA_CRT" >&2
    touch "$crt_stamp"
  fi
}

if [ -f "$CRESSET_VENV/.complete" ]; then
  install_crt
  exit 0
fi
echo "setup-venv: installing torch==$CRESSET_TORCH_VERSION into $CRESSET_VENV (several GB, once)" >&2
mkdir -p "$CRESSET_CACHE"
python3 -m venv "$CRESSET_VENV"
"$CRESSET_VENV/bin/pip" install --disable-pip-version-check --progress-bar off \
  "torch==$CRESSET_TORCH_VERSION" "numpy>=1.26,<3"
"$CRESSET_VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$CRESSET_TORCH_VERSION', torch.__version__"
install_crt
touch "$CRESSET_VENV/.complete"
