"""Device-to-device copy bandwidth, measured several ways in one process, to find which figure is
the floor to quote (issue 12: bench_kernels_gpu.py's copy read 2.44 TB/s on an H100 where a plain
copy timed by events reads 3.03).

Each row moves N bytes read + N bytes written. Ways:
  memcpy-events   cudaMemcpyAsync (torch copy_) on the stream, CUDA events around each call
  memcpy-graph    the same memcpy captured 4x in a CUDA graph, replays timed by do_bench
  kernel-graph    an SM copy kernel (torch.mul(src, 1, out=dst)) captured 4x in a CUDA graph
  kernel-events   the SM copy kernel on the stream, events around each call

Prints a table and, with --json, writes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch

from gla_export.runtime.floor import cuda_event_seconds


def _events(fn, reps: int = 30) -> float:
    return 1e3 * cuda_event_seconds(fn, reps)  # the library's floor measurement, in ms


def _graph(fn, reps_in_graph: int = 4) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps_in_graph):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return do_bench(g.replay, warmup=50, rep=300, return_mode="median") / reps_in_graph


def measure(gib: float = 1.0) -> list[dict]:
    n = int(gib * (1 << 30)) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    moved = 2 * n * 4
    ways = {
        "memcpy-events": (_events, lambda: dst.copy_(src)),
        "memcpy-graph": (_graph, lambda: dst.copy_(src)),
        "kernel-events": (_events, lambda: torch.mul(src, 1.0, out=dst)),
        "kernel-graph": (_graph, lambda: torch.mul(src, 1.0, out=dst)),
    }
    rows = []
    for name, (timer, fn) in ways.items():
        ms = timer(fn)
        rows.append({"way": name, "gib": gib, "ms": ms, "tbps": moved / (ms * 1e-3) / 1e12})
    assert torch.equal(dst, src)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    rows = [r for gib in (0.25, 1.0, 2.0) for r in measure(gib)]
    print(f"copy bandwidth on {name} (bytes read + written)")
    for r in rows:
        print(f"  {r['way']:14s} {r['gib']:5.2f} GiB  {r['ms']:8.3f} ms  {r['tbps']:5.2f} TB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
