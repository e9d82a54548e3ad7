#!/usr/bin/env bash
# Configures and builds dsmoe (Release) into ./build, or $DSMOE_BUILD_DIR.
# Extra arguments go to CMake, e.g. scripts/build.sh -DDSMOE_SANITIZE=ON
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${DSMOE_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
