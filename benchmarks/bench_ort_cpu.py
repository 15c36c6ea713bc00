"""Our ONNX Runtime CPU kernel vs ONNX Runtime's own ``LinearAttention`` (opset 27,
``update_rule="gated"``), in the same process, on the same inputs and thread count.

    python benchmarks/bench_ort_cpu.py [--threads 2] [--runs 50] [--json out.json]

Cases (float32 activations and state):
  prefill  B1 T2048 H4 d_k=d_v=64, no state in            target: >= 5x faster than ORT's kernel
  decode   B8 T1 H4 d_k256 d_v512, with past_state         target: >= 2x faster

Prints a table (median milliseconds, ratio, target) and writes the full results as JSON. The two
outputs are compared first, so a fast wrong kernel cannot win. Runs use IO binding with inputs and
outputs bound in place for both kernels (no numpy copies in the timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

CASES = {
    "prefill": dict(B=1, T=2048, H=4, K=64, V=64, state=False, target=5.0),
    "decode": dict(B=8, T=1, H=4, K=256, V=512, state=True, target=2.0),
}


def _models(c: dict) -> tuple[bytes, bytes]:
    from onnx import TensorProto as TP
    from onnx import helper

    B, T, H, K, V = c["B"], c["T"], c["H"], c["K"], c["V"]

    def io(name, shape):
        return helper.make_tensor_value_info(name, TP.FLOAT, shape)

    inputs = [io("q", [B, T, H * K]), io("k", [B, T, H * K]), io("v", [B, T, H * V]), io("g", [B, T, H * K])]
    if c["state"]:
        inputs.append(io("s", [B, H, K, V]))
    outputs = [io("o", [B, T, H * V]), io("so", [B, H, K, V])]

    ours = helper.make_node("GatedLinearAttention", ["q", "k", "v", "g"] + (["s"] if c["state"] else []), ["o", "so"],
                            domain="gla", q_num_heads=H, kv_num_heads=H)
    m_ours = helper.make_model(helper.make_graph([ours], "ours", inputs, outputs),
                               opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gla", 1)])
    # LinearAttention's inputs: query, key, value, past_state, decay, beta
    theirs = helper.make_node("LinearAttention", ["q", "k", "v", "s" if c["state"] else "", "g"], ["o", "so"],
                              q_num_heads=H, kv_num_heads=H, update_rule="gated")
    m_theirs = helper.make_model(helper.make_graph([theirs], "theirs", inputs, outputs),
                                 opset_imports=[helper.make_opsetid("", 27)])
    for m in (m_ours, m_theirs):
        m.ir_version = 10  # onnxruntime 1.31 loads ir_version <= 10
    return m_ours.SerializeToString(), m_theirs.SerializeToString()


def _bound(sess, feeds: dict, out_shapes: dict):
    """IO binding with every input and output in place, so that a run is the kernel and not the
    copies of a 16 MB state into and out of numpy."""
    import onnxruntime as ort

    io = sess.io_binding()
    keep = []
    for name, arr in feeds.items():
        v = ort.OrtValue.ortvalue_from_numpy(arr)
        keep.append(v)
        io.bind_ortvalue_input(name, v)
    for name, shape in out_shapes.items():
        v = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32)
        keep.append(v)
        io.bind_ortvalue_output(name, v)
    return io, keep


def _time(sess, io, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_case(name: str, c: dict, threads: int, runs: int, warmup: int, seed: int = 0) -> dict:
    import onnxruntime as ort

    from gla_export.runtime import create_session

    os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"  # LinearAttention is in opset 27
    rng = np.random.default_rng(seed)
    B, T, H, K, V = c["B"], c["T"], c["H"], c["K"], c["V"]
    feeds = {
        "q": rng.standard_normal((B, T, H * K), dtype=np.float32),
        "k": rng.standard_normal((B, T, H * K), dtype=np.float32) * np.float32(K**-0.5),
        "v": rng.standard_normal((B, T, H * V), dtype=np.float32),
        # a GLA-like decay: logsigmoid(x) / 16
        "g": (-np.logaddexp(0, -rng.standard_normal((B, T, H * K))) / 16).astype(np.float32),
    }
    if c["state"]:
        feeds["s"] = rng.standard_normal((B, H, K, V), dtype=np.float32)

    m_ours, m_theirs = _models(c)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    ours = create_session(m_ours, providers=("cpu",), session_options=so)
    so2 = ort.SessionOptions()
    so2.intra_op_num_threads = threads
    so2.log_severity_level = 3
    theirs = ort.InferenceSession(m_theirs, so2, providers=["CPUExecutionProvider"])

    o1, s1 = ours.run(None, feeds)
    o2, s2 = theirs.run(None, feeds)
    import torch

    from gla_export.testing import rel_err  # inf for NaN/Inf: a NaN output cannot pass as agreement

    agree = {
        "output_rel_diff": rel_err(torch.from_numpy(o1), torch.from_numpy(o2), floor=1e-30),
        "state_rel_diff": rel_err(torch.from_numpy(s1), torch.from_numpy(s2), floor=1e-30),
    }
    if not max(agree.values()) <= 1e-4:
        raise SystemExit(f"{name}: our output and ONNX Runtime's differ ({agree}); not timing a wrong kernel")

    out_shapes = {"o": [B, T, H * V], "so": [B, H, K, V]}
    io_ours, _buffers_ours = _bound(ours, feeds, out_shapes)  # the buffers must outlive the runs
    io_theirs, _buffers_theirs = _bound(theirs, feeds, out_shapes)
    # interleave the two so that machine noise hits both alike
    t_ours, t_theirs = [], []
    rounds = 5
    for _ in range(rounds):
        t_ours += _time(ours, io_ours, max(runs // rounds, 1), warmup)
        t_theirs += _time(theirs, io_theirs, max(runs // rounds, 1), warmup)
    ms_ours, ms_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "case": name,
        "shape": {k: c[k] for k in ("B", "T", "H", "K", "V", "state")},
        "ours_ms": ms_ours,
        "onnxruntime_ms": ms_theirs,
        "speedup": ms_theirs / ms_ours,
        "target": c["target"],
        "met": ms_theirs / ms_ours >= c["target"],
        "ours_ms_all": t_ours,
        "onnxruntime_ms_all": t_theirs,
        **agree,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per kernel (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--json", type=Path, default=Path("bench_ort_cpu.json"))
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from gla_export.ops.native import cpu_isa

    results = [bench_case(n, CASES[n], args.threads, args.runs, args.warmup) for n in args.cases.split(",")]
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "cpu_isa": cpu_isa(),
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "results": results,
    }
    print(f"{'case':8s} {'ours ms':>10s} {'ORT ms':>10s} {'speedup':>8s} {'target':>7s}  met")
    for r in results:
        print(f"{r['case']:8s} {r['ours_ms']:10.3f} {r['onnxruntime_ms']:10.3f} {r['speedup']:7.1f}x {r['target']:6.1f}x  "
              f"{'yes' if r['met'] else 'NO'}")
    args.json.write_text(json.dumps(info, indent=2))
    print(f"wrote {args.json} ({info['cpu']}, {args.threads} threads, onnxruntime {ort.__version__}, ISA {info['cpu_isa']})")
    return 0 if all(r["met"] for r in results) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
