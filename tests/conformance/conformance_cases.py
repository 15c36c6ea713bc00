"""The op's conformance table: one list of nodes (op, attributes, input types and shapes) and what
every engine must do with each: run it, or refuse it with a message containing a given text.

Drivers (each a test file in this folder) take the same table through the Python contract and
the reference op, the C API (gla_infer_problem), ONNX Runtime (CPU; CUDA on a GPU), the TensorRT
plugin's harness (no device; with a GPU, enqueue too) and TensorRT-RTX plan builds. An engine that
runs a node another refuses fails its driver. The few places where an engine cannot follow the
contract are listed per case in `exceptions`, each with its reason (docs/op-contract.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GLA, LA = "GatedLinearAttention", "LinearAttention"
B, T, HQ, HKV, K, V = 2, 5, 4, 2, 16, 24


def act(dtype="float32", b=B, t=T, w=HQ * K):
    return (dtype, [b, t, w])


def q_(dtype="float32", **kw):
    return act(dtype, **kw)


def k_(dtype="float32", w=HKV * K, **kw):
    return act(dtype, w=w, **kw)


def v_(dtype="float32", w=HKV * V, **kw):
    return act(dtype, w=w, **kw)


def g_(dtype="float32", w=HKV * K, **kw):
    return act(dtype, w=w, **kw)


def state(dtype="float32", n=B, h=HKV, k=K, v=V):
    return (dtype, [n, h, k, v])


HEADS = {"q_num_heads": HQ, "kv_num_heads": HKV}


@dataclass
class Case:
    id: str
    inputs: list  # (dtype, shape) per position, None for an absent optional input in the middle
    attrs: dict = field(default_factory=lambda: dict(HEADS))
    expect: str | None = None  # None: runs; else a text of the refusal message
    cuda: str | None = "same"  # what the CUDA engines (ORT CUDA, TensorRT) do, when it differs
    op: str = GLA
    gates: str = "negative"  # "positive": small positive log-gates (computed as the formula says)
    # engine -> (expected on that engine, why it cannot follow the contract)
    exceptions: dict = field(default_factory=dict)

    def expected(self, engine: str, on_cuda: bool = False) -> str | None:
        if engine in self.exceptions:
            return self.exceptions[engine][0]
        if on_cuda and self.cuda != "same":
            return self.cuda
        return self.expect

    @property
    def typed_attrs(self) -> bool:
        """Attributes of the right ONNX types (the C API's struct cannot carry a wrong one)."""
        kinds = {"q_num_heads": int, "kv_num_heads": int, "reverse": int, "chunk_size": int, "scale": float}
        return all(isinstance(v, kinds[k]) and not isinstance(v, bool) for k, v in self.attrs.items() if k in kinds)


ONLY_ONE_OUTPUT = "TensorRT's ONNX parser requires a plugin node to name every output of the plugin"

CASES = [
    # ---- nodes every engine runs ----------------------------------------------------------------
    Case("gla-full-fp32", [q_(), k_(), v_(), g_(), state(), None, ("float32", [HKV])]),
    Case("gla-required-only-fp16", [q_("float16"), k_("float16"), v_("float16"), g_("float16")]),
    Case("gla-bf16-fp32-state", [q_("bfloat16"), k_("bfloat16"), v_("bfloat16"), g_("bfloat16"), state()]),
    Case("gla-fp16-fp16-state-gqa-6-1", [q_("float16", w=6 * K), k_("float16", w=K), v_("float16", w=V),
                                          g_("float16", w=K), state("float16", h=1)],
         attrs={"q_num_heads": 6, "kv_num_heads": 1}),
    Case("gla-cu-int32", [q_(b=1, t=9), k_(b=1, t=9), v_(b=1, t=9), g_(b=1, t=9), state(n=3), ("int32", [4])]),
    Case("gla-cu-int64-gamma", [q_(b=1, t=9), k_(b=1, t=9), v_(b=1, t=9), g_(b=1, t=9), state(n=2),
                                ("int64", [3]), ("float32", [HKV])]),
    Case("gla-per-head-gate", [q_(), k_(), v_(), g_(w=HKV), state()]),
    Case("gla-reverse-scale", [q_(), k_(), v_(), g_(), state()], attrs={**HEADS, "reverse": 1, "scale": 0.3}),
    Case("gla-chunk-size-hint", [q_(), k_(), v_(), g_()], attrs={**HEADS, "chunk_size": 16}),
    Case("gla-positive-gates", [q_(), k_(), v_(), g_(), state()], gates="positive"),
    Case("gla-positive-gates-per-head", [q_(), k_(), v_(), g_(w=HKV), state()], gates="positive"),
    # d_k over the CUDA kernels' limit: the CPU runs it, CUDA engines refuse it (TensorRT at build time)
    Case("gla-dk-1040", [q_(b=1, t=3, w=1040), k_(b=1, t=3, w=1040), v_(b=1, t=3, w=8), g_(b=1, t=3, w=1040)],
         attrs={"q_num_heads": 1, "kv_num_heads": 1},
         cuda="head size d_k=1040 is larger than the CUDA kernels take (1024)"),
    # ---- shapes -----------------------------------------------------------------------------------
    Case("key-width", [q_(), k_(w=24), v_(), g_()], expect="input 'key' has shape [2,5,24], expected [B=2, T=5, kv_num_heads*d_k=32]"),
    Case("key-time", [q_(), k_(t=4), v_(), g_()], expect="input 'key' has shape [2,4,32], expected [B=2, T=5"),
    Case("query-width", [q_(w=62), k_(), v_(), g_()],
         expect="input 'query' has shape [2,5,62]: its last dimension 62 is not a multiple of q_num_heads=4"),
    Case("query-rank", [("float32", [B, T, HQ, K]), k_(), v_(), g_()], expect="input 'query' has shape [2,5,4,16], expected rank 3"),
    Case("value-width", [q_(), k_(), v_(w=47), g_()],
         expect="input 'value' has shape [2,5,47]: its last dimension must be a positive multiple of kv_num_heads=2"),
    Case("value-batch", [q_(), k_(), v_(b=1), g_()], expect="input 'value' has shape [1,5,48], expected [B=2, T=5"),
    Case("gate-width", [q_(), k_(), v_(), g_(w=7)], expect="input 'gate' has shape [2,5,7], expected [B=2, T=5, kv_num_heads*d_k=32]"),
    Case("past-state-dk", [q_(), k_(), v_(), g_(), state(k=8)],
         expect="input 'past_state' has shape [2,2,8,24], expected [N=2, kv_num_heads=2, d_k=16, d_v=24]"),
    Case("past-state-rank", [q_(), k_(), v_(), g_(), ("float32", [2, 16, 24])],
         expect="input 'past_state' has shape [2,16,24], expected rank 4"),
    Case("past-state-rows-cu", [q_(b=1), k_(b=1), v_(b=1), g_(b=1), state(n=2), ("int32", [4])],
         expect="input 'past_state' has shape [2,2,16,24], expected [N=3"),
    Case("g-gamma-shape", [q_(), k_(), v_(), g_(), state(), None, ("float32", [4])],
         expect="input 'g_gamma' has shape [4], expected [kv_num_heads=2]"),
    Case("cu-with-batch-2", [q_(), k_(), v_(), g_(), state(), ("int32", [2])],
         expect="with cu_seqlens the sequences are packed along T and B must be 1"),
    Case("cu-rank-2", [q_(b=1), k_(b=1), v_(b=1), g_(b=1), state(n=2), ("int32", [1, 3])],
         expect="input 'cu_seqlens' has shape [1,3], expected rank 1"),
    Case("head-size-over-16384", [q_(b=1, t=1, w=16400), k_(b=1, t=1, w=16400), v_(b=1, t=1, w=4), g_(b=1, t=1, w=16400)],
         attrs={"q_num_heads": 1, "kv_num_heads": 1}, expect="head sizes d_k=16400, d_v=4; the kernels take at most 16384"),
    # ---- element types ----------------------------------------------------------------------------
    Case("key-fp16-query-fp32", [q_(), k_("float16"), v_(), g_()], expect="input 'key' has element type float16, expected float32 like 'query'"),
    Case("gate-fp16-query-fp32", [q_(), k_(), v_(), g_("float16")], expect="input 'gate' has element type float16, expected float32 like 'query'"),
    Case("state-int32", [q_(), k_(), v_(), g_(), state("int32")],
         expect="input 'past_state' has element type int32, expected float32, float16 or bfloat16",
         # ORT's schema types past_state (one registration per state type) and refuses it first
         exceptions={"ort": ("past_state", "ONNX Runtime's type check of the op's schema runs before the kernel")}),
    Case("cu-seqlens-float", [q_(b=1), k_(b=1), v_(b=1), g_(b=1), state(n=2), ("float32", [3])],
         expect="input 'cu_seqlens' has element type float32, expected int32 or int64"),
    Case("g-gamma-int32", [q_(), k_(), v_(), g_(), state(), None, ("int32", [HKV])],
         expect="input 'g_gamma' has element type int32, expected float32, float16 or bfloat16"),
    # ---- attributes -------------------------------------------------------------------------------
    Case("heads-do-not-divide", [q_(), k_(w=3 * K), v_(w=3 * V), g_(w=3 * K)], attrs={"q_num_heads": 4, "kv_num_heads": 3},
         expect="attribute q_num_heads=4 must be a multiple of kv_num_heads=3"),
    Case("q-heads-2^32+4", [q_(), k_(), v_(), g_()], attrs={"q_num_heads": 2**32 + 4, "kv_num_heads": HKV},
         expect="attribute q_num_heads=4294967300 must be in [1, 65536]"),
    Case("zero-heads", [q_(), k_(), v_(), g_()], attrs={"q_num_heads": 0, "kv_num_heads": HKV},
         expect="attribute q_num_heads=0 must be in [1, 65536]"),
    Case("no-kv-heads", [q_(), k_(), v_(), g_()], attrs={"q_num_heads": HQ}, expect="the required int attribute 'kv_num_heads' is missing"),
    Case("reverse-2", [q_(), k_(), v_(), g_()], attrs={**HEADS, "reverse": 2}, expect="attribute reverse=2 must be 0 or 1"),
    Case("chunk-size-negative", [q_(), k_(), v_(), g_()], attrs={**HEADS, "chunk_size": -1}, expect="attribute chunk_size=-1 must be >= 0"),
    Case("scale-as-int", [q_(), k_(), v_(), g_()], attrs={**HEADS, "scale": 2}, expect="attribute 'scale' must be a float"),
    Case("heads-as-float", [q_(), k_(), v_(), g_()], attrs={"q_num_heads": 4.0, "kv_num_heads": HKV},
         expect="attribute 'q_num_heads' must be an int"),
    Case("unknown-attribute", [q_(), k_(), v_(), g_()], attrs={**HEADS, "update_rule": "gated"},
         expect="unknown attribute 'update_rule'",
         exceptions={"ort": (None, "ONNX Runtime's custom-op API reads attributes by name and cannot list a node's")}),
    # ---- the standard LinearAttention (TensorRT plugin, C API, contract) ---------------------------
    Case("la-gated", [q_(), k_(), v_(), state(), g_()], attrs={**HEADS, "update_rule": "gated"}, op=LA),
    Case("la-gated-per-head-bf16", [q_("bfloat16"), k_("bfloat16"), v_("bfloat16"), state("bfloat16"), g_("bfloat16", w=HKV)],
         attrs={**HEADS, "update_rule": "gated"}, op=LA),
    Case("la-linear-no-past", [q_(), k_(), v_()], attrs={**HEADS, "update_rule": "linear"}, op=LA),
    Case("la-delta", [q_(), k_(), v_()], attrs={**HEADS, "update_rule": "delta"}, op=LA,
         expect="attribute update_rule='delta' is not supported (supported: 'gated', 'linear')",
         exceptions={"capi": ("attribute update_rule is not supported", "the C struct carries the rule as an enum")}),
    Case("la-no-rule", [q_(), k_(), v_()], attrs=dict(HEADS), op=LA, expect="the ONNX default 'gated_delta' is not supported"),
    Case("la-gated-no-decay", [q_(), k_(), v_(), state()], attrs={**HEADS, "update_rule": "gated"}, op=LA,
         expect="input 'decay' is absent: update_rule 'gated' needs it"),
    Case("la-decay-fp16", [q_(), k_(), v_(), state(), g_("float16")], attrs={**HEADS, "update_rule": "gated"}, op=LA,
         expect="input 'decay' has element type float16, expected float32 like 'query'"),
]


# ---- data ------------------------------------------------------------------------------------------


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def make_data(case: Case, seed: int = 0) -> list[np.ndarray | None]:
    """Inputs for `case`: random activations, log-gates <= 0 (or small positive ones), valid
    cu_seqlens for the shape it has."""
    rng = np.random.default_rng(seed)
    gate_pos = 4 if case.op == LA else 3
    out = []
    for i, spec in enumerate(case.inputs):
        if spec is None:
            out.append(None)
            continue
        dtype, shape = spec
        name = ("query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma")[i] if case.op == GLA else None
        if name == "cu_seqlens":
            n = int(np.prod(shape))
            total = case.inputs[0][1][1]
            x = np.linspace(0, total, n).round().astype(np.int64).reshape(shape)
        elif i == gate_pos:
            mag = rng.random(shape)
            x = mag * 0.02 + 1e-3 if case.gates == "positive" else -mag * 0.5
        elif name == "g_gamma":
            x = -rng.random(shape) * 0.2
        else:
            x = rng.standard_normal(shape) * 0.5
        out.append(np.ascontiguousarray(x.astype(np_dtype(dtype))))
    return out


def matches(message: str, expected: str) -> bool:
    return expected in message
