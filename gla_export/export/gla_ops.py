"""The GLA operation in ONNX, three ways (``--gla-op``).

- ``custom``: one ``gla::GatedLinearAttention`` node (DESIGN.md §1), run by our ONNX Runtime
  library and TensorRT plugin, or by the Python reference in :mod:`gla_export.export.reference_op`.
- ``onnx``: one standard ``LinearAttention`` node (opset 27, ``update_rule="gated"``).
- ``decomposed``: standard ops only (opset <= 26), runnable anywhere. Prefill is the chunked
  matrix form of gla_export/ops/chunk.py, batched over all chunks at once; only the carried
  state goes through a ``Scan`` over chunks. The step (T = 1) is a handful of ops.

Every form takes 3-D packed ``query [B,T,Hq·d_k]``, ``key [B,T,Hkv·d_k]``, ``value [B,T,Hkv·d_v]``,
a float32 log decay ``gate [B,T,Hkv·d_k]`` and ``past_state [B,Hkv,d_k,d_v]``, and returns
``output [B,T,Hq·d_v]`` in the activation type and ``present_state`` in the state type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..ops.contract import check_attributes
from .graph import GraphBuilder

FORMS = ("custom", "onnx", "decomposed")
CUSTOM_DOMAIN = "gla"
CUSTOM_OP = "GatedLinearAttention"
CUSTOM_VERSION = 1
ONNX_OP = "LinearAttention"
ONNX_OP_OPSET = 27  # the first opset with LinearAttention
DECOMPOSED_MAX_OPSET = 26

# chunked form: chunks of CHUNK steps, cut into sub-chunks of SUB steps (as gla_export.ops.chunk)
CHUNK = 64
SUB = 16


@dataclass(frozen=True)
class GLAShape:
    Hq: int
    Hkv: int
    K: int
    V: int
    scale: float

    @property
    def groups(self) -> int:
        return self.Hq // self.Hkv


def emit_gla(
    b: GraphBuilder,
    form: str,
    query: str,
    key: str,
    value: str,
    gate_f32: str,
    past_state: str,
    shape: GLAShape,
    act_type: int,
    state_type: int,
    single_step: bool,
) -> tuple[str, str]:
    """Emit the GLA op; returns ``(output, present_state)`` value names."""
    if form in ("custom", "onnx"):
        # the op contract's attribute table (gla_export/ops/contract.py): what every engine accepts,
        # and nothing else (ONNX Runtime's custom-op API could not see an unknown attribute)
        attrs = dict(q_num_heads=shape.Hq, kv_num_heads=shape.Hkv, scale=float(shape.scale))
        if form == "onnx":
            attrs["update_rule"] = "gated"
        check_attributes(CUSTOM_OP if form == "custom" else ONNX_OP, attrs)
        gate = b.cast(gate_f32, act_type, TensorProto.FLOAT)
        if form == "custom":
            inputs, extra = [query, key, value, gate, past_state], dict(domain=CUSTOM_DOMAIN)
        else:
            inputs, extra = [query, key, value, past_state, gate], {}
        o, s = b.op(CUSTOM_OP if form == "custom" else ONNX_OP, inputs, n_out=2,
                    hint=CUSTOM_OP if form == "custom" else ONNX_OP, **extra, **attrs)
        return o, s
    if form != "decomposed":
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    F = TensorProto.FLOAT
    q, k, v = (b.cast(x, F, act_type) for x in (query, key, value))
    s0 = b.cast(past_state, F, state_type)
    if single_step:
        o, s = _decomposed_step(b, q, k, v, gate_f32, s0, shape)
    else:
        o, s = _decomposed_chunked(b, q, k, v, gate_f32, s0, shape)
    return b.cast(o, act_type, F), b.cast(s, state_type, F)


def _decomposed_step(b: GraphBuilder, q, k, v, g, s0, sh: GLAShape) -> tuple[str, str]:
    """One step: ``S = exp(g) ⊙ S + kᵀv``, ``o = scale · q S`` (query head h reads kv head h // G)."""
    qh = b.op("Reshape", [q, b.i64(0, sh.Hkv, sh.groups, sh.K)])  # [B,Hkv,G,K]
    kh = b.op("Reshape", [k, b.i64(0, sh.Hkv, sh.K, 1)])
    vh = b.op("Reshape", [v, b.i64(0, sh.Hkv, 1, sh.V)])
    gh = b.op("Reshape", [g, b.i64(0, sh.Hkv, sh.K, 1)])
    s1 = b.op("Add", [b.op("Mul", [b.op("Exp", [gh]), s0]), b.op("Mul", [kh, vh])])
    o = b.op("Mul", [b.op("MatMul", [qh, s1]), b.scalar(sh.scale, TensorProto.FLOAT)])  # [B,Hkv,G,V]
    return b.op("Reshape", [o, b.i64(0, 1, sh.Hq * sh.V)]), s1


def _scan_body(sh: GLAShape) -> onnx.GraphProto:
    """Carry the state across chunks: ``S_start[c] = S``; ``S ← decay[c] ⊙ S + dS[c]``."""
    F = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["decay_c", "S_in"], ["decayed"], name="scan/Mul"),
        helper.make_node("Add", ["decayed", "dS_c"], ["S_out"], name="scan/Add"),
        helper.make_node("Identity", ["S_in"], ["S_start_c"], name="scan/Identity"),
    ]
    return helper.make_graph(
        nodes,
        "gla_state_scan",
        [
            helper.make_tensor_value_info("S_in", F, ["batch", sh.Hkv, sh.K, sh.V]),
            helper.make_tensor_value_info("decay_c", F, ["batch", sh.Hkv, sh.K, 1]),
            helper.make_tensor_value_info("dS_c", F, ["batch", sh.Hkv, sh.K, sh.V]),
        ],
        [
            helper.make_tensor_value_info("S_out", F, ["batch", sh.Hkv, sh.K, sh.V]),
            helper.make_tensor_value_info("S_start_c", F, ["batch", sh.Hkv, sh.K, sh.V]),
        ],
    )


def _decomposed_chunked(b: GraphBuilder, q, k, v, g, s0, sh: GLAShape) -> tuple[str, str]:
    """The chunked matrix form (gla_export/ops/chunk.py), every exponential <= 1 for g <= 0."""
    F = TensorProto.FLOAT
    C, G, Hkv, K, V = CHUNK, sh.groups, sh.Hkv, sh.K, sh.V
    T = b.op("Shape", [q], start=1, end=2)  # [1]
    c = b.i64(C)
    pad = b.op("Mod", [b.op("Sub", [c, b.op("Mod", [T, c])]), c])
    # padded steps have k = 0 and g = 0: they leave the state alone, so the final state is exact
    pads = b.op("Concat", [b.i64(0, 0, 0, 0), pad, b.i64(0)], axis=0)
    qp, kp, vp, gp = (b.op("Pad", [x, pads]) for x in (q, k, v, g))

    # chunks lead ([NC, B, Hkv, ...]) so that the Scan walks axis 0 (the only axis every runtime's Scan takes)
    qc = b.op("Transpose", [b.op("Reshape", [qp, b.i64(0, -1, C, Hkv, G, K)])], perm=[1, 0, 3, 4, 2, 5])  # [NC,B,Hkv,G,C,K]
    kc = b.op("Transpose", [b.op("Reshape", [kp, b.i64(0, -1, C, Hkv, K)])], perm=[1, 0, 3, 2, 4])  # [NC,B,Hkv,C,K]
    vc = b.op("Transpose", [b.op("Reshape", [vp, b.i64(0, -1, C, Hkv, V)])], perm=[1, 0, 3, 2, 4])  # [NC,B,Hkv,C,V]
    gc = b.op("Transpose", [b.op("Reshape", [gp, b.i64(0, -1, C, Hkv, K)])], perm=[1, 0, 3, 2, 4])
    Gc = b.op("CumSum", [gc, b.const(3, np.int64, "axis")])  # Γ inside each chunk
    Gl = b.op("Slice", [Gc, b.i64(-1), b.i64(C), b.i64(3)])  # Γ_C: [NC,B,Hkv,1,K]

    # each chunk's own contribution to the state; the carried state goes through a Scan
    kd = b.op("Mul", [kc, b.op("Exp", [b.op("Sub", [Gl, Gc])])])
    dS = b.op("MatMul", [b.op("Transpose", [kd], perm=[0, 1, 2, 4, 3]), vc])  # [NC,B,Hkv,K,V]
    decay = b.op("Transpose", [b.op("Exp", [Gl])], perm=[0, 1, 2, 4, 3])  # [NC,B,Hkv,K,1]
    s_final, s_start = b.op("Scan", [s0, decay, dS], n_out=2, body=_scan_body(sh), num_scan_inputs=2)

    # state carried in: scale · (q ⊙ exp(Γ)) S_start
    qe = b.op("Mul", [qc, b.op("Unsqueeze", [b.op("Exp", [Gc]), b.i64(3)])])
    o = b.op("MatMul", [qe, b.op("Unsqueeze", [s_start, b.i64(3)])])  # [NC,B,Hkv,G,C,V]
    # inside the chunk
    A = _intra_chunk_scores(b, qc, kc, Gc, sh)  # [NC,B,Hkv,G,C,C]
    o = b.op("Add", [o, b.op("MatMul", [A, b.op("Unsqueeze", [vc, b.i64(3)])])])
    o = b.op("Mul", [o, b.scalar(sh.scale, F)])
    o = b.op("Reshape", [b.op("Transpose", [o], perm=[1, 0, 4, 2, 3, 5]), b.i64(0, -1, sh.Hq * V)])
    o = b.op("Slice", [o, b.i64(0), T, b.i64(1)])
    return o, s_final


def _intra_chunk_scores(b: GraphBuilder, qc, kc, Gc, sh: GLAShape) -> str:
    """``A[i, j] = q_i · (k_j ⊙ exp(Γ_i − Γ_j))`` for ``j <= i`` inside each chunk (see
    ``intra_chunk_scores`` in gla_export/ops/chunk.py). Between two sub-chunks the factor is split
    at the first step of the later one, so both halves are <= 1 (for log-gates <= 0); on the
    diagonal sub-chunk it is computed per pair."""
    F = TensorProto.FLOAT
    C, s, K = CHUNK, SUB, sh.K
    ns = C // s
    qs = b.op("Reshape", [qc, b.i64(0, 0, 0, 0, ns, s, K)])  # [NC,B,Hkv,G,ns,s,K]
    ks = b.op("Reshape", [kc, b.i64(0, 0, 0, ns, s, K)])  # [NC,B,Hkv,ns,s,K]
    Gs = b.op("Reshape", [Gc, b.i64(0, 0, 0, ns, s, K)])
    Gn = b.op("Slice", [Gs, b.i64(0), b.i64(1), b.i64(4)])  # first step of each sub-chunk [..,ns,1,K]
    zero = b.scalar(0.0, F)

    # between sub-chunks a > b
    q_scaled = b.op("Mul", [qs, b.op("Unsqueeze", [b.op("Exp", [b.op("Sub", [Gs, Gn])]), b.i64(3)])])
    # pairs a <= b are masked below: their exponent is zeroed first (it could overflow), the used
    # ones stay exact (a positive log-gate is computed as the formula says, docs/op-contract.md)
    below_b = np.arange(ns)[:, None, None, None] > np.arange(ns)[None, :, None, None]
    expo = b.op("Where", [b.const(below_b, np.bool_, "below_mask"),
                          b.op("Sub", [b.op("Unsqueeze", [Gn, b.i64(4)]), b.op("Unsqueeze", [Gs, b.i64(3)])]), zero])
    k_scaled = b.op("Mul", [b.op("Unsqueeze", [ks, b.i64(3)]), b.op("Exp", [expo])])  # [..,ns_a,ns_b,s,K]
    k_scaled_t = b.op("Unsqueeze", [b.op("Transpose", [k_scaled], perm=[0, 1, 2, 3, 4, 6, 5]), b.i64(3)])
    A_off = b.op("MatMul", [b.op("Unsqueeze", [q_scaled, b.i64(5)]), k_scaled_t])  # [..,G,ns_a,ns_b,s_i,s_j]
    below = (np.arange(ns)[:, None] > np.arange(ns)[None, :]).astype(np.float32)[:, :, None, None]
    A_off = b.op("Mul", [A_off, b.const(below, np.float32, "below")])

    # the diagonal sub-chunk, per pair (i, j)
    causal = np.tril(np.ones((s, s), dtype=bool))[:, :, None]  # i >= j; the rest is zeroed below
    E = b.op("Exp", [b.op("Where", [b.const(causal, np.bool_, "causal_mask"),
                                    b.op("Sub", [b.op("Unsqueeze", [Gs, b.i64(5)]), b.op("Unsqueeze", [Gs, b.i64(4)])]),
                                    zero])])
    KE = b.op("Mul", [b.op("Unsqueeze", [ks, b.i64(4)]), E])  # [..,ns,s_i,s_j,K]
    KE_t = b.op("Unsqueeze", [b.op("Transpose", [KE], perm=[0, 1, 2, 3, 4, 6, 5]), b.i64(3)])  # [..,1,ns,s_i,K,s_j]
    A_d = b.op("MatMul", [b.op("Unsqueeze", [qs, b.i64(6)]), KE_t])  # [..,G,ns,s_i,1,s_j]
    tril = np.tril(np.ones((s, s), dtype=np.float32))
    A_d = b.op("Mul", [b.op("Squeeze", [A_d, b.i64(6)]), b.const(tril, np.float32, "tril")])

    A = b.op("Transpose", [A_off], perm=[0, 1, 2, 3, 4, 6, 5, 7])  # [..,G,ns_a,s_i,ns_b,s_j]
    eye = np.eye(ns, dtype=np.float32)[:, None, :, None]
    A = b.op("Add", [A, b.op("Mul", [b.op("Unsqueeze", [A_d, b.i64(6)]), b.const(eye, np.float32, "eye")])])
    return b.op("Reshape", [A, b.i64(0, 0, 0, 0, C, C)])
