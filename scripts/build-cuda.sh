#!/usr/bin/env bash
# Compiles the CUDA backend (DSMOE_CUDA=ON) into ./build-cuda — its tests, its benchmark and the
# attention and expert servers with `--device cuda:N` — and runs the `gpu` tests, which skip with
# a reason where there is no GPU. Needs the CUDA toolkit at /usr/local/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${DSMOE_CUDA_BUILD_DIR:-build-cuda}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSMOE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90} -DDSMOE_BUILD_BENCH=ON >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target dsmoe_cuda_tests dsmoe_cuda_serving_tests \
  dsmoe_expert_service_tests dsmoe_bench_gpu dsmoe-attention-server dsmoe-expert-server
ctest --test-dir "$BUILD_DIR" -L gpu --output-on-failure
"$BUILD_DIR/bin/dsmoe_expert_service_tests"  # its cuda:0 case on the GPU, or skipped with why
