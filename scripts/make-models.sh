#!/usr/bin/env bash
# Generate the TorchScript models and reference outputs when the script changed or they are
# missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
stamp="$root/tests/fixtures/generated/expected.json"
if [ -f "$stamp" ] && [ -f "$root/model_store/iris/model.pt" ] && [ "$stamp" -nt "$root/scripts/make_models.py" ]; then
  exit 0
fi
"$CRESSET_VENV/bin/python" "$root/scripts/make_models.py" "$root"
