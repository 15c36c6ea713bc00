#!/usr/bin/env bash
# One unattended GPU run for the ONNX Runtime library's CUDA execution provider path: builds
# libgla_kernels_capi and libgla_onnxruntime with CUDA, then runs the gpu-marked tests of
# tests/onnxruntime (one-node graphs on CUDAExecutionProvider with CPU fallback disabled, bad
# inputs, a whole exported model). Logs go to $OUT (default out/gpu_ort); a summary is printed last.
#
#   bash tools/gpu_ort_tests.sh
#
# Needs, on the GPU machine (no registry there):
#   - onnxruntime-gpu in /tmp/site (shared/gpu/README.md: the staged wheel parts' install.sh)
#   - the ONNX Runtime headers carried in .deps/onnxruntime-headers (make them here with
#     `bash tools/fetch_onnxruntime_headers.sh .deps/onnxruntime-headers`), or ONNXRUNTIME_INCLUDE_DIR
#   - optional: GLA_CUDA_ARCHITECTURES (default: this GPU's compute capability)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_ort}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
headers=${ONNXRUNTIME_INCLUDE_DIR:-$PWD/.deps/onnxruntime-headers/include}
[ -f "$headers/onnxruntime_c_api.h" ] || { note "no ONNX Runtime headers in $headers (carry .deps/onnxruntime-headers)"; exit 2; }
arch=${GLA_CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}

note "building libgla_kernels_capi + libgla_onnxruntime for sm_$arch"
{ cmake -S . -B build/gpu-ort -DCMAKE_BUILD_TYPE=Release -DGLA_CUDA_ARCHITECTURES="$arch" \
    -DONNXRUNTIME_INCLUDE_DIR="$headers" -DGLA_WITH_TRT=OFF -DGLA_WITH_RUNNER=OFF \
  && cmake --build build/gpu-ort --target gla_kernels_capi gla_onnxruntime -j"$(nproc)"; } > "$OUT/build.log" 2>&1 \
  || { note "build FAILED (see $OUT/build.log)"; tail -30 "$OUT/build.log"; exit 1; }
export GLA_EXPORT_LIB_DIR=$PWD/build/gpu-ort/plugins/kernels:$PWD/build/gpu-ort/plugins/onnxruntime

python3 - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import onnxruntime as ort
from gla_export.ops.native import cuda_compiled
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("CUDA kernels in the library:", cuda_compiled())
EOF

note "tests: python -m pytest -m gpu tests/onnxruntime"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/onnxruntime -o addopts="-ra" > "$OUT/tests.log" 2>&1
status=$?
tail -6 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 | tee -a "$OUT/summary.txt"
exit $status
