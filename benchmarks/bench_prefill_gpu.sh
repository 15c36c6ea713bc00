#!/usr/bin/env bash
# Prefill v1 / v2 / v3 (issue 12 item 6) in one unattended GPU call of a few minutes: build the kernel
# core (or take a carried GLA_EXPORT_LIB_DIR), v1 vs v2 vs v3 vs fla chunk_gla timings and each
# path's kernels (benchmarks/bench_prefill_gpu.py, which also compares v2's and v3's outputs with
# v1's and fla's), the CUDA kernel tests against the reference (every GPU test under v3, which also
# runs the tests parametrised over v1/v2/v3; the reference cases under v2 and v1), then
# compute-sanitizer memcheck on small v3 and v2 cases (SANITIZER_TOOLS="memcheck racecheck" for
# both, SANITIZER_PATHS="v3 v2"). Logs and JSON go to $OUT (default out/bench_prefill); the table is
# printed last. Each step has a timeout (BENCH_TIMEOUT 240 s, TEST_TIMEOUT 150 s a path,
# SANITIZER_TIMEOUT 60 s a tool and path) so the whole call stays within a few minutes (typically ~5).
#
#   bash benchmarks/bench_prefill_gpu.sh
#   STEPS="build bench" bash benchmarks/bench_prefill_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench_prefill}
mkdir -p "$OUT"
STEPS=${STEPS:-"build bench tests sanitizer"}   # in this order
export PYTHONUNBUFFERED=1
status=0
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
note() { echo "== $*" | tee -a "$OUT/summary.txt"; }
t0=$SECONDS

. benchmarks/kernels_setup.sh
kernels_setup build/bench-prefill || exit 1

if step bench; then
  note "benchmark v1 / v2 / v3 / fla (at $((SECONDS - t0)) s)"
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_prefill_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench_prefill.json" > "$OUT/bench.log" 2>&1 \
    || { status=1; tail -20 "$OUT/bench.log"; }
fi

if step tests; then
  # every GPU case under v3 (wherever a head has 2+ value blocks), the reference cases under v2 and v1
  for path in v3 v2 v1; do
    sel=()
    [ "$path" != v3 ] && sel=(-k "matches_reference or extreme")
    note "tests: GLA_CUDA_PREFILL=$path tests/kernels/test_cuda_kernels.py -m gpu ${sel[*]}"
    GLA_CUDA_PREFILL=$path timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cuda_kernels.py \
      -o addopts="-ra" ${sel[@]+"${sel[@]}"} > "$OUT/tests_$path.log" 2>&1 || status=1
    tail -2 "$OUT/tests_$path.log" | tee -a "$OUT/summary.txt"
    grep -E "^(FAILED|ERROR)" "$OUT/tests_$path.log" | head -20 | tee -a "$OUT/summary.txt"
  done
fi

if step sanitizer; then
  cat > "$OUT/sanitize_prefill.py" <<'EOF'
import torch
from gla_export.ops.native import native_gla
from gla_export.testing import GLACase, make_inputs
for c in [GLACase(B=1, T=200, Hq=4, Hkv=2, K=100, V=130, dtype=torch.float16, initial_state=True, reverse=True),
          GLACase(B=1, T=150, Hq=2, Hkv=2, K=64, V=136, initial_state=True),
          GLACase(Hq=2, Hkv=1, K=64, V=256, dtype=torch.bfloat16, cu_seqlens=(0, 0, 700, 700, 1250, 1251))]:
    native_gla(**make_inputs(c, device="cuda"), output_final_state=True)
torch.cuda.synchronize()
print("sanitizer cases ran")
EOF
  for path in ${SANITIZER_PATHS:-v3 v2}; do
    for tool in ${SANITIZER_TOOLS:-memcheck}; do
      note "compute-sanitizer --tool $tool ($path)"
      GLA_CUDA_PREFILL=$path timeout "${SANITIZER_TIMEOUT:-60}" compute-sanitizer --tool "$tool" --kernel-name kns=gla_ --error-exitcode 9 \
        python3 "$OUT/sanitize_prefill.py" > "$OUT/sanitizer_${tool}_$path.log" 2>&1
      rc=$?
      tail -2 "$OUT/sanitizer_${tool}_$path.log" | tee -a "$OUT/summary.txt"
      [ $rc -eq 0 ] || { note "$tool $path: exit $rc"; status=1; }
    done
  done
fi

note "total $((SECONDS - t0)) s, status $status"
cat "$OUT/summary.txt"
[ -f "$OUT/bench.log" ] && { echo; grep " kernels (us per call)" "$OUT/bench.log"; sed -n '/fp16, ms per call/,$p' "$OUT/bench.log"; }
exit $status
