#!/usr/bin/env bash
# Installs what dsmoe needs to build and test on Debian 12, and nothing when it is all there.
# Every package comes from Debian's own archive.
set -euo pipefail

PACKAGES=(
  # build
  cmake ninja-build g++ pkg-config
  # core library and CLI
  libabsl-dev nlohmann-json3-dev libcli11-dev
  # tokenizer: PCRE2 (Unicode regexes of the pre-tokenizers) and ICU (normalization)
  libpcre2-dev libicu-dev
  # services: gRPC and protobuf
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  # services: grpc.health.v1's .proto (the servers' health checkers of one another)
  grpc-proto
  # services: Prometheus metrics (prometheus-cpp core + pull exposer)
  prometheus-cpp-dev
  # services: TLS certificate checks and API-key hashing (libssl)
  libssl-dev
  # services: Boost.Asio (the expert data plane's framed protocol) and Boost.Beast (HTTP API);
  # header-only, 1.81 (Debian 12's newest)
  libboost1.81-dev
  # tests: GoogleTest, and the PyTorch reference implementation
  libgtest-dev libgmock-dev python3-torch python3-numpy
  # benchmarks: OpenBLAS sgemm, the reference compute rate prefill is judged by
  libopenblas-dev
  # tests: gRPC clients in Python (integration tests); Node.js runs the reference tokenizer
  python3-grpcio python3-protobuf
  # tests: a real Prometheus (+ promtool) scrapes a local cluster; unzip unpacks helm (deploy tests)
  prometheus unzip python3-yaml
  # tests and `dsmoe cluster up`: the openssl tool makes certificates (throw-away cluster CA)
  openssl
  # tests: fuzzing (tests/fuzz, a build of its own), clang with libFuzzer and sanitizer runtimes
  clang libclang-rt-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js (with npm) runs the reference tokenizer in the tests. The machine image brings its own
# build; only where there is none do we take Debian's.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then missing+=(nodejs npm); fi
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
