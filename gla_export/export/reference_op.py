"""``gla::GatedLinearAttention`` for the ONNX reference evaluator (``onnx.reference``).

Lets ``custom`` graphs run and be checked with no native library:
``ReferenceEvaluator(model, new_ops=[GatedLinearAttention])`` or :func:`reference_evaluator`.
The arithmetic is gla_export.ops' chunked form in float32 on CPU torch tensors (the op's
contract, DESIGN.md §1: 3-D packed activations, 4-D state with its own type).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx.reference.op_run import OpRun

from ..ops import GLAShapeError, gated_linear_attention


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype in (np.float16, np.float32, np.float64):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dtype == _bf16():
        return torch.from_numpy(x.astype(np.float32))
    raise GLAShapeError(f"unsupported element type {x.dtype}")


def _like(t: torch.Tensor, ref_dtype: np.dtype) -> np.ndarray:
    return t.detach().cpu().float().numpy().astype(ref_dtype)


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def gla_packed(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    gate: np.ndarray,
    past_state: np.ndarray | None = None,
    cu_seqlens: np.ndarray | None = None,
    g_gamma: np.ndarray | None = None,
    *,
    q_num_heads: int,
    kv_num_heads: int,
    scale: float = 0.0,
    reverse: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The op on numpy arrays in its ONNX layout; returns ``(output, present_state)``."""
    for name, x in (("query", query), ("key", key), ("value", value), ("gate", gate)):
        if x.ndim != 3:
            raise GLAShapeError(f"{name} must be 3-D [B, T, H*D], got shape {_shape(x)}")
    if q_num_heads <= 0 or kv_num_heads <= 0:
        raise GLAShapeError(f"q_num_heads ({q_num_heads}) and kv_num_heads ({kv_num_heads}) must be positive")
    B, T, qd = query.shape
    if qd % q_num_heads or key.shape[2] % kv_num_heads or value.shape[2] % kv_num_heads:
        raise GLAShapeError(
            f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)} do not divide into "
            f"{q_num_heads} query heads and {kv_num_heads} key/value heads"
        )
    K, V = qd // q_num_heads, value.shape[2] // kv_num_heads
    if key.shape[2] // kv_num_heads != K:
        raise GLAShapeError(f"key {_shape(key)} must have head size d_k={K} like query {_shape(query)}")
    if gate.shape[2] == kv_num_heads * K:
        g = _to_torch(gate).reshape(B, T, kv_num_heads, K)
    elif gate.shape[2] == kv_num_heads:  # one decay per head
        g = _to_torch(gate).reshape(B, T, kv_num_heads, 1)
    else:
        raise GLAShapeError(f"gate must be [B, T, Hkv*d_k] = [{B}, {T}, {kv_num_heads * K}], got shape {_shape(gate)}")
    q = _to_torch(query).reshape(B, T, q_num_heads, K)
    k = _to_torch(key).reshape(key.shape[0], key.shape[1], kv_num_heads, K)
    v = _to_torch(value).reshape(value.shape[0], value.shape[1], kv_num_heads, V)
    h0 = None if past_state is None else _to_torch(past_state)
    cu = None if cu_seqlens is None else torch.from_numpy(np.asarray(cu_seqlens).astype(np.int64))
    gamma = None if g_gamma is None else _to_torch(g_gamma)
    # the chunked form, except for a few steps (decode), where the per-step loop is cheaper
    backend = "naive" if q.shape[0] * q.shape[1] <= 16 else "chunk"
    o, ht = gated_linear_attention(q, k, v, g, scale=scale or None, initial_state=h0, output_final_state=True,
                                   g_gamma=gamma, reverse=bool(reverse), cu_seqlens=cu, backend=backend)
    state_dtype = past_state.dtype if past_state is not None else np.dtype(np.float32)
    return _like(o.reshape(B, T, q_num_heads * V), query.dtype), _like(ht, state_dtype)


class GatedLinearAttention(OpRun):
    op_domain = "gla"

    def _run(self, query, key, value, gate, past_state=None, cu_seqlens=None, g_gamma=None,
             q_num_heads=None, kv_num_heads=None, scale=0.0, reverse=0, chunk_size=64):
        if q_num_heads is None or kv_num_heads is None:
            raise GLAShapeError("attributes q_num_heads and kv_num_heads are required")
        return gla_packed(query, key, value, gate, past_state, cu_seqlens, g_gamma,
                          q_num_heads=int(q_num_heads), kv_num_heads=int(kv_num_heads),
                          scale=float(scale or 0.0), reverse=int(reverse or 0))


def reference_evaluator(model, **kwargs):
    """An ``onnx.reference.ReferenceEvaluator`` that knows ``gla::GatedLinearAttention``."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=[GatedLinearAttention], **kwargs)
