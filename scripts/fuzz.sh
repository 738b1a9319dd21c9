#!/usr/bin/env bash
# Fuzz the parsers that read hostile input (FUZZING.md). Not part of `make test`.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 600 s for each of every target
# Needs a nightly toolchain (libFuzzer's coverage and AddressSanitizer) and cargo-fuzz, which
# it installs if missing. The growing corpus lives in $CRESSET_CACHE/fuzz/corpus; the seeds
# committed in fuzz/seeds are read too. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/env.sh"
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(tar_stream archive_tgz archive_zip gguf_header safetensors_header request_json multipart_form)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
# Its own target dir: the nightly, instrumented build must not churn the workspace's.
export CARGO_TARGET_DIR="$CRESSET_CACHE/fuzz-target"
cd "$root/fuzz"
for target in "${targets[@]}"; do
  corpus="$CRESSET_CACHE/fuzz/corpus/$target"
  mkdir -p "$corpus"
  echo "fuzz: $target for ${seconds}s" >&2
  cargo +nightly fuzz run --fuzz-dir "$root/fuzz" "$target" "$corpus" "$root/fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
