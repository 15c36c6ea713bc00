"""Constant-memory decoding of an export: prefill once with ``prefill.onnx``, then one
``step.onnx`` call per token, the recurrent states carried from call to call.

Backends:

- ``ort-cpu``: ONNX Runtime on the CPU;
- ``ort-cuda``: ONNX Runtime's CUDA execution provider; the states never leave the GPU;
- ``trt``: TensorRT engines built by ``gla-export build`` (the ``tensorrt`` Python package).

Memory does not grow with the context. Every buffer a decode step touches is allocated when
the batch is set up: two sets of state tensors (the step reads one and writes the other, then
they swap roles), the ``input_ids`` and ``logits`` buffers, and for ONNX Runtime two I/O bindings
(one per direction of the swap) bound to those buffers. A step writes the new tokens into the
ids buffer and runs. Prompts (prefill) allocate their activations per call, optionally in
chunks of ``prefill_chunk`` tokens to bound that too.

Buffers are torch tensors (on the CPU, or on the GPU for ``ort-cuda`` and ``trt``) handed to the
runtimes by pointer, so that rows can be copied, zeroed, snapshotted and restored on the device
without a trip through the host.

Batches are left-padded: rows of different lengths are aligned on their last token and the
prefill graph's ``attention_mask`` marks the padding, which leaves the recurrent state untouched
and is cut out of the short-convolution windows, so rows that already hold contexts are read in
one prefill too (docs/export.md, section 3). Exports written before the metadata's
``padding_with_past`` lack that cut: for models with short convolutions their rows holding a
context are prefilled in groups of equal length.

A conversation's state is its layer states plus the *pending token* (sampled, shown, not yet
consumed; see :mod:`.state`). Decoding that is interrupted, saved and resumed runs exactly the
same sequence of graph calls as decoding that never stopped, so greedy decoding (and seeded
sampling) reproduces the same tokens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MissingRuntimeError, ModelError, UsageError
from .sampling import Sampler, SamplingParams
from .state import ConversationState, StateFileError, model_identity
from .tokenizers import Tokenizer, load_tokenizer

BACKENDS = ("ort-cpu", "ort-cuda", "trt")
FINISH_EOS, FINISH_STOP, FINISH_LENGTH, FINISH_INTERRUPTED = "eos", "stop", "length", "interrupted"
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32,
}


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of the graphs, without its batch dimension."""

    name: str  # graph input, past_key_values.{layer}.{kind}
    output: str  # graph output, present.{layer}.{kind}
    layer: int
    kind: str  # recurrent_state | conv_state
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()


def state_specs(meta: dict[str, Any]) -> list[StateSpec]:
    specs = []
    for s in meta["states"]:
        if s["dtype"] not in TORCH_DTYPES:
            raise ModelError(f"state {s['input']} has dtype {s['dtype']}, which the decoder does not support")
        shape = tuple(int(d) for d in s["shape"][1:])  # the first dimension is the batch
        specs.append(StateSpec(s["input"], s["output"], int(s["layer"]), s["kind"], shape, TORCH_DTYPES[s["dtype"]]))
    return specs


# ---- runtimes ----------------------------------------------------------------------------------------


class _Engine:
    """Runs the two graphs on torch tensors passed by pointer (all on ``device``)."""

    device: torch.device
    has_mask: bool
    max_batch: int | None = None
    max_seq: int | None = None
    name: str

    def bind_step(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Any:
        """A handle that runs the step graph on exactly these buffers, made once per batch setup."""
        raise NotImplementedError

    def run_step(self, handle: Any) -> None:
        raise NotImplementedError

    def run(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


_ORT_ELEMENT_TYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
    torch.bfloat16: 16,  # numpy has no bfloat16: ONNX Runtime takes the ONNX type code (TensorProto.BFLOAT16)
}


def _bind_args(dev: str, dev_id: int, tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """``bind_input``/``bind_output`` arguments for buffers that stay where they are."""
    return [(n, dev, dev_id, _ORT_ELEMENT_TYPES[t.dtype], tuple(t.shape), t.data_ptr()) for n, t in tensors.items()]


class _OrtEngine(_Engine):
    def __init__(self, export_dir: Path, meta: dict[str, Any], cuda: bool, device_id: int, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingRuntimeError(
                "ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu for ort-cuda)") from e
        self.ort = ort
        form = meta["gla_op"]["form"]
        if cuda:
            if hasattr(ort, "preload_dlls"):
                try:  # onnxruntime-gpu finds CUDA's libraries through torch's or the system's
                    ort.preload_dlls()
                except Exception:  # noqa: BLE001 - a failure shows up below as a missing provider
                    pass
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingRuntimeError(
                    "the ort-cuda backend needs onnxruntime-gpu (CUDAExecutionProvider is not available in this "
                    f"onnxruntime {ort.__version__}): pip install onnxruntime-gpu"
                )
            if not torch.cuda.is_available():
                raise MissingRuntimeError(
                    "the ort-cuda backend needs a CUDA GPU and a CUDA build of PyTorch (for the device buffers)")
            self.device = torch.device("cuda", device_id)
            cuda_options: dict[str, Any] = {"device_id": device_id}
            if meta["dtype"] == "float32":
                cuda_options["use_tf32"] = 0  # TF32 products cost ~1e-3 relative error: an fp32 export means fp32
            providers: list[Any] = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
            self.name = f"onnxruntime {ort.__version__} (CUDA:{device_id})"
        else:
            if meta["dtype"] == "bfloat16":
                raise UsageError("this export is bfloat16 and ONNX Runtime has no bfloat16 CPU kernels: "
                                 "use --backend ort-cuda or trt")
            self.device = torch.device("cpu")
            providers = ["CPUExecutionProvider"]
            self.name = f"onnxruntime {ort.__version__} (CPU)"
        self._dev = ("cuda", device_id) if cuda else ("cpu", 0)
        if form == "onnx":
            # LinearAttention is in opset 27, which ONNX Runtime 1.31 still calls "under development"
            os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"
        self.sessions = {}
        for graph in ("prefill", "step"):
            path = export_dir / meta["files"][graph]
            so = ort.SessionOptions()
            so.log_severity_level = 3  # the opset-27 "under development" notice is expected for the onnx form
            if threads:
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
            try:
                if form == "custom":  # our custom-op library registered (MissingRuntimeError when not built)
                    from .session import create_session

                    self.sessions[graph] = create_session(path, providers, so)
                else:
                    self.sessions[graph] = ort.InferenceSession(str(path), so, providers=providers)
            except MissingRuntimeError as e:
                raise MissingRuntimeError(f"{e}; or export with --gla-op decomposed, which needs no library") from e
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise ModelError(f"ONNX Runtime cannot load {path}: {str(e).strip().splitlines()[0]}") from e
        if form == "custom":
            self.name += " + libgla_onnxruntime"
        self.has_mask = "attention_mask" in {i.name for i in self.sessions["prefill"].get_inputs()}

    def _binding(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Any:
        b = self.sessions[graph].io_binding()
        for args in _bind_args(*self._dev, feeds):
            b.bind_input(*args)
        for args in _bind_args(*self._dev, outputs):
            b.bind_output(*args)
        return b

    def bind_step(self, feeds, outputs):
        return self._binding("step", feeds, outputs), _bind_args(*self._dev, feeds)

    def run_step(self, handle) -> None:
        binding, feed_args = handle
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
            raise ModelError(f"the step graph failed in ONNX Runtime: {str(e).strip().splitlines()[0]}") from e

    def run(self, graph, feeds, outputs) -> None:
        self.sync()  # torch may have written these buffers on its stream
        b = self._binding(graph, feeds, outputs)
        try:
            self.sessions[graph].run_with_iobinding(b)
        except Exception as e:  # noqa: BLE001
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in feeds.items() if not n.startswith("past_"))
            first = str(e).strip().splitlines()[0]
            raise ModelError(f"the {graph} graph failed in ONNX Runtime ({shapes}): {first}") from e


_TRT_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64, "INT32": torch.int32,
}


class _TrtEngine(_Engine):
    """Engines from ``gla-export build`` (see gla_export.runtime.tensorrt), run with TensorRT's
    Python API on torch's current CUDA stream."""

    def __init__(self, export_dir: Path, meta: dict[str, Any], device_id: int, engines_dir: str | os.PathLike | None,
                 plugin: str | os.PathLike | None):
        import importlib
        import json

        from . import tensorrt as trt_build

        engines_dir = Path(engines_dir) if engines_dir is not None else export_dir / trt_build.ENGINES_DIR
        info_path = engines_dir / trt_build.INFO_FILE
        if not info_path.is_file():
            raise UsageError(f"no TensorRT engines in {engines_dir} (no {trt_build.INFO_FILE}): "
                             f"run `gla-export build {export_dir}` first")
        info = json.loads(info_path.read_text())
        module = (info.get("runtime") or {}).get("module") or "tensorrt"
        if trt_build.available_module(module) is None:
            raise MissingRuntimeError(f"the engines in {engines_dir} were built with `{module}`, "
                                      f"which is not installed: {trt_build.INSTALL_HINT}")
        self.device = _trt_device(device_id)
        trt = importlib.import_module(module)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        form = meta["gla_op"]["form"]
        if form != "decomposed" or plugin is not None:
            lib = trt_build.plugin_library(plugin)
            registry = trt.get_plugin_registry()
            self._plugin_handle = registry.load_library(lib)
            if not self._plugin_handle:
                raise MissingRuntimeError(f"TensorRT could not load the plugin library {lib}")
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.tensors = {}, {}, {}
        for graph in ("prefill", "step"):
            path = engines_dir / trt_build.ENGINE_FILES[graph]
            if not path.is_file():
                raise UsageError(f"{path} is missing: run `gla-export build {export_dir} --force`")
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
        self.has_mask = "attention_mask" in self.tensors["prefill"]
        self.input_dtypes = {
            n: _TRT_DTYPES.get(self.engines["prefill"].get_tensor_dtype(n).name, torch.int64)
            for n in ("input_ids", "attention_mask") if n in self.tensors["prefill"]
        }
        lo, _, hi = self.engines["prefill"].get_tensor_profile_shape("input_ids", 0)
        self.max_seq = int(hi[1])
        _, _, step_hi = self.engines["step"].get_tensor_profile_shape("input_ids", 0)
        self.max_batch = min(int(hi[0]), int(step_hi[0]))
        self._step_batch: int | None = None
        self.name = f"{module} {trt.__version__}"

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


def _trt_device(device_id: int) -> torch.device:
    """Where TensorRT's buffers live (a seam for the tests, which run the wiring on the CPU)."""
    if not torch.cuda.is_available():
        raise MissingRuntimeError(
            "the trt backend needs a CUDA GPU and a CUDA build of PyTorch (for the device buffers)")
    device = torch.device("cuda", device_id)
    torch.cuda.set_device(device)
    return device


def _make_engine(backend: str, export_dir: Path, meta: dict[str, Any], *, device_id: int, threads: int | None,
                 engines_dir: str | os.PathLike | None, plugin: str | os.PathLike | None) -> _Engine:
    if backend == "ort-cpu":
        return _OrtEngine(export_dir, meta, cuda=False, device_id=0, threads=threads)
    if backend == "ort-cuda":
        return _OrtEngine(export_dir, meta, cuda=True, device_id=device_id, threads=threads)
    if backend == "trt":
        return _TrtEngine(export_dir, meta, device_id, engines_dir, plugin)
    raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


# ---- generation results ---------------------------------------------------------------------------------


@dataclass
class TokenEvent:
    """One generated token of one row; ``piece`` is what it adds to the text (UTF-8 bytes).

    ``token == -1``: no new token, only text a subword tokenizer had held back, released when an
    interrupted row stops."""

    row: int
    token: int
    piece: bytes

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")


@dataclass
class RowResult:
    row: int
    tokens: list[int]
    finish_reason: str
    state: ConversationState | None
    text_bytes: bytes = b""
    prompt_tokens: int = 0

    @property
    def text(self) -> str:
        return self.text_bytes.decode("utf-8", errors="replace")


class Generation:
    """Iterate for :class:`TokenEvent` as tokens are produced; :attr:`results` (one per row) is
    complete once the iteration ends (or after :meth:`run`)."""

    def __init__(self, events: Iterator[TokenEvent], results: list[RowResult | None]):
        self._events = events
        self.results = results

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def run(self) -> list[RowResult]:
        for _ in self._events:
            pass
        return self.results  # type: ignore[return-value]


# ---- the decoder -----------------------------------------------------------------------------------------


class StatefulDecoder:
    """Prefill-then-step decoding of an export directory (see the module docstring).

    Args:
        export_dir: written by ``gla-export export``.
        backend: ``ort-cpu``, ``ort-cuda`` or ``trt``.
        batch_size: rows (conversations) decoded together; :meth:`resize` changes it.
        device_id: the GPU for ``ort-cuda`` and ``trt``.
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
        prefill_chunk: feed prompts in pieces of at most this many tokens (bounds the prefill's
            activation memory; TensorRT's profile maximum applies in any case).
        engines_dir, plugin: for ``trt``: where ``gla-export build`` put the engines (default
            ``EXPORT_DIR/tensorrt``) and the plugin library (default: the one built with gla-export).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        backend: str = "ort-cpu",
        *,
        batch_size: int = 1,
        device_id: int = 0,
        threads: int | None = None,
        prefill_chunk: int | None = None,
        engines_dir: str | os.PathLike | None = None,
        plugin: str | os.PathLike | None = None,
    ):
        if backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise UsageError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.export_dir = Path(export_dir)
        self.backend = backend
        from ..export.metadata import open_export

        self.metadata = open_export(self.export_dir)
        self.specs = state_specs(self.metadata)
        self.vocab_size = int(self.metadata["model"]["vocab_size"])
        self.tokenizer: Tokenizer = load_tokenizer(self.export_dir, self.metadata)
        eos = self.metadata["model"].get("eos_token_id")
        self.eos_token_id: int | None = int(eos) if eos is not None else self.tokenizer.eos_token_id
        self.bos_token_id: int | None = self.tokenizer.bos_token_id
        step_inputs = {i["name"]: i["dtype"] for i in self.metadata["graphs"]["step"]["inputs"]}
        prefill_inputs = {i["name"]: i["dtype"] for i in self.metadata["graphs"]["prefill"]["inputs"]}
        self._engine = _make_engine(backend, self.export_dir, self.metadata, device_id=device_id, threads=threads,
                                    engines_dir=engines_dir, plugin=plugin)
        self._id_dtypes = {
            "step": TORCH_DTYPES[step_inputs["input_ids"]],
            "prefill": TORCH_DTYPES[prefill_inputs["input_ids"]],
            "mask": TORCH_DTYPES[prefill_inputs.get("attention_mask", "int64")],
        }
        if isinstance(self._engine, _TrtEngine):  # the engine decides (a builder may have narrowed int64 ids)
            self._id_dtypes["prefill"] = self._id_dtypes["step"] = self._engine.input_dtypes["input_ids"]
            self._id_dtypes["mask"] = self._engine.input_dtypes.get("attention_mask", torch.int64)
        # padding is exact over any past, except in exports older than the metadata's
        # padding_with_past for models with short convolutions (their padding took slots of the
        # convolution windows): there, rows that hold a context are prefilled in groups of equal length
        conv = any(s.kind == "conv_state" for s in self.specs)
        self._padding_with_past = bool(self.metadata.get("padding_with_past")) or not conv
        self.prefill_chunk = prefill_chunk
        if self._engine.max_seq is not None:
            self.prefill_chunk = min(prefill_chunk or self._engine.max_seq, self._engine.max_seq)
        self.device = self._engine.device
        self._lock = threading.RLock()  # one graph call at a time: the buffers are shared
        self._version = 0  # counts the calls that change the buffers (a generation checks it between rounds)
        self.batch_size = 0
        self.resize(batch_size)

    # -- properties ------------------------------------------------------------------------------------

    @property
    def runtime_name(self) -> str:
        return self._engine.name

    @property
    def has_attention_mask(self) -> bool:
        return self._engine.has_mask

    @cached_property
    def identity(self) -> str:
        """The model identity that state files and snapshots carry (see :func:`.state.model_identity`)."""
        return model_identity(self.export_dir, self.metadata)

    @property
    def state_nbytes(self) -> int:
        """Bytes of one conversation's state: what a snapshot holds, whatever its context length."""
        return sum(s.row_nbytes for s in self.specs)

    # -- buffers ---------------------------------------------------------------------------------------

    def resize(self, batch_size: int) -> None:
        """Allocate the buffers for ``batch_size`` rows (all states reset to zero)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        if self._engine.max_batch is not None and batch_size > self._engine.max_batch:
            raise UsageError(f"batch_size {batch_size} exceeds the engines' maximum batch {self._engine.max_batch} "
                             "(rebuild them with a larger --max-batch)")
        with self._lock:
            self._version += 1
            self._step_handles = None
            dev, B = self.device, batch_size
            pin = dev.type == "cuda"
            self._states = [
                {s.name: torch.zeros((B, *s.shape), dtype=s.dtype, device=dev) for s in self.specs} for _ in range(2)
            ]
            self._cur = 0
            ids, V = self._id_dtypes["step"], self.vocab_size
            self._ids_host = torch.zeros((B, 1), dtype=ids, pin_memory=pin)
            self._ids_dev = self._ids_host if not pin else torch.zeros((B, 1), dtype=ids, device=dev)
            self._logits_dev = torch.zeros((B, 1, V), dtype=torch.float32, device=dev)
            self._logits_host = self._logits_dev if not pin else torch.zeros((B, 1, V), pin_memory=True)
            self._ids_np = self._ids_host.numpy()[:, 0]
            self._logits_np = self._logits_host.numpy()[:, 0, :]
            self._step_handles = [
                self._engine.bind_step(
                    {"input_ids": self._ids_dev, **self._states[p]},
                    {"logits": self._logits_dev, **{s.output: self._states[1 - p][s.name] for s in self.specs}},
                )
                for p in (0, 1)
            ]
            self._consumed = [0] * B
            self.batch_size = B

    def _rows(self, rows: Sequence[int] | None) -> list[int]:
        if rows is None:
            return list(range(self.batch_size))
        out = [int(r) for r in rows]
        bad = [r for r in out if not 0 <= r < self.batch_size]
        if bad:
            raise UsageError(f"rows {bad} are outside the batch [0, {self.batch_size})")
        if len(set(out)) != len(out):
            raise UsageError(f"rows must be distinct, got {out}")
        return out

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Zero the states of ``rows`` (default: every row): empty contexts."""
        rows = self._rows(rows)
        with self._lock:
            self._version += 1
            cur = self._states[self._cur]
            for t in cur.values():
                if len(rows) == self.batch_size:
                    t.zero_()
                else:
                    for r in rows:
                        t[r].zero_()
            for r in rows:
                self._consumed[r] = 0
            self._engine.sync()

    def consumed(self, row: int) -> int:
        """Tokens fed to ``row`` since it was reset or restored (plus the restored state's count)."""
        return self._consumed[self._rows([row])[0]]

    # -- snapshots ---------------------------------------------------------------------------------------

    def snapshot(self, row: int, *, pending_token: int | None = None, sampler: Sampler | dict | None = None,
                 generated: int = 0, finish_reason: str | None = None,
                 device: str | torch.device | None = None) -> ConversationState:
        """A copy of ``row``'s state (on ``device``, default the decoder's)."""
        (row,) = self._rows([row])
        with self._lock:
            cur = self._states[self._cur]
            tensors = {s.name: cur[s.name][row:row + 1].to(device or self.device, copy=True) for s in self.specs}
        if isinstance(sampler, Sampler):
            sampler = sampler.state_dict()
        return ConversationState(self.identity, tensors, pending_token, self._consumed[row], generated, sampler,
                                 finish_reason)

    def restore(self, row: int, state: ConversationState) -> None:
        """Copy ``state`` into batch row ``row`` (any row: snapshots are per conversation)."""
        (row,) = self._rows([row])
        if state.identity != self.identity:
            raise StateFileError(
                "the conversation state belongs to another model (its identity differs from this export's)")
        for s in self.specs:
            t = state.tensors.get(s.name)
            if t is None:
                raise StateFileError(f"the conversation state has no tensor {s.name}")
            if tuple(t.shape) != (1, *s.shape) or t.dtype != s.dtype:
                raise StateFileError(
                    f"state tensor {s.name} is {t.dtype} {list(t.shape)}, expected {s.dtype} {[1, *s.shape]}")
        if set(state.tensors) != {s.name for s in self.specs}:
            extra = sorted(set(state.tensors) - {s.name for s in self.specs})
            raise StateFileError(f"the conversation state has tensors this export does not: {extra}")
        with self._lock:
            self._version += 1
            cur = self._states[self._cur]
            for s in self.specs:
                cur[s.name][row].copy_(state.tensors[s.name][0])
            self._consumed[row] = state.consumed
            self._engine.sync()

    # -- running the graphs ---------------------------------------------------------------------------------

    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            raise UsageError(f"{what} (shape {list(ids.shape)}) holds token ids {bad[:5].tolist()} "
                             f"outside the vocabulary [0, {self.vocab_size})")

    def step(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Feed one token to every row; returns the next-token logits ``[batch_size, V]`` (float32).

        The array is a view of the decoder's logits buffer: valid until the next call.
        """
        with self._lock:
            self._version += 1
            ids = self._ids_np
            if len(tokens) != self.batch_size:
                raise UsageError(
                    f"step needs one token per row: got {len(tokens)} tokens for a batch of {self.batch_size}")
            ids[:] = tokens
            self._check_ids(ids, "tokens")
            if self._ids_dev is not self._ids_host:
                self._ids_dev.copy_(self._ids_host)
            self._engine.run_step(self._step_handles[self._cur])
            self._cur ^= 1
            if self._logits_host is not self._logits_dev:
                self._logits_host.copy_(self._logits_dev)
            for r in range(self.batch_size):
                self._consumed[r] += 1
            return self._logits_np

    def prefill(self, token_lists: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> np.ndarray:
        """Feed a prompt to each of ``rows`` (default: every row, one list per row), continuing from
        their current states; returns the logits after each prompt's last token ``[len(rows), V]``.

        Rows of different lengths are left-padded through ``attention_mask`` (see the module docstring).
        """
        rows = self._rows(rows)
        if len(token_lists) != len(rows):
            raise UsageError(f"prefill got {len(token_lists)} prompts for {len(rows)} rows")
        lists = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
        for i, ids in enumerate(lists):
            if ids.size == 0:
                raise UsageError(f"prompt {i} (row {rows[i]}) is empty: give at least one token")
            self._check_ids(ids, f"prompt {i} (row {rows[i]})")
        lengths = {len(ids) for ids in lists}
        with self._lock:
            self._version += 1
            by_len: dict[int, list[int]] = {}
            for i, ids in enumerate(lists):
                by_len.setdefault(len(ids), []).append(i)
            if len(lengths) == 1:
                groups = [list(range(len(rows)))]
            elif self._engine.has_mask and (self._padding_with_past or not any(self._consumed[r] for r in rows)):
                # one padded prefill, but single tokens go through the step graph as in uninterrupted decoding
                groups = [g for g in (by_len.pop(1, None), sorted(i for g in by_len.values() for i in g)) if g]
            else:
                groups = list(by_len.values())
            out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
            for g in groups:
                out[g] = self._run_prompt([rows[i] for i in g], [lists[i] for i in g])
            return out

    def _run_prompt(self, rows: list[int], lists: list[np.ndarray]) -> np.ndarray:
        eng, dev, n = self._engine, self.device, len(rows)
        L = max(len(ids) for ids in lists)
        full = rows == list(range(self.batch_size))
        cur = self._states[self._cur]
        if full:
            bufs = [cur, self._states[1 - self._cur]]
        else:
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            src = {name: t.index_select(0, idx) for name, t in cur.items()}
            bufs = [src, {name: torch.empty_like(t) for name, t in src.items()}]
        single = L == 1  # one token per row: the step graph, exactly what uninterrupted decoding runs
        ids = np.zeros((n, L), dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        for i, t in enumerate(lists):
            ids[i, L - len(t):] = t
            mask[i, L - len(t):] = 1
        chunk = 1 if single else (self.prefill_chunk or L)
        p = 0
        logits = None
        for start in range(0, L, chunk):
            stop = min(start + chunk, L)
            graph = "step" if single else "prefill"
            feeds = {"input_ids": torch.from_numpy(ids[:, start:stop].copy()).to(dev, self._id_dtypes[graph])}
            if graph == "prefill" and eng.has_mask:
                feeds["attention_mask"] = torch.from_numpy(mask[:, start:stop].copy()).to(dev, self._id_dtypes["mask"])
            elif not mask[:, start:stop].all():
                raise UsageError(
                    "this export's prefill graph has no attention_mask: prompts of one batch must have equal lengths")
            feeds.update(bufs[p])
            logits = torch.empty((n, stop - start, self.vocab_size), dtype=torch.float32, device=dev)
            outputs = {"logits": logits, **{s.output: bufs[1 - p][s.name] for s in self.specs}}
            eng.run(graph, feeds, outputs)
            p ^= 1
        if full:
            if p == 1:
                self._cur ^= 1
        else:
            for name, t in cur.items():
                t.index_copy_(0, idx, bufs[p][name])
            eng.sync()
        for r, t in zip(rows, lists, strict=True):
            self._consumed[r] += len(t)
        assert logits is not None
        return logits[:, -1, :].to("cpu", torch.float32).numpy()

    # -- generation ---------------------------------------------------------------------------------------

    def encode(self, text: str, *, first: bool = True) -> list[int]:
        """Token ids of ``text``; ``first`` (a new conversation) adds BOS."""
        return self.tokenizer.encode(text, add_bos=first)

    def start(
        self,
        row: int,
        *,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        state: ConversationState | None = None,
        sampling: SamplingParams | None = None,
    ) -> tuple[list[int], Sampler]:
        """Put a conversation into ``row``: restore ``state`` (or reset), and return the tokens still
        to feed (the pending token, then the new prompt) and the conversation's sampler. The caller
        feeds them with :meth:`prefill` (or :meth:`step` for a single token, as :meth:`generate` does)."""
        if prompt is not None and prompt_ids is not None:
            raise UsageError("give prompt or prompt_ids, not both")
        if state is not None:
            self.restore(row, state)
            sampler = _sampler_for(state, sampling)
            new = [] if prompt is None and prompt_ids is None else (
                self.encode(prompt, first=False) if prompt is not None else list(prompt_ids))  # type: ignore[arg-type]
            feed = ([state.pending_token] if state.pending_token is not None else []) + new
            if not feed:
                raise UsageError("the conversation state has no pending token: give a prompt to continue it")
        else:
            self.reset([row])
            sampler = Sampler(sampling or SamplingParams())
            if prompt_ids is not None:
                feed = list(prompt_ids)
            else:
                feed = self.encode(prompt if prompt is not None else "", first=True)
            if not feed:
                raise UsageError("the prompt is empty and the tokenizer adds no BOS token: give at least one token")
        arr = np.asarray(feed, dtype=np.int64)
        self._check_ids(arr, f"prompt of row {row}")
        return [int(t) for t in feed], sampler

    def generate(
        self,
        prompts: str | Sequence[str | None] | None = None,
        *,
        prompt_ids: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
        states: ConversationState | Sequence[ConversationState | None] | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingParams | Sequence[SamplingParams | None] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        keep_tokens: bool = True,
        snapshot: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Generate for one or several conversations at once (one batch row each; the batch is
        resized to their number and every row's previous state is replaced).

        Each row: a new conversation from ``prompts[i]`` (text; BOS added) or ``prompt_ids[i]``, or
        a saved conversation ``states[i]`` continued with an optional new prompt. Stops at EOS,
        at one of ``stop_token_ids`` (EOS too unless ``ignore_eos``), or after ``max_new_tokens``.
        ``sampling`` per row or for all: for a saved conversation, None keeps its sampler
        (parameters and position).

        ``should_stop`` is asked after every round of tokens; when it returns True every row still
        going stops with finish reason ``interrupted`` (a Ctrl-C handler sets such a flag: the
        states stay consistent, unlike with an exception raised in the middle of a step).

        Returns a :class:`Generation`: iterate it for tokens as they come; ``results[i].state``
        (when ``snapshot``) is the conversation to continue later, its pending token the last one
        generated. ``keep_tokens=False`` keeps no token list or text in the results (constant
        memory however long the generation).
        """
        n, prompt_rows, id_rows, state_rows, sampling_rows = _normalise(prompts, prompt_ids, states, sampling)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        stops = set(int(t) for t in stop_token_ids) if stop_token_ids is not None else set()
        eos = None if ignore_eos else self.eos_token_id
        results: list[RowResult | None] = [None] * n
        return Generation(self._generate(n, prompt_rows, id_rows, state_rows, sampling_rows, max_new_tokens, eos, stops,
                                         keep_tokens, snapshot, should_stop, results), results)

    def _generate(self, n, prompt_rows, id_rows, state_rows, sampling_rows, max_new_tokens, eos, stops, keep_tokens,
                  snapshot, should_stop, results):
        # The lock is held while a round of tokens is computed, never across a ``yield``: a
        # Generation that its consumer abandons (or pauses) must not block every other thread's
        # calls until it is garbage-collected. Another call that changes the buffers in between
        # (another generation, step, prefill, reset, restore, resize) ends this one with a
        # UsageError at its next round instead of decoding from someone else's states.
        with self._lock:
            if self.batch_size != n:
                self.resize(n)
            feeds, samplers = [], []
            for i in range(n):
                feed, sampler = self.start(i, prompt=prompt_rows[i], prompt_ids=id_rows[i], state=state_rows[i],
                                           sampling=sampling_rows[i])
                feeds.append(feed)
                samplers.append(sampler)
            prompt_tokens = [len(f) for f in feeds]
            generated = [s.generated if s is not None else 0 for s in state_rows]
            if max_new_tokens == 0:
                # nothing to sample: consume all but the last token, which becomes the pending one
                rest = [i for i in range(n) if len(feeds[i]) > 1]
                if rest:
                    self.prefill([feeds[i][:-1] for i in rest], rows=rest)
                for i in range(n):
                    state = self.snapshot(i, pending_token=feeds[i][-1], sampler=samplers[i], generated=generated[i],
                                          finish_reason=FINISH_LENGTH) if snapshot else None
                    results[i] = RowResult(i, [], FINISH_LENGTH, state, b"", prompt_tokens[i])
                return
            logits = self.prefill(feeds)
            streams = [self.tokenizer.stream() for _ in range(n)]
            tokens: list[list[int]] = [[] for _ in range(n)]
            text = [bytearray() for _ in range(n)]
            counts = [0] * n
            active = [True] * n
            next_ids = np.zeros(n, dtype=np.int64)

            def finish(i: int, reason: str) -> bytes:
                tail = streams[i].flush()
                if keep_tokens:
                    text[i] += tail
                active[i] = False
                # the row is fed junk from now on: take its state while it is still this conversation's
                state = self.snapshot(i, pending_token=int(next_ids[i]), sampler=samplers[i], generated=generated[i],
                                      finish_reason=reason) if snapshot else None
                results[i] = RowResult(i, tokens[i], reason, state, bytes(text[i]), prompt_tokens[i])
                return tail

            def sample_round(logits: np.ndarray) -> list[TokenEvent]:
                events = []
                for i in range(n):
                    if not active[i]:
                        continue
                    tok = samplers[i].sample(logits[i])
                    next_ids[i] = tok
                    counts[i] += 1
                    generated[i] += 1
                    piece = streams[i].bytes_for(tok)
                    if keep_tokens:
                        tokens[i].append(tok)
                        text[i] += piece
                    reason = FINISH_EOS if tok == eos else FINISH_STOP if tok in stops else \
                        FINISH_LENGTH if counts[i] >= max_new_tokens else None
                    if reason is not None:
                        piece += finish(i, reason)
                    events.append(TokenEvent(i, tok, piece))
                return events

            events = sample_round(logits)
            version = self._version
        while True:
            yield from events
            if not any(active):
                return
            stop = should_stop is not None and should_stop()
            with self._lock:
                if self._version != version:
                    raise UsageError("this generation was interrupted by another call on the same decoder (generate, "
                                     "step, prefill, reset, restore or resize): finish or drop one generation "
                                     "before starting the next, or use one decoder per thread")
                events = []
                if stop:
                    for i in range(n):
                        if active[i]:
                            tail = finish(i, FINISH_INTERRUPTED)
                            if tail:
                                events.append(TokenEvent(i, -1, tail))
                if not any(active):
                    break
                events += sample_round(self.step(next_ids))
                version = self._version
        yield from events


def _sampler_for(state: ConversationState, sampling: SamplingParams | None) -> Sampler:
    if state.sampler is None:
        return Sampler(sampling or SamplingParams())
    saved_seed = state.sampler.get("seed")
    if sampling is not None and sampling.seed is not None and sampling.seed != saved_seed:
        return Sampler(sampling)  # a different seed given on purpose: a new random stream
    return Sampler.from_state_dict(state.sampler, sampling)


def _normalise(prompts, prompt_ids, states, sampling):
    def as_rows(x, scalar_types) -> list | None:
        if x is None:
            return None
        if isinstance(x, scalar_types):
            return [x]
        return list(x)

    p = as_rows(prompts, (str,))
    ids = prompt_ids
    if ids is not None:
        ids = list(ids)
        ids = [ids] if ids and all(isinstance(t, (int, np.integer)) for t in ids) else ids
    s = as_rows(states, (ConversationState,))
    counts = {len(x) for x in (p, ids, s) if x is not None}
    if not counts:
        raise UsageError("generate needs prompts, prompt_ids or states")
    if len(counts) > 1:
        raise UsageError(f"prompts, prompt_ids and states must have one entry per row; got lengths {sorted(counts)}")
    n = counts.pop()
    if n == 0:
        raise UsageError("generate got no rows (empty prompts list)")
    p = p or [None] * n
    ids = ids or [None] * n
    s = s or [None] * n
    for i in range(n):
        if p[i] is not None and ids[i] is not None:
            raise UsageError(f"row {i}: give a prompt or prompt ids, not both")
        if p[i] is None and ids[i] is None and s[i] is None:
            raise UsageError(f"row {i} has no prompt and no state")
        if p[i] is not None and not isinstance(p[i], str):
            raise UsageError(f"prompts[{i}] must be a string, got {type(p[i]).__name__}")
    if sampling is None or isinstance(sampling, SamplingParams):
        sp = [sampling] * n
    else:
        sp = list(sampling)
        if len(sp) != n:
            raise UsageError(f"sampling has {len(sp)} entries for {n} rows")
    return n, p, ids, s, sp


__all__ = [
    "BACKENDS",
    "Generation",
    "RowResult",
    "StateSpec",
    "StatefulDecoder",
    "TokenEvent",
]
