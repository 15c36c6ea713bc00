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


# ---- com.microsoft::GroupQueryAttention (the subset ``--attention-op gqa`` emits) ---------------------

_GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
               "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
               "k_norm_weight", "query_seqlens")


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) if x.dtype != _bf16() else x.astype(np.float32)


def group_query_attention(inputs: dict[str, np.ndarray | None], num_heads: int, kv_num_heads: int, scale: float = 0.0,
                          do_rotary: int = 0, local_window_size: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's GroupQueryAttention, as its schema (1.32) describes it and its CPU kernel was
    measured to behave (tests/export/test_hybrid_gqa.py), for what the exporter emits: separate
    3-D q/k/v, BNSH past and present of ``P + S`` slots (no shared buffer, no windowed cache, no
    quantization), every row continuing the same ``P`` cached slots; rotary of the non-interleaved
    halves at ``position_ids`` per token (else ``P + s``); ``attention_bias`` added to the scaled
    scores; causal; ``local_window_size`` W: the query at slot p sees slots p−W+1 .. p.
    Arithmetic in float32, results rounded to the input type. Returns (output, present_key,
    present_value)."""
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    pk, pv = inputs["past_key"], inputs["past_value"]
    if k is None or v is None or pk is None or pv is None:
        raise NotImplementedError("GroupQueryAttention reference: needs separate key/value and past_key/past_value")
    dtype = q.dtype
    B, S, _ = q.shape
    H, Hkv = num_heads, kv_num_heads
    d = q.shape[2] // H
    P = pk.shape[2]
    seqlens = np.asarray(inputs["seqlens_k"]).reshape(-1)
    qlens = inputs["query_seqlens"]
    qlens = np.full(B, S) if qlens is None else np.asarray(qlens).reshape(-1)
    if not (np.all(qlens == S) and np.all(seqlens + 1 == P + S)):
        raise NotImplementedError(f"GroupQueryAttention reference: every row must append its {S} new tokens after the "
                                  f"{P} cached ones (seqlens_k {seqlens.tolist()}, query_seqlens {qlens.tolist()})")
    qf = _as_float32(q).reshape(B, S, H, d)
    kf = _as_float32(k).reshape(B, S, Hkv, d)
    vf = _as_float32(v).reshape(B, S, Hkv, d)
    if do_rotary:
        cos, sin = _as_float32(inputs["cos_cache"]), _as_float32(inputs["sin_cache"])
        pos = inputs["position_ids"]
        pos = np.broadcast_to(P + np.arange(S), (B, S)) if pos is None else np.asarray(pos)
        c, s_ = cos[pos][:, :, None, :], sin[pos][:, :, None, :]  # [B,S,1,d/2]

        def rotate(x):
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            out = np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_], -1)
            return out.astype(dtype).astype(np.float32) if dtype != np.float32 else out

        qf, kf = rotate(qf), rotate(kf)
    present_k = np.concatenate([_as_float32(pk), kf.transpose(0, 2, 1, 3)], 2)  # [B,Hkv,P+S,d]
    present_v = np.concatenate([_as_float32(pv), vf.transpose(0, 2, 1, 3)], 2)
    G = H // Hkv
    kk, vv = np.repeat(present_k, G, 1), np.repeat(present_v, G, 1)  # [B,H,P+S,d]
    scores = qf.transpose(0, 2, 1, 3) @ kk.transpose(0, 1, 3, 2) * (scale or d ** -0.5)  # [B,H,S,P+S]
    if inputs["attention_bias"] is not None:
        scores = scores + _as_float32(inputs["attention_bias"])
    j, qi = np.arange(P + S), P + np.arange(S)[:, None]
    ok = j <= qi
    if local_window_size >= 0:
        ok &= qi - j < local_window_size
    scores = np.where(ok, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ vv).transpose(0, 2, 1, 3).reshape(B, S, H * d)
    return out.astype(dtype), present_k.astype(pk.dtype), present_v.astype(pv.dtype)


class GroupQueryAttention(OpRun):
    op_domain = "com.microsoft"

    def _run(self, *args, **_attrs):
        node = self.onnx_node
        attrs = {a.name: a for a in node.attribute}
        supported = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size"}
        other = sorted(n for n in attrs if n not in supported)
        if other or (("rotary_interleaved" in attrs) and attrs["rotary_interleaved"].i):
            raise NotImplementedError(f"GroupQueryAttention reference: attributes {other or ['rotary_interleaved=1']} "
                                      "are not modelled")
        inputs = dict.fromkeys(_GQA_INPUTS)
        for i, name in enumerate(node.input):
            if name and i < len(_GQA_INPUTS):
                inputs[_GQA_INPUTS[i]] = args[i]
        for unused in ("head_sink", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight"):
            if inputs[unused] is not None:
                raise NotImplementedError(f"GroupQueryAttention reference: input {unused} is not modelled")

        def get(name, default):
            return attrs[name].f if name == "scale" and name in attrs else attrs[name].i if name in attrs else default

        out = group_query_attention(inputs, get("num_heads", 0), get("kv_num_heads", 0), get("scale", 0.0),
                                    get("do_rotary", 0), get("local_window_size", -1))
        return out[: max(1, len(node.output))]


def reference_evaluator(model, **kwargs):
    """An ``onnx.reference.ReferenceEvaluator`` that knows ``gla::GatedLinearAttention`` and the
    ``com.microsoft::GroupQueryAttention`` nodes of ``--attention-op gqa``."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=[GatedLinearAttention, GroupQueryAttention], **kwargs)
