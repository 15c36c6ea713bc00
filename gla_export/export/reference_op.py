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
from ..ops.contract import GLA, check_node, infer_problem


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


def _desc(x: np.ndarray | None) -> tuple[str, list[int]] | None:
    if x is None:
        return None
    name = "bfloat16" if x.dtype == _bf16() else np.dtype(x.dtype).name
    return name, list(x.shape)


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
    chunk_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """The op on numpy arrays in its ONNX layout; returns ``(output, present_state)``.

    Inputs and attributes go through the op contract (gla_export.ops.contract, the kernel core's
    gla::infer_problem in Python): the same nodes are accepted, with the same messages, as in
    ONNX Runtime and TensorRT."""
    attrs = dict(q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, scale=float(scale), reverse=reverse,
                 chunk_size=chunk_size)
    p = infer_problem(GLA, attrs, [_desc(x) for x in (query, key, value, gate, past_state, cu_seqlens, g_gamma)])
    B, T, K, V = p.batch, p.seq_len, p.head_dim_k, p.head_dim_v
    g = _to_torch(gate).reshape(B, T, kv_num_heads, 1 if p.gate_per_head else K)
    q = _to_torch(query).reshape(B, T, q_num_heads, K)
    k = _to_torch(key).reshape(B, T, kv_num_heads, K)
    v = _to_torch(value).reshape(B, T, kv_num_heads, V)
    h0 = None if past_state is None else _to_torch(past_state)
    cu = None if cu_seqlens is None else torch.from_numpy(np.asarray(cu_seqlens).astype(np.int64))
    gamma = None if g_gamma is None else _to_torch(g_gamma)
    # the chunked form, except for a few steps (decode), where the per-step loop is cheaper
    backend = "naive" if B * T <= 16 else "chunk"
    o, ht = gated_linear_attention(q, k, v, g, scale=p.scale or None, initial_state=h0, output_final_state=True,
                                   g_gamma=gamma, reverse=p.reverse, cu_seqlens=cu, backend=backend)
    state_dtype = past_state.dtype if past_state is not None else np.dtype(np.float32)
    return _like(o.reshape(B, T, q_num_heads * V), query.dtype), _like(ht, state_dtype)


class GatedLinearAttention(OpRun):
    op_domain = "gla"

    def _run(self, query, key, value, gate, past_state=None, cu_seqlens=None, g_gamma=None, **_attrs):
        # the node's own attributes, unknown ones refused (as TensorRT's creator does; ONNX
        # Runtime's custom-op API cannot see them, see docs/op-contract.md)
        a = check_node(self.onnx_node)
        o, s = gla_packed(query, key, value, gate, past_state, cu_seqlens, g_gamma, q_num_heads=a["q_num_heads"],
                          kv_num_heads=a["kv_num_heads"], scale=a["scale"], reverse=a["reverse"],
                          chunk_size=a["chunk_size"])
        return (o, s)[: max(1, len(self.onnx_node.output))]


def reference_evaluator(model, **kwargs):
    """An ``onnx.reference.ReferenceEvaluator`` that knows ``gla::GatedLinearAttention``."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=[GatedLinearAttention], **kwargs)
