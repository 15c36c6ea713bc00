"""ONNX Runtime on a GPU: our gla::GatedLinearAttention (libgla_onnxruntime, CUDA execution
provider) against ONNX Runtime's own com.microsoft LinearAttention CUDA kernel, with our kernel
core called directly, fla's kernels and SDPA in the same process for reference (DESIGN.md §7).

Both ONNX Runtime rows are one-node sessions bound to device tensors (IO binding, nothing copied
per call); each is timed as the wall time of many back-to-back runs with the end-of-run
synchronisation turned off and one device synchronisation at the end, so the two carry the same
ONNX Runtime overhead. Outputs of every contender are checked against each other first.

    python benchmarks/bench_ort_gpu.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_gpu import Ours, _fla, _inputs, _sdpa, time_calls  # noqa: E402

CASES = [
    # name, B, T, H, d_k, d_v, with a past state
    ("prefill B1 T8192 H16 d128", 1, 8192, 16, 128, 128, False),
    ("prefill B1 T4096 H16 d128", 1, 4096, 16, 128, 128, False),
    ("prefill B1 T4096 H4 256x512", 1, 4096, 4, 256, 512, False),
    ("decode B16 H4 256x512", 16, 1, 4, 256, 512, True),
    ("decode B1 H4 256x512", 1, 1, 4, 256, 512, True),
]


def _ort():
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return ort


def _onnx_node_model(op: str, domain: str, inputs: list, attrs: dict, shapes: dict, state_dtype, opset_extra=()):
    from onnx import TensorProto, helper

    act = TensorProto.FLOAT16
    st = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}[state_dtype]
    vi = []
    for name in inputs:
        if not name:
            continue
        vi.append(helper.make_tensor_value_info(name, st if "state" in name else act, shapes[name]))
    node = helper.make_node(op, inputs, ["output", "present_state"], domain=domain, **attrs)
    outs = [helper.make_tensor_value_info("output", act, None), helper.make_tensor_value_info("present_state", st, None)]
    graph = helper.make_graph([node], "bench", vi, outs)
    opsets = [helper.make_opsetid("", 21), *[helper.make_opsetid(d, v) for d, v in opset_extra]]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


class OrtCall:
    """One IO-bound session run: inputs and outputs are torch CUDA tensors bound once."""

    def __init__(self, session, feeds: dict, outputs: dict):
        ort = _ort()
        self.session = session
        self.binding = session.io_binding()
        np_types = {torch.float16: "float16", torch.float32: "float32"}
        import numpy as np

        for name, t in feeds.items():
            self.binding.bind_input(name, "cuda", 0, np.dtype(np_types[t.dtype]), list(t.shape), t.data_ptr())
        for name, t in outputs.items():
            self.binding.bind_output(name, "cuda", 0, np.dtype(np_types[t.dtype]), list(t.shape), t.data_ptr())
        self.ro = ort.RunOptions()
        self.ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.keep = (feeds, outputs)

    def __call__(self):
        self.session.run_with_iobinding(self.binding, self.ro)


def time_wall(call, n: int, groups: int = 7) -> float:
    """Median over groups of the mean wall milliseconds per call (device synchronised per group)."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    per = []
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(per)


def run_case(case, quick: bool, results: list) -> None:
    from gla_export.runtime import create_session

    ort = _ort()
    name, B, T, H, K, V, with_state = case
    x = _inputs(B, T, H, H, K, V, torch.float16, seed=1, state=with_state)
    packed = {n: x[n].reshape(B, T, -1).contiguous() for n in ("q", "k", "v", "g")}
    shapes = {"query": [B, T, H * K], "key": [B, T, H * K], "value": [B, T, H * V], "gate": [B, T, H * K],
              "decay": [B, T, H * K], "past_state": [B, H, K, V]}  # fmt: skip
    out = torch.empty(B, T, H * V, dtype=torch.float16, device="cuda")
    n_calls = 20 if T > 1 else 200
    if quick:
        n_calls //= 4
    row = {"case": name}

    # ours through ONNX Runtime (fp32 state)
    ins = ["query", "key", "value", "gate"] + (["past_state"] if with_state else [])
    model = _onnx_node_model("GatedLinearAttention", "gla", ins, dict(q_num_heads=H, kv_num_heads=H),
                             shapes, torch.float32, opset_extra=[("gla", 1)])  # fmt: skip
    sess = create_session(model, providers=("cuda",))
    st_ours = torch.empty(B, H, K, V, dtype=torch.float32, device="cuda")
    feeds = {"query": packed["q"], "key": packed["k"], "value": packed["v"], "gate": packed["g"]}
    if with_state:
        feeds["past_state"] = x["initial_state"]
    call = OrtCall(sess, feeds, {"output": out, "present_state": st_ours})
    call()
    torch.cuda.synchronize()
    ref_out = out.float().clone()
    row["ours_ort_ms"] = time_wall(call, n_calls)

    # ONNX Runtime's com.microsoft LinearAttention: fp32 state first, then fp16 (what ORT's kernel may require)
    row["ms_ort_ms"], row["ms_ort_note"] = None, ""
    for sdt in (torch.float32, torch.float16):
        try:
            ins_ms = ["query", "key", "value", "past_state" if with_state else "", "decay"]
            model = _onnx_node_model("LinearAttention", "com.microsoft", ins_ms,
                                     dict(q_num_heads=H, kv_num_heads=H, update_rule="gated"),
                                     shapes, sdt, opset_extra=[("com.microsoft", 1)])  # fmt: skip
            so = ort.SessionOptions()
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            sess_ms = ort.InferenceSession(model, so, providers=["CUDAExecutionProvider"])
            st_ms = torch.empty(B, H, K, V, dtype=sdt, device="cuda")
            feeds_ms = {"query": packed["q"], "key": packed["k"], "value": packed["v"], "decay": packed["g"]}
            if with_state:
                feeds_ms["past_state"] = x["initial_state"].to(sdt)
            out_ms = torch.empty_like(out)
            call_ms = OrtCall(sess_ms, feeds_ms, {"output": out_ms, "present_state": st_ms})
            call_ms()
            torch.cuda.synchronize()
            err = ((out_ms.float() - ref_out).norm() / ref_out.norm()).item()
            row["ms_ort_ms"] = time_wall(call_ms, n_calls)
            row["ms_ort_note"] = f"{str(sdt).split('.')[-1]} state, rel diff vs ours {err:.1e}"
            break
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            row["ms_ort_note"] = f"fails: {str(e).splitlines()[0][:120]}"

    # our kernel core called directly, fla and SDPA (CUDA-graph timing), for reference
    row["ours_native_ms"] = time_calls([Ours(x)])[0]
    chunk_gla, fused_recurrent_gla = _fla()
    if chunk_gla is not None:
        h0 = x.get("initial_state")
        if T == 1:
            row["fla_ms"] = time_calls([lambda: fused_recurrent_gla(x["q"], x["k"], x["v"], x["g"], initial_state=h0,
                                                                    output_final_state=True)])[0]  # fmt: skip
        else:
            row["fla_ms"] = time_calls([lambda: chunk_gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True)])[0]
    if T > 1 and K == V:
        sdpa, _backend = _sdpa(x)
        if sdpa is not None:
            row["sdpa_ms"] = time_calls([sdpa])[0]
    results.append(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ort_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"bench_ort_gpu: onnxruntime {ort.__version__} has no CUDAExecutionProvider", file=sys.stderr)
        return 2
    results: list = []
    for case in CASES:
        try:
            run_case(case, args.quick, results)
        except Exception as e:  # noqa: BLE001
            results.append({"case": case[0], "error": f"{type(e).__name__}: {e}"})
        print(results[-1], flush=True)
    gpu = torch.cuda.get_device_name()
    print(f"\nONNX Runtime {ort.__version__} on {gpu}, {datetime.date.today()}, fp16 activations, ms per call")
    hdr = f"{'case':30} {'ours ORT':>9} {'MS ORT':>9} {'ratio':>7} {'ours core':>9} {'fla':>8} {'sdpa':>8}  note"
    print(hdr)
    for r in results:
        if "error" in r:
            print(f"{r['case']:30} ERROR {r['error']}")
            continue
        ratio = f"{r['ms_ort_ms'] / r['ours_ort_ms']:.1f}x" if r.get("ms_ort_ms") else "-"

        def f(k):
            return f"{r[k]:9.4f}" if r.get(k) else f"{'-':>9}"

        print(f"{r['case']:30} {f('ours_ort_ms')} {f('ms_ort_ms')} {ratio:>7} {f('ours_native_ms')} {f('fla_ms')} {f('sdpa_ms')}  {r.get('ms_ort_note', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "date": str(datetime.date.today()), "onnxruntime": ort.__version__,
                                               "results": results}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    sys.exit(main())
