# Two commands do everything on a fresh machine:
#   make serve   build, fetch and generate what is needed, and run the server on model_store/
#   make test    the same set-up, then the whole test suite
# Caches (the torch venv, the cargo target dir) live outside the clone: see scripts/env.sh.

SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build models serve test dist bench bench-gpu clean-cache

setup:
	@scripts/setup-venv.sh

# The `reverse` build of the echo plugin is a second build of the same plugin, used by the
# tests; it is built first and copied aside, then the normal build replaces it.
build: setup
	@$(ENV) cargo build --release -p cresset-plugin-echo --features reverse \
	  && mkdir -p "$$CARGO_TARGET_DIR/variants" \
	  && cp "$$CARGO_TARGET_DIR/release/libcresset_plugin_echo.so" "$$CARGO_TARGET_DIR/variants/libcresset_plugin_echo_reverse.so"
	@$(ENV) cargo build --release --workspace

models: setup
	@$(ENV) scripts/make-models.sh

# The quick start serves on loopback. The inference API is open; the management and metrics
# APIs need the key in model_store/.cresset-keys.json, and the server prints a ready-to-paste
# curl that reads it (README "Security").
serve: build models
	@$(ENV) "$$CARGO_TARGET_DIR/release/cresset" serve --model-store model_store --models all --disable-inference-token-auth

# The self-contained CPU distribution (scripts/make-dist.sh): prints the tarball's path.
dist: build
	@$(ENV) scripts/make-dist.sh

# The GPU tests cannot run here, but they must compile: checked first (seconds, no codegen).
# The distribution test (tests/tests/dist.rs) unpacks `make dist` into a minimal Debian root.
test: build models
	@$(ENV) cargo check --release --tests -p cresset-torch -p cresset-plugin-torchscript \
	  --features cresset-torch/gpu,cresset-plugin-torchscript/gpu
	@$(ENV) export CRESSET_DIST="$$(scripts/make-dist.sh)" \
	  && export CRESSET_DEBIAN_ROOT="$$(scripts/setup-debian-root.sh)" \
	  && cargo test --release --workspace --no-fail-fast

# LLM decoding on a CUDA GPU against transformers (issue 16); writes the gpu-llm section of
# BENCHMARKS.md. Needs a GPU and a Python with torch and transformers ($(BENCH_PYTHON)): the
# machine's own, with the same torch version as the build; no network. Builds first unless
# CRESSET_PREBUILT=1 (binaries carried from a build machine, in $$CARGO_TARGET_DIR/release).
BENCH_PYTHON ?= python3
bench-gpu:
	@$(ENV) if [ "$${CRESSET_PREBUILT:-0}" != 1 ]; then \
	  cargo build --release -p cresset -p cresset-plugin-gpt \
	  && cargo build --release -p cresset-bench --bin cresset-bench-llm-gpu; fi
	@$(ENV) CRESSET_BENCH_PYTHON="$(BENCH_PYTHON)" CRESSET_REPO_ROOT="$(CURDIR)" \
	  "$$CARGO_TARGET_DIR/release/cresset-bench-llm-gpu" $(BENCH_ARGS)

# The serving benchmark; writes BENCHMARKS.md. Not part of `make test` (speed is never a test).
bench: build models
	@$(ENV) "$$CARGO_TARGET_DIR/release/cresset-bench" $(BENCH_ARGS)
	@$(ENV) "$$CARGO_TARGET_DIR/release/cresset-bench-nlp" $(BENCH_ARGS)
	@$(ENV) "$$CARGO_TARGET_DIR/release/cresset-bench-isolation" $(BENCH_ARGS)
	@$(ENV) llama="$$(scripts/setup-llama-cpp.sh)" && CRESSET_LLAMA_CPP_PYTHON="$$llama" "$$CARGO_TARGET_DIR/release/cresset-bench-llm" $(BENCH_ARGS)
	@$(ENV) "$$CARGO_TARGET_DIR/release/cresset-bench-offload" $(BENCH_ARGS)
	@$(ENV) ts="$$(scripts/setup-torchserve.sh)" && CRESSET_TORCHSERVE_VENV="$$ts" "$$CARGO_TARGET_DIR/release/cresset-bench-vision" $(BENCH_ARGS)
	@$(ENV) "$$CARGO_TARGET_DIR/release/cresset-bench-vision-formats" $(BENCH_ARGS)

clean-cache:
	@$(ENV) rm -rf "$$CARGO_TARGET_DIR"
