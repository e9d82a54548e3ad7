#!/usr/bin/env bash
# The main job on a built-in default: install, build, write the tiny DeepSeekMoE checkpoint
# (Hugging Face format, random weights) and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSMOE_BUILD_DIR:-build}
MODEL=${DSMOE_DEMO_MODEL:-out/tiny}
DSMOE="$BUILD_DIR/cli/dsmoe"
if [[ ! -f "$MODEL/config.json" ]]; then
  "$DSMOE" make-model --preset tiny --dtype bf16 --seed 1 --out "$MODEL"
fi
"$DSMOE" info --model "$MODEL"
echo "--- greedy generation (token ids as they are produced):"
"$DSMOE" generate --model "$MODEL" --ids 100,200,300,400 --max-tokens 32 --ignore-eos
echo "--- the same as JSON:"
"$DSMOE" generate --model "$MODEL" --ids 100,200,300,400 --max-tokens 8 --json
