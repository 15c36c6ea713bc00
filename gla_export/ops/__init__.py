"""The GLA operation: one public function, several algorithms behind it.

``gated_linear_attention(q, k, v, g, ...)`` returns ``(o, final_state)`` with tensors
``[B, T, H, D]`` (DESIGN.md §1). Backends:

- ``naive``: the reference, a per-step loop (gla_export/ops/naive.py);
- ``chunk``: the chunked matrix form in PyTorch, fast on the CPU and differentiable;
- ``triton``: chunked prefill and fused recurrent-step kernels for CUDA tensors (forward only);
- ``native``: our C++/CUDA kernel core through ctypes (gla_export/ops/native.py; never picked by ``auto``);
- ``auto``: ``triton`` for CUDA tensors when Triton is importable, else ``chunk``.
"""

from __future__ import annotations

import torch

from ._common import GLAShapeError, check_inputs
from .chunk import chunk_gla
from .naive import naive_gla

BACKENDS = ("auto", "naive", "chunk", "triton", "native")

__all__ = ["BACKENDS", "GLAShapeError", "chunk_gla", "gated_linear_attention", "naive_gla", "triton_available"]


def triton_available() -> bool:
    """True when the Triton backend can run here (CUDA present, or the Triton interpreter enabled)."""
    try:
        from . import triton_gla  # noqa: F401
    except ImportError:
        return False
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and triton_available():
        return "triton"
    return "chunk"


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    g_gamma: torch.Tensor | None = None,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention.

    Args:
        q: queries ``[B, T, Hq, d_k]``.
        k: keys ``[B, T, Hkv, d_k]``; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        v: values ``[B, T, Hkv, d_v]``.
        g: log-space decay ``[B, T, Hkv, d_k]`` (``≤ 0``), or ``[B, T, Hkv, 1]`` for one decay per
            head, or ``None`` for no decay.
        scale: output scale; ``None`` or ``0`` means ``d_k ** -0.5``.
        initial_state: ``[N, Hkv, d_k, d_v]``; zeros when ``None``. Its dtype is the state's dtype.
        output_final_state: also return the state after the last step.
        g_gamma: ``[Hkv]`` constant per-head log decay added to ``g``.
        reverse: walk each sequence from its end to its start.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of ragged sequences packed along ``T`` (``B == 1``).
        backend: ``auto``, ``naive``, ``chunk`` or ``triton``.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, Hq, d_v]`` in ``q``'s dtype; ``final_state`` is
        ``[N, Hkv, d_k, d_v]`` in the initial state's dtype (float32 without one), or ``None``.
    """
    chosen = _pick_backend(backend, q)
    # validated once, here; the backend reuses the sizes. The native kernels on CUDA read
    # cu_seqlens on the device, so only there its contents are not read back to the host.
    host_cu = cu_seqlens is None or cu_seqlens.device.type == "cpu" or chosen != "native"
    dims = check_inputs(q, k, v, g, initial_state, g_gamma, cu_seqlens, cu_contents=host_cu)
    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        g_gamma=g_gamma,
        reverse=reverse,
        cu_seqlens=cu_seqlens,
        _dims=dims,
    )
    if chosen == "naive":
        return naive_gla(q, k, v, g, **kwargs)
    if chosen == "triton":
        from .triton_gla import triton_gla

        return triton_gla(q, k, v, g, **kwargs)
    if chosen == "native":
        from .native import native_gla

        return native_gla(q, k, v, g, **kwargs)
    # short inputs (decode steps) do not need a full 64-step chunk of padding
    chunk_size = min(64, max(16, -(-q.shape[1] // 16) * 16))
    return chunk_gla(q, k, v, g, chunk_size=chunk_size, **kwargs)
