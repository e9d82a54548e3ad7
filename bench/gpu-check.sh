#!/usr/bin/env bash
# The one script to run on a GPU machine: the `gpu` tests (every CUDA kernel against the CPU
# reference, the GPU runner against the CPU engine, ...), then the GPU benchmark; its markdown
# table is printed last.
#
# Binaries come from, in this order: $DSMOE_GPU_BIN; .gpu-carry/bin (built on another machine by
# bench/gpu/make-carry.sh, with the shared libraries a CUDA-only image lacks in .gpu-carry/lib);
# or a fresh CUDA build in build-cuda/ (needs the Debian -dev packages of the normal build).
# Logs go to $OUT (if set) or /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-/tmp}
BIN=${DSMOE_GPU_BIN:-}
if [[ -z "$BIN" && -x .gpu-carry/bin/dsmoe_cuda_tests ]]; then BIN=.gpu-carry/bin; fi
if [[ -z "$BIN" ]]; then
  cmake -S . -B build-cuda -G Ninja -DDSMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null || exit 1
  ninja -C build-cuda dsmoe_cuda_tests dsmoe_cuda_serving_tests dsmoe_expert_service_tests \
    dsmoe_bench_gpu || exit 1
  BIN=build-cuda/bin
fi
if [[ -d .gpu-carry/lib ]]; then export LD_LIBRARY_PATH="$PWD/.gpu-carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
# cuBLAS 13 from wherever this machine keeps it, if the binary's RPATH does not find it.
if ldd "$BIN/dsmoe_cuda_tests" | grep -q 'libcublas.*not found'; then
  for d in /usr/local/cuda*/lib64 /usr/local/cuda*/lib /usr/local/cuda*/targets/x86_64-linux/lib \
           $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in ("cublas", "cuda_runtime", "cu13")))' 2>/dev/null); do
    if [[ -e $d/libcublas.so.13 || -e $d/libcudart.so.13 ]]; then LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; fi
  done
fi
# The build machine's libstdc++ only if this one's is older.
if ldd "$BIN/dsmoe_cuda_tests" 2>&1 | grep -q 'GLIBCXX.*not found' && [[ -d .gpu-carry/libstd ]]; then
  LD_LIBRARY_PATH="$PWD/.gpu-carry/libstd:$LD_LIBRARY_PATH"
fi
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null
if ldd "$BIN"/* | grep "not found"; then echo "missing shared libraries" >&2; exit 1; fi

echo "== gpu tests =="
"$BIN/dsmoe_cuda_tests" --gtest_color=no 2>&1 | tee "$LOG_DIR/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
"$BIN/dsmoe_cuda_serving_tests" --gtest_color=no 2>&1 | tee -a "$LOG_DIR/gpu-tests.log"
tests_rc=$(( tests_rc || PIPESTATUS[0] ))
# The expert server's service with its experts on the GPU (placement changes while serving).
"$BIN/dsmoe_expert_service_tests" --gtest_color=no 2>&1 | tee -a "$LOG_DIR/gpu-tests.log"
tests_rc=$(( tests_rc || PIPESTATUS[0] ))
echo "== gpu benchmark =="
"$BIN/dsmoe_bench_gpu" "$@" 2>&1 | tee "$LOG_DIR/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary =="
grep -E '^\[(gpu|kv|cpu|nccl|expert-service)' "$LOG_DIR/gpu-tests.log"
grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$LOG_DIR/gpu-tests.log" | grep -v '^\[  SKIPPED \] [A-Z]' | head -40
echo "tests exit code $tests_rc, benchmark exit code $bench_rc"
echo
grep -E '^\|' "$LOG_DIR/gpu-bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
