"""ONNX Runtime (``ort-cpu``, ``ort-cuda``): two sessions from :func:`gla_export.runtime.create_session`,
run through I/O bindings on torch buffers."""

from __future__ import annotations

from typing import Any, ClassVar, TYPE_CHECKING

import torch

from ..._dtypes import ort_element_type
from ...errors import MissingRuntimeError, ModelError, UsageError, first_line
from .base import check_graph_io, sync_device

if TYPE_CHECKING:
    from ...export.metadata import ExportMetadata

CUDA_HINT = "pip install 'gla-export[gpu]'"


def _bind_args(dev: str, dev_id: int, tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """``bind_input``/``bind_output`` arguments for buffers that stay where they are."""
    return [(n, dev, dev_id, ort_element_type(t.dtype), tuple(t.shape), t.data_ptr()) for n, t in tensors.items()]


def open_session(metadata: ExportMetadata, graph: str, *, cuda: bool, device_id: int = 0, threads: int | None = None,
                 cuda_graph: bool = False):
    """A session for one graph of the export (the decoder's and ``verify``'s), through the one
    session factory; ModelError when the file is not the graph the metadata describes.
    ``cuda_graph`` turns on ONNX Runtime's CUDA-graph capture (``enable_cuda_graph``): every run
    must then bind its inputs and outputs at the same device addresses (one graph per
    ``gpu_graph_id``)."""
    from ..session import create_session

    path = metadata.path(graph)
    cuda_options = {"device_id": device_id}
    if cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    providers: list[Any] = [("cuda", cuda_options), "cpu"] if cuda else ["cpu"]
    form = metadata.form
    try:
        sess = create_session(path, providers, library=form == "custom", intra_op_num_threads=threads,
                              allow_unreleased_opsets=form == "onnx")
    except MissingRuntimeError as e:
        if form == "custom":
            raise MissingRuntimeError(f"{e}; or export with --gla-op decomposed, which needs no library") from e
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise ModelError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from e
    check_graph_io(metadata, graph, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()],
                   str(path))
    if cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise MissingRuntimeError("ONNX Runtime could not create its CUDA execution provider (no usable GPU?)")
    return sess


class OrtRuntime:
    """``ort-cpu`` and ``ort-cuda``: the export's two ONNX Runtime sessions."""

    names: ClassVar[tuple[str, ...]] = ("ort-cpu", "ort-cuda")
    max_batch: int | None = None
    max_seq: int | None = None

    @classmethod
    def check(cls, metadata: ExportMetadata, *, cuda: bool = False, library: Any = None, **_: Any) -> str:
        """What runs the export here (``onnxruntime 1.x (CPU) + libgla_onnxruntime.so``), or
        MissingRuntimeError/UsageError saying what is missing."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingRuntimeError(
                "onnxruntime is not installed: pip install 'gla-export[cpu]' (or '[gpu]' for ort-cuda)") from e
        if cuda:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingRuntimeError(
                    "ort-cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available in this "
                    f"onnxruntime {ort.__version__}): {CUDA_HINT}")
            if not torch.cuda.is_available():
                raise MissingRuntimeError(
                    "ort-cuda needs a CUDA GPU and a CUDA build of PyTorch (for the device buffers)")
            detail = f"onnxruntime {ort.__version__} (CUDA)"
        else:
            if metadata.dtype == "bfloat16":
                raise UsageError("this export is bfloat16 and ONNX Runtime has no bfloat16 CPU kernels: "
                                 "use --backend ort-cuda or trt")
            detail = f"onnxruntime {ort.__version__} (CPU)"
        if metadata.form == "custom":
            if library is not None:
                from pathlib import Path

                lib = Path(library)
                if not lib.is_file():
                    raise MissingRuntimeError(f"the gla ONNX Runtime library {lib} does not exist")
            else:
                from ..._native import find_library

                lib = find_library("ort")
                if lib is None:
                    raise MissingRuntimeError("the gla ONNX Runtime library (libgla_onnxruntime) is not built; "
                                              "or export with --gla-op decomposed, which needs no library")
            detail += f" + {lib.name}"
        return detail

    def __init__(self, metadata: ExportMetadata, *, cuda: bool, device_id: int = 0, threads: int | None = None,
                 cuda_graph: bool = False):
        self.check(metadata, cuda=cuda)
        import onnxruntime as ort

        if cuda_graph and not cuda:
            raise UsageError("CUDA-graph capture needs ort-cuda (the CPU runtime has no graphs)")

        self._dev = ("cuda", device_id) if cuda else ("cpu", 0)
        self.device = torch.device(*self._dev) if cuda else torch.device("cpu")
        self.name = f"onnxruntime {ort.__version__} ({f'CUDA:{device_id}' if cuda else 'CPU'})"
        if metadata.form == "custom":
            self.name += " + libgla_onnxruntime"
        self.sessions = {"prefill": open_session(metadata, "prefill", cuda=cuda, device_id=device_id, threads=threads)}
        # the step graph is captured (one CUDA graph per bound set of buffers) unless that is off
        # or ONNX Runtime refuses: why it is off is kept in ``cuda_graph_off``
        self.cuda_graph = False
        self.cuda_graph_off: str | None = None if cuda_graph else "turned off"
        if cuda_graph and metadata.form == "onnx":
            # the standard LinearAttention has no CUDA kernel: its CPU fallback cannot be captured
            self.cuda_graph_off = "the onnx form's LinearAttention runs on the CPU"
        elif cuda_graph:
            try:
                self.sessions["step"] = open_session(metadata, "step", cuda=True, device_id=device_id,
                                                     threads=threads, cuda_graph=True)
                self.cuda_graph = True
            except ModelError as e:
                self.cuda_graph_off = f"ONNX Runtime refused CUDA-graph capture: {e}"
        self._open_args = (metadata, cuda, device_id, threads)
        if "step" not in self.sessions:
            self.sessions["step"] = open_session(metadata, "step", cuda=cuda, device_id=device_id, threads=threads)
        if self.cuda_graph:
            self.name += " + CUDA graph"
        # ids from 1: a run without the annotation is graph 0 to ONNX Runtime, which would capture it
        self._next_graph_id = 1
        self.has_mask = "attention_mask" in {i.name for i in self.sessions["prefill"].get_inputs()}

    def sync(self) -> None:
        sync_device(self.device)

    def disable_cuda_graph(self, why: str) -> None:
        """Run the step graph uncaptured from now on (a session without graphs replaces the
        captured one): handles bound before are void, bind again."""
        metadata, cuda, device_id, threads = self._open_args
        self.sessions["step"] = open_session(metadata, "step", cuda=cuda, device_id=device_id, threads=threads)
        self.cuda_graph = False
        self.cuda_graph_off = why
        self.name = self.name.replace(" + CUDA graph", "")

    def _binding(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Any:
        b = self.sessions[graph].io_binding()
        for args in _bind_args(*self._dev, feeds):
            b.bind_input(*args)
        for args in _bind_args(*self._dev, outputs):
            b.bind_output(*args)
        return b

    def bind_step(self, feeds, outputs):
        """With CUDA graphs, each binding gets its own ``gpu_graph_id`` (captured at its second run,
        replayed after): the caller keeps the buffers alive and at their addresses for as long as
        it runs the handle, and never binds them again (a fresh binding is a fresh graph)."""
        binding = self._binding("step", feeds, outputs)
        if not self.cuda_graph:
            return binding, _bind_args(*self._dev, feeds), None
        import onnxruntime as ort

        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(self._next_graph_id))
        self._next_graph_id += 1
        return binding, None, run_options

    def run_step(self, handle) -> None:
        binding, feed_args, run_options = handle
        if run_options is not None:  # a captured graph: the addresses are those it was captured with
            self.sync()  # torch wrote the token ids on its own stream
            try:
                self.sessions["step"].run_with_iobinding(binding, run_options)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"the captured step graph failed in ONNX Runtime: {first_line(e)}") from e
            return
        if self._dev[0] != "cpu":
            # ONNX Runtime copies an input to the device of the node that reads it when it is bound,
            # not when it runs: a state read by a node that fell back to the CPU (the onnx form's
            # LinearAttention has no CUDA kernel) would be a stale copy. Rebinding the same
            # pointers (arguments computed once, in bind_step) is cheap where no copy is needed.
            for args in feed_args:
                binding.bind_input(*args)
        try:
            self.sessions["step"].run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"the step graph failed in ONNX Runtime: {first_line(e)}") from e

    def run(self, graph, feeds, outputs) -> None:
        self.sync()  # torch may have written these buffers on its stream
        b = self._binding(graph, feeds, outputs)
        run_options = None
        if graph == "step" and self.cuda_graph:
            # buffers of this call only: run without a graph (-1), never capture them as graph 0
            import onnxruntime as ort

            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", "-1")
        try:
            self.sessions[graph].run_with_iobinding(b, run_options)
        except Exception as e:  # noqa: BLE001
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in feeds.items() if not n.startswith("past_"))
            first = first_line(e)
            raise ModelError(f"the {graph} graph failed in ONNX Runtime ({shapes}): {first}") from e
