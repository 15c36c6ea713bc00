"""Argument checking shared by every GLA backend.

One convention everywhere (DESIGN.md §1, §2): tensors are ``[B, T, H, D]``; ``q`` has ``Hq``
heads, ``k``/``v``/``g`` have ``Hkv`` heads with ``Hq`` a multiple of ``Hkv``; the state is
``[N, Hkv, d_k, d_v]`` where ``N`` is ``B``, or the number of sequences when ``cu_seqlens``
packs ragged sequences along ``T`` with ``B == 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import CUDA_MAX_HEAD_DIM_K, MAX_HEAD_DIM, MAX_HEADS, GLAShapeError

# the op's activation types (contract.FLOAT_TYPES) and float64, which the PyTorch reference paths
# (naive, chunk) take beside them
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["CUDA_MAX_HEAD_DIM_K", "FLOAT_DTYPES", "GLADims", "GLAShapeError", "check_inputs"]


@dataclass(frozen=True)
class GLADims:
    B: int
    T: int
    Hq: int
    Hkv: int
    K: int
    V: int
    N: int
    gate_per_head: bool

    @property
    def groups(self) -> int:
        return self.Hq // self.Hkv


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_contents: bool = True,
) -> GLADims:
    """Validate the op's inputs and return their sizes; raise :class:`GLAShapeError` naming the input.

    The rules are the op contract's (gla_export/ops/contract.py, the kernel core's
    gla::infer_problem) in the ``[B, T, H, D]`` layout: the same types, head counts, head-size
    limits, per-head gate and ``cu_seqlens`` rules. ``cu_contents`` also checks the offsets
    themselves (0, never decreasing, ending at T): a host read, so a caller whose kernel reads them
    on the device may skip it, as the CUDA kernels of ONNX Runtime and TensorRT do.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise GLAShapeError(f"{name} must be [B, T, H, D], got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise GLAShapeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise GLAShapeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, Hq, K = q.shape
    Hkv = k.shape[2]
    V = v.shape[3]
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise GLAShapeError(f"q, k, v must agree on [B, T]: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != K:
        raise GLAShapeError(f"k must have head size d_k={K} like q, got shape {_shape(k)}")
    if v.shape[2] != Hkv:
        raise GLAShapeError(f"v must have Hkv={Hkv} heads like k, got shape {_shape(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise GLAShapeError(f"q heads ({Hq}) must be a positive multiple of k/v heads ({Hkv})")
    if Hq > MAX_HEADS:
        raise GLAShapeError(f"q has {Hq} heads, more than the op takes ({MAX_HEADS}): q shape {_shape(q)}")
    if not (1 <= K <= MAX_HEAD_DIM and 1 <= V <= MAX_HEAD_DIM):
        raise GLAShapeError(f"head sizes d_k={K}, d_v={V} must be in [1, {MAX_HEAD_DIM}]: q {_shape(q)}, v {_shape(v)}")
    gate_per_head = False
    if g is not None:
        if g.dim() != 4 or g.shape[:3] != (B, T, Hkv) or g.shape[3] not in (K, 1):
            raise GLAShapeError(
                f"g must be [B, T, Hkv, d_k] = [{B}, {T}, {Hkv}, {K}] (or d_k=1 for one decay per head), "
                f"got shape {_shape(g)}"
            )
        if g.dtype not in FLOAT_DTYPES:
            raise GLAShapeError(f"g must be a floating tensor, got {g.dtype}")
        gate_per_head = g.shape[3] == 1 and K != 1
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise GLAShapeError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {_shape(cu_seqlens)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise GLAShapeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if B != 1:
            raise GLAShapeError(f"with cu_seqlens the batch size must be 1, got q shape {_shape(q)}")
        if cu_contents:
            cu = cu_seqlens.detach().cpu()
            if int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
                raise GLAShapeError(
                    f"cu_seqlens must start at 0, never decrease and end at T={T}, got {cu.tolist()}"
                )
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, Hkv, K, V):
        raise GLAShapeError(
            f"initial_state must be [N, Hkv, d_k, d_v] = [{N}, {Hkv}, {K}, {V}], got shape {_shape(initial_state)}"
        )
    if g_gamma is not None and tuple(g_gamma.shape) != (Hkv,):
        raise GLAShapeError(f"g_gamma must be [Hkv] = [{Hkv}], got shape {_shape(g_gamma)}")
    return GLADims(B, T, Hq, Hkv, K, V, N, gate_per_head)


def default_scale(scale: float | None, K: int) -> float:
    """``scale`` of ``None`` or ``0`` means ``d_k ** -0.5`` (the ONNX attribute's convention too)."""
    return K ** -0.5 if not scale else float(scale)


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Accumulate in float64 when any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def state_dtype(initial_state: torch.Tensor | None, acc: torch.dtype = torch.float32) -> torch.dtype:
    """The state keeps its own type: the initial state's, else the accumulation type (float32,
    or float64 for float64 inputs)."""
    return initial_state.dtype if initial_state is not None else acc


def seq_bounds(dims: GLADims, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence, in state-row order."""
    if cu_seqlens is None:
        return [(b, 0, dims.T) for b in range(dims.B)]
    cu = [int(x) for x in cu_seqlens.detach().cpu().tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
