# Sourced by the Makefile's recipes: where the caches live and how cargo finds libtorch.
# Everything big (the torch venv, model assets, the cargo target dir) lives outside the clone,
# in $CRESSET_CACHE, so that fresh clones reuse it; a fresh machine fills it.
export CRESSET_CACHE="${CRESSET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cresset}"
export CRESSET_TORCH_VERSION="${CRESSET_TORCH_VERSION:-2.11.0}"
export CRESSET_VENV="${CRESSET_VENV:-$CRESSET_CACHE/venv-torch-$CRESSET_TORCH_VERSION}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CRESSET_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
# The ONNX Runtime library the ONNX models load (from the pinned onnxruntime wheel; fetch-assets.sh).
export CRESSET_ONNXRUNTIME="${CRESSET_ONNXRUNTIME:-$CRESSET_CACHE/assets/onnxruntime/libonnxruntime.so.1.31.1}"
export PATH="$CRESSET_VENV/bin:$PATH"
