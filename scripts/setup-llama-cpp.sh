#!/usr/bin/env bash
# For `make bench`: build llama-cpp-python (it has no wheel on the package index, so pip
# compiles llama.cpp from its sdist: about 12 minutes on 2 cores) into its own venv in the
# cache, once, and print the venv's python. The baseline must not vanish silently: a failed
# build is an error here, and the benchmark refuses to run without it.
#
# The build is portable (AVX2/FMA/F16C, no -march=native): a native build of 0.3.36 segfaults
# at its first token on an Intel Xeon with AMX, and our machines change from day to day. No pip
# wheel cache, so that a wheel built natively elsewhere is never reused.
set -uo pipefail
. "$(dirname "$0")/env.sh"
version=0.3.36
venv="$CRESSET_CACHE/venv-llama-cpp-$version-portable"
if [ ! -f "$venv/.complete" ]; then
  echo "setup-llama-cpp: building llama-cpp-python==$version, portable (once; ~12 min)" >&2
  rm -rf "$venv"
  if python3 -m venv "$venv" \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
       "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --progress-bar off \
         "llama-cpp-python==$version" >&2; then
    touch "$venv/.complete"
  else
    echo "setup-llama-cpp: the build of llama-cpp-python failed; the llm benchmark needs it" >&2
    exit 1
  fi
fi
echo "$venv/bin/python"
