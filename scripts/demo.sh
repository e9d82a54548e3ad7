#!/usr/bin/env bash
# The main job on a built-in default: install, build, write the tiny DeepSeekMoE checkpoint
# (Hugging Face format, random weights, DeepSeek-V3's real tokenizer), bring up a local cluster
# — the gateway, 1 attention server, 2 expert servers, each its own process on 127.0.0.1, with
# TLS, mutual TLS between them and an API key at the gateway (certificates and key made for
# this cluster under $STATE/tls) —, stream a completion through the gateway's gRPC API, and
# shut everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
BUILD_DIR=${DSMOE_BUILD_DIR:-build}
DSMOE="$BUILD_DIR/bin/dsmoe"
MODEL=${DSMOE_DEMO_MODEL:-out/tiny}
STATE=out/cluster

if [[ ! -f "$MODEL/config.json" ]]; then
  if TOKENIZER=$(scripts/fetch-tokenizer.sh 2>/dev/null); then
    "$DSMOE" make-model --preset tiny --dtype bf16 --seed 1 --tokenizer "$TOKENIZER" --out "$MODEL"
  else
    echo "(no tokenizer available: the demo uses token ids)"
    "$DSMOE" make-model --preset tiny --dtype bf16 --seed 1 --out "$MODEL"
  fi
fi
"$DSMOE" info --model "$MODEL"

"$DSMOE" cluster down --state-dir "$STATE" >/dev/null 2>&1 || true
"$DSMOE" cluster up --model "$MODEL" --attention-servers 1 --expert-servers 2 --state-dir "$STATE"
trap '"$DSMOE" cluster down --state-dir "$STATE"' EXIT
GATEWAY=$(sed -n 's/.*"gateway": "\([^"]*\)".*/\1/p' "$STATE/cluster.json")

echo "--- streaming a completion through the gateway at $GATEWAY (random weights: expect gibberish)"
# --state-dir gives the client the cluster's CA and API key (tls/ca.pem, tls/api-key).
CLIENT=("$DSMOE" client generate --gateway "$GATEWAY" --state-dir "$STATE")
if [[ -f "$MODEL/tokenizer.json" ]]; then
  "${CLIENT[@]}" --prompt "Mixture-of-Experts models route each token" --max-tokens 32 --ignore-eos
  "${CLIENT[@]}" --prompt "Shared experts" --max-tokens 8 --ignore-eos --json
else
  "${CLIENT[@]}" --ids 100,200,300,400 --max-tokens 32 --ignore-eos
  "${CLIENT[@]}" --ids 100,200,300,400 --max-tokens 8 --ignore-eos --json
fi
HTTP_URL=$(sed -n 's/.*"http_url": "\([^"]*\)".*/\1/p' "$STATE/cluster.json")
if [[ -n "$HTTP_URL" && -f "$MODEL/tokenizer_config.json" ]] && command -v curl >/dev/null &&
   grep -q chat_template "$MODEL/tokenizer_config.json"; then
  echo "--- one chat completion over the OpenAI-compatible HTTP API at $HTTP_URL (docs/http-api.md):"
  curl -sS --cacert "$STATE/tls/ca.pem" -H "Authorization: Bearer $(cat "$STATE/tls/api-key")" \
    "$HTTP_URL/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"messages": [{"role": "user", "content": "What is a mixture of experts?"}], "max_tokens": 16}'
  echo
fi
echo "--- without the API key the gateway refuses (UNAUTHENTICATED):"
"$DSMOE" client generate --gateway "$GATEWAY" --ca "$STATE/tls/ca.pem" --ids 1,2 --max-tokens 2 || true
echo "--- Prometheus metrics of every process (metrics_url in $STATE/cluster.json):"
sed -n 's/.*"role": "\([^"]*\)".*/\1/p; s/.*"metrics_url": "\([^"]*\)".*/  \1/p' "$STATE/cluster.json"
ATTENTION_METRICS=$(grep -A6 '"attention-server"' "$STATE/cluster.json" | sed -n 's/.*"metrics_url": "\([^"]*\)".*/\1/p' | head -1)
if [[ -n "$ATTENTION_METRICS" ]] && command -v curl >/dev/null; then
  echo "--- expert load so far (dsmoe_expert_tokens_total, first MoE layer):"
  curl -s "$ATTENTION_METRICS" | grep '^dsmoe_expert_tokens_total' | head -8
fi
echo "--- logs of every process are in $STATE/"
