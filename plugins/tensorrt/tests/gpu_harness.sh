#!/usr/bin/env bash
# The TensorRT plugin's kernels on a GPU, without TensorRT (no TensorRT runtime runs on the GPU test
# machine): tests/tensorrt_plugin/test_plugin_gpu.py drives libgla_tensorrt.so through
# gla_trt_plugin_harness -- creator, shapes, formats, configure, serialise/re-create, enqueue on
# device buffers for both creators and every dtype -- compares with the float64 reference, and runs
# compute-sanitizer (memcheck, racecheck, initcheck) on small cases.
#
#   plugins/tensorrt/tests/gpu_harness.sh build   # here: needs the TensorRT headers (fetched from PyPI)
#                                                 # -> build/trt-gpu/bin/{libgla_tensorrt.so,gla_trt_plugin_harness}
#   plugins/tensorrt/tests/gpu_harness.sh run     # on the GPU machine, with build/trt-gpu/bin carried there
#   plugins/tensorrt/tests/gpu_harness.sh         # both, on a GPU machine that can fetch the headers
#
# GLA_CUDA_ARCHITECTURES (default 90: H100/H200), JOBS (default 2); logs and junit.xml go to $OUT
# (default build/trt-gpu/logs). The exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/../../.."
BUILD=${GLA_TRT_GPU_BUILD:-build/trt-gpu}
BIN="$BUILD/bin"
mode=${1:-all}

if [ "$mode" = build ] || [ "$mode" = all ]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGLA_CUDA_ARCHITECTURES="${GLA_CUDA_ARCHITECTURES:-90}" \
        -DGLA_WITH_ORT=OFF -DGLA_WITH_RUNNER=OFF -DGLA_WITH_TRT=ON
  cmake --build "$BUILD" -j"${JOBS:-2}" --target gla_tensorrt gla_trt_plugin_harness
  mkdir -p "$BIN"
  cp "$BUILD/plugins/tensorrt/libgla_tensorrt.so" "$BUILD/plugins/tensorrt/gla_trt_plugin_harness" "$BIN/"
  echo "built: $BIN ($(du -sh "$BIN" | cut -f1))"
fi

if [ "$mode" = run ] || [ "$mode" = all ]; then
  if [ ! -f "$BIN/libgla_tensorrt.so" ] || [ ! -x "$BIN/gla_trt_plugin_harness" ]; then
    echo "gpu_harness.sh: $BIN holds no build: run '$0 build' first (and carry $BIN to this machine)" >&2
    exit 2
  fi
  OUT=${OUT:-$BUILD/logs}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt" || true
  export GLA_EXPORT_LIB_DIR="$PWD/$BIN" GLA_TRT_HARNESS="$PWD/$BIN/gla_trt_plugin_harness"
  export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1
  set +e
  python3 -m pytest -q -rA -p no:cacheprovider tests/tensorrt_plugin/test_plugin_gpu.py --junitxml="$OUT/junit.xml" \
    2>&1 | tee "$OUT/pytest.log"
  status=${PIPESTATUS[0]}
  set -e
  echo "gpu_harness.sh: pytest exit status $status (log: $OUT/pytest.log)"
  exit "$status"
fi
