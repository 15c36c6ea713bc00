#!/usr/bin/env bash
# The whole GPU pass on the GPU test machine, in a few unattended calls (each under 10 minutes):
#
#   bash benchmarks/gpu_run.sh prebuild # start the native build in the background (while wheels are sent)
#   bash benchmarks/gpu_run.sh train   # start the sample-model training in the background (setsid)
#   bash benchmarks/gpu_run.sh tests   # every gpu-marked test + compute-sanitizer on the kernels
#   bash benchmarks/gpu_run.sh bench   # kernels, Triton, ONNX Runtime and end-to-end benchmarks
#   bash benchmarks/gpu_run.sh e2e     # verify + gla-export bench on the sample model
#   bash benchmarks/gpu_run.sh decode  # captured decode: its gpu tests, then bench_decode_gpu.py (issue 12)
#   bash benchmarks/gpu_run.sh quant   # tests/quant's gpu tests, then fp16 vs int8 vs int4 of the 1.3B shape on ORT CUDA (< 9 min)
#   bash benchmarks/gpu_run.sh fetch   # copy the trained sample model into $OUT
#
# Needs: the staged wheels installed into /tmp/site (onnxruntime-gpu, polygraphy, fla; see
# shared/gpu/README.md), the native libraries built for the GPU in .gpu-bin (libgla_kernels_capi,
# libgla_onnxruntime, libgla_tensorrt, gla_trt_plugin_harness, gla-run; build them elsewhere with
# `cmake -S . -B build/gpu -DGLA_CUDA_ARCHITECTURES=90` and carry the folder) or nvcc to build
# them here, and samples/data/kjv.txt for training. Logs go to $OUT; a summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
OUT=${OUT:-out/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
export NCCL_NVLS_ENABLE=0
status=0
note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

BIN=${GLA_GPU_BIN:-$PWD/.gpu-bin}
# the GPU machine reaches no registry: headers come carried in .gpu-hdr (copied from a build here)
[ -d .gpu-hdr/ort ] && export ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR:-$PWD/.gpu-hdr/ort}
[ -d .gpu-hdr/trt ] && export TENSORRT_INCLUDE_DIR=${TENSORRT_INCLUDE_DIR:-$PWD/.gpu-hdr/trt}
if [ "$mode" = prebuild ]; then
  # start the native build in the background and return at once, so it runs while the wheel parts
  # are sent (each later mode waits for it); its log is /tmp/gla-build.log
  rm -f /tmp/gla-build.done
  setsid nohup bash -c "bash benchmarks/gpu_run.sh build; echo \$? > /tmp/gla-build.done" > /tmp/gla-build.log 2>&1 < /dev/null &
  sleep 3; nvidia-smi -L; echo "native build started in the background"; exit 0
fi
if [ -f /tmp/gla-build.log ] && [ "$mode" != build ]; then
  for _ in $(seq 1 120); do [ -f /tmp/gla-build.done ] && break; sleep 5; done
  [ -f /tmp/gla-build.done ] || { note "background build still running after 10 minutes"; tail -5 /tmp/gla-build.log; exit 1; }
fi
if [ ! -f "$BIN/libgla_onnxruntime.so" ] && [ "$mode" != train ] && [ "$mode" != fetch ]; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  note "building the native libraries for sm_$arch"
  { cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DGLA_CUDA_ARCHITECTURES="$arch" \
      ${ONNXRUNTIME_INCLUDE_DIR:+-DONNXRUNTIME_INCLUDE_DIR=$ONNXRUNTIME_INCLUDE_DIR} \
    && cmake --build build/gpu -j"$(nproc)"; } > "$OUT/build.log" 2>&1 || { note "build FAILED"; tail -30 "$OUT/build.log"; exit 1; }
  mkdir -p "$BIN"
  cp build/gpu/plugins/kernels/libgla_kernels_capi.so build/gpu/plugins/onnxruntime/libgla_onnxruntime.so \
     build/gpu/plugins/tensorrt/libgla_tensorrt.so build/gpu/plugins/tensorrt/gla_trt_plugin_harness \
     build/gpu/runtimes/gla-run "$BIN/" || { note "copying the native build into $BIN FAILED"; exit 1; }
fi
[ "$mode" = build ] && { ls -la "$BIN"; exit 0; }
export GLA_EXPORT_LIB_DIR=$BIN GLA_RUN_BINARY=$BIN/gla-run GLA_TRT_HARNESS=$BIN/gla_trt_plugin_harness
chmod +x "$BIN"/gla-run "$BIN"/gla_trt_plugin_harness 2>/dev/null

case "$mode" in
train)
  rm -rf /tmp/sample-train && mkdir -p /tmp/sample-train
  setsid nohup bash -c "python3 samples/train_sample.py --device cuda --minutes ${TRAIN_MINUTES:-6} \
      --dropout ${TRAIN_DROPOUT:-0.1} --out /tmp/sample-train/model > /tmp/sample-train/log.txt 2>&1; \
      echo \$? > /tmp/sample-train/done" > /dev/null 2>&1 < /dev/null &
  sleep 45
  tail -5 /tmp/sample-train/log.txt
  ;;
fetch)
  for _ in $(seq 1 100); do [ -f /tmp/sample-train/done ] && break; sleep 5; done
  tail -25 /tmp/sample-train/log.txt
  mkdir -p "$OUT/sample-model" && cp /tmp/sample-train/model/* "$OUT/sample-model/" && ls -la "$OUT/sample-model"
  ;;
tests)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__)"
  note "gpu tests"
  # one CPU thread pool per worker sized to its share of the cores: 8 workers each spinning 16 OpenMP
  # threads over the float64 references made tests crawl into their time limit. Each failure's
  # traceback goes to failures.log as it happens (tests/conftest.py), and test names stream to the
  # log as they finish (-v), so a run cut by the time limit still says what failed and why.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ${JOBS:-8} > 0 ? $(nproc) / ${JOBS:-8} : 1 ))}
  export GLA_FAILURE_LOG=$OUT/failures.log
  # the GPU memory test reads the device's memory in use, which other workers would move: alone, after
  serial="tests/runtime/test_memory.py::test_gpu_memory_is_flat_from_64_to_16384_tokens"
  timeout ${TEST_SECONDS:-330} python3 -m pytest -v -m gpu -p no:cacheprovider -o addopts="-ra" -n ${JOBS:-8} --timeout 200 \
    --tb=short ${TEST_PATHS:-tests/kernels/test_cuda_kernels.py tests/onnxruntime tests/runtime tests/runtimes \
    tests/models tests/tensorrt_plugin/test_plugin_gpu.py tests/conformance tests/cli tests/serve tests/quant} --deselect "$serial" \
    -rP > "$OUT/tests.log" 2>&1 || status=1
  if [ -z "${TEST_PATHS:-}" ] || [[ "$TEST_PATHS" == *tests/runtime* ]]; then
    timeout ${SERIAL_SECONDS:-150} python3 -m pytest -v -p no:cacheprovider -o addopts="-ra" --timeout 140 --tb=short \
      "$serial" -rP >> "$OUT/tests.log" 2>&1 || status=1
  fi
  grep -E "^PARITY|^ort-cuda: state" "$OUT/tests.log" | sort | tee -a "$OUT/summary.txt"
  grep -E " (FAILED|ERROR) |^(FAILED|ERROR) " "$OUT/tests.log" | head -60 | tee -a "$OUT/summary.txt"
  grep -E "^=+ .*(passed|failed|error).* =+$" "$OUT/tests.log" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
  if [ "${TRITON_TESTS:-1}" != 0 ]; then
    note "triton gpu tests"
    timeout ${TRITON_SECONDS:-200} python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra" -n ${JOBS:-8} --tb=line \
      tests/ops/test_triton.py > "$OUT/tests_triton.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_triton.log" | tail -30 | tee -a "$OUT/summary.txt"
  fi
  if [ "${SANITIZER:-1}" != 0 ]; then
    note "compute-sanitizer on the kernel core (benchmarks/gpu_kernels.sh sanitizer step)"
    STEPS=sanitizer OUT=$OUT/sanitizer timeout 150 bash benchmarks/gpu_kernels.sh > "$OUT/sanitizer.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit" "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
  fi
  ;;
bench)
  note "kernel core vs fla vs SDPA"
  timeout ${T_KERNELS:-150} python3 benchmarks/bench_kernels_gpu.py --json "$OUT/bench_kernels_gpu.json" > "$OUT/bench_kernels.log" 2>&1 || status=1
  note "ONNX Runtime: ours vs com.microsoft LinearAttention"
  timeout ${T_ORT:-120} python3 benchmarks/bench_ort_gpu.py --json "$OUT/bench_ort_gpu.json" > "$OUT/bench_ort.log" 2>&1 || status=1
  note "Triton vs fla"
  timeout ${T_TRITON:-110} python3 benchmarks/bench_triton.py > "$OUT/bench_triton.log" 2>&1 || status=1
  note "end to end: export, verify, bench (sample model)"
  python3 -c "from gla_export.cli import main; main()" export -o /tmp/sample-export --force --no-validate > "$OUT/export.log" 2>&1 || status=1
  timeout ${T_VERIFY:-60} python3 -c "from gla_export.cli import main; main()" verify /tmp/sample-export --json "$OUT/verify.json" > "$OUT/verify.log" 2>&1 || status=1
  timeout ${T_E2E:-100} python3 -c "from gla_export.cli import main; main()" bench /tmp/sample-export -o "$OUT/e2e" > "$OUT/bench_e2e.log" 2>&1 || status=1
  for f in bench_kernels bench_ort bench_triton verify bench_e2e; do echo; echo "---- $f"; tail -28 "$OUT/$f.log"; done
  ;;
e2e)
  note "end to end on the sample model: verify and bench (ours on ORT CUDA vs PyTorch eager vs fla's model)"
  python3 -c "from gla_export.cli import main; main()" export -o /tmp/sample-export --force -q > "$OUT/export.log" 2>&1 || status=1
  timeout ${T_VERIFY:-60} python3 -c "from gla_export.cli import main; main()" verify /tmp/sample-export > "$OUT/verify.log" 2>&1 || status=1
  timeout ${T_E2E:-200} python3 -c "from gla_export.cli import main; main()" bench /tmp/sample-export -o "$OUT/e2e" \
    --only ort-cuda --only eager --only fla --contexts ${E2E_CONTEXTS:-64,1024,16384} --decode-tokens 64 -q \
    > "$OUT/bench_e2e.log" 2>&1 || status=1
  for f in verify bench_e2e; do echo; echo "---- $f"; tail -40 "$OUT/$f.log"; done
  ;;
decode)
  note "captured decode step, device sampling, gla-run graphs: gpu tests (issue 12)"
  timeout ${T_DECODE_TESTS:-170} python3 -m pytest -v -m gpu -p no:cacheprovider -o addopts="-ra" --timeout 150 --tb=short \
    tests/runtime/test_cuda_graph.py tests/runtime/test_decoder.py tests/runtimes/test_gla_run.py -k cuda \
    > "$OUT/tests_decode.log" 2>&1 || status=1
  grep -E " (FAILED|ERROR) |^(FAILED|ERROR) " "$OUT/tests_decode.log" | head -30 | tee -a "$OUT/summary.txt"
  grep -E "^=+ .*(passed|failed|error).* =+$" "$OUT/tests_decode.log" | tee -a "$OUT/summary.txt"
  note "decode against the floor: sample B1, 1.3B fp16 B1/B16 (captured, uncaptured, eager, fla)"
  timeout ${T_DECODE_BENCH:-290} python3 benchmarks/bench_decode_gpu.py --out "$OUT" > "$OUT/bench_decode.log" 2>&1 || status=1
  tail -40 "$OUT/bench_decode.log"
  ;;
quant)
  note "quantized exports on ORT CUDA: the gpu tests of tests/quant (decoding vs the dequantized model, bench's floor)"
  timeout ${T_QUANT_TESTS:-150} python3 -m pytest -v -m gpu -p no:cacheprovider -o addopts="-ra" --timeout 140 --tb=short \
    tests/quant > "$OUT/tests_quant.log" 2>&1 || status=1
  grep -E " (FAILED|ERROR) |^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$" "$OUT/tests_quant.log" | tee -a "$OUT/summary.txt"
  note "quantized weights: fp16 vs int8 vs int4 (1.3B shape, random weights, ORT CUDA; exports included, budget 270 s)"
  timeout ${T_QUANT:-330} python3 benchmarks/bench_quant_gpu.py --size ${QUANT_SIZE:-1.3B} --budget ${QUANT_BUDGET:-270} \
    --json "$OUT/bench_quant_gpu.json" > "$OUT/bench_quant.log" 2>&1 || status=1
  note "quantized sample model: export int4, verify on ort-cuda (logits vs the dequantized model, quality vs float)"
  python3 -c "from gla_export.cli import main; main()" export -o /tmp/sample-int4 --weights int4 --force -q > "$OUT/export_int4.log" 2>&1 || status=1
  timeout ${T_VERIFY:-90} python3 -c "from gla_export.cli import main; main()" verify /tmp/sample-int4 > "$OUT/verify_int4.log" 2>&1 || status=1
  for f in bench_quant verify_int4; do echo; echo "---- $f"; tail -30 "$OUT/$f.log"; done
  ;;
*)
  echo "usage: $0 train|tests|bench|e2e|decode|quant|fetch" >&2
  exit 2
  ;;
esac
cat "$OUT/summary.txt" 2>/dev/null
exit $status
