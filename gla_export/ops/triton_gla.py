"""The Triton backend of the GLA op: a chunked prefill and a fused recurrent step (forward only).

``triton_gla`` has the signature, arguments and return of :func:`gla_export.ops.naive.naive_gla`
and picks the kernel family:

- the fused recurrent kernel (gla_export/ops/_triton/recurrent.py) when every sequence has at
  most ``RECURRENT_MAX_T`` steps (decode, short appends) — the state is read and written once —
  and whenever the reference would accumulate in float64 (float64 inputs or state);
- the chunked prefill (gla_export/ops/_triton/chunk.py) otherwise.

``triton_gla_chunk`` and ``triton_gla_recurrent`` force one family (tests, benchmarks).

The kernels run on CUDA tensors. For tests without a GPU they also run on CPU tensors under the
Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``) before this module is
first imported, because ``triton.jit`` reads it when the kernels are defined.
"""

from __future__ import annotations

import contextlib

import torch

from ._common import GLADims, GLAShapeError, acc_dtype, check_inputs, default_scale, state_dtype
from ._triton.chunk import chunk_forward
from ._triton.common import interpreting
from ._triton.recurrent import recurrent_forward

# Sequences up to this many steps take the recurrent kernel: below it the chunked form's four
# launches and its per-chunk state round trip cost more than walking the steps.
RECURRENT_MAX_T = 32

KERNELS = ("auto", "chunk", "recurrent")


def triton_gla(
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
    *,
    _dims: GLADims | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with Triton kernels; see :func:`gla_export.ops.gated_linear_attention`."""
    return _forward("auto", q, k, v, g, scale, initial_state, output_final_state, g_gamma, reverse, cu_seqlens, _dims)


def triton_gla_chunk(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`triton_gla` through the chunked prefill kernels, whatever the length (no float64)."""
    return _forward("chunk", q, k, v, g, scale, initial_state, output_final_state, g_gamma, reverse, cu_seqlens)


def triton_gla_recurrent(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`triton_gla` through the fused recurrent kernel, whatever the length."""
    return _forward("recurrent", q, k, v, g, scale, initial_state, output_final_state, g_gamma, reverse, cu_seqlens)


def pick_kernel(max_len: int, acc: torch.dtype) -> str:
    """The kernel family ``triton_gla`` runs for sequences of at most ``max_len`` steps."""
    return "recurrent" if acc == torch.float64 or max_len <= RECURRENT_MAX_T else "chunk"


def _check_runnable(named: dict[str, torch.Tensor | None]) -> None:
    q = named["q"]
    if q.device.type != "cuda" and not interpreting():
        raise GLAShapeError(
            f"q is on {q.device}: the Triton backend runs CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1); use backend='chunk' on the CPU"
        )
    for name, t in named.items():
        if t is not None and name != "cu_seqlens" and t.device != q.device:
            raise GLAShapeError(f"{name} is on {t.device} but q is on {q.device}; move every input to one device")
    if torch.is_grad_enabled():
        needs = [name for name, t in named.items() if t is not None and t.requires_grad]
        if needs:
            raise RuntimeError(
                f"the Triton GLA kernels are forward only, but {', '.join(needs)} require grad; "
                f"run under torch.no_grad() / torch.inference_mode(), or use backend='chunk' to train"
            )


def _forward(kernel, q, k, v, g, scale, initial_state, output_final_state, g_gamma, reverse, cu_seqlens, _dims=None):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    dims = _dims or check_inputs(q, k, v, g, initial_state, g_gamma, cu_seqlens)
    _check_runnable(dict(q=q, k=k, v=v, g=g, initial_state=initial_state, g_gamma=g_gamma, cu_seqlens=cu_seqlens))
    acc = acc_dtype(q, initial_state)
    scale = default_scale(scale, dims.K)
    ht_dtype = state_dtype(initial_state, acc) if output_final_state else None
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens.detach().cpu().tolist()]
    max_len = dims.T if cu is None else max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
    if kernel == "auto":
        kernel = pick_kernel(max_len, acc)
    if kernel == "chunk" and acc == torch.float64:
        raise GLAShapeError(
            f"the chunked Triton kernels have no float64 path (q is {q.dtype}, initial_state is "
            f"{None if initial_state is None else initial_state.dtype}); triton_gla runs float64 through the recurrent kernel"
        )

    dev = q.device
    if dims.B == 0 or dims.T == 0:
        o = torch.zeros(dims.B, dims.T, dims.Hq, dims.V, dtype=q.dtype, device=dev)
        if ht_dtype is None:
            return o, None
        if initial_state is None:
            return o, torch.zeros(dims.N, dims.Hkv, dims.K, dims.V, dtype=ht_dtype, device=dev)
        return o, initial_state.to(ht_dtype, copy=True)

    q, k, v = (x.contiguous() for x in (q, k, v))
    g = None if g is None else g.contiguous()
    gamma = None if g_gamma is None else g_gamma.to(acc).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    cu_dev = None if cu_seqlens is None else cu_seqlens.to(dev).contiguous()
    # Triton launches on the current device, which need not be the inputs' one
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if kernel == "chunk":
            return chunk_forward(q, k, v, g, gamma, h0, scale, reverse, cu, cu_dev, ht_dtype)
        return recurrent_forward(q, k, v, g, gamma, h0, scale, reverse, dims.N, cu_dev, ht_dtype, acc)
