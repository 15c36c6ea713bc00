"""The hardware floor of a decode step: the bytes one step must move, over the copy bandwidth
measured on the same device in the same run.

A decode step of batch B reads every weight once (the embedding table only for the B rows it
gathers) and reads and writes every row's recurrent states once::

    floor = (weight bytes + 2 × B × state bytes per row) / copy bandwidth

Copy bandwidth counts bytes read plus bytes written. On the GPU it is measured two ways in one
process, both kept: ``memcpy`` (``cudaMemcpyAsync`` device to device, run by a copy engine) and
``kernel`` (an SM copy kernel, ``torch.mul(src, 1, out=dst)``), each timed by CUDA events on the
stream, never inside a CUDA graph (a memcpy captured in a graph becomes a memcpy node that reads
~20 % slower on an H100: 2.44 vs 3.03 TB/s, issue 12). The floor uses the faster of the two: the
floor must not be beaten by a plain copy. On the CPU, ``np.copyto`` of arrays far larger than the
caches, best of the repeats, by NumPy (one thread) and by torch (its intra-op threads).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ONNX_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def step_weight_bytes(step_graph: str | os.PathLike, batch: int, hidden_size: int | None = None) -> int:
    """Bytes of the step graph's initializers one step reads at batch ``batch``: all of each,
    except tables read only by a ``Gather`` on their rows (the embedding): ``batch`` rows of those.
    Reads the graph without its external weights (the sizes come from the shapes)."""
    import onnx

    g = onnx.load(str(step_graph), load_external_data=False).graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in g.node:
        for pos, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, pos))
    total = 0
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        size = n * _ONNX_BYTES.get(t.data_type, 4)
        uses = consumers.get(t.name, [])
        if uses and all(op == "Gather" and pos == 0 for op, pos in uses) and len(t.dims) == 2:
            size = min(size, batch * int(t.dims[1]) * _ONNX_BYTES.get(t.data_type, 4))
        total += size
    return total


def cuda_event_seconds(fn, repeats: int = 10, device: torch.device | None = None, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` on the current stream, each call between two CUDA events (never
    inside a CUDA graph: module docstring), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Copy bandwidth on ``device`` in bytes/s (read + written): ``{"bytes_per_s": best way,
    "way": its name, "ways": {name: bytes_per_s}, "buffer_bytes": n}`` (module docstring)."""
    if device.type == "cuda":
        nbytes = nbytes or 1 << 30
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        moved = 2 * src.numel() * 4
        ways = {
            "memcpy": lambda: dst.copy_(src),
            "kernel": lambda: torch.mul(src, 1.0, out=dst),
        }
        out = {name: moved / cuda_event_seconds(fn, repeats, device) for name, fn in ways.items()}
    else:
        nbytes = nbytes or 256 << 20
        src = np.random.default_rng(0).random(nbytes // 8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t)
        out = {"numpy-copyto": 2 * src.nbytes / best}
        # and torch's copy, which uses the intra-op threads (NumPy's is one thread)
        a = torch.from_numpy(src)
        b = torch.empty_like(a)
        b.copy_(a)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t)
        out["torch-copy"] = 2 * src.nbytes / best
    way = max(out, key=out.get)
    return {"bytes_per_s": out[way], "way": way, "ways": out, "buffer_bytes": int(nbytes)}


def floor_ms(weight_bytes: int, state_row_bytes: int, batch: int, bytes_per_s: float) -> float:
    """Milliseconds a step of ``batch`` rows needs at least (module docstring)."""
    return 1e3 * (weight_bytes + 2 * batch * state_row_bytes) / bytes_per_s


def model_floor(export_dir: str | os.PathLike, batches: list[int] | tuple[int, ...], bytes_per_s: float
                ) -> dict[str, Any]:
    """The floor of an export at each batch: ``{"weight_bytes": {B: n}, "state_bytes_per_row": n,
    "ms_per_token": {B: ms}}``."""
    from .._dtypes import torch_dtype
    from ..export.metadata import open_export

    meta = open_export(Path(export_dir))
    state_row = 0
    for s in meta.states:
        n = 1
        for d in s.row_shape:
            n *= int(d)
        state_row += n * torch.tensor([], dtype=torch_dtype(s.dtype)).element_size()
    weights = {b: step_weight_bytes(meta.path("step"), b) for b in batches}
    return {
        "weight_bytes": weights,
        "state_bytes_per_row": state_row,
        "ms_per_token": {b: floor_ms(weights[b], state_row, b, bytes_per_s) for b in batches},
    }
