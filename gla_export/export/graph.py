"""A small ONNX graph builder and the external weights file that several graphs share.

Graphs are written directly from the model's weights (a "model builder"), not traced: names,
dtypes and the GLA node are under our control, and the weights are streamed tensor by tensor
into ONE data file that every graph's initializers point into (offset, length), so peak memory
stays near one copy of the weights however large the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .._dtypes import DTYPES

# from the one dtype table (gla_export/_dtypes.py)
TORCH_TO_ONNX = {d.torch: d.onnx for d in DTYPES.values()}
ONNX_TYPE_NAMES = {d.onnx: d.name for d in DTYPES.values()}

# Big tensors start on a 64 KiB boundary so a runtime may memory-map them (ONNX Runtime maps
# external data whose offset is a multiple of the allocation granularity, 64 KiB on Windows);
# small ones only on 64 bytes so a model's many norm vectors do not waste space.
BIG_TENSOR = 1 << 16
BIG_ALIGN = 1 << 16
SMALL_ALIGN = 64


def _written() -> torch.Tensor:
    raise RuntimeError("this weight has been written already")


@dataclass
class Weight:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]  # called once, while writing; returns a CPU tensor of shape/dtype
    offset: int = -1
    length: int = -1


@dataclass
class WeightTable:
    """The weights of one export, in write order; graphs refer to them by name."""

    file_name: str
    weights: dict[str, Weight] = field(default_factory=dict)

    def add(self, name: str, shape: Sequence[int], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> str:
        shape = tuple(int(s) for s in shape)
        if name in self.weights:
            w = self.weights[name]
            if w.shape != shape or w.dtype != dtype:
                raise ValueError(f"weight {name} registered twice with different shapes/dtypes")
            return name
        self.weights[name] = Weight(name, shape, dtype, produce)
        return name

    @property
    def numel(self) -> int:
        return sum(int(np.prod(w.shape, dtype=np.int64)) for w in self.weights.values())

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(w.shape, dtype=np.int64)) * torch.empty((), dtype=w.dtype).element_size() for w in self.weights.values())

    def write(self, directory: Path, on_tensor: Callable[[int], None] | None = None) -> Path:
        """Stream every weight into ``directory/file_name``; records each one's offset and length."""
        path = Path(directory) / self.file_name
        offset = 0
        with open(path, "wb") as f:
            for w in self.weights.values():
                t = w.produce()
                if tuple(t.shape) != w.shape or t.dtype != w.dtype:
                    raise RuntimeError(
                        f"weight {w.name}: produced {tuple(t.shape)} {t.dtype}, declared {w.shape} {w.dtype}"
                    )
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                align = BIG_ALIGN if data.nbytes >= BIG_TENSOR else SMALL_ALIGN
                pad = (-offset) % align
                if pad:
                    f.write(b"\0" * pad)
                    offset += pad
                f.write(memoryview(data))
                w.offset, w.length = offset, data.nbytes
                offset += data.nbytes
                # the producer holds the model's tensor: drop it, so the weights can be freed
                # once the caller lets go of the model (validation does, before loading the graphs)
                w.produce = _written
                del t, data
                if on_tensor is not None:
                    on_tensor(w.length)
            f.flush()
            os.fsync(f.fileno())
        return path

    def tensor_proto(self, name: str) -> TensorProto:
        """An initializer pointing into the data file (call after :meth:`write`)."""
        w = self.weights[name]
        return self._external_proto(name, TORCH_TO_ONNX[w.dtype], w.shape, w)

    def _external_proto(self, name: str, data_type: int, dims: Sequence[int], w) -> TensorProto:
        """The initializer ``name`` of ONNX type ``data_type`` and shape ``dims`` at ``w``'s place
        (``offset``, ``length``) in the data file; RuntimeError before ``w`` is written."""
        if w.offset < 0:
            raise RuntimeError(f"weight {name} has not been written yet")
        t = TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.file_name), ("offset", str(w.offset)), ("length", str(w.length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t


class GraphBuilder:
    """Collects nodes, graph inputs/outputs, inline constants and references to shared weights."""

    def __init__(self, name: str, weights: WeightTable | None = None):
        self.name = name
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.constants: list[TensorProto] = []
        self.used_weights: list[str] = []
        self._used: set[str] = set()
        self._const_cache: dict[tuple, str] = {}
        self._counts: dict[str, int] = {}
        self.scope = ""

    # ---- names ----
    def fresh(self, hint: str) -> str:
        base = f"{self.scope}/{hint}" if self.scope else hint
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ---- values ----
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Expose ``value`` as graph output ``name`` (an Identity renames it when needed)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{name}/Identity"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def weight(self, name: str) -> str:
        if self.weights is None or name not in self.weights.weights:
            raise KeyError(f"weight {name} is not registered")
        if name not in self._used:
            self._used.add(name)
            self.used_weights.append(name)
        return name

    def const(self, value, dtype=np.int64, hint: str = "const") -> str:
        """A small constant stored inside the graph (deduplicated by value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = f"const/{hint}_{len(self._const_cache)}"
            self.constants.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def i64(self, *values: int) -> str:
        return self.const(list(values), np.int64, "i64")

    def scalar(self, value: float, elem_type: int) -> str:
        np_type = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}.get(elem_type)
        if np_type is None:  # bfloat16: numpy has none; keep an fp32 constant and cast it once
            return self.op("Cast", [self.const(value, np.float32, "f32")], to=elem_type)
        return self.const(value, np_type, "scalar")

    # ---- nodes ----
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", hint: str | None = None, **attrs):
        name = self.fresh(hint or op_type)
        outs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def cast(self, x: str, to: int, frm: int | None = None) -> str:
        return x if frm is not None and frm == to else self.op("Cast", [x], to=to)

    def graph(self, initializers: Sequence[TensorProto] = ()) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=[*self.constants, *initializers])


def min_ir_version(opset: int) -> int:
    """The lowest IR version valid for ``opset`` of the default domain (onnx writes a newer one by
    default, which older runtimes refuse)."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True)
