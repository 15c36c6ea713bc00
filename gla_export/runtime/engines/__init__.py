"""Runtime adapters: what runs an export's prefill and step graphs for the decoder.

- :class:`~.ort.OrtRuntime` (``ort-cpu``, ``ort-cuda``): two ONNX Runtime sessions;
- :class:`~.trt.TrtRuntime` (``trt``): two TensorRT engines.

Both follow the :class:`~.base.Runtime` protocol; its ``check(metadata)`` says whether a runtime
can run an export here (the decoder and ``verify`` both ask it). TensorRT is imported only when
the ``trt`` runtime is used."""

from __future__ import annotations

import os
from typing import Any, TYPE_CHECKING

from ...errors import UsageError
from .base import RUNTIMES, Runtime, check_graph_io
from .ort import OrtRuntime

if TYPE_CHECKING:
    from ...export.metadata import ExportMetadata


def check_runtime(name: str, metadata: ExportMetadata, **options: Any) -> str:
    """What would run the export with runtime ``name`` here; MissingRuntimeError/UsageError
    saying what is missing otherwise. Loads nothing."""
    if name in ("ort-cpu", "ort-cuda"):
        return OrtRuntime.check(metadata, cuda=name == "ort-cuda", **options)
    if name == "trt":
        from .trt import TrtRuntime

        return TrtRuntime.check(metadata, **options)
    raise UsageError(f"backend must be one of {', '.join(RUNTIMES)}, got {name!r}")


def open_runtime(name: str, metadata: ExportMetadata, *, device_id: int = 0, threads: int | None = None,
                 engines_dir: str | os.PathLike | None = None, plugin: str | os.PathLike | None = None,
                 cuda_graph: bool | None = None) -> Runtime:
    """The runtime ``name`` with the export's two graphs loaded. ``cuda_graph`` (ort-cuda only):
    capture the step graph in CUDA graphs; off unless asked for, as in the decoder and the CLI,
    until the captured path has passed its GPU tests (docs/benchmarks.md)."""
    if cuda_graph and name != "ort-cuda":
        raise UsageError(f"CUDA-graph capture is an ort-cuda option (backend {name!r} has none)")
    if name == "ort-cpu":
        return OrtRuntime(metadata, cuda=False, threads=threads)
    if name == "ort-cuda":
        return OrtRuntime(metadata, cuda=True, device_id=device_id, threads=threads,
                          cuda_graph=bool(cuda_graph))
    if name == "trt":
        from .trt import TrtRuntime

        return TrtRuntime(metadata, device_id=device_id, engines_dir=engines_dir, plugin=plugin)
    raise UsageError(f"backend must be one of {', '.join(RUNTIMES)}, got {name!r}")


__all__ = ["RUNTIMES", "OrtRuntime", "Runtime", "check_graph_io", "check_runtime", "open_runtime"]
