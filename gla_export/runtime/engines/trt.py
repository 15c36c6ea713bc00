"""TensorRT (``trt``): the engines of ``gla-export build`` (see gla_export.runtime.tensorrt), run
with TensorRT's Python API on torch's current CUDA stream."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TYPE_CHECKING

import torch

from ..._dtypes import BY_TRT
from ...errors import MissingRuntimeError, ModelError, UsageError
from .. import tensorrt as trt_build
from .base import check_graph_io, sync_device

if TYPE_CHECKING:
    from ...export.metadata import ExportMetadata


def engines_dir_of(metadata: ExportMetadata, engines_dir: str | os.PathLike | None = None) -> Path:
    assert metadata.export_dir is not None
    return Path(engines_dir) if engines_dir is not None else metadata.export_dir / trt_build.ENGINES_DIR


def plugin_for(metadata: ExportMetadata, plugin: str | os.PathLike | None = None) -> str | None:
    """The plugin library the engines need (None for a decomposed export given no plugin);
    MissingRuntimeError when it is not built."""
    if metadata.form == "decomposed" and plugin is None:
        return None
    return trt_build.plugin_library(plugin)


def load_plugin(trt: Any, library: str) -> None:
    """Register libgla_tensorrt's creators with ``trt``'s plugin registry (the one loader of the
    decoder, verify and the build worker); MissingRuntimeError when it registers none."""
    try:
        trt_build.load_plugin(trt.get_plugin_registry(), library)
    except trt_build.PluginLoadError as e:
        raise MissingRuntimeError(str(e)) from e


def _trt_device(device_id: int) -> torch.device:
    """Where TensorRT's buffers live (a seam for the tests, which run the wiring on the CPU)."""
    if not torch.cuda.is_available():
        raise MissingRuntimeError("trt needs a CUDA GPU and a CUDA build of PyTorch (for the device buffers)")
    device = torch.device("cuda", device_id)
    torch.cuda.set_device(device)
    return device


def _module(metadata: ExportMetadata, edir: Path, module: str | None = None) -> str:
    """The TensorRT Python module that runs the engines in ``edir``: ``module`` if given, else the one
    that built them (engines.json); MissingRuntimeError/UsageError when it or the engines are absent."""
    if module is None:
        info_path = edir / trt_build.INFO_FILE
        if not info_path.is_file():
            raise UsageError(f"no TensorRT engines in {edir} (no {trt_build.INFO_FILE}): "
                             f"run `gla-export build {metadata.export_dir}` first")
        module = (json.loads(info_path.read_text()).get("runtime") or {}).get("module") or "tensorrt"
        if trt_build.available_module(module) is None:
            raise MissingRuntimeError(f"the engines in {edir} were built with `{module}`, "
                                      f"which is not installed: {trt_build.INSTALL_HINT}")
    elif trt_build.available_module(module) is None:
        raise MissingRuntimeError(f"the `{module}` Python package is not installed: {trt_build.INSTALL_HINT}")
    return module


class TrtRuntime:
    """``trt``: the export's two TensorRT engines."""

    names: ClassVar[tuple[str, ...]] = ("trt",)

    @classmethod
    def check(cls, metadata: ExportMetadata, *, engines_dir: str | os.PathLike | None = None,
              plugin: str | os.PathLike | None = None, module: str | None = None, **_: Any) -> str:
        """What runs the export here, or MissingRuntimeError/UsageError saying what is missing.
        ``module``: the TensorRT Python module that must run the engines (default: the one that
        built them, as engines.json records)."""
        edir = engines_dir_of(metadata, engines_dir)
        module = _module(metadata, edir, module)
        missing = [str(edir / f) for f in trt_build.ENGINE_FILES.values() if not (edir / f).is_file()]
        if missing:
            raise UsageError(f"no engines ({', '.join(missing)}): run `gla-export build {metadata.export_dir} --force`")
        if not torch.cuda.is_available():
            raise MissingRuntimeError("trt needs a CUDA GPU (a TensorRT engine can only be deserialised on one) "
                                      "and a CUDA build of PyTorch")
        lib = plugin_for(metadata, plugin)
        return f"{module}, engines in {edir}" + (f" + {Path(lib).name}" if lib else "")

    def __init__(self, metadata: ExportMetadata, *, device_id: int = 0, engines_dir: str | os.PathLike | None = None,
                 plugin: str | os.PathLike | None = None):
        edir = engines_dir_of(metadata, engines_dir)
        module = _module(metadata, edir)
        self.device = _trt_device(device_id)
        trt = importlib.import_module(module)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        lib = plugin_for(metadata, plugin)
        if lib is not None:
            load_plugin(trt, lib)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.tensors = {}, {}, {}
        for graph in ("prefill", "step"):
            path = edir / trt_build.ENGINE_FILES[graph]
            if not path.is_file():
                raise UsageError(f"{path} is missing: run `gla-export build {metadata.export_dir} --force`")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ModelError(
                    f"TensorRT {trt.__version__} cannot load {path}: engines only run on the GPU model and TensorRT "
                    "version that built them (rebuild with `gla-export build --force`)"
                )
            ctx = engine.create_execution_context()
            if ctx is None:
                raise ModelError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.engines[graph], self.contexts[graph] = engine, ctx
            self.tensors[graph] = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
            check_graph_io(metadata, graph, [n for n, is_in in self.tensors[graph].items() if is_in],
                           [n for n, is_in in self.tensors[graph].items() if not is_in], str(path))
        self.has_mask = "attention_mask" in self.tensors["prefill"]
        self.input_dtypes = {
            n: (BY_TRT[k].torch if (k := self.engines["prefill"].get_tensor_dtype(n).name) in BY_TRT else torch.int64)
            for n in ("input_ids", "attention_mask") if n in self.tensors["prefill"]
        }
        lo, _, hi = self.engines["prefill"].get_tensor_profile_shape("input_ids", 0)
        self.max_seq = int(hi[1])
        _, _, step_hi = self.engines["step"].get_tensor_profile_shape("input_ids", 0)
        self.max_batch = min(int(hi[0]), int(step_hi[0]))
        self._step_batch: int | None = None
        self.name = f"{module} {trt.__version__}"

    def sync(self) -> None:
        sync_device(self.device)

    def _set(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        ctx, known = self.contexts[graph], self.tensors[graph]
        for name, t in {**feeds, **outputs}.items():
            if name not in known:
                raise ModelError(f"the {graph} engine has no tensor named {name}")
            if known[name] and not ctx.set_input_shape(name, tuple(t.shape)):
                raise UsageError(
                    f"the {graph} engine rejects {name} of shape {list(t.shape)} (outside its optimisation profile)")
            ctx.set_tensor_address(name, t.data_ptr())

    def _execute(self, graph: str) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        if not self.contexts[graph].execute_async_v3(stream):
            raise ModelError(f"TensorRT failed to run the {graph} engine (see its log above)")

    def bind_step(self, feeds, outputs):
        addresses = [(n, t.data_ptr()) for n, t in {**feeds, **outputs}.items()]
        return dict(feeds), dict(outputs), addresses

    def run_step(self, handle) -> None:
        feeds, outputs, addresses = handle
        ctx = self.contexts["step"]
        if self._step_batch != feeds["input_ids"].shape[0]:  # input shapes change only with the batch
            self._set("step", feeds, outputs)
            self._step_batch = feeds["input_ids"].shape[0]
        for name, ptr in addresses:  # the two handles differ in which state buffer is in and which out
            ctx.set_tensor_address(name, ptr)
        self._execute("step")

    def run(self, graph, feeds, outputs) -> None:
        self._set(graph, feeds, outputs)
        if graph == "step":
            self._step_batch = None
        self._execute(graph)


