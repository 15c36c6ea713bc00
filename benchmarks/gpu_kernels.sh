#!/usr/bin/env bash
# One unattended GPU run for the CUDA kernels of the kernel core: build (or take a carried build),
# the GPU tests, compute-sanitizer memcheck + racecheck on small cases, then the benchmark against
# fla and SDPA. Logs and the benchmark JSON go to $OUT (default out/gpu_kernels); the benchmark
# table is printed last.
#
#   bash benchmarks/gpu_kernels.sh            # everything
#   STEPS="tests bench" bash benchmarks/gpu_kernels.sh
#
# Inputs, all optional:
#   GLA_EXPORT_LIB_DIR   a folder holding libgla_kernels_capi.so built with CUDA (skips the build)
#   .whl/fla/*.whl       fla-core and flash-linear-attention wheels (the peers), installed to /tmp/site
#   GLA_CUDA_ARCHITECTURES  for the build (default: this GPU's compute capability)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_kernels}
mkdir -p "$OUT"
STEPS=${STEPS:-"build tests bench variants sanitizer"}   # also: ncu
export PYTHONUNBUFFERED=1
status=0
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

. benchmarks/kernels_setup.sh
kernels_setup build/gpu-kernels || exit 1

if step tests; then
  note "tests: tests/kernels/test_cuda_kernels.py -m gpu"
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cuda_kernels.py -o addopts="-ra" \
    > "$OUT/tests.log" 2>&1 || status=1
  tail -4 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 | tee -a "$OUT/summary.txt"
fi

if step bench; then
  note "benchmark"
  python3 benchmarks/bench_kernels_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench_kernels_gpu.json" 2>&1 | tee "$OUT/bench.log" \
    || status=1
fi

if step variants; then
  # the step kernel's rows a thread (GLA_CUDA_STEP_ROWS, default 4): decode only
  for rows in ${VARIANT_ROWS:-8}; do
    note "variant: GLA_CUDA_STEP_ROWS=$rows"
    GLA_CUDA_STEP_ROWS=$rows python3 benchmarks/bench_kernels_gpu.py --no-peers --only decode \
      --json "$OUT/bench_rows_$rows.json" > "$OUT/variant_rows_$rows.log" 2>&1 || status=1
    grep -E "^decode" "$OUT/variant_rows_$rows.log" | cut -c1-40 | tee -a "$OUT/summary.txt"
  done
  # (the segment split's target, kTargetBlocks = 256, is a constant since the workspace depends on
  # it: a TensorRT plan declares its workspace at build time; change it in forward.cuh to try others)
fi

if step ncu; then
  # where the time goes: one prefill (segment passes + chunk kernel) and one decode step
  cat > "$OUT/ncu_cases.py" <<'EOF'
import sys, torch
sys.path.insert(0, "benchmarks")
from bench_kernels_gpu import Ours, _inputs
for x in (_inputs(1, 8192, 16, 16, 128, 128, torch.float16, 0), _inputs(16, 1, 4, 4, 256, 512, torch.float16, 0, state=True)):
    Ours(x)()
torch.cuda.synchronize()
EOF
  note "ncu"
  timeout 300 ncu --kernel-name regex:gla_ --launch-count 6 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 "$OUT/ncu_cases.py" > "$OUT/ncu.txt" 2>&1 || note "ncu: exit $?"
  grep -E "gla_|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Memory Throughput|Compute \(SM\) Throughput" "$OUT/ncu.txt" \
    | head -80 | tee -a "$OUT/summary.txt"
fi

if step sanitizer; then
  # small cases of every kernel: step, chunk (fp16, fp32 planes, 2 key blocks, GQA), segments,
  # ragged with empty sequences, the exact diagonal path
  cat > "$OUT/sanitize_cases.py" <<'EOF'
import torch, torch.nn.functional as F
from gla_export.ops.native import native_gla
from gla_export.testing import GLACase, make_inputs
cases = [
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=60, V=100, dtype=torch.float16, initial_state=True),
    GLACase(B=1, T=130, Hq=4, Hkv=2, K=100, V=60, dtype=torch.float16, initial_state=True, g_gamma=True, reverse=True),
    GLACase(B=1, T=70, Hq=1, Hkv=1, K=60, V=36),
    GLACase(B=1, T=1100, Hq=1, Hkv=1, K=32, V=32, dtype=torch.bfloat16, initial_state=True),
    GLACase(Hq=2, Hkv=1, K=16, V=16, dtype=torch.float16, cu_seqlens=(0, 0, 1300, 1300, 1301)),
]
for c in cases:
    kw = make_inputs(c, device="cuda")
    o, s = native_gla(**kw, output_final_state=True)
kw = make_inputs(GLACase(B=1, T=100, Hq=1, Hkv=1, K=32, V=16, dtype=torch.float16), device="cuda")
kw["g"] = F.logsigmoid(torch.randn_like(kw["g"].float()) * 30).half()
native_gla(**kw, output_final_state=True)
torch.cuda.synchronize()
print("sanitizer cases ran")
EOF
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    note "compute-sanitizer --tool $tool"
    timeout 240 compute-sanitizer --tool "$tool" --kernel-name kns=gla_ --error-exitcode 9 python3 "$OUT/sanitize_cases.py" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    tail -3 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || { note "$tool: exit $rc"; status=1; }
  done
fi

cat "$OUT/summary.txt"
[ -f "$OUT/bench.log" ] && { echo; grep -A20 "copy .* TB/s" "$OUT/bench.log"; }
exit $status
