#!/usr/bin/env bash
# Cross-build the CUDA parts for aarch64 Jetson: Orin (sm_87) and Thor (sm_110), on an x86-64 host
# with an x86-64 CUDA toolkit (nvcc 13) and Debian's aarch64 cross compiler. Into build/arm64-cuda/:
#   plugins/kernels/libgla_kernels_capi.so    kernel core with the CUDA kernels (C API)
#   plugins/onnxruntime/libgla_onnxruntime.so  ONNX Runtime custom ops, CPU and CUDA EPs
#   plugins/tensorrt/libgla_tensorrt.so        TensorRT IPluginV3 plugin
#   runtimes/gla-run                           decode runner with its TensorRT path
# Run by `tools/arm64/build.sh --cuda`, or on its own. See docs/arm64.md and docs/tensorrt.md.
#
# How: nvcc picks its target from the host compiler (-ccbin aarch64-linux-gnu-g++) and then reads
# the target's headers and libraries from <toolkit>/targets/aarch64-linux, which an x86-64 install
# does not have. NVIDIA publishes that folder's contents for aarch64 as PyPI wheels
# (nvidia-cuda-runtime: headers, libcudart_static.a; nvidia-cuda-cccl; nvidia-cuda-crt;
# nvidia-cuda-nvcc: fatbinary_section.h), so this script downloads the ones matching the local
# nvcc (pip download --platform manylinux2014_aarch64, once, cached in $build/cuda-wheels) and lays
# out a private toolkit root in $build/toolkit: symbolic links to the local nvcc, its tools and
# NVVM, plus targets/aarch64-linux from the wheels. The system's CUDA install is not modified.
# The TensorRT headers come as for the native build (TENSORRT_INCLUDE_DIR, else the kernel-lens
# wheel; cmake/FetchTensorRTHeaders.cmake); the plugin links no TensorRT library.
#
# What this proves: the code compiles and links for aarch64 with sm_87 and sm_110 machine code in it.
# What it cannot: nothing here runs a CUDA kernel on a Jetson (qemu-user has no GPU); that needs
# a device (docs/tensorrt.md lists the steps to run there).
#
# Environment: CUDA_HOME (default: the folder above `command -v nvcc`, else /usr/local/cuda),
# GLA_ARM64_CUDA_BUILD_DIR (default build/arm64-cuda), GLA_ARM64_CUDA_ARCHS (default "87;110"),
# GLA_ARM64_JOBS (default 2), PYTHON (default python3, for pip download).
# Exit status: 0 built; 3 a tool is missing; 1 the build failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${GLA_ARM64_CUDA_BUILD_DIR:-build/arm64-cuda}
archs=${GLA_ARM64_CUDA_ARCHS:-87;110}
jobs=${GLA_ARM64_JOBS:-2}
python=${PYTHON:-python3}
triple=${GLA_AARCH64_TRIPLE:-aarch64-linux-gnu}

# a toolkit root is where bin/nvcc sits beside bin/nvcc.profile (a PATH nvcc may be a wrapper script)
candidates=()
[ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
command -v nvcc >/dev/null && candidates+=("$(dirname "$(readlink -f "$(command -v nvcc)")")/..")
candidates+=(/usr/local/cuda)
CUDA_HOME=""
for c in "${candidates[@]}"; do
  if [ -x "$c/bin/nvcc" ] && [ -f "$c/bin/nvcc.profile" ]; then CUDA_HOME=$(cd "$c" && pwd -P); break; fi
done
[ -n "$CUDA_HOME" ] || { echo "build_cuda.sh: no CUDA toolkit (bin/nvcc + bin/nvcc.profile) in ${candidates[*]}: set CUDA_HOME" >&2; exit 3; }
nvcc=$CUDA_HOME/bin/nvcc
command -v "$triple-g++" >/dev/null || {
  echo "build_cuda.sh: $triple-g++ not found: apt-get install -y --no-install-recommends g++-aarch64-linux-gnu" >&2; exit 3; }
# "Cuda compilation tools, release 13.0, V13.0.88"
full=$("$nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p')
major_minor=${full%.*}
echo "== nvcc $full at $nvcc; target aarch64, sm $archs"

mkdir -p "$build"
build=$(cd "$build" && pwd)
wheels=$build/cuda-wheels
stamp=$wheels/STAMP
if [ "$(cat "$stamp" 2>/dev/null)" != "$full" ]; then
  echo "== downloading the aarch64 CUDA $major_minor target files (PyPI wheels)"
  rm -rf "$wheels"
  # crt and nvcc exactly match the compiler (their headers are the compiler's); the runtime and
  # CCCL from the same minor release
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    "nvidia-cuda-runtime==$major_minor.*" "nvidia-cuda-cccl==$major_minor.*" "nvidia-cuda-crt==$full" \
    "nvidia-cuda-nvcc==$full" -d "$wheels"
  echo "$full" >"$stamp"
fi

tk=$build/toolkit
# laid out again only when the compiler changes (fresh files would make every CUDA object stale)
if [ "$(cat "$tk/STAMP" 2>/dev/null)" != "$full $CUDA_HOME" ]; then
echo "== laying out the toolkit root $tk"
rm -rf "$tk"
mkdir -p "$tk/bin" "$tk/targets/aarch64-linux"
for f in "$CUDA_HOME"/bin/*; do
  [ "$(basename "$f")" = nvcc.profile ] || ln -s "$f" "$tk/bin/"
done
cp "$CUDA_HOME/bin/nvcc.profile" "$tk/bin/"  # TOP = $(_HERE_)/.. : this folder, not the real install
ln -s "$CUDA_HOME/nvvm" "$tk/nvvm"
[ -e "$CUDA_HOME/targets/x86_64-linux" ] && ln -s "$CUDA_HOME/targets/x86_64-linux" "$tk/targets/x86_64-linux"
"$python" - "$wheels" "$tk/targets/aarch64-linux" <<'EOF'
import glob, os, sys, zipfile
wheels, out = sys.argv[1:]
for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    with zipfile.ZipFile(w) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            # nvidia/cu13/{include,lib}/...: the target folder's layout; the nvcc wheel's aarch64
            # executables are not wanted (the compiler is the host's), only its headers
            if len(parts) < 4 or parts[0] != "nvidia" or parts[2] not in ("include", "lib") or info.is_dir():
                continue
            dest = os.path.join(out, *parts[2:])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                dst.write(src.read())
EOF
# the shared runtime is versioned only in the wheel; CMake's FindCUDAToolkit looks for libcudart.so
( cd "$tk/targets/aarch64-linux/lib" && for f in libcudart.so.*; do [ -e "$f" ] && ln -sf "$f" libcudart.so; done; true )
echo "$full $CUDA_HOME" >"$tk/STAMP"
fi

echo "== configuring $build"
cmake -S . -B "$build" \
  -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
  -DGLA_AARCH64_TRIPLE="$triple" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$tk/bin/nvcc" \
  -DCUDAToolkit_ROOT="$tk" \
  -DGLA_CUDA_ARCHITECTURES="$archs" >"$build/configure-arm64.log" 2>&1 || { cat "$build/configure-arm64.log" >&2; exit 1; }
grep -E "^-- gla-export|Warning|CUDA" "$build/configure-arm64.log" | grep -v "^-- Check\|^-- Detecting" || true

echo "== building"
targets=(gla_kernels_capi gla_onnxruntime gla-run)
grep -q "gla_tensorrt" "$build/Makefile" 2>/dev/null && targets+=(gla_tensorrt gla_trt_plugin_harness)
cmake --build "$build" -j"$jobs" --target "${targets[@]}"

# cuobjdump lists the GPU code in a library of any host architecture; x86-64 installs assembled from
# wheels may lack it, and PyPI has it as its own small wheel (a newer one reads older fat binaries)
cuobjdump=$CUDA_HOME/bin/cuobjdump
if [ ! -x "$cuobjdump" ]; then
  cuobjdump=$(ls "$build"/cuobjdump/nvidia/*/bin/cuobjdump 2>/dev/null | head -1 || true)
  if [ -z "$cuobjdump" ]; then
    echo "== downloading cuobjdump (nvidia-cuda-cuobjdump, x86-64) to list the GPU code"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      "nvidia-cuda-cuobjdump>=${major_minor%%.*}.0,<$(( ${major_minor%%.*} + 1 ))" -d "$build/cuobjdump" \
      && "$python" -m zipfile -e "$build"/cuobjdump/*.whl "$build/cuobjdump" || true
    cuobjdump=$(ls "$build"/cuobjdump/nvidia/*/bin/cuobjdump 2>/dev/null | head -1 || true)
    [ -n "$cuobjdump" ] && chmod +x "$cuobjdump"
  fi
fi

echo "== products"
status=0
for f in plugins/kernels/libgla_kernels_capi.so plugins/onnxruntime/libgla_onnxruntime.so plugins/tensorrt/libgla_tensorrt.so \
         runtimes/gla-run; do
  if [ ! -e "$build/$f" ]; then echo "   MISSING $build/$f"; status=1; continue; fi
  machine=$(od -An -tx2 -j18 -N2 "$build/$f" | tr -d ' ')
  [ "$machine" = "00b7" ] || { echo "   $build/$f is not aarch64 (e_machine 0x$machine)"; status=1; continue; }
  # the GPU code the library carries (cuobjdump reads any host architecture's ELF)
  sms="" ptx=""
  if [ -n "$cuobjdump" ]; then
    sms=$("$cuobjdump" --list-elf "$build/$f" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -uV | tr '\n' ' ' || true)
    ptx=$("$cuobjdump" --list-ptx "$build/$f" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -uV | tr '\n' ' ' || true)
  fi
  needed=$("$triple-readelf" -d "$build/$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  echo "   $f: aarch64; cubins: ${sms:-none}; PTX: ${ptx:-none}; needs: $needed"
done
exit $status
