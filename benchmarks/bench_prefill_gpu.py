"""Prefill v1, v2 and v3 of our chunked CUDA kernels against fla's chunk_gla, on one GPU, in one process.

v1: gla_chunk_kernel computes the intra-chunk scores Q̃K̃ᵀ in every block of 64 value columns.
v2: gla_scores_kernel writes them once per (chunk, query head) to the workspace and the main kernel
    reads them (docs/cuda-kernels.md, "Prefill v2").
v3: gla_states_scores_kernel writes the state at every chunk boundary and the scores (one launch),
    then gla_output_kernel computes every chunk's output at once (docs/cuda-kernels.md, "Prefill v3");
    v3w is v3 with GLA_CUDA_V3_SEGMENTS=0 (the chunk states walk whole sequences, no segment passes).
GLA_CUDA_PREFILL=v1|v2|v3 picks the path (the library reads it at each call, so a CUDA graph
captured under one value keeps it).

Shapes (fp16): B1 T4096 H4 256x512 (the 1.3B GLA head), B1 T8192 H16 d128, B8 T2048 H16 d128.
Timing as benchmarks/bench_kernels_gpu.py: median of CUDA-event timings of CUDA-graph replays over
rotating input sets. Also checks v2 and v3 against v1 on the same inputs (relative error of the
output and the final state), and (--kernels, default on) times each kernel of each path with the
PyTorch profiler. Prints a table last; --json writes every number.

    python benchmarks/bench_prefill_gpu.py [--json out.json] [--only 4096,8192] [--no-kernels]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_gpu import Ours, _fla, _inputs, time_calls

SHAPES = [  # name, B, T, H, K, V, target (fla/ours at least)
    ("B1_T4096_H4_k256_v512", 1, 4096, 4, 256, 512, 1.2),
    ("B1_T8192_H16_d128", 1, 8192, 16, 128, 128, 1.5),
    ("B8_T2048_H16_d128", 8, 2048, 16, 128, 128, None),
]


# the environment of each path; v3w: v3 whose chunk-states kernel walks whole sequences (no segment passes)
PATH_ENV = {
    "v1": {"GLA_CUDA_PREFILL": "v1"},
    "v2": {"GLA_CUDA_PREFILL": "v2"},
    "v3": {"GLA_CUDA_PREFILL": "v3"},
    "v3w": {"GLA_CUDA_PREFILL": "v3", "GLA_CUDA_V3_SEGMENTS": "0"},
}


def _with_path(path: str, fn):
    env = PATH_ENV[path]
    old = {name: os.environ.get(name) for name in ("GLA_CUDA_PREFILL", "GLA_CUDA_V3_SEGMENTS")}
    for name in old:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        return fn()
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


PATHS = ("v1", "v2", "v3", "v3w")


def kernel_times(call, reps: int = 5) -> dict:
    """Microseconds per call of each CUDA kernel `call` launches (PyTorch profiler, mean of reps)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type is not None and "cuda" in str(ev.device_type).lower():
            us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if us:
                out[ev.key.split("(")[0][-60:]] = round(us / reps, 2)
    return out


def run_shape(name, B, T, H, K, V, target, nsets=2, dtype=torch.float16, kernels=True) -> dict:
    sets = [_inputs(B, T, H, H, K, V, dtype, seed=i) for i in range(nsets)]
    K_flops = 2 * B * H * T * (64 * (K + V) + 2 * K * V)
    row = {"name": name, "shape": f"B{B} T{T} H{H} dk{K} dv{V} fp16", "flops": K_flops, "target_fla_over_ours": target}
    outs = {}
    for path in PATHS:
        calls = [Ours(x) for x in sets]
        ms, mode = _with_path(path, lambda calls=calls: time_calls(calls))
        row[f"{path}_ms"], row[f"{path}_mode"] = ms, mode
        row[f"{path}_tflops"] = K_flops / (ms * 1e-3) / 1e12
        one = Ours(sets[0])
        _with_path(path, one)
        torch.cuda.synchronize()
        outs[path] = (one.o.clone(), one.ht.clone())
        if kernels:
            try:
                row[f"{path}_kernels_us"] = _with_path(path, lambda one=one: kernel_times(one))
            except Exception as e:  # noqa: BLE001 - the breakdown is extra; the timings above stand
                row[f"{path}_kernels_us"] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
    for path in PATHS[1:]:
        row[f"{path}_vs_v1_rel_o"] = _rel(outs[path][0], outs["v1"][0])
        row[f"{path}_vs_v1_rel_state"] = _rel(outs[path][1], outs["v1"][1])
    row["finite"] = bool(all(torch.isfinite(t).all() for pair in outs.values() for t in pair))
    chunk_gla, _ = _fla()
    if chunk_gla is not None:
        row["fla_ms"], row["fla_mode"] = time_calls(
            [lambda x=x: chunk_gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True) for x in sets]
        )
        o_fla, s_fla = chunk_gla(sets[0]["q"], sets[0]["k"], sets[0]["v"], sets[0]["g"], output_final_state=True)
        for path in PATHS:
            row[f"{path}_vs_fla_rel_o"] = _rel(outs[path][0], o_fla)
            row[f"{path}_vs_fla_rel_state"] = _rel(outs[path][1], s_fla.to(outs[path][1].dtype))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", default="", help="comma-separated substrings of the shape names to run")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel profiler breakdown")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prefill_gpu: no CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    only = [o for o in args.only.split(",") if o]
    rows = [run_shape(*s, kernels=not args.no_kernels) for s in SHAPES if not only or any(o in s[0] for o in only)]
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": dev.name,
        "sms": dev.multi_processor_count,
        "torch": torch.__version__,
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    for r in rows:  # the per-kernel breakdown first, the table last
        for path in PATHS:
            ks = r.get(f"{path}_kernels_us")
            if ks:
                print(f"{r['name']} {path} kernels (us per call): " + ", ".join(f"{k} {v}" for k, v in ks.items()))
    print(f"\n{info['date']}  {dev.name} ({dev.multi_processor_count} SMs)  fp16, ms per call (graph replays)")
    hdr = (f"{'shape':24s} {'v1 ms':>8s} {'v2 ms':>8s} {'v3 ms':>8s} {'v3w ms':>8s} {'fla ms':>8s} {'v1/v2':>6s} {'v1/v3':>6s} "
           f"{'fla/v1':>7s} {'fla/v2':>7s} {'fla/v3':>7s} {'target':>6s} {'v3~v1 o':>8s} {'v3~v1 S':>8s} {'v3~fla o':>8s}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for r in rows:
        fla = r.get("fla_ms")

        def f(x):
            return f"{x:8.4f}" if x is not None else f"{'-':>8s}"

        def ratio(a, b, w=7):
            return f"{a / b:{w}.2f}" if a is not None and b else f"{'-':>{w}s}"

        tgt = f"{r['target_fla_over_ours']:.1f}x" if r["target_fla_over_ours"] else "-"
        vf = f"{r['v3_vs_fla_rel_o']:8.1e}" if "v3_vs_fla_rel_o" in r else f"{'-':>8s}"
        print(f"{r['name']:24s} {f(r['v1_ms'])} {f(r['v2_ms'])} {f(r['v3_ms'])} {f(r['v3w_ms'])} {f(fla)} {ratio(r['v1_ms'], r['v2_ms'], 6)} "
              f"{ratio(r['v1_ms'], r['v3_ms'], 6)} {ratio(fla, r['v1_ms'])} {ratio(fla, r['v2_ms'])} {ratio(fla, r['v3_ms'])} "
              f"{tgt:>6s} {r['v3_vs_v1_rel_o']:8.1e} {r['v3_vs_v1_rel_state']:8.1e} {vf}")  # fmt: skip
        ok = ok and r["finite"]
        # a library built before v3 ignores GLA_CUDA_PREFILL=v3 and runs v1: the kernels tell
        ks = r.get("v3_kernels_us") or {}
        if ks and "error" not in ks and not any("gla_output_kernel" in k for k in ks):
            print(f"{r['name']}: v3 ran no gla_output_kernel: this library has no prefill v3 (rebuild it)")
            ok = False
        for path in PATHS[1:]:
            ok = ok and r[f"{path}_vs_v1_rel_o"] < 1e-2 and r[f"{path}_vs_v1_rel_state"] < 1e-2
    print("(fla/vN > 1: ours faster; target: fla/ours wanted; vN~v1 o / S: relative difference of the outputs /")
    print(" final states from v1's, fp16; v3w: v3 with GLA_CUDA_V3_SEGMENTS=0, whole-sequence walks)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
