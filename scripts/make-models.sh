#!/usr/bin/env bash
# Everything the server's default store and the tests need, made once and remade only when a
# script changed:
#   - real weights from the package index (scripts/fetch-assets.sh, into $CRESSET_CACHE/assets);
#   - TorchScript models and reference outputs (scripts/make_models.py);
#   - small random HuggingFace checkpoints and what transformers gives for them
#     (scripts/make_nlp_fixtures.py, with transformers installed into the venv);
#   - small random Llama checkpoints and GGUF files, and what transformers gives for them and
#     for the real SmolLM2 GGUF (scripts/make_llm_fixtures.py);
#   - k-quant blocks and the gguf package's dequantization of them (scripts/make_kquant_fixtures.py);
#   - SentencePiece models (the real Mistral one, two trained here), what the sentencepiece
#     package gives for them, and a GPT-fast-style target/draft pair (scripts/make_spm_fixtures.py);
#   - real photographs, random-weight torchvision models in TorchScript, AOTInductor and ONNX,
#     and what torchvision gives for them (scripts/make_vision_fixtures.py);
#   - a real ImageNet classifier (EfficientNet-Lite0's weights from the package index) in
#     TorchScript and ONNX, and what PyTorch gives for the photographs
#     (scripts/make_real_classifier_fixtures.py);
#   - TorchServe's text classification example model (TorchScript, AOTInductor, ONNX) and what
#     TorchServe's own text_classifier handler makes of test texts (scripts/make_text_fixtures.py);
#   - the default store's `minilm` and `smollm2` models, from the real weights.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
TRANSFORMERS_VERSION=5.23.0
# What the fixture scripts, the OpenAI-client test, the TorchServe-archive test and the
# TorchServe gRPC test (grpcio-tools compiles TorchServe's protos) need, pinned; setuptools
# as torch 2.11 requires it (<82), which grpcio-tools would otherwise move past.
PY_TEST_DEPS="transformers==$TRANSFORMERS_VERSION gguf==0.19.0 accelerate==1.15.0 openai==3.54.0 torch-model-archiver==0.12.0 sentencepiece==0.2.1 torchvision==0.26.0 pillow==13.0.0 onnx==1.23.2 efficientnet-lite-pytorch==0.1.0 tritonclient[http,grpc]==2.73.0 grpcio-tools==1.85.4 setuptools==81.0.0"

"$root/scripts/fetch-assets.sh"
minilm="$CRESSET_CACHE/assets/all-minilm-l6-v2"

stamp="$root/tests/fixtures/generated/expected.json"
if ! { [ -f "$stamp" ] && [ -f "$root/model_store/iris/model.pt" ] && [ "$stamp" -nt "$root/scripts/make_models.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_models.py" "$root"
fi

deps_stamp="$CRESSET_VENV/.test-deps"
if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$PY_TEST_DEPS" ]; then
  echo "make-models: installing $PY_TEST_DEPS into the venv" >&2
  # shellcheck disable=SC2086
  "$CRESSET_VENV/bin/pip" install --disable-pip-version-check --progress-bar off $PY_TEST_DEPS >&2
  echo "$PY_TEST_DEPS" > "$deps_stamp"
fi
nlp_stamp="$root/tests/fixtures/generated/nlp/expected.json"
if ! { [ -f "$nlp_stamp" ] && [ "$nlp_stamp" -nt "$root/scripts/make_nlp_fixtures.py" ] \
  && [ "$nlp_stamp" -nt "$root/scripts/fixture_common.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_nlp_fixtures.py" "$root" "$minilm"
fi

smollm2="$CRESSET_CACHE/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
llm_stamp="$root/tests/fixtures/generated/llm/expected.json"
if ! { [ -f "$llm_stamp" ] && [ "$llm_stamp" -nt "$root/scripts/make_llm_fixtures.py" ] \
  && [ "$llm_stamp" -nt "$root/scripts/fixture_common.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_llm_fixtures.py" "$root" "$smollm2"
fi
kquant_stamp="$root/tests/fixtures/generated/kquants/meta.json"
if ! { [ -f "$kquant_stamp" ] && [ "$kquant_stamp" -nt "$root/scripts/make_kquant_fixtures.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_kquant_fixtures.py" "$root"
fi
spm_stamp="$root/tests/fixtures/generated/spm/expected.json"
if ! { [ -f "$spm_stamp" ] && [ "$spm_stamp" -nt "$root/scripts/make_spm_fixtures.py" ] \
  && [ "$spm_stamp" -nt "$root/scripts/fixture_common.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_spm_fixtures.py" "$root" \
    "$CRESSET_CACHE/assets/mistral-tokenizers/tokenizer.model.v1"
fi
vision_stamp="$root/tests/fixtures/generated/vision/expected.json"
if ! { [ -f "$vision_stamp" ] && [ "$vision_stamp" -nt "$root/scripts/make_vision_fixtures.py" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_vision_fixtures.py" "$root" "$CRESSET_CACHE/assets/photos"
fi
real_stamp="$root/tests/fixtures/generated/effnet-lite0/expected.json"
if ! { [ -f "$real_stamp" ] && [ "$real_stamp" -nt "$root/scripts/make_real_classifier_fixtures.py" ] \
  && [ "$real_stamp" -nt "$vision_stamp" ]; }; then
  "$CRESSET_VENV/bin/python" "$root/scripts/make_real_classifier_fixtures.py" "$root" \
    "$CRESSET_CACHE/assets/effnet-lite0/efficientnet-lite0-57934424.pth"
fi
# The text fixtures' reference is TorchServe's own text_classifier handler, run in the
# TorchServe venv (scripts/setup-torchserve.sh, also the vision benchmark's baseline).
text_stamp="$root/tests/fixtures/generated/text/expected.json"
if ! { [ -f "$text_stamp" ] && [ "$text_stamp" -nt "$root/scripts/make_text_fixtures.py" ] \
  && [ "$text_stamp" -nt "$root/tests/fixtures/torchtext/corpus.json" ]; }; then
  ts_venv="$("$root/scripts/setup-torchserve.sh")"
  "$ts_venv/bin/python" "$root/scripts/make_text_fixtures.py" "$root"
fi
if ! cmp -s "$smollm2" "$root/model_store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; then
  cp "$smollm2" "$root/model_store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi

# The default store serves the real MiniLM as `minilm` (feature_extraction). Its MANIFEST.toml
# and model-config.toml are committed; the weights and tokenizer are copied in (git-ignored).
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
  if ! cmp -s "$minilm/$f" "$root/model_store/minilm/$f"; then
    cp "$minilm/$f" "$root/model_store/minilm/$f"
  fi
done
