#!/usr/bin/env bash
# Best effort, for `make bench` only: build llama-cpp-python (it has no wheel on the package
# index, so pip compiles llama.cpp from its sdist: about 12 minutes on 2 cores) into its own
# venv in the cache, once. Prints the venv's python on success; prints nothing on failure.
set -uo pipefail
. "$(dirname "$0")/env.sh"
version=0.3.36
venv="$CRESSET_CACHE/venv-llama-cpp-$version"
if [ ! -f "$venv/.complete" ]; then
  echo "setup-llama-cpp: building llama-cpp-python==$version (once; ~12 min)" >&2
  rm -rf "$venv"
  if python3 -m venv "$venv" \
    && "$venv/bin/pip" install --disable-pip-version-check --progress-bar off \
         "llama-cpp-python==$version" >&2; then
    touch "$venv/.complete"
  else
    echo "setup-llama-cpp: the build failed; the benchmark skips llama.cpp" >&2
    exit 0
  fi
fi
echo "$venv/bin/python"
