#!/usr/bin/env bash
# One call of measurements after `gpu_run.sh tests` on the same warm machine (it reuses .gpu-bin):
# copy bandwidth four ways, prefill v1/v2/fla, decode against the floor (captured/uncaptured/eager/
# fla, sample + 1.3B shape), quantized 1.3B exports on ORT CUDA. Each step has its own time limit;
# a short summary is printed last. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_measure}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0
BIN=${GLA_GPU_BIN:-$PWD/.gpu-bin}
export GLA_EXPORT_LIB_DIR=$BIN GLA_RUN_BINARY=$BIN/gla-run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${T_COPY:-40} python3 benchmarks/copy_bandwidth.py --json "$OUT/copy.json" > "$OUT/copy.log" 2>&1
STEPS=bench BENCH_TIMEOUT=${T_PREFILL:-120} OUT=$OUT/prefill bash benchmarks/bench_prefill_gpu.sh > "$OUT/prefill.log" 2>&1
timeout ${T_DECODE:-230} python3 benchmarks/bench_decode_gpu.py --out "$OUT" > "$OUT/decode.log" 2>&1
timeout ${T_QUANT:-170} python3 benchmarks/bench_quant_gpu.py --size 1.3B --budget $(( ${T_QUANT:-170} - 25 )) > "$OUT/quant.log" 2>&1
for f in copy prefill decode quant; do echo; echo "---- $f"; tail -${TAIL:-22} "$OUT/$f.log"; done
