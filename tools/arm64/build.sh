#!/usr/bin/env bash
# Cross-build gla-export's native parts for aarch64 (64-bit Arm Linux: Jetson, Raspberry Pi 4/5,
# Graviton, Ampere) on an x86-64 Debian/Ubuntu host. See docs/arm64.md.
#
#   tools/arm64/build.sh          the CPU parts, into build/arm64/:
#                                   plugins/kernels/libgla_kernels_capi.so   kernel core's C API (NEON + portable)
#                                   plugins/onnxruntime/libgla_onnxruntime.so ONNX Runtime custom-op library (CPU EP)
#                                   runtimes/gla-run                          the C++ decode runner
#                                   tools/gla-kernel-check                    test driver (tests/arm64/kernel_check.cc)
#                                   tools/gla-ort-node                        test driver (tests/arm64/ort_node.cc)
#                                   tools/libgla_cpuinfo_shim.so              qemu-user helper (tools/arm64/cpuinfo_shim.c)
#   tools/arm64/build.sh --wheel  also the Python package (pip wheel ., CPU parts) as an aarch64 machine's
#                                 `pip install .` builds it, into build/arm64/wheel/ (scikit-build-core
#                                 running the same CMake project with this toolchain file)
#   tools/arm64/build.sh --cuda   also the CUDA kernels and the TensorRT plugin for Jetson Orin (sm_87)
#                                 and Thor (sm_110), into build/arm64-cuda/ (tools/arm64/build_cuda.sh)
#
# Needs cmake >= 3.24 and Debian's cross compiler:
#   apt-get install -y --no-install-recommends g++-aarch64-linux-gnu
# The ONNX Runtime C/C++ headers come as for the native build (cmake/FetchOnnxRuntimeHeaders.cmake):
# ONNXRUNTIME_INCLUDE_DIR when set, else Debian's libonnxruntime-dev, fetched once into the build
# folder. The headers are the same for every architecture.
#
# Environment: GLA_ARM64_BUILD_DIR (default build/arm64), GLA_ARM64_JOBS (default 2), PYTHON (--wheel),
# GLA_AARCH64_TRIPLE (default aarch64-linux-gnu: the compilers are <triple>-gcc/g++).
# Exit status: 0 built; 3 a tool is missing (the message names the package); 1 the build failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
triple=${GLA_AARCH64_TRIPLE:-aarch64-linux-gnu}
build=${GLA_ARM64_BUILD_DIR:-build/arm64}
jobs=${GLA_ARM64_JOBS:-2}
want_cuda=0
want_wheel=0
for arg in "$@"; do
  case "$arg" in
    --cuda) want_cuda=1 ;;
    --wheel) want_wheel=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

missing() { echo "build.sh: $1 not found: apt-get install -y --no-install-recommends $2" >&2; exit 3; }
command -v cmake >/dev/null || missing cmake cmake
command -v "$triple-g++" >/dev/null || missing "$triple-g++" "g++-aarch64-linux-gnu"

t0=$(date +%s)
echo "== configuring $build (aarch64, CPU parts)"
mkdir -p "$build"
cmake -S . -B "$build" \
  -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
  -DGLA_AARCH64_TRIPLE="$triple" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGLA_WITH_CUDA=OFF \
  -DGLA_WITH_TRT=OFF >"$build/configure-arm64.log" 2>&1 || { cat "$build/configure-arm64.log" >&2; exit 1; }
grep -E "^-- gla-export|Warning" "$build/configure-arm64.log" || true

echo "== building libgla_kernels_capi, libgla_onnxruntime, gla-run"
cmake --build "$build" -j"$jobs" --target gla_kernels_capi gla_onnxruntime gla-run

echo "== building the test tools"
mkdir -p "$build/tools"
# the driver finds libgla_kernels_capi.so beside the kernel core's build, wherever the folder moves
"$triple-g++" -std=c++17 -O2 -Wall -Wextra -Iplugins/kernels/include tests/arm64/kernel_check.cc \
  -L"$build/plugins/kernels" -lgla_kernels_capi -Wl,-rpath,'$ORIGIN/../plugins/kernels' \
  -o "$build/tools/gla-kernel-check"
# the ONNX Runtime headers the custom-op library was configured with (its include flags)
ort_include=""
for dir in $(sed -n 's/^CXX_INCLUDES = //p' "$build/plugins/onnxruntime/CMakeFiles/gla_onnxruntime.dir/flags.make"); do
  [ -f "$dir/onnxruntime_cxx_api.h" ] && { ort_include=$dir; break; }
done
[ -n "$ort_include" ] || { echo "build.sh: cannot find the ONNX Runtime headers of $build's configuration" >&2; exit 1; }
"$triple-g++" -std=c++17 -O2 -Wall -Wextra -isystem "$ort_include" tests/arm64/ort_node.cc -ldl \
  -o "$build/tools/gla-ort-node"
"$triple-gcc" -O2 -Wall -Wextra -shared -fPIC tools/arm64/cpuinfo_shim.c -ldl -o "$build/tools/libgla_cpuinfo_shim.so"

# every product must be an aarch64 ELF: a silently native build would prove nothing
for f in plugins/kernels/libgla_kernels_capi.so plugins/onnxruntime/libgla_onnxruntime.so runtimes/gla-run \
         tools/gla-kernel-check tools/gla-ort-node tools/libgla_cpuinfo_shim.so; do
  machine=$(od -An -tx2 -j18 -N2 "$build/$f" | tr -d ' ')
  [ "$machine" = "00b7" ] || { echo "build.sh: $build/$f is not an aarch64 ELF (e_machine 0x$machine)" >&2; exit 1; }
  echo "   $build/$f"
done
echo "== CPU parts built in $(( $(date +%s) - t0 )) s"

if [ "$want_wheel" = 1 ]; then
  # _PYTHON_HOST_PLATFORM gives the wheel its aarch64 tag; scikit-build-core's own build folder is
  # kept apart from the one above (it is configured with other install settings)
  echo "== building the wheel (pip wheel . with the aarch64 toolchain)"
  t1=$(date +%s)
  rm -rf "$build/wheel"
  _PYTHON_HOST_PLATFORM=linux-aarch64 GLA_WITH_CUDA=OFF "${PYTHON:-python3}" -m pip wheel . --no-deps --quiet \
    -w "$build/wheel" \
    -C cmake.define.CMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
    -C cmake.define.GLA_AARCH64_TRIPLE="$triple" \
    -C build-dir="$build/wheel-build"
  ls "$build"/wheel/*.whl
  echo "== wheel built in $(( $(date +%s) - t1 )) s"
fi

if [ "$want_cuda" = 1 ]; then
  exec bash tools/arm64/build_cuda.sh
fi
