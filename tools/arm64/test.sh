#!/usr/bin/env bash
# Runs the aarch64 build (tools/arm64/build.sh) under qemu-user emulation and checks it against
# x86-64 and the float64 reference (tools/arm64/emulated_checks.py; docs/arm64.md):
#
#   tools/arm64/test.sh [kernels] [op] [decode] [wheel]   (default: kernels op decode)
#
#   kernels  the kernel core's C API, NEON and portable builds: prefill and step, fp32/fp16/bf16,
#            odd sizes, final state, against the naive reference
#   op       one-node gla::GatedLinearAttention graphs on the aarch64 ONNX Runtime with the
#            aarch64 custom-op library, against the naive reference
#   decode   the bundled sample model, exported here, decoded greedily by the aarch64 gla-run on the
#            aarch64 ONNX Runtime: the same tokens as the x86-64 gla-run (with prefill, and step only)
#   wheel    the same with the gla-run of the aarch64 wheel (build.sh --wheel) as pip installs it
#
# Needs: qemu-user (or qemu-user-static) for qemu-aarch64, the aarch64 C/C++ runtime that
# g++-aarch64-linux-gnu brings (libc6-arm64-cross, libstdc++6-arm64-cross: /usr/aarch64-linux-gnu),
# a Python with gla-export's dependencies and its x86-64 build installed (pip install .), and, for op
# and decode, ONNX Runtime's manylinux aarch64 wheel from PyPI (downloaded once into
# $build/ort with pip download; its libonnxruntime.so is all that is used). Set GLA_ARM64_ORT_LIB to
# use an aarch64 libonnxruntime.so that is already here.
#
# ONNX Runtime's CPU detection reads /proc/cpuinfo, which qemu-user 7.2 passes through from the
# x86 host; on an x86 description ONNX Runtime crashes while creating a session. The op and decode
# runs therefore preload tools/arm64/cpuinfo_shim.c, which shows it the description of a
# Neoverse-N1 (the core qemu emulates for them) instead.
#
# Environment: PYTHON (default python3), GLA_ARM64_BUILD_DIR (default build/arm64), GLA_ARM64_LIBS
# (another aarch64 build folder whose libraries to test with this one's tools, e.g. build/arm64-cuda),
# GLA_ARM64_ORT_VERSION (default: the version of the x86-64 onnxruntime the Python imports).
# Exit status: 0 all passed; 1 a check failed; 3 a tool or the build is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=$(cd "${GLA_ARM64_BUILD_DIR:-build/arm64}" 2>/dev/null && pwd) || {
  echo "test.sh: no ${GLA_ARM64_BUILD_DIR:-build/arm64}: run tools/arm64/build.sh first" >&2; exit 3; }
python=${PYTHON:-python3}
sysroot=/usr/aarch64-linux-gnu
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(kernels op decode)

qemu=$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)
[ -n "$qemu" ] || { echo "test.sh: qemu-aarch64 not found: apt-get install -y --no-install-recommends qemu-user" >&2; exit 3; }
[ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] && [ -e "$sysroot/lib/libstdc++.so.6" ] || {
  echo "test.sh: no aarch64 C/C++ runtime in $sysroot: apt-get install -y --no-install-recommends libc6-arm64-cross libstdc++6-arm64-cross" >&2
  exit 3; }
for f in tools/gla-kernel-check tools/gla-ort-node tools/libgla_cpuinfo_shim.so runtimes/gla-run \
         plugins/onnxruntime/libgla_onnxruntime.so plugins/kernels/libgla_kernels_capi.so; do
  [ -e "$build/$f" ] || { echo "test.sh: $build/$f is missing: run tools/arm64/build.sh" >&2; exit 3; }
done

extra=()
case " ${parts[*]} " in
  *" op "*|*" decode "*|*" wheel "*)
    ort_lib=${GLA_ARM64_ORT_LIB:-}
    if [ -z "$ort_lib" ]; then
      version=${GLA_ARM64_ORT_VERSION:-$("$python" -c 'import onnxruntime; print(onnxruntime.__version__)')}
      pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      ort_dir=$build/ort/$version
      ort_lib=$(ls "$ort_dir"/libonnxruntime.so.* 2>/dev/null | head -1 || true)
      if [ -z "$ort_lib" ]; then
        echo "== fetching onnxruntime $version for manylinux aarch64 (PyPI)"
        mkdir -p "$ort_dir"
        "$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
          --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
          --python-version "$pyver" "onnxruntime==$version" -d "$ort_dir/wheel"
        "$python" - "$ort_dir" <<'EOF'
import glob, os, shutil, sys, zipfile
out = sys.argv[1]
(wheel,) = glob.glob(os.path.join(out, "wheel", "onnxruntime-*aarch64.whl"))
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if os.path.basename(n).startswith("libonnxruntime.so.")]
    with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.rmtree(os.path.join(out, "wheel"))
EOF
        ort_lib=$(ls "$ort_dir"/libonnxruntime.so.* | head -1)
      fi
    fi
    machine=$(od -An -tx2 -j18 -N2 "$ort_lib" | tr -d ' ')
    [ "$machine" = "00b7" ] || { echo "test.sh: $ort_lib is not an aarch64 library" >&2; exit 3; }
    # what ONNX Runtime's cpuinfo expects on a Neoverse-N1 (ARMv8.2: fp16, dot product)
    cpuinfo=$build/tools/cpuinfo-neoverse-n1
    : >"$cpuinfo"
    for cpu in 0 1; do
      printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$cpu" >>"$cpuinfo"
    done
    extra=(--ort-lib "$ort_lib" --cpuinfo "$cpuinfo")
    ;;
esac

echo "== $("$qemu" --version | head -1); aarch64 build $build"
# GLA_ARM64_LIBS: test another aarch64 build's libraries (e.g. build/arm64-cuda, on their CPU path)
[ -n "${GLA_ARM64_LIBS:-}" ] && extra+=(--libs "$GLA_ARM64_LIBS")
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" tools/arm64/emulated_checks.py "${parts[@]}" \
  --build "$build" --qemu "$qemu" --sysroot "$sysroot" "${extra[@]}"
