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

# bits per element of each ONNX tensor type (4-bit types are packed two to a byte)
_ONNX_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
              17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}
# (op type, input position) pairs that read only the rows of the table they index (axis 0):
# Gather's data, GatherBlockQuantized's data, scales and zero points (gather_axis 0)
_ROW_READS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3)}


def tensor_bytes(t) -> int:
    """Bytes an initializer holds, from its type and dims (its data is not read): packed 4-bit
    types take half a byte per element, rounded up."""
    n = 1
    for d in t.dims:
        n *= int(d)
    bits = _ONNX_BITS.get(t.data_type)
    if bits is None:
        raise ValueError(f"initializer {t.name!r}: element type {t.data_type} has no fixed size")
    return (n * bits + 7) // 8


def _storage_key(t, graph_path: Path) -> tuple:
    """What identifies a stored tensor: its byte range in the external weights file (two names for
    the same bytes, as a tied table's GatherBlockQuantized and MatMulNBits views are, are one
    tensor), else the graph and its name."""
    if t.data_location == 1:  # TensorProto.EXTERNAL
        d = {e.key: e.value for e in t.external_data}
        return ("external", d.get("location"), int(d.get("offset", 0)), int(d.get("length", tensor_bytes(t))))
    return ("inline", str(graph_path), t.name)


def _row_read(node, pos: int) -> bool:
    if (node.op_type, pos) not in _ROW_READS:
        return False
    axis_name = "axis" if node.op_type == "Gather" else "gather_axis"
    axis = next((a.i for a in node.attribute if a.name == axis_name), 0)
    return axis == 0


def _load(graph_path: str | os.PathLike):
    import onnx

    return onnx.load(str(graph_path), load_external_data=False).graph


def step_weight_bytes(step_graph: str | os.PathLike, batch: int) -> int:
    """Bytes of the step graph's initializers one step reads at batch ``batch``: all of each, once
    per stored tensor, except tables read only by row gathers (``Gather``, ``GatherBlockQuantized``
    on axis 0: the embedding, with its scales and zero points when quantized): ``batch`` rows of
    those. A tensor stored once and named twice (a tied, quantized table: the gather's view and the
    logits' MatMulNBits view are the same bytes) counts once, whole when any of its readers reads
    it whole. Reads the graph without its external weights (the sizes come from types and dims)."""
    return _step_reads(step_graph)(batch)


def _step_reads(step_graph: str | os.PathLike):
    """:func:`step_weight_bytes` as a function of the batch, the graph read once."""
    g = _load(step_graph)
    readers: dict[str, list] = {}
    for node in g.node:
        for pos, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, pos))
    # per stored tensor, per name it has: (size, bytes per row when only row gathers read it,
    # None when something reads it whole); a name nothing reads is left out
    stored: dict[tuple, list[tuple[int, int | None]]] = {}
    for t in g.initializer:
        reads = stored.setdefault(_storage_key(t, Path(step_graph)), [])
        size = tensor_bytes(t)
        uses = readers.get(t.name, [])
        if not uses:
            continue
        if len(t.dims) >= 1 and int(t.dims[0]) > 0 and all(_row_read(n, pos) for n, pos in uses):
            reads.append((size, size // int(t.dims[0])))
        else:
            reads.append((size, None))

    def weight_bytes(batch: int) -> int:
        # the most any of its names reads of each stored tensor (rows only, or all)
        return sum(max((size if row is None else min(size, batch * row) for size, row in reads), default=0)
                   for reads in stored.values())

    return weight_bytes


def resident_weight_bytes(graphs: list[str | os.PathLike] | tuple[str | os.PathLike, ...]) -> dict[str, int]:
    """The weights a runtime holding ``graphs`` keeps: every stored tensor once (the prefill and
    step graphs share one weights file, and a tensor named twice is stored once), as stored (packed
    codes, scales and zero points for quantized weights): ``{"bytes": n, "tensors": count}``."""
    stored: dict[tuple, int] = {}
    for path in graphs:
        for t in _load(path).initializer:
            key = _storage_key(t, Path(path))
            stored[key] = max(stored.get(key, 0), tensor_bytes(t))
    return {"bytes": sum(stored.values()), "tensors": len(stored)}


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


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()`` after one untimed call (wall clock)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


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
        a = torch.from_numpy(src)
        b = torch.empty_like(a)
        ways = {
            "numpy-copyto": lambda: np.copyto(dst, src),
            # and torch's copy, which uses the intra-op threads (NumPy's is one thread)
            "torch-copy": lambda: b.copy_(a),
        }
        out = {name: 2 * src.nbytes / _best_seconds(fn, repeats) for name, fn in ways.items()}
    way = max(out, key=out.get)
    return {"bytes_per_s": out[way], "way": way, "ways": out, "buffer_bytes": int(nbytes)}


def floor_ms(weight_bytes: int, state_row_bytes: int, batch: int, bytes_per_s: float) -> float:
    """Milliseconds a step of ``batch`` rows needs at least (module docstring)."""
    return 1e3 * step_bytes(weight_bytes, state_row_bytes, batch) / bytes_per_s


def step_bytes(weight_bytes: int, state_row_bytes: int, batch: int) -> int:
    """Bytes a decode step of ``batch`` rows moves: the weights it reads, each row's states read and written."""
    return int(weight_bytes) + 2 * int(batch) * int(state_row_bytes)


def model_floor(export_dir: str | os.PathLike, batches: list[int] | tuple[int, ...], bytes_per_s: float
                ) -> dict[str, Any]:
    """The floor of an export at each batch: ``{"weights_resident_bytes": n, "weight_tensors": n,
    "weight_bytes": {B: read per step}, "state_bytes_per_row": n, "step_bytes": {B: n},
    "bytes_per_token": {B: step bytes / B}, "ms_per_token": {B: ms}}`` (a step of B rows makes B
    tokens; ``ms_per_token`` is the step's floor, as the decode figures are per step)."""
    from .._dtypes import torch_dtype
    from ..export.metadata import open_export

    meta = open_export(Path(export_dir))
    state_row = 0
    for s in meta.states:
        n = 1
        for d in s.row_shape:
            n *= int(d)
        state_row += n * torch.tensor([], dtype=torch_dtype(s.dtype)).element_size()
    step_weights = _step_reads(meta.path("step"))
    weights = {b: step_weights(b) for b in batches}
    resident = resident_weight_bytes([meta.path("prefill"), meta.path("step")])
    moved = {b: step_bytes(weights[b], state_row, b) for b in batches}
    return {
        "weights_resident_bytes": resident["bytes"],
        "weight_tensors": resident["tensors"],
        "weight_bytes": weights,
        "state_bytes_per_row": state_row,
        "step_bytes": moved,
        "bytes_per_token": {b: moved[b] / b for b in batches},
        "ms_per_token": {b: 1e3 * moved[b] / bytes_per_s for b in batches},  # floor_ms of each
    }
