#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries on this (GPU-less) machine and gathers them, with
# the Debian shared libraries they need that a GPU machine's CUDA image lacks (abseil, gRPC, ...;
# libstdc++ as a fallback), in .gpu-carry/ — ignored through .git/info/exclude — for the device tool to
# carry. CUDA's own libraries (cudart, cuBLAS) are not copied: the GPU machine has them.
#
#   bench/gpu/make-carry.sh [build-dir]      (default /work/build-cuda; -j2)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-/work/build-cuda}
cmake -S . -B "$BUILD" -G Ninja -DDSMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
BINARIES=(dsmoe_cuda_tests dsmoe_cuda_serving_tests dsmoe_expert_service_tests dsmoe_bench_gpu)
ninja -C "$BUILD" -j2 "${BINARIES[@]}"
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
rm -rf .gpu-carry && mkdir -p .gpu-carry/bin .gpu-carry/lib .gpu-carry/libstd
for b in "${BINARIES[@]}"; do cp "$BUILD/bin/$b" .gpu-carry/bin/; done
# Every Debian library they load (abseil, gRPC, protobuf, prometheus-cpp, ssl, ...) except the C
# library itself, the C++ runtime (below) and CUDA's, which the GPU machine has.
for lib in $(ldd .gpu-carry/bin/* | grep -o '=> /[^ ]*' | cut -c4- | sort -u); do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++*|libgcc_s*) ;;
    libcuda.so*|libcudart*|libcublas*|libnccl*|libnvidia*) ;;
    *) cp -L "$lib" .gpu-carry/lib/ ;;
  esac
done
cp -L "$(g++ -print-file-name=libstdc++.so.6)" "$(g++ -print-file-name=libgcc_s.so.1)" .gpu-carry/libstd/
du -sh .gpu-carry
