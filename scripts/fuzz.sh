#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang, ASan and UBSan into their own build
# directory (the normal build is untouched) and runs each for a bounded time, starting from the
# checked-in seeds (tests/fuzz/corpus/<target>/). A crash fails the script and leaves its input
# in $BUILD_DIR/artifacts/: fix the bug, then add the input to the target's corpus directory,
# where the normal build's ctest fuzz.replay.<target> replays it from then on.
#
#   scripts/fuzz.sh [seconds per target (default 40)] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-40}
shift || true
TARGETS=("$@")
if ((${#TARGETS[@]} == 0)); then
  TARGETS=(safetensors config tokenizer_json tokenizer_encode request chat_template data_plane
    http_request)
fi
BUILD_DIR=${DSMOE_FUZZ_BUILD_DIR:-build-fuzz}
JOBS=$(($(nproc) < 2 ? $(nproc) : 2))

CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -G Ninja -DDSMOE_FUZZ=ON -DCMAKE_BUILD_TYPE=None \
  -DCMAKE_CXX_FLAGS="-O1 -gline-tables-only" >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS" --target "${TARGETS[@]/#/dsmoe_fuzz_}"

mkdir -p "$BUILD_DIR/artifacts"
failed=()
for t in "${TARGETS[@]}"; do
  # New inputs go to a scratch directory: the checked-in corpus stays small and reviewed.
  found="$BUILD_DIR/found/$t"
  mkdir -p "$found"
  echo "== fuzzing $t for ${SECONDS_PER_TARGET}s"
  if ! "$BUILD_DIR/bin/dsmoe_fuzz_$t" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 \
      -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$BUILD_DIR/artifacts/$t-" "$found" "tests/fuzz/corpus/$t" \
      >"$BUILD_DIR/$t.log" 2>&1; then
    failed+=("$t")
    tail -40 "$BUILD_DIR/$t.log"
  fi
  # The summary: executions, speed, new inputs, and coverage and corpus size at the end.
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" \
    "$BUILD_DIR/$t.log" | tr '\n' ' ' || true
  echo
  grep -E "^#[0-9]+" "$BUILD_DIR/$t.log" | tail -1 || true
done
if ((${#failed[@]} > 0)); then
  echo "fuzz: crashes in ${failed[*]}; inputs in $BUILD_DIR/artifacts/" >&2
  exit 1
fi
echo "fuzz: ${#TARGETS[@]} targets, ${SECONDS_PER_TARGET}s each, no crash"
