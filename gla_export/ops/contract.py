"""The GLA op's contract in Python: the same rules, limits and messages as the kernel core's
``gla::infer_problem`` (plugins/kernels/include/gla/contract.h, src/common/contract.cc).

Used by the ONNX reference op (gla_export.export.reference_op), by ``check_inputs`` (the limits
and type table) and by tests/conformance, which runs one table of cases through this module, the
C API, ONNX Runtime and the TensorRT plugin and fails when any two disagree. docs/op-contract.md
is the table in prose.

Inputs are described as ``(dtype_name, shape)`` (``None`` for an absent optional input; a shape
entry ``-1`` or ``None`` is unknown, accepted only with ``allow_unknown``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class GLAShapeError(ValueError):
    """An input to the GLA op has the wrong rank, shape or dtype."""

GLA = "GatedLinearAttention"
LA = "LinearAttention"

INPUTS = {
    GLA: ("query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma"),
    LA: ("query", "key", "value", "past_state", "decay", "beta"),
}
REQUIRED_INPUTS = {GLA: 4, LA: 3}
OUTPUTS = ("output", "present_state")

# name -> (kind, default); a default of None means required
ATTRIBUTES = {
    GLA: {"q_num_heads": ("int", None), "kv_num_heads": ("int", None), "scale": ("float", 0.0),
          "reverse": ("int", 0), "chunk_size": ("int", 64)},
    LA: {"q_num_heads": ("int", None), "kv_num_heads": ("int", None), "scale": ("float", 0.0),
         "update_rule": ("str", None), "chunk_size": ("int", 64)},
}
UPDATE_RULES = ("gated", "linear")

MAX_HEADS = 1 << 16
MAX_HEAD_DIM = 1 << 14
CUDA_MAX_HEAD_DIM_K = 1024

FLOAT_TYPES = ("float32", "float16", "bfloat16")
INDEX_TYPES = ("int32", "int64")


class ContractError(GLAShapeError):
    """A node or its inputs do not fit the op; the message is the engines' message."""

    def __init__(self, message: str, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported  # over a kernel limit (the C status kUnsupported)


@dataclass(frozen=True)
class Problem:
    """``gla::Problem``: -1 where a size is unknown (build time)."""

    batch: int
    seq_len: int
    num_seqs: int
    q_heads: int
    kv_heads: int
    head_dim_k: int
    head_dim_v: int
    act_dtype: str
    state_dtype: str
    g_gamma_dtype: str
    has_gate: bool
    gate_per_head: bool
    has_past_state: bool
    has_cu_seqlens: bool
    cu_seqlens_int64: bool
    has_g_gamma: bool
    reverse: bool
    scale: float

    def output_shapes(self) -> tuple[list[int], list[int]]:
        v = -1 if self.head_dim_v < 0 else self.q_heads * self.head_dim_v
        return ([self.batch, self.seq_len, v], [self.num_seqs, self.kv_heads, self.head_dim_k, self.head_dim_v])


def _shape(shape: Sequence) -> str:
    return "[" + ",".join("?" if d is None or d < 0 else str(int(d)) for d in shape) + "]"


def _num(v: int) -> str:
    return "?" if v < 0 else str(v)


def check_attributes(op: str, attrs: Mapping[str, object]) -> dict:
    """The node's attributes, checked and completed with their defaults; unknown ones are refused."""
    if op not in ATTRIBUTES:
        raise ContractError(f"op {op!r} is not {GLA} or {LA}")
    table = ATTRIBUTES[op]
    for name in attrs:
        if name not in table:
            raise ContractError(f"unknown attribute '{name}' ({op} takes {', '.join(table)})")
    out: dict = {}
    for name, (kind, default) in table.items():
        value = attrs.get(name)
        if value is None:
            out[name] = default
            continue
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ContractError(f"attribute '{name}' must be an int")
        if kind == "float" and not isinstance(value, float):
            raise ContractError(f"attribute '{name}' must be a float")
        if kind == "str" and not isinstance(value, (str, bytes)):
            raise ContractError(f"attribute '{name}' must be a string")
        out[name] = value.decode() if isinstance(value, bytes) else value
    if out["q_num_heads"] is None:
        raise ContractError("the required int attribute 'q_num_heads' is missing")
    if out["kv_num_heads"] is None:
        raise ContractError("the required int attribute 'kv_num_heads' is missing")
    hq, hkv = out["q_num_heads"], out["kv_num_heads"]
    if not 1 <= hq <= MAX_HEADS:
        raise ContractError(f"attribute q_num_heads={hq} must be in [1, {MAX_HEADS}]")
    if not 1 <= hkv <= MAX_HEADS:
        raise ContractError(f"attribute kv_num_heads={hkv} must be in [1, {MAX_HEADS}]")
    if hq % hkv:
        raise ContractError(f"attribute q_num_heads={hq} must be a multiple of kv_num_heads={hkv}")
    if op == GLA and out["reverse"] not in (0, 1):
        raise ContractError(f"attribute reverse={out['reverse']} must be 0 or 1")
    if not 0 <= out["chunk_size"] < 2**31:
        raise ContractError(f"attribute chunk_size={out['chunk_size']} must be >= 0 and fit int32 (it is a hint)")
    if not math.isfinite(out["scale"]):
        raise ContractError(f"attribute scale={out['scale']:g} must be finite")
    if op == LA:
        if out["update_rule"] is None:
            raise ContractError(
                "attribute update_rule is missing: the ONNX default 'gated_delta' is not supported (supported: "
                "'gated', 'linear'; set the attribute explicitly)")
        if out["update_rule"] not in UPDATE_RULES:
            raise ContractError(f"attribute update_rule='{out['update_rule']}' is not supported (supported: 'gated', "
                                "'linear')")
    return out


def infer_problem(op: str, attrs: Mapping[str, object], inputs: Sequence[tuple[str, Sequence] | None], *,
                  allow_unknown: bool = False, cuda: bool = False) -> Problem:
    """Inputs + attributes -> :class:`Problem`, or :class:`ContractError` naming the input and its shape."""
    a = check_attributes(op, attrs)
    la = op == LA
    names = INPUTS[op]
    ins = list(inputs)
    while len(ins) > REQUIRED_INPUTS[op] and ins[-1] is None:
        ins.pop()
    lo, hi = REQUIRED_INPUTS[op], len(names)
    if not lo <= len(ins) <= hi:
        listing = ("query, key, value, [past_state], [decay], [beta]" if la
                   else "query, key, value, gate, [past_state], [cu_seqlens], [g_gamma]")
        raise ContractError(f"{op} takes {lo} to {hi} inputs ({listing}), got {len(ins)}")
    ins += [None] * (hi - len(ins))
    d = {names[i]: (None if x is None else (x[0], None if x[1] is None else [(-1 if s is None else int(s)) for s in x[1]]))
         for i, x in enumerate(ins)}
    gate = "decay" if la else "gate"
    if la and a["update_rule"] == "gated" and d["decay"] is None:
        raise ContractError("input 'decay' is absent: update_rule 'gated' needs it")
    for n in ("query", "key", "value") + (() if la else ("gate",)):
        if d[n] is None:
            raise ContractError(f"the required input '{n}' is missing")

    layouts = {"query": (3, "[B, T, q_num_heads*d_k]"), "key": (3, "[B, T, kv_num_heads*d_k]"),
               "value": (3, "[B, T, kv_num_heads*d_v]"), gate: (3, "[B, T, kv_num_heads*d_k] or [B, T, kv_num_heads]"),
               "beta": (3, "[B, T, kv_num_heads]"), "past_state": (4, "[N, kv_num_heads, d_k, d_v]"),
               "cu_seqlens": (1, "[N+1]"), "g_gamma": (1, "[kv_num_heads]")}
    for n, (rank, layout) in layouts.items():
        if n not in d or d[n] is None:
            continue
        shape = d[n][1]
        if shape is None and allow_unknown:
            continue
        if shape is None or len(shape) != rank:
            raise ContractError(f"input '{n}' has shape {_shape(shape or [])}, expected rank {rank} {layout}")
        if not allow_unknown and any(s < 0 for s in shape):
            raise ContractError(f"input '{n}' has shape {_shape(shape)} with an unknown dimension")

    def dim(n: str, i: int) -> int:
        x = d.get(n)
        if x is None or x[1] is None or len(x[1]) <= i:
            return -1
        return x[1][i]

    def differs(got: int, want: int) -> bool:
        return got >= 0 and want >= 0 and got != want

    def sh(n: str) -> str:
        return _shape(d[n][1] or [])

    act = d["query"][0]
    if act not in FLOAT_TYPES:
        raise ContractError(f"input 'query' has element type {act}, expected float32, float16 or bfloat16")
    for n in ("key", "value", gate, "beta"):
        if d.get(n) is not None and d[n][0] != act:
            raise ContractError(f"input '{n}' has element type {d[n][0]}, expected {act} like 'query'")
    for n in ("past_state", "g_gamma"):
        if d.get(n) is not None and d[n][0] not in FLOAT_TYPES:
            raise ContractError(f"input '{n}' has element type {d[n][0]}, expected float32, float16 or bfloat16")
    if d.get("cu_seqlens") is not None and d["cu_seqlens"][0] not in INDEX_TYPES:
        raise ContractError(f"input 'cu_seqlens' has element type {d['cu_seqlens'][0]}, expected int32 or int64")

    hq, hkv = a["q_num_heads"], a["kv_num_heads"]
    B, T = dim("query", 0), dim("query", 1)
    qw, kw, vw = dim("query", 2), dim("key", 2), dim("value", 2)
    if qw >= 0 and qw % hq:
        raise ContractError(f"input 'query' has shape {sh('query')}: its last dimension {qw} is not a multiple of "
                            f"q_num_heads={hq}")
    if qw == 0:
        raise ContractError(f"input 'query' has shape {sh('query')}: the head size d_k must be at least 1")
    dk = qw // hq if qw >= 0 else -1
    if differs(dim("key", 0), B) or differs(dim("key", 1), T) or differs(kw, hkv * dk if dk >= 0 else -1):
        raise ContractError(f"input 'key' has shape {sh('key')}, expected [B={_num(B)}, T={_num(T)}, "
                            f"kv_num_heads*d_k={_num(hkv * dk if dk >= 0 else -1)}]")
    if dk < 0 and kw >= 0:
        if kw == 0 or kw % hkv:
            raise ContractError(f"input 'key' has shape {sh('key')}: its last dimension must be a positive multiple "
                                f"of kv_num_heads={hkv}")
        dk = kw // hkv
    if differs(dim("value", 0), B) or differs(dim("value", 1), T):
        raise ContractError(f"input 'value' has shape {sh('value')}, expected [B={_num(B)}, T={_num(T)}, "
                            f"kv_num_heads*d_v]")
    if vw >= 0 and (vw == 0 or vw % hkv):
        raise ContractError(f"input 'value' has shape {sh('value')}: its last dimension must be a positive multiple "
                            f"of kv_num_heads={hkv}")
    dv = vw // hkv if vw >= 0 else -1
    per_head = False
    if d.get(gate) is not None:
        gw = dim(gate, 2)
        full = hkv * dk if dk >= 0 else -1
        if differs(dim(gate, 0), B) or differs(dim(gate, 1), T) or (gw >= 0 and full >= 0 and gw not in (full, hkv)):
            raise ContractError(f"input '{gate}' has shape {sh(gate)}, expected [B={_num(B)}, T={_num(T)}, "
                                f"kv_num_heads*d_k={_num(full)}] (or [B, T, kv_num_heads={hkv}] for one decay per head)")
        per_head = gw >= 0 and full >= 0 and gw == hkv and gw != full
    if d.get("beta") is not None and (differs(dim("beta", 0), B) or differs(dim("beta", 1), T)):
        raise ContractError(f"input 'beta' has shape {sh('beta')}, expected [B={_num(B)}, T={_num(T)}, ...]")
    N = B
    has_cu = d.get("cu_seqlens") is not None
    if has_cu:
        length = dim("cu_seqlens", 0)
        if 0 <= length < 2:
            raise ContractError(f"input 'cu_seqlens' has shape {sh('cu_seqlens')}, expected [N+1] with N >= 1")
        if differs(B, 1):
            raise ContractError(f"input 'query' has shape {sh('query')}: with cu_seqlens the sequences are packed "
                                f"along T and B must be 1")
        N = length - 1 if length >= 0 else -1
    if d.get("past_state") is not None:
        s = [dim("past_state", i) for i in range(4)]
        if differs(s[0], N) or differs(s[1], hkv) or differs(s[2], dk) or differs(s[3], dv):
            why = " (N = len(cu_seqlens) - 1)" if has_cu else " (N = B)"
            raise ContractError(f"input 'past_state' has shape {sh('past_state')}, expected [N={_num(N)}, "
                                f"kv_num_heads={hkv}, d_k={_num(dk)}, d_v={_num(dv)}]{why}")
        if N < 0:
            N = s[0]
    if d.get("g_gamma") is not None and differs(dim("g_gamma", 0), hkv):
        raise ContractError(f"input 'g_gamma' has shape {sh('g_gamma')}, expected [kv_num_heads={hkv}]")
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ContractError(f"input 'query' has shape {sh('query')} and 'value' {sh('value')}: head sizes d_k={dk}, "
                            f"d_v={dv}; the kernels take at most {MAX_HEAD_DIM}", unsupported=True)
    if cuda and dk > CUDA_MAX_HEAD_DIM_K:
        raise ContractError(f"input 'query' has shape {sh('query')}: head size d_k={dk} is larger than the CUDA "
                            f"kernels take ({CUDA_MAX_HEAD_DIM_K})", unsupported=True)
    has_gate = d.get(gate) is not None and (not la or a["update_rule"] == "gated")
    past = d.get("past_state")
    gamma = d.get("g_gamma")
    return Problem(
        batch=1 if has_cu else B, seq_len=T, num_seqs=N, q_heads=hq, kv_heads=hkv, head_dim_k=dk, head_dim_v=dv,
        act_dtype=act, state_dtype=past[0] if past is not None else "float32",
        g_gamma_dtype=gamma[0] if gamma is not None else "float32", has_gate=has_gate,
        gate_per_head=has_gate and per_head, has_past_state=past is not None, has_cu_seqlens=has_cu,
        cu_seqlens_int64=has_cu and d["cu_seqlens"][0] == "int64", has_g_gamma=gamma is not None,
        reverse=bool(a.get("reverse", 0)) and not la, scale=float(a["scale"]),
    )


def onnx_attributes(node) -> dict:
    """An ONNX NodeProto's attributes as Python values (for :func:`check_attributes`)."""
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def check_node(node) -> dict:
    """Checks an ONNX node of either op (its attributes; unknown ones are refused). ONNX Runtime's
    custom-op API cannot list a node's attributes and TensorRT's parser narrows int attributes to
    int32 before the plugin sees them, so the exporter and gla-export's loaders check nodes here."""
    op = node.op_type
    try:
        return check_attributes(op, onnx_attributes(node))
    except ContractError as e:
        raise ContractError(f"{op} '{node.name}': {e}") from None


def check_onnx_file(path, *, tensorrt: bool = False) -> None:
    """Checks the attributes of every GLA and LinearAttention node of an ONNX file (its graph only;
    external weights are not read). Raises :class:`ContractError` naming the node.

    ``tensorrt``: also what TensorRT's ONNX parser needs beyond the contract: a node that names
    both outputs (a plugin's output count is fixed before the parser sees the node, and the parser
    refuses a node with fewer, in words that do not say why)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in iter_gla_nodes(model):
        check_node(node)
        if tensorrt and (len(node.output) < 2 or not node.output[1]):
            raise ContractError(
                f"{node.op_type} '{node.name}': the node has no present_state output, which the TensorRT "
                "plugin needs (its ONNX parser requires a plugin node to name every output); add it, "
                "unused if need be (ONNX Runtime runs the node either way)")


def iter_gla_nodes(model):
    """The GLA and LinearAttention nodes of a model's main graph."""
    for node in model.graph.node:
        if (node.op_type == GLA and node.domain == "gla") or (node.op_type == LA and node.domain in ("", "ai.onnx")):
            yield node
