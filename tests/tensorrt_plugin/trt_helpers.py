"""Helpers of the TensorRT tests: one-node ONNX graphs of both ops, harness cases, GLA inputs in
the plugin's packed layout."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
              "int32": TensorProto.INT32, "int64": TensorProto.INT64}
TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "int32": torch.int32, "int64": torch.int64}
TORCH_NAMES = {v: k for k, v in TORCH_TYPES.items()}


@dataclass
class NodeCase:
    """One plugin node: its op, attributes and inputs (dtype, shape with -1 for B and T)."""

    id: str
    op: str  # GatedLinearAttention | LinearAttention
    attrs: dict
    inputs: list[tuple[str, str, list]]  # (name, dtype, shape); shape entries "B"/"T"/"N+1" or ints
    out_types: tuple[str, str]
    expect_shapes: tuple[list, list]  # with "B", "T", "N" symbols

    def onnx_model(self) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(n, ONNX_TYPES[t], s) for n, t, s in self.inputs]
        node = helper.make_node(self.op, [n for n, _, _ in self.inputs], ["output", "present_state"],
                                domain="gla" if self.op == "GatedLinearAttention" else "", name=f"node_{self.id}",
                                **self.attrs)
        outs = [helper.make_tensor_value_info("output", ONNX_TYPES[self.out_types[0]], None),
                helper.make_tensor_value_info("present_state", ONNX_TYPES[self.out_types[1]], None)]
        opsets = [helper.make_opsetid("", 27 if self.op == "LinearAttention" else 21)]
        if self.op == "GatedLinearAttention":
            opsets.append(helper.make_opsetid("gla", 1))
        model = helper.make_model(helper.make_graph([node], self.id, ins, outs), opset_imports=opsets)
        model.ir_version = 10
        return model

    def profile(self, ranges: dict[str, tuple[int, int, int]]) -> dict[str, list]:
        prof = {}
        for name, _, shape in self.inputs:
            prof[name] = [[ranges[d][i] if isinstance(d, str) else d for d in shape] for i in range(3)]
        return prof


def gla_node(id: str, *, Hq=4, Hkv=4, K=16, V=16, act="float32", state="float32", past=True, cu=None, gamma=False,
             reverse=0, scale=0.0) -> NodeCase:
    b = 1 if cu or gamma else "B"  # ragged sequences are packed along T with B = 1
    inputs = [("query", act, [b, "T", Hq * K]), ("key", act, [b, "T", Hkv * K]), ("value", act, [b, "T", Hkv * V]),
              ("gate", act, [b, "T", Hkv * K])]
    # inputs are positional and TensorRT's parser cannot pass an empty one to a plugin: g_gamma
    # comes with cu_seqlens, cu_seqlens with past_state
    n_sym = "B"
    if past or cu or gamma:
        inputs.append(("past_state", state, ["N" if cu else "B", Hkv, K, V]))
    if cu or gamma:
        inputs.append(("cu_seqlens", cu or "int32", ["N+1"]))
        n_sym = "N"
    if gamma:
        inputs.append(("g_gamma", "float32", [Hkv]))
    attrs = {"q_num_heads": Hq, "kv_num_heads": Hkv, "scale": scale, "reverse": reverse}
    return NodeCase(id, "GatedLinearAttention", attrs, inputs, (act, state if (past or cu or gamma) else "float32"),
                    ([b, "T", Hq * V], [n_sym, Hkv, K, V]))


def la_node(id: str, *, Hq=4, Hkv=4, K=16, V=16, act="float32", state="float32", past=True, rule="gated",
            per_head=False, beta=False) -> NodeCase:
    inputs = [("query", act, ["B", "T", Hq * K]), ("key", act, ["B", "T", Hkv * K]), ("value", act, ["B", "T", Hkv * V])]
    if past or rule == "gated" or beta:
        inputs.append(("past_state", state, ["B", Hkv, K, V]))
    if rule == "gated" or beta:
        inputs.append(("decay", act, ["B", "T", Hkv if per_head else Hkv * K]))
    if beta:
        inputs.append(("beta", act, ["B", "T", Hkv]))
    attrs = {"q_num_heads": Hq, "kv_num_heads": Hkv, "update_rule": rule}
    has_past = len(inputs) > 3
    return NodeCase(id, "LinearAttention", attrs, inputs, (act, state if has_past else "float32"),
                    (["B", "T", Hq * V], ["B", Hkv, K, V]))


# ---- the harness (plugins/tensorrt/tests/plugin_harness.cc) -------------------------------------


@dataclass
class HarnessInput:
    dtype: str
    dims: list[int]
    symbolic: set[int] = field(default_factory=set)
    max_dims: list[int] | None = None
    data: bytes | None = None


def write_case(case_dir: Path, op: str, fields: dict, inputs: list[HarnessInput], name: str = "harness_node") -> None:
    case_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"op {op}", f"name {name}"]
    for fname, (ftype, value) in fields.items():
        lines.append(f"field {fname} {ftype} {value}")
    for i, x in enumerate(inputs):
        dims = " ".join(f"{d}{'*' if j in x.symbolic else ''}" for j, d in enumerate(x.dims))
        lines.append(f"input {x.dtype} {dims}")
        if x.max_dims is not None:
            lines.append(f"max {i} {' '.join(map(str, x.max_dims))}")
        if x.data is not None:
            (case_dir / f"input{i}.bin").write_bytes(x.data)
    (case_dir / "case.txt").write_text("\n".join(lines) + "\n")


def run_harness(harness: str, library: str, case_dir: Path, device: bool, wrapper: list[str] | None = None,
                timeout: float = 300) -> tuple[int, dict, str]:
    cmd = [*(wrapper or []), harness, library, str(case_dir)] + ([] if device else ["--no-device"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    result_file = case_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return proc.returncode, result, proc.stdout + proc.stderr


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def tensor_from(path: Path, dtype: str, shape: list[int]) -> torch.Tensor:
    raw = path.read_bytes()
    if dtype == "bfloat16":
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    np_type = {"float32": np.float32, "float16": np.float16}[dtype]
    return torch.from_numpy(np.frombuffer(raw, dtype=np_type).copy()).reshape(shape)


def packed(t: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B, T, H*D], the op's layout."""
    return t.reshape(*t.shape[:2], -1)
