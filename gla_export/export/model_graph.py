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


@dataclass(frozen=True)
class GraphSpec:
    config: GLAConfig
    dtype: torch.dtype  # activations and weights
    state_dtype: torch.dtype  # the GLA recurrent state
    form: str
    attention_mask: bool = True

    @property
    def act_type(self) -> int:
        return TORCH_TO_ONNX[self.dtype]

    @property
    def state_type(self) -> int:
        return TORCH_TO_ONNX[self.state_dtype]


def state_names(layer: int, kind: str) -> tuple[str, str]:
    """(input name, output name) of one layer's state; kind is ``recurrent_state`` or ``conv_state``."""
    return f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"


def state_specs(spec: GraphSpec) -> list[dict]:
    """Every state tensor: name in and out, shape (``"batch"`` first), ONNX element type."""
    c = spec.config
    out = []
    for i in range(c.num_hidden_layers):
        name_in, name_out = state_names(i, "recurrent_state")
        out.append(dict(layer=i, kind="recurrent_state", input=name_in, output=name_out,
                        shape=[BATCH, c.kv_heads, c.head_k_dim, c.head_v_dim], elem_type=spec.state_type))
        if c.use_short_conv:
            name_in, name_out = state_names(i, "conv_state")
            out.append(dict(layer=i, kind="conv_state", input=name_in, output=name_out,
                            shape=[BATCH, c.conv_channels, c.conv_size - 1], elem_type=spec.act_type))
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

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        b.scope = f"/model/layers.{i}/attn"
        h = _rms_norm(b, x, b.weight(f"{p}.attn_norm.weight"), w_type[f"{p}.attn_norm.weight"], c.norm_eps, act)
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

        b.scope = f"/model/layers.{i}/mlp"
        h = _rms_norm(b, x, b.weight(f"{p}.mlp_norm.weight"), w_type[f"{p}.mlp_norm.weight"], c.norm_eps, act)
        size = c.mlp_intermediate_size
        gate, up = b.op("Split", [b.op("MatMul", [h, b.weight(f"{p}.mlp.gate_up_proj.weight")]), b.i64(size, size)], n_out=2, axis=-1)
        x = b.op("Add", [x, b.op("MatMul", [b.op("Mul", [_silu(b, gate), up]), b.weight(f"{p}.mlp.down_proj.weight")])])

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
        b.output(present[st["output"]], st["output"], st["elem_type"], st["shape"])
    return b


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
