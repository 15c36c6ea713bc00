"""Our CUDA kernels (libgla_kernels_capi) against flash-linear-attention and PyTorch SDPA, on one GPU.

Three shapes (DESIGN.md §7), fp16 activations, in one process:

- prefill B1 T8192 H16 d128          ours vs fla chunk_gla vs SDPA flash attention (causal)
- prefill B1 T4096 H4 d_k256 d_v512  ours vs fla chunk_gla (vs SDPA where a backend takes d_k != d_v)
- decode  B16 H4 256x512, fp32 state ours vs fla fused_recurrent_gla, and as a fraction of the
                                     device-to-device copy bandwidth measured in the same run
  (and the same decode at B1, which is launch-bound)

Each timing is the median of CUDA-event timings (triton.testing.do_bench) of a CUDA graph that
replays the call several times over rotating input sets (so neither launch gaps nor a warm L2
flatter anyone), divided by the number of calls; a callable that cannot be captured is timed
without a graph (noted in the table). Prints a table last; --json writes every number.

    python benchmarks/bench_kernels_gpu.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F

TARGETS_H200_MS = {"prefill_T8192_H16_d128": 0.40, "prefill_T4096_H4_k256_v512": 0.45, "decode_B16_H4_k256_v512": 0.020}


def _inputs(B, T, Hq, Hkv, K, V, dtype, seed, state=False, state_dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device="cuda", generator=gen)

    x = dict(
        q=rnd(B, T, Hq, K).to(dtype),
        k=rnd(B, T, Hkv, K).to(dtype),
        v=rnd(B, T, Hkv, V).to(dtype),
        g=(F.logsigmoid(rnd(B, T, Hkv, K)) / 16).to(dtype),  # the gates of a trained GLA (normaliser 16)
    )
    if state:
        x["initial_state"] = rnd(B, Hkv, K, V).to(state_dtype)
    return x


class Ours:
    """One prepared call of gla_cuda_forward (problem, pointers, workspace built once)."""

    def __init__(self, x: dict):
        from gla_export.ops.native import Tensors, load_library, make_problem

        self.lib = load_library()
        if not self.lib.gla_cuda_compiled():
            raise RuntimeError("libgla_kernels_capi has no CUDA kernels")
        q, k, v, g, h0 = x["q"], x["k"], x["v"], x["g"], x.get("initial_state")
        self.problem = make_problem(q, k, v, g, None, h0)
        B, T, Hq, _ = q.shape
        self.o = torch.empty(B, T, Hq, v.shape[3], dtype=q.dtype, device="cuda")
        sd = h0.dtype if h0 is not None else torch.float32
        self.ht = torch.empty(B, k.shape[2], k.shape[3], v.shape[3], dtype=sd, device="cuda")
        self.x = x  # keep the inputs alive
        self.tensors = Tensors(q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(),
                               None if h0 is None else h0.data_ptr(), None, None, self.o.data_ptr(), self.ht.data_ptr())  # fmt: skip
        self.nbytes = self.lib.gla_cuda_workspace_bytes(ctypes.byref(self.problem))
        self.ws = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, device="cuda")

    def __call__(self):
        st = self.lib.gla_cuda_forward(ctypes.byref(self.problem), ctypes.byref(self.tensors), self.ws.data_ptr(),
                                       self.nbytes, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))  # fmt: skip
        if st != 0:
            raise RuntimeError(f"gla_cuda_forward: status {st}: {self.lib.gla_last_error_message().decode()}")


def time_calls(calls: list, reps_in_graph: int = 8, rep_ms: int = 300) -> tuple[float, str]:
    """Median milliseconds per call, over a rotation of prepared calls."""
    from triton.testing import do_bench

    for c in calls:
        c()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps_in_graph):
                for c in calls:
                    c()
        graph.replay()
        torch.cuda.synchronize()
        ms = do_bench(graph.replay, warmup=50, rep=rep_ms, return_mode="median")
        return ms / (reps_in_graph * len(calls)), "graph"
    except Exception as e:  # noqa: BLE001 - a peer that cannot be captured is still timed
        torch.cuda.synchronize()
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:80]})", file=sys.stderr)

        def run():
            for c in calls:
                c()

        return do_bench(run, warmup=25, rep=rep_ms, return_mode="median") / len(calls), "stream"


def copy_bandwidth() -> tuple[float, dict[str, float]]:
    """Device-to-device copy, bytes read + written per second: the fastest of three ways, and all three.

    A ``dst.copy_(src)`` captured in a CUDA graph becomes a memcpy node, run by a copy engine, which
    reads ~20 % slower than the same copy issued on the stream (2.44 vs 3.03 TB/s on an H100, issue
    12): quoting kernels against it inflated their "% of copy". So the copy is timed as an SM copy
    kernel (``torch.mul(src, 1, out=dst)``) in a graph, exactly as the kernels are timed, and as a
    stream memcpy timed by CUDA events; the faster is the reference."""
    from gla_export.runtime.floor import cuda_event_seconds

    n = 1 << 28  # 1 GiB of fp32 each way
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    moved = 2 * n * 4
    ways = {}
    ms, _ = time_calls([lambda: torch.mul(src, 1.0, out=dst)], reps_in_graph=4)
    ways["kernel-graph"] = moved / (ms * 1e-3)
    ms, _ = time_calls([lambda: dst.copy_(src)], reps_in_graph=4)
    ways["memcpy-graph"] = moved / (ms * 1e-3)
    ways["memcpy-events"] = moved / cuda_event_seconds(lambda: dst.copy_(src), 20)
    best = max(ways[k] for k in ("kernel-graph", "memcpy-events"))
    return best, ways


def _fla():
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        return chunk_gla, fused_recurrent_gla
    except Exception as e:  # noqa: BLE001
        print(f"fla not available: {e}", file=sys.stderr)
        return None, None


def _sdpa(x: dict):
    """A causal SDPA call on the same q/k/v (flash attention when it takes the shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def call(backend=backend):
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

            return call, backend.name.lower()
        except Exception:  # noqa: BLE001 - this backend does not take the shape
            continue
    return None, "n/a"


def prefill(name, B, T, H, K, V, nsets, results, dtype=torch.float16, peers=True):
    sets = [_inputs(B, T, H, H, K, V, dtype, seed=i) for i in range(nsets)]
    row = {"name": name, "shape": f"B{B} T{T} H{H} dk{K} dv{V} {str(dtype)[6:]}"}
    row["ours_ms"], row["ours_mode"] = time_calls([Ours(x) for x in sets])
    flops = 2 * B * H * T * (64 * (K + V) + 2 * K * V)  # intra-chunk scores and AV, QS and K^T V
    row["ours_tflops"] = flops / (row["ours_ms"] * 1e-3) / 1e12
    if peers:
        chunk_gla, _ = _fla()
        if chunk_gla is not None:
            row["fla_ms"], row["fla_mode"] = time_calls(
                [lambda x=x: chunk_gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True) for x in sets]
            )
        call, backend = _sdpa(sets[0])
        row["sdpa_backend"] = backend
        if call is not None:
            row["sdpa_ms"], row["sdpa_mode"] = time_calls([call])
    results.append(row)


def decode(name, B, H, K, V, nsets, results, bw, dtype=torch.float16, state_dtype=torch.float32, peers=True):
    sets = [_inputs(B, 1, H, H, K, V, dtype, seed=i, state=True, state_dtype=state_dtype) for i in range(nsets)]
    row = {"name": name, "shape": f"B{B} T1 H{H} {K}x{V} {str(dtype)[6:]} state {str(state_dtype)[6:]}"}
    row["ours_ms"], row["ours_mode"] = time_calls([Ours(x) for x in sets])
    esz = torch.finfo(state_dtype).bits // 8
    moved = 2 * B * H * K * V * esz + B * H * (3 * K + 2 * V) * 2
    row["bytes"] = moved
    row["ours_gbps"] = moved / (row["ours_ms"] * 1e-3) / 1e9
    row["ours_frac_copy_bw"] = moved / (row["ours_ms"] * 1e-3) / bw
    if peers:
        _, fused = _fla()
        if fused is not None:
            row["fla_ms"], row["fla_mode"] = time_calls(
                [lambda x=x: fused(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"], output_final_state=True)
                 for x in sets]  # fmt: skip
            )
    results.append(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="the three target shapes only")
    ap.add_argument("--only", default="", help="comma-separated substrings of the work names to run")
    ap.add_argument("--no-peers", action="store_true", help="time our kernels only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    bw, bw_ways = copy_bandwidth()
    results: list[dict] = []
    peers = not args.no_peers
    work = [
        ("prefill_T8192_H16_d128", lambda: prefill("prefill_T8192_H16_d128", 1, 8192, 16, 128, 128, 2, results, peers=peers)),
        ("prefill_T4096_H4_k256_v512",
         lambda: prefill("prefill_T4096_H4_k256_v512", 1, 4096, 4, 256, 512, 2, results, peers=peers)),
        ("decode_B16_H4_k256_v512", lambda: decode("decode_B16_H4_k256_v512", 16, 4, 256, 512, 4, results, bw, peers=peers)),
        ("decode_B1_H4_k256_v512", lambda: decode("decode_B1_H4_k256_v512", 1, 4, 256, 512, 8, results, bw, peers=peers)),
    ]
    if not args.quick:
        work += [
            ("prefill_T8192_H16_d128_bf16", lambda: prefill("prefill_T8192_H16_d128_bf16", 1, 8192, 16, 128, 128, 2, results,
                                                            dtype=torch.bfloat16, peers=False)),
            ("prefill_T8192_H16_d128_fp32", lambda: prefill("prefill_T8192_H16_d128_fp32", 1, 8192, 16, 128, 128, 2, results,
                                                            dtype=torch.float32, peers=False)),
            ("prefill_B8_T2048_H16_d64", lambda: prefill("prefill_B8_T2048_H16_d64", 8, 2048, 16, 64, 64, 2, results,
                                                         peers=peers)),
            ("decode_B16_fp16_state", lambda: decode("decode_B16_fp16_state", 16, 4, 256, 512, 4, results, bw,
                                                     state_dtype=torch.float16, peers=False)),
        ]  # fmt: skip
    only = [o for o in args.only.split(",") if o]
    for name, run in work:
        if not only or any(o in name for o in only):
            run()

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": dev.name,
        "sms": dev.multi_processor_count,
        "torch": torch.__version__,
        "copy_bandwidth_tbps": bw / 1e12,
        "copy_bandwidth_ways_tbps": {k: v / 1e12 for k, v in bw_ways.items()},
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)

    print(f"\n{info['date']}  {dev.name} ({dev.multi_processor_count} SMs)  copy {bw / 1e12:.2f} TB/s (read+write; "
          + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bw_ways.items()) + ")")
    hdr = f"{'work':30s} {'ours ms':>9s} {'fla ms':>9s} {'sdpa ms':>9s} {'fla/ours':>8s} {'sdpa/ours':>9s}  notes"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        fla, sdpa = r.get("fla_ms"), r.get("sdpa_ms")
        notes = []
        if "ours_frac_copy_bw" in r:
            notes.append(f"{r['ours_gbps']:.0f} GB/s = {100 * r['ours_frac_copy_bw']:.0f}% of copy")
        if "ours_tflops" in r:
            notes.append(f"{r['ours_tflops']:.0f} TFLOP/s")
        if r.get("sdpa_backend") not in (None, "flash_attention"):
            notes.append(f"sdpa: {r['sdpa_backend']}")
        target = TARGETS_H200_MS.get(r["name"])
        if target:
            notes.append(f"H200 target {target:g} ms")
        modes = {r.get(k) for k in ("ours_mode", "fla_mode", "sdpa_mode")} - {None, "graph"}
        if modes:
            notes.append("not graphed: " + ",".join(sorted(modes)))

        def f(x):
            return f"{x:9.4f}" if x is not None else f"{'-':>9s}"

        def ratio(a, b):
            return f"{a / b:8.2f}" if a is not None and b else f"{'-':>8s}"

        print(f"{r['name']:30s} {f(r['ours_ms'])} {f(fla)} {f(sdpa)} {ratio(fla, r['ours_ms'])} {ratio(sdpa, r['ours_ms']):>9s}  "
              + "; ".join(notes))  # fmt: skip
    return 0 if all(math.isfinite(r["ours_ms"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
