"""The one table of tensor element types: the name the export's metadata uses, the short name of
the command-line options, and what torch, ONNX, ONNX Runtime's I/O binding, numpy and TensorRT
call the same type. Every module that converts between them reads this table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str  # metadata.json ("float32"), and torch's attribute name
    torch: torch.dtype
    onnx: int  # onnx.TensorProto element type
    trt: str  # tensorrt.DataType member name
    short: str | None = None  # the --dtype spelling (fp32, fp16, bf16) for activation types
    numpy: Any = None  # numpy's type; None for bfloat16, which numpy lacks (see numpy_dtype)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", torch.float32, 1, "FLOAT", "fp32", np.float32),
        DType("float16", torch.float16, 10, "HALF", "fp16", np.float16),
        DType("bfloat16", torch.bfloat16, 16, "BF16", "bf16", None),
        DType("float64", torch.float64, 11, "DOUBLE", None, np.float64),
        DType("int64", torch.int64, 7, "INT64", None, np.int64),
        DType("int32", torch.int32, 6, "INT32", None, np.int32),
    )
}
BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in DTYPES.values()}
BY_SHORT: dict[str, DType] = {d.short: d for d in DTYPES.values() if d.short}
BY_ONNX: dict[int, DType] = {d.onnx: d for d in DTYPES.values()}
BY_TRT: dict[str, DType] = {d.trt: d for d in DTYPES.values()}
FLOAT_NAMES = ("float32", "float16", "bfloat16")  # the activation and state types an export may have


def torch_dtype(name: str) -> torch.dtype:
    """``float16`` → ``torch.float16``; KeyError for a name not in the table."""
    return DTYPES[name].torch


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``float16``."""
    return BY_TORCH[dtype].name


def numpy_dtype(name: str) -> Any:
    """numpy's type for ``name``; bfloat16 through ml_dtypes (Polygraphy and ONNX Runtime read it)."""
    d = DTYPES[name]
    if d.numpy is not None:
        return d.numpy
    import ml_dtypes

    return ml_dtypes.bfloat16


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy (bfloat16 as ml_dtypes.bfloat16, the value unchanged)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(numpy_dtype("bfloat16"))
    return t.numpy()


def ort_element_type(dtype: torch.dtype) -> Any:
    """What ONNX Runtime's ``IOBinding.bind_input``/``bind_output`` take as the element type: a numpy
    type, or for bfloat16 (no numpy type) the ONNX type code."""
    d = BY_TORCH[dtype]
    return d.numpy if d.numpy is not None else d.onnx
