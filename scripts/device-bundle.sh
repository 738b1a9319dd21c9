#!/usr/bin/env bash
# Stripped copies of what `make bench-gpu` runs, in `target-device/release/` inside the clone
# (ignored by git), small enough to carry to a GPU machine that has no Rust toolchain: the
# server, the gpt plugin, the CUDA graph library and the bench program (25 MB; the debug-info
# builds are over 100 MB each). There, in the clone, with that machine's torch (the same
# version as the build's) on the library path:
#   LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib" \
#   CARGO_TARGET_DIR="$PWD/target-device" CRESSET_PREBUILT=1 \
#   CRESSET_CUDA_GRAPH_LIB="$PWD/target-device/release/libcresset_cuda_graph.so" make bench-gpu
# (make bench-gpu tells the bench where the clone is: CRESSET_REPO_ROOT.)
set -euo pipefail
. "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
release="$CARGO_TARGET_DIR/release"
out="$root/target-device/release"
rm -rf "$out"
mkdir -p "$out"
graph="$(ls -t "$release"/build/cresset-torch-*/out/libcresset_cuda_graph.so 2>/dev/null | head -1)"
[ -n "$graph" ] || { echo "device-bundle: no libcresset_cuda_graph.so: build first (make build)" >&2; exit 1; }
for f in "$release/cresset" "$release/libcresset_plugin_gpt.so" "$release/cresset-bench-llm-gpu" "$graph"; do
  [ -f "$f" ] || { echo "device-bundle: $f is missing: build first" >&2; exit 1; }
  cp "$f" "$out/"
  strip "$out/$(basename "$f")"
done
du -sh "$out" >&2
echo "$out"
