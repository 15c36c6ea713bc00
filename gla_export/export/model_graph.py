"""The GLA causal LM as ONNX graphs: prefill (dynamic T) and step (T = 1).

Mirrors gla_export/models/modeling.py operation for operation: RMSNorm in float32 (cast back to
the activation type), the log decay ``logsigmoid(gk_proj x) / normalizer`` clamped at clamp_min
in float32, GQA, the short convolutions with their cache of the last ``conv_size − 1`` inputs,
the gated RMSNorm on the output, the SwiGLU MLP and tied embeddings. Two rewrites that change no
result: the projections that read the same input are one MatMul over their concatenated weights
(q, k, v, output gate and the first gk_proj factor; the MLP's gate and up) and the three short
convolutions are one depthwise convolution over their concatenated channels — fewer, larger
kernels, which matters most for the launch-bound decode step. Masking a row commutes with the
projection (``(x·m)W = (xW)·m`` for m in {0, 1}), so the mask is applied after it.

Logits are float32 whatever the activation type.

Hybrid models: a softmax-attention layer (modeling.py's ``Attention``) is q/k/v projections (one
MatMul, with the concatenated bias when the checkpoint has one), the rotary embedding from the
row's positions, its KV cache ``past_key_values.{i}.key/.value [B, Hkv, L, d]`` extended by the
new keys (left padding moved out, as for the convolutions), a masked softmax in float32 (GQA as a
broadcast over the query groups) and o_proj; standard ops only (MatMul/Softmax), which every
runtime runs. A full-attention layer's present cache is ``L + T`` long; a windowed layer's keeps
the last W positions. One more state, ``past_key_values.position [B]`` (int64), counts each row's
real tokens: the rotary position of its next token and which cache slots hold real keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from ..models.config import GLAConfig
from ..models.modeling import GLAForCausalLM
from .gla_ops import GLAShape, emit_gla
from .graph import TORCH_TO_ONNX, GraphBuilder, WeightTable

BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"  # a full-attention layer's cache length before the call ...
PRESENT_SEQUENCE = "present_sequence"  # ... and after it (past_sequence + sequence)
POSITION_STATE = "position"


@dataclass(frozen=True)
class GraphSpec:
    config: GLAConfig
    dtype: torch.dtype  # activations and weights
    state_dtype: torch.dtype  # the GLA recurrent state
    form: str
    attention_mask: bool = True
    attention_op: str = "decomposed"  # hybrids: "decomposed" (MatMul/Softmax) or "onnx" (Attention, RotaryEmbedding; opset 23)

    @property
    def act_type(self) -> int:
        return TORCH_TO_ONNX[self.dtype]

    @property
    def state_type(self) -> int:
        return TORCH_TO_ONNX[self.state_dtype]


def state_names(layer: int, kind: str) -> tuple[str, str]:
    """(input name, output name) of one layer's state; kind is ``recurrent_state``, ``conv_state``,
    ``key`` or ``value``."""
    return f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"


def state_specs(spec: GraphSpec) -> list[dict]:
    """Every state tensor: name in and out, shape (``"batch"`` first) in and out, ONNX element type,
    and how it grows (``memory``: ``fixed`` or ``grows``, with ``bytes_per_token`` per row)."""
    c = spec.config
    out = []
    for i in range(c.num_hidden_layers):
        a = c.attention_spec(i)
        if a is not None:
            d, hkv, w = c.attention_head_dim(i), a["num_kv_heads"], a["window_size"]
            itemsize = torch.empty((), dtype=spec.dtype).element_size()
            for kind in ("key", "value"):
                name_in, name_out = state_names(i, kind)
                out.append(dict(layer=i, kind=kind, input=name_in, output=name_out,
                                shape=[BATCH, hkv, w if w else PAST_SEQUENCE, d],
                                output_shape=[BATCH, hkv, w if w else PRESENT_SEQUENCE, d],
                                elem_type=spec.act_type, window_size=w,
                                memory="fixed" if w else "grows",
                                bytes_per_token=0 if w else hkv * d * itemsize))
            continue
        name_in, name_out = state_names(i, "recurrent_state")
        out.append(dict(layer=i, kind="recurrent_state", input=name_in, output=name_out,
                        shape=[BATCH, c.kv_heads, c.head_k_dim, c.head_v_dim], elem_type=spec.state_type))
        if c.use_short_conv:
            name_in, name_out = state_names(i, "conv_state")
            out.append(dict(layer=i, kind="conv_state", input=name_in, output=name_out,
                            shape=[BATCH, c.conv_channels, c.conv_size - 1], elem_type=spec.act_type))
    if c.attn is not None:
        out.append(dict(layer=None, kind=POSITION_STATE, input=f"past_key_values.{POSITION_STATE}",
                        output=f"present.{POSITION_STATE}", shape=[BATCH], elem_type=TensorProto.INT64))
    for st in out:
        st.setdefault("output_shape", st["shape"])
        st.setdefault("memory", "fixed")
        st.setdefault("bytes_per_token", 0)
    return out


# ---------------------------------------------------------------------------------------------
# weights: names in the graphs, and how to produce each tensor from the PyTorch model
# ---------------------------------------------------------------------------------------------


def register_weights(model: GLAForCausalLM, table: WeightTable) -> None:
    """Register every tensor the graphs use, in a streaming-friendly order (one layer at a time).

    Linear weights are stored transposed (``[in, out]``, as MatMul wants them); fused groups are
    concatenated along the output dimension. Each tensor is produced only while it is written.
    """
    c = model.config

    def add(name: str, produce, shape, dtype):
        table.add(name, shape, dtype, produce)

    def param(name: str, t: torch.Tensor):
        add(name, lambda: t.detach(), tuple(t.shape), t.dtype)

    def linear_t(name: str, *ts: torch.Tensor):
        rows = sum(t.shape[0] for t in ts)
        add(name, lambda: torch.cat([t.detach() for t in ts], 0).t().contiguous(), (ts[0].shape[1], rows), ts[0].dtype)

    emb = model.model.embeddings.weight
    param("model.embeddings.weight", emb)
    for i, layer in enumerate(model.model.layers):
        p, a = f"model.layers.{i}", layer.attn
        param(f"{p}.attn_norm.weight", layer.attn_norm.weight)
        if c.attention_spec(i) is not None:
            linear_t(f"{p}.attn.qkv_proj.weight", a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            if a.q_proj.bias is not None:
                biases = (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
                add(f"{p}.attn.qkv_proj.bias", lambda bs=biases: torch.cat([t.detach() for t in bs]),
                    (sum(t.shape[0] for t in biases),), biases[0].dtype)
            linear_t(f"{p}.attn.o_proj.weight", a.o_proj.weight)
            param(f"{p}.mlp_norm.weight", layer.mlp_norm.weight)
            linear_t(f"{p}.mlp.gate_up_proj.weight", layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
            linear_t(f"{p}.mlp.down_proj.weight", layer.mlp.down_proj.weight)
            continue
        parts = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        if c.use_output_gate:
            parts.append(a.g_proj.weight)
        parts.append(a.gk_proj[0].weight)
        linear_t(f"{p}.attn.in_proj.weight", *parts)
        linear_t(f"{p}.attn.gk_proj.1.weight", a.gk_proj[1].weight)
        param(f"{p}.attn.gk_proj.1.bias", a.gk_proj[1].bias)
        if c.use_short_conv:
            convs = (a.q_conv1d, a.k_conv1d, a.v_conv1d)
            w0 = convs[0].weight
            add(f"{p}.attn.conv1d.weight", lambda convs=convs: torch.cat([m.weight.detach() for m in convs], 0),
                (c.conv_channels, 1, c.conv_size), w0.dtype)
            if c.conv_bias:
                add(f"{p}.attn.conv1d.bias", lambda convs=convs: torch.cat([m.bias.detach() for m in convs], 0),
                    (c.conv_channels,), w0.dtype)
        norm = a.g_norm_swish_gate if c.fuse_norm_and_gate else a.g_norm
        if norm.weight is not None:
            param(f"{p}.attn.{'g_norm_swish_gate' if c.fuse_norm_and_gate else 'g_norm'}.weight", norm.weight)
        linear_t(f"{p}.attn.o_proj.weight", a.o_proj.weight)
        param(f"{p}.mlp_norm.weight", layer.mlp_norm.weight)
        linear_t(f"{p}.mlp.gate_up_proj.weight", layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
        linear_t(f"{p}.mlp.down_proj.weight", layer.mlp.down_proj.weight)
    param("model.norm.weight", model.model.norm.weight)
    if not c.tie_word_embeddings:
        param("lm_head.weight", model.lm_head.weight)  # [V, H]: used through Gemm(transB=1), like the tied one


# ---------------------------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------------------------


def _rms_norm(b: GraphBuilder, x: str, weight: str | None, weight_type: int, eps: float, act: int) -> str:
    """``rms_norm`` of modeling.py: float32 inside, cast back to ``act``. Written as the pattern
    ONNX Runtime's optimizer fuses into one ``SimplifiedLayerNormalization`` (Pow, ReduceMean,
    Add, Sqrt, Div, Mul by the weight): six kernels a norm become one (issue 12)."""
    F = TensorProto.FLOAT
    xf = b.cast(x, F, act)
    ms = b.op("ReduceMean", [b.op("Pow", [xf, b.scalar(2.0, F)]), b.i64(-1)], keepdims=1)
    y = b.op("Div", [xf, b.op("Sqrt", [b.op("Add", [ms, b.scalar(eps, F)])])])
    if weight is not None:
        y = b.op("Mul", [y, b.cast(weight, F, weight_type)])
    return b.cast(y, act, F)


def _silu(b: GraphBuilder, x: str) -> str:
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _log_sigmoid(b: GraphBuilder, x: str) -> str:
    """``min(x, 0) − log(1 + exp(−|x|))``: no overflow for any x."""
    F = TensorProto.FLOAT
    one, zero = b.scalar(1.0, F), b.scalar(0.0, F)
    soft = b.op("Log", [b.op("Add", [one, b.op("Exp", [b.op("Neg", [b.op("Abs", [x])])])])])
    return b.op("Sub", [b.op("Min", [x, zero]), soft])


def build_graph(spec: GraphSpec, table: WeightTable, kind: str) -> GraphBuilder:
    """The prefill (``kind="prefill"``) or step (``kind="step"``) graph of the model."""
    if kind not in ("prefill", "step"):
        raise ValueError(f"kind must be prefill or step, got {kind!r}")
    c = spec.config
    F, I64, act = TensorProto.FLOAT, TensorProto.INT64, spec.act_type
    step = kind == "step"
    T = 1 if step else SEQUENCE
    b = GraphBuilder(f"gla_{kind}", table)

    ids = b.input("input_ids", I64, [BATCH, T])
    has_mask = spec.attention_mask and not step
    if has_mask:
        mask = b.input("attention_mask", I64, [BATCH, T])
    states = state_specs(spec)
    for st in states:
        b.input(st["input"], st["elem_type"], st["shape"])

    mask_act = mask_f = close_pad = None
    if has_mask:
        b.scope = "/model/mask"
        mask_act = b.op("Unsqueeze", [b.op("Cast", [mask], to=act), b.i64(-1)])  # [B,T,1]
        mask_f = mask_act if act == F else b.op("Unsqueeze", [b.op("Cast", [mask], to=F), b.i64(-1)])
        if c.use_short_conv:
            close_pad = _close_padding_indices(b, mask, c.conv_size - 1, act)

    b.scope = "/model/embeddings"
    x = b.op("Gather", [b.weight("model.embeddings.weight"), ids], axis=0)
    w_type = {n: TORCH_TO_ONNX[w.dtype] for n, w in table.weights.items()}
    shape = GLAShape(c.num_heads, c.kv_heads, c.head_k_dim, c.head_v_dim, c.head_k_dim ** -0.5)
    by_layer: dict[int, dict[str, dict]] = {}
    for st in states:
        by_layer.setdefault(st["layer"], {})[st["kind"]] = st
    present: dict[str, str] = {}
    pos_ctx = None
    if c.attn is not None:
        b.scope = "/model/positions"
        pos_st = next(st for st in states if st["kind"] == POSITION_STATE)
        pos_ctx = _position_context(b, ids, mask if has_mask else None, pos_st["input"])
        present[pos_st["output"]] = pos_ctx["present"]

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        b.scope = f"/model/layers.{i}/attn"
        h = _rms_norm(b, x, b.weight(f"{p}.attn_norm.weight"), w_type[f"{p}.attn_norm.weight"], c.norm_eps, act)
        if c.attention_spec(i) is not None:
            kst, vst = by_layer[i]["key"], by_layer[i]["value"]
            o, present[kst["output"]], present[vst["output"]] = _attention(
                b, h, p, c, c.attention_spec(i), kst["input"], vst["input"], pos_ctx, act, has_mask, table,
                spec.attention_op)
            x = b.op("Add", [x, b.op("MatMul", [o, b.weight(f"{p}.attn.o_proj.weight")])])
            x = _mlp(b, x, p, c, w_type, act, i)
            continue
        proj = b.op("MatMul", [h, b.weight(f"{p}.attn.in_proj.weight")])
        qkv_dim = c.key_dim + c.key_dim_per_group + c.value_dim_per_group
        sizes = [qkv_dim] + ([c.value_dim] if c.use_output_gate else []) + [c.gate_low_rank_dim]
        parts = b.op("Split", [proj, b.i64(*sizes)], n_out=len(sizes), axis=-1)
        qkv, gk_low = parts[0], parts[-1]
        if has_mask:  # masked positions: zero q, k, v (and zero input to the convolutions)
            qkv = b.op("Mul", [qkv, mask_act])
        if c.use_short_conv:
            st = by_layer[i]["conv_state"]
            qkv, conv_out = _short_conv(b, qkv, st["input"], p, c, act, close_pad)
            present[st["output"]] = conv_out
        q, k, v = b.op("Split", [qkv, b.i64(c.key_dim, c.key_dim_per_group, c.value_dim_per_group)], n_out=3, axis=-1)
        if has_mask:
            k = b.op("Mul", [k, mask_act])

        gk = b.op("Add", [b.op("MatMul", [gk_low, b.weight(f"{p}.attn.gk_proj.1.weight")]), b.weight(f"{p}.attn.gk_proj.1.bias")])
        gk = b.op("Div", [_log_sigmoid(b, b.cast(gk, F, act)), b.scalar(float(c.gate_logit_normalizer), F)])
        if c.clamp_min is not None:
            gk = b.op("Max", [gk, b.scalar(float(c.clamp_min), F)])
        if has_mask:
            gk = b.op("Mul", [gk, mask_f])

        st = by_layer[i]["recurrent_state"]
        o, s_out = emit_gla(b, spec.form, q, k, v, gk, st["input"], shape, act, spec.state_type, single_step=step)
        present[st["output"]] = s_out

        o4 = b.op("Reshape", [o, b.i64(0, 0, c.num_heads, c.head_v_dim)])
        if c.fuse_norm_and_gate:
            wn = f"{p}.attn.g_norm_swish_gate.weight"
            wname = b.weight(wn) if wn in table.weights else None
            normed = _rms_norm(b, o4, wname, w_type.get(wn, F), c.norm_eps, act)
            g4 = b.op("Reshape", [parts[1], b.i64(0, 0, c.num_heads, c.head_v_dim)])
            gated = b.op("Mul", [b.cast(normed, F, act), _silu(b, b.cast(g4, F, act))])
            o4 = b.cast(gated, act, F)
        else:
            wn = f"{p}.attn.g_norm.weight"
            wname = b.weight(wn) if wn in table.weights else None
            o4 = _rms_norm(b, o4, wname, w_type.get(wn, F), c.norm_eps, act)
            if c.use_output_gate:
                g4 = b.op("Reshape", [parts[1], b.i64(0, 0, c.num_heads, c.head_v_dim)])
                o4 = b.op("Mul", [o4, _silu(b, g4)])
        o = b.op("Reshape", [o4, b.i64(0, 0, c.value_dim)])
        x = b.op("Add", [x, b.op("MatMul", [o, b.weight(f"{p}.attn.o_proj.weight")])])

        x = _mlp(b, x, p, c, w_type, act, i)

    b.scope = "/model/norm"
    x = _rms_norm(b, x, b.weight("model.norm.weight"), w_type["model.norm.weight"], c.norm_eps, act)
    b.scope = "/lm_head"
    head = "model.embeddings.weight" if c.tie_word_embeddings else "lm_head.weight"
    flat = b.op("Reshape", [x, b.i64(-1, c.hidden_size)])
    logits = b.op("Gemm", [flat, b.weight(head)], transB=1)  # [B·T, V] against the [V, H] table
    out_shape = b.op("Concat", [b.op("Shape", [x], start=0, end=2), b.i64(c.vocab_size)], axis=0)
    logits = b.cast(b.op("Reshape", [logits, out_shape]), F, act)
    b.scope = ""

    b.output(logits, "logits", F, [BATCH, T, c.vocab_size])
    for st in states:
        b.output(present[st["output"]], st["output"], st["elem_type"], st["output_shape"])
    return b


def _mlp(b: GraphBuilder, x: str, p: str, c: GLAConfig, w_type: dict, act: int, i: int) -> str:
    b.scope = f"/model/layers.{i}/mlp"
    h = _rms_norm(b, x, b.weight(f"{p}.mlp_norm.weight"), w_type[f"{p}.mlp_norm.weight"], c.norm_eps, act)
    size = c.mlp_intermediate_size
    gate, up = b.op("Split", [b.op("MatMul", [h, b.weight(f"{p}.mlp.gate_up_proj.weight")]), b.i64(size, size)], n_out=2, axis=-1)
    return b.op("Add", [x, b.op("MatMul", [b.op("Mul", [_silu(b, gate), up]), b.weight(f"{p}.mlp.down_proj.weight")])])


def _position_context(b: GraphBuilder, ids: str, mask: str | None, past_pos: str) -> dict[str, str]:
    """What every attention layer needs, computed once: the new tokens' rotary positions
    ``[B, T]`` (``position + cumsum(mask) − 1``), their count of real tokens ``n_real``, each row's
    left padding ``pad`` (``[B]``; None without a mask), T, and the present position."""
    zero, one = b.const(0, np.int64, "i64"), b.const(1, np.int64, "i64")
    T = b.op("Shape", [ids], start=1, end=2)  # [1]
    pos2 = b.op("Unsqueeze", [past_pos, b.i64(1)])  # [B,1]
    if mask is None:
        n_real = T  # [1], broadcasts over B
        positions = b.op("Add", [pos2, b.op("Range", [zero, b.op("Squeeze", [T, b.i64(0)]), one])])
        pad = None
    else:
        n_real = b.op("ReduceSum", [mask, b.i64(1)], keepdims=0)  # [B]
        positions = b.op("Sub", [b.op("Add", [pos2, b.op("CumSum", [mask, b.const(1, np.int64, "axis")])]), one])
        pad = b.op("Sub", [T, n_real])
    seen = b.op("Add", [past_pos, n_real])  # [B]
    return dict(positions=positions, n_real=n_real, pad=pad, T=T, seen=seen, present=b.op("Identity", [seen]), cos_sin={})


def _rotary_tables(b: GraphBuilder, ctx: dict, d: int, theta: float, act: int, squeeze: bool = False) -> tuple[str, str]:
    """cos, sin ``[B, T, 1, d/2]`` float32 at the new tokens' positions, rounded to ``act`` first
    (fla caches its tables in the activation dtype); shared by the layers of one (d, theta).
    ``squeeze``: ``[B, T, d/2]`` in ``act``, as the ``RotaryEmbedding`` node takes them."""
    if squeeze:
        key = (d, float(theta), "act")
        if key not in ctx["cos_sin"]:
            cos, sin = _rotary_tables(b, ctx, d, theta, act)
            ctx["cos_sin"][key] = tuple(b.cast(b.op("Squeeze", [t, b.i64(2)]), act, TensorProto.FLOAT) for t in (cos, sin))
        return ctx["cos_sin"][key]
    key = (d, float(theta))
    if key not in ctx["cos_sin"]:
        F = TensorProto.FLOAT
        inv_freq = (1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).numpy()
        freqs = b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [ctx["positions"]], to=F), b.i64(-1)]),
                             b.const(inv_freq, np.float32, "inv_freq")])  # [B,T,d/2]
        tables = []
        for fn in ("Cos", "Sin"):
            t = b.op(fn, [freqs])
            if act != F:
                t = b.cast(b.op("Cast", [t], to=act), F, act)
            tables.append(b.op("Unsqueeze", [t, b.i64(2)]))
        ctx["cos_sin"][key] = tuple(tables)
    return ctx["cos_sin"][key]


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str, d: int, act: int) -> str:
    """GPT-NeoX rotary rotation of ``x [B, T, H, d]`` in float32, cast back to ``act``."""
    xf = b.cast(x, TensorProto.FLOAT, act)
    x1, x2 = b.op("Split", [xf, b.i64(d // 2, d // 2)], n_out=2, axis=-1)
    lo = b.op("Sub", [b.op("Mul", [x1, cos]), b.op("Mul", [x2, sin])])
    hi = b.op("Add", [b.op("Mul", [x2, cos]), b.op("Mul", [x1, sin])])
    return b.cast(b.op("Concat", [lo, hi], axis=-1), act, TensorProto.FLOAT)


def _attention(b: GraphBuilder, h: str, p: str, c: GLAConfig, spec: dict, past_k: str, past_v: str, ctx: dict,
               act: int, has_mask: bool, table: WeightTable, attention_op: str = "decomposed") -> tuple[str, str, str]:
    """One softmax-attention layer as modeling.py's ``Attention.forward`` (before o_proj): returns
    (output ``[B, T, H·d]``, present key, present value). ``attention_op="onnx"``: the rotation
    and the masked softmax as the standard ``RotaryEmbedding`` and ``Attention`` nodes (opset 23,
    tables given per position, a boolean mask); otherwise plain ops (MatMul, Softmax)."""
    F = TensorProto.FLOAT
    H, Hkv = spec["num_heads"], spec["num_kv_heads"]
    d, G, W = c.hidden_size // H, H // Hkv, spec["window_size"]
    qkv = b.op("MatMul", [h, b.weight(f"{p}.attn.qkv_proj.weight")])
    if f"{p}.attn.qkv_proj.bias" in table.weights:
        qkv = b.op("Add", [qkv, b.weight(f"{p}.attn.qkv_proj.bias")])
    q, k, v = b.op("Split", [qkv, b.i64(H * d, Hkv * d, Hkv * d)], n_out=3, axis=-1)
    if attention_op == "gqa":
        return _attention_gqa(b, q, k, v, spec, d, past_k, past_v, ctx, act, has_mask)
    if attention_op == "onnx":
        cos, sin = _rotary_tables(b, ctx, d, spec["rope_theta"], act, squeeze=True)
        q = b.op("Reshape", [b.op("RotaryEmbedding", [q, cos, sin], num_heads=H), b.i64(0, 0, H, d)])
        k = b.op("Reshape", [b.op("RotaryEmbedding", [k, cos, sin], num_heads=Hkv), b.i64(0, 0, Hkv, d)])
    else:
        cos, sin = _rotary_tables(b, ctx, d, spec["rope_theta"], act)
        q = _rotate(b, b.op("Reshape", [q, b.i64(0, 0, H, d)]), cos, sin, d, act)
        k = _rotate(b, b.op("Reshape", [k, b.i64(0, 0, Hkv, d)]), cos, sin, d, act)
    v = b.op("Reshape", [v, b.i64(0, 0, Hkv, d)])
    # the cache and the new keys/values side by side on the last axis: [B, Hkv, L+T, 2d]
    past = b.op("Concat", [past_k, past_v], axis=-1)
    new = b.op("Transpose", [b.op("Concat", [k, v], axis=-1)], perm=[0, 2, 1, 3])
    kv = b.op("Concat", [past, new], axis=2)
    L = b.op("Shape", [past_k], start=2, end=3)  # [1]
    Lk = b.op("Shape", [kv], start=2, end=3)
    zero, one = b.const(0, np.int64, "i64"), b.const(1, np.int64, "i64")
    j = b.op("Range", [zero, b.op("Squeeze", [Lk, b.i64(0)]), one])  # [Lk]
    if has_mask:  # left padding out: the past moves right onto it, zeros enter (close_left_padding)
        pad = b.op("Unsqueeze", [ctx["pad"], b.i64(1)])  # [B,1]
        kv = _close_kv_padding(b, kv, j, pad, L, Lk, b.op("Shape", [kv], start=0, end=1), act, Hkv, d)
    full_k, full_v = b.op("Split", [kv, b.i64(d, d)], n_out=2, axis=-1)

    # which slots each query sees (attention_key_mask in modeling.py): [B, 1, 1, T, Lk]
    qi = b.op("Unsqueeze", [b.op("Add", [b.op("Range", [zero, b.op("Squeeze", [ctx["T"], b.i64(0)]), one]), L]), b.i64(1)])  # [T,1]
    first_real = b.op("Sub", [Lk, b.op("Reshape", [ctx["seen"], b.i64(-1, 1, 1, 1, 1)])])  # [B,1,1,1,1]
    ok = b.op("And", [b.op("GreaterOrEqual", [j, first_real]), b.op("LessOrEqual", [j, qi])])
    if W is not None:
        ok = b.op("And", [ok, b.op("Less", [b.op("Sub", [qi, j]), b.const(W, np.int64, "window")])])
    ok = b.op("Or", [ok, b.op("Equal", [j, qi])])
    if attention_op == "onnx":
        ok4 = b.op("Squeeze", [ok, b.i64(1)])  # [B,1,1,T,Lk] -> [B,1,T,Lk]
        qh = b.op("Transpose", [q], perm=[0, 2, 1, 3])  # [B,H,T,d]
        o = b.op("Attention", [qh, full_k, full_v, ok4], scale=d ** -0.5)  # 4D: the head counts come from the shapes
        o = b.op("Reshape", [b.op("Transpose", [o], perm=[0, 2, 1, 3]), b.i64(0, 0, H * d)])
        if W is not None:
            full_k, full_v = _last_slots(b, full_k, W), _last_slots(b, full_v, W)
        return o, full_k, full_v
    bias = b.op("Where", [ok, b.scalar(0.0, F), b.scalar(-1e30, F)])

    qg = b.op("Reshape", [b.op("Transpose", [b.cast(q, F, act)], perm=[0, 2, 1, 3]), b.i64(0, Hkv, G, -1, d)])  # [B,Hkv,G,T,d]
    kt = b.op("Unsqueeze", [b.op("Transpose", [b.cast(full_k, F, act)], perm=[0, 1, 3, 2]), b.i64(2)])  # [B,Hkv,1,d,Lk]
    scores = b.op("Add", [b.op("Mul", [b.op("MatMul", [qg, kt]), b.scalar(d ** -0.5, F)]), bias])
    probs = b.op("Softmax", [scores], axis=-1)
    o = b.op("MatMul", [probs, b.op("Unsqueeze", [b.cast(full_v, F, act), b.i64(2)])])  # [B,Hkv,G,T,d]
    o = b.op("Transpose", [b.op("Reshape", [o, b.i64(0, H, -1, d)])], perm=[0, 2, 1, 3])
    o = b.cast(b.op("Reshape", [o, b.i64(0, 0, H * d)]), act, F)
    if W is not None:
        full_k, full_v = _last_slots(b, full_k, W), _last_slots(b, full_v, W)
    return o, full_k, full_v


def _close_kv_padding(b: GraphBuilder, kv: str, j: str, pad: str, L: str, Lk: str, B_: str, act: int, Hkv: int,
                      d: int) -> str:
    """``close_left_padding`` of modeling.py on keys and values side by side (``kv [B, Hkv, Lk, 2d]``,
    ``Lk = L + T`` slots ``j``): each row's past moves right onto its ``pad [B, 1]`` padded slots
    (one Gather), and the ``pad`` slots that open at the front are zeroed."""
    zero, one = b.const(0, np.int64, "i64"), b.const(1, np.int64, "i64")
    src = b.op("Where", [b.op("Less", [j, b.op("Add", [pad, L])]), b.op("Sub", [j, pad]), j])  # [B,Lk]
    keep = b.op("Cast", [b.op("GreaterOrEqual", [j, pad])], to=act)  # [B,Lk]
    rows = b.op("Range", [zero, b.op("Squeeze", [B_, b.i64(0)]), one])
    flat = b.op("Add", [b.op("Max", [src, zero]), b.op("Mul", [b.op("Unsqueeze", [rows, b.i64(1)]), Lk])])
    rowsmaj = b.op("Reshape", [b.op("Transpose", [kv], perm=[0, 2, 1, 3]), b.i64(-1, Hkv * 2 * d)])
    g = b.op("Mul", [b.op("Gather", [rowsmaj, flat], axis=0), b.op("Unsqueeze", [keep, b.i64(-1)])])  # [B, Lk, Hkv·2d]
    return b.op("Transpose", [b.op("Reshape", [g, b.i64(0, 0, Hkv, 2 * d)])], perm=[0, 2, 1, 3])


def _last_slots(b: GraphBuilder, cache: str, n: int) -> str:
    """The last ``n`` slots (axis 2) of a ``[B, Hkv, L, d]`` cache: what a window of ``n`` keeps."""
    return b.op("Slice", [cache, b.i64(-n), b.i64(np.iinfo(np.int64).max), b.i64(2)])


def _attention_gqa(b: GraphBuilder, q: str, k: str, v: str, spec: dict, d: int, past_k: str, past_v: str, ctx: dict,
                   act: int, has_mask: bool) -> tuple[str, str, str]:
    """The attention of one layer as ONNX Runtime's ``com.microsoft::GroupQueryAttention``, with
    the same cache contract as the plain-op form (right-aligned caches, W slots for a window).

    The op sees ``[past, new]`` in buffer order (``seqlens_k = L + T − 1`` and ``query_seqlens =
    T`` for every row, so it appends the new keys at ``L``); which slots each query sees is given
    in full by ``attention_bias`` (our mask: the row's real keys, causal and within the window by
    real-token order, itself always), because a row's empty front slots and its left padding are
    not in the op's model of a cache. ``local_window_size`` is set where buffer order is real-token
    order (no mask input): a hint the bias makes exact. The rotation is fused (``do_rotary``) when
    the op takes it (head size a multiple of 16 on the CPU): the tables are given per token
    (``cos_cache`` row ``b·T + t``, ``position_ids`` pointing at it, padded to the op's minimum of
    ``L + T`` rows), so each row gets its own positions. The padding then leaves the present cache
    as in the plain-op form (one Gather), and a window keeps the last W slots."""
    I32 = TensorProto.INT32
    H, Hkv, W = spec["num_heads"], spec["num_kv_heads"], spec["window_size"]
    zero, one = b.const(0, np.int64, "i64"), b.const(1, np.int64, "i64")
    L = b.op("Shape", [past_k], start=2, end=3)  # [1]
    Lk = b.op("Add", [L, ctx["T"]])
    B_ = b.op("Shape", [q], start=0, end=1)
    fused = d % 16 == 0
    cos = sin = pos_ids = ""
    if fused:
        cos_t, sin_t = _rotary_tables(b, ctx, d, spec["rope_theta"], act, squeeze=True)  # [B,T,d/2]
        pads = b.op("Concat", [b.i64(0, 0), Lk, b.i64(0)], axis=0)
        cos, sin = (b.op("Pad", [b.op("Reshape", [t, b.i64(-1, d // 2)]), pads]) for t in (cos_t, sin_t))
        if "gqa_position_ids" not in ctx:
            shape = b.op("Shape", [ctx["positions"]])
            n = b.op("ReduceProd", [shape], keepdims=0)
            ctx["gqa_position_ids"] = b.op("Reshape", [b.op("Range", [zero, n, one]), shape])
        pos_ids = ctx["gqa_position_ids"]
    else:
        cos_t, sin_t = _rotary_tables(b, ctx, d, spec["rope_theta"], act)
        q = _rotate(b, b.op("Reshape", [q, b.i64(0, 0, H, d)]), cos_t, sin_t, d, act)
        k = _rotate(b, b.op("Reshape", [k, b.i64(0, 0, Hkv, d)]), cos_t, sin_t, d, act)
        q, k = b.op("Reshape", [q, b.i64(0, 0, H * d)]), b.op("Reshape", [k, b.i64(0, 0, Hkv * d)])
    seqlens = b.op("Cast", [b.op("Expand", [b.op("Sub", [Lk, one]), B_])], to=I32)
    total = b.op("Cast", [b.op("Squeeze", [Lk, b.i64(0)])], to=I32)
    qlens = b.op("Cast", [b.op("Expand", [ctx["T"], B_])], to=I32)

    # the bias: slot j of [past (L), new (T)] for query t of row b, in real-token order
    j = b.op("Range", [zero, b.op("Squeeze", [Lk, b.i64(0)]), one])  # [Lk]
    t = b.op("Range", [zero, b.op("Squeeze", [ctx["T"], b.i64(0)]), one])  # [T]
    past_pos = b.op("Unsqueeze", [b.op("Sub", [ctx["seen"], ctx["n_real"]]), b.i64(1)])  # [B,1]: real keys in the past
    in_new = b.op("GreaterOrEqual", [j, L])  # [Lk]
    if has_mask:
        pad = b.op("Unsqueeze", [ctx["pad"], b.i64(1)])  # [B,1]
        shift = b.op("Mul", [pad, b.op("Cast", [in_new], to=TensorProto.INT64)])  # new slots move left past the padding
        ordk = b.op("Sub", [b.op("Sub", [j, L]), shift])  # [B,Lk]
        ordq = b.op("Sub", [t, pad])  # [B,T]
        real_new = b.op("And", [in_new, b.op("GreaterOrEqual", [j, b.op("Add", [L, pad])])])
        real_past = b.op("And", [b.op("Not", [in_new]), b.op("GreaterOrEqual", [j, b.op("Sub", [L, past_pos])])])
        valid = b.op("Or", [real_new, real_past])  # [B,Lk]
    else:
        ordk = b.op("Unsqueeze", [b.op("Sub", [j, L]), b.i64(0)])  # [1,Lk]
        ordq = b.op("Unsqueeze", [t, b.i64(0)])  # [1,T]
        valid = b.op("GreaterOrEqual", [j, b.op("Sub", [L, past_pos])])  # [B,Lk]
    ordk = b.op("Unsqueeze", [ordk, b.i64(1)])  # [B|1,1,Lk]
    ordq = b.op("Unsqueeze", [ordq, b.i64(2)])  # [B|1,T,1]
    ok = b.op("And", [b.op("Unsqueeze", [valid, b.i64(1)]), b.op("LessOrEqual", [ordk, ordq])])  # [B,T,Lk]
    if W is not None:
        ok = b.op("And", [ok, b.op("Less", [b.op("Sub", [ordq, ordk]), b.const(W, np.int64, "window")])])
    own = b.op("Equal", [j, b.op("Unsqueeze", [b.op("Add", [t, L]), b.i64(1)])])  # [T,Lk]: its own key, always
    ok = b.op("Unsqueeze", [b.op("Or", [ok, own]), b.i64(1)])  # [B,1,T,Lk]
    lowest = float(np.finfo(np.float16).min) if act == TensorProto.FLOAT16 else -1e30
    bias = b.op("Where", [ok, b.scalar(0.0, act), b.scalar(lowest, act)])

    inputs = [q, k, v, past_k, past_v, seqlens, total, cos, sin, pos_ids, bias, "", "", "", "", "", qlens]
    window = W if (W is not None and not has_mask) else -1
    o, present_k, present_v = b.op("GroupQueryAttention", inputs, n_out=3, domain="com.microsoft",
                                   num_heads=H, kv_num_heads=Hkv, scale=d ** -0.5, do_rotary=int(fused),
                                   rotary_interleaved=0, local_window_size=window)
    if has_mask:  # left padding out, as in the plain-op form: the past moves right onto it
        Lk_ = b.op("Shape", [present_k], start=2, end=3)
        kv = _close_kv_padding(b, b.op("Concat", [present_k, present_v], axis=-1), j, pad, L, Lk_, B_, act, Hkv, d)
        present_k, present_v = b.op("Split", [kv, b.i64(d, d)], n_out=2, axis=-1)
    if W is not None:
        present_k, present_v = _last_slots(b, present_k, W), _last_slots(b, present_v, W)
    return o, present_k, present_v


def _close_padding_indices(b: GraphBuilder, mask: str, n_cache: int, act: int) -> tuple[str, str]:
    """Where each column of ``[cache, x]`` (``[B, L = n_cache + T, C]``, flattened to ``[B·L, C]``)
    comes from once a row's left padding is cut out of its convolution windows, as
    ``close_left_padding`` in gla_export/models/modeling.py: with ``p_b`` padded positions, the
    cache moves right by ``p_b`` onto the padding (zeros enter on the left), the real tokens keep
    their places. Returns (flat gather indices ``[B, L]``, 0/1 keep factor ``[B, L, 1]`` in ``act``).
    The same for every layer, so computed once."""
    zero, one = b.const(0, np.int64, "i64"), b.const(1, np.int64, "i64")
    T = b.op("Shape", [mask], start=1, end=2)  # [1]
    pad = b.op("Sub", [T, b.op("ReduceSum", [mask, b.i64(1)], keepdims=1)])  # [B,1]
    L = b.op("Add", [T, b.i64(n_cache)])
    j = b.op("Range", [zero, b.op("Squeeze", [L, b.i64(0)]), one])  # [L]
    src = b.op("Where", [b.op("Less", [j, b.op("Add", [pad, b.i64(n_cache)])]), b.op("Sub", [j, pad]), j])  # [B,L]
    keep = b.op("Unsqueeze", [b.op("Cast", [b.op("GreaterOrEqual", [src, zero])], to=act), b.i64(-1)])
    B = b.op("Shape", [mask], start=0, end=1)
    rows = b.op("Range", [zero, b.op("Squeeze", [B, b.i64(0)]), one])  # [B]
    base = b.op("Mul", [b.op("Unsqueeze", [rows, b.i64(1)]), L])  # [B,1]: each row's first flat column
    flat = b.op("Add", [b.op("Max", [src, zero]), base])
    return flat, keep


def _short_conv(b: GraphBuilder, x: str, cache: str, p: str, c: GLAConfig, act: int,
                close_pad: tuple[str, str] | None = None) -> tuple[str, str]:
    """Depthwise causal convolution + SiLU over ``[cache, x]``; the new cache is the last
    ``conv_size − 1`` inputs. ``x``: ``[B, T, C]``, cache ``[B, C, W−1]``. ``close_pad``
    (from :func:`_close_padding_indices`) takes each row's left padding out of the windows."""
    if close_pad is None:
        full = b.op("Concat", [cache, b.op("Transpose", [x], perm=[0, 2, 1])], axis=2)  # [B, C, W-1+T]
    else:
        flat, keep = close_pad
        full = b.op("Concat", [b.op("Transpose", [cache], perm=[0, 2, 1]), x], axis=1)  # [B, W-1+T, C]
        # one Gather over [B·L, C] rows: indices of B·L, not B·L·C as GatherElements would need
        full = b.op("Gather", [b.op("Reshape", [full, b.i64(-1, c.conv_channels)]), flat], axis=0)  # [B, L, C]
        full = b.op("Transpose", [b.op("Mul", [full, keep])], perm=[0, 2, 1])
    inputs = [full, b.weight(f"{p}.attn.conv1d.weight")]
    if c.conv_bias:
        inputs.append(b.weight(f"{p}.attn.conv1d.bias"))
    if act == TensorProto.BFLOAT16:  # ONNX Conv has no bfloat16: convolve in float32, round once
        inputs = [b.cast(t, TensorProto.FLOAT, act) for t in inputs]
        y = b.cast(b.op("Conv", inputs, group=c.conv_channels, kernel_shape=[c.conv_size]), act, TensorProto.FLOAT)
    else:
        y = b.op("Conv", inputs, group=c.conv_channels, kernel_shape=[c.conv_size])
    y = b.op("Transpose", [_silu(b, y)], perm=[0, 2, 1])
    new_cache = b.op("Slice", [full, b.i64(-(c.conv_size - 1)), b.i64(np.iinfo(np.int64).max), b.i64(2)])
    return y, new_cache
