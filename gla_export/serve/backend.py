"""The serving layer's one door into the rest of gla_export.

Everything ``gla_export.serve`` needs from the runtime and export layers is imported here and
nowhere else, so that a change of those layers is mended in this file alone. What the server
uses is the lowest stable layer: the export's metadata (:func:`open_export`), an ONNX Runtime
session with our custom-op library (:func:`create_session`), the graphs' documented inputs and
outputs (docs/export.md: ``input_ids``, ``attention_mask``, ``past_key_values.{i}.*`` →
``logits``, ``present.{i}.*``), the tokenizer, the sampler and the state-file format.

What the runtime layer does not offer and the server needs is written here: :class:`Graphs`
runs the two graphs on a *pool* of state rows (torch tensors handed to ONNX Runtime by
pointer): a batched step over the first ``n`` rows, and a left-padded prefill of any rows that
continues their states, the result copied back only when the call succeeded (a failed prefill
leaves every row as it was).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._dtypes import ort_element_type, torch_dtype
from ..errors import GlaExportError, MissingRuntimeError, ModelError, UsageError, first_line
from ..export.metadata import open_export
from ..runtime.engines import RUNTIMES
from ..runtime.sampling import Sampler, SamplingParams
from ..runtime.session import create_session
from ..runtime.state import ConversationState, StateFileError, load_state, model_identity, save_state
from ..runtime.tokenizers import TextDecoder, Tokenizer, TokenStream, load_tokenizer

__all__ = [
    "ConversationState", "GlaExportError", "Graphs", "MissingRuntimeError", "ModelError", "Sampler",
    "SamplingParams", "StateFileError", "StateSpec", "TextDecoder", "TokenStream", "Tokenizer", "UsageError",
    "load_state", "load_tokenizer", "model_identity", "open_export", "save_state",
]


@dataclass(frozen=True)
class StateSpec:
    name: str  # past_key_values.{layer}.{kind}
    output: str  # present.{layer}.{kind}
    shape: tuple[int, ...]  # without the batch dimension
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.tensor([], dtype=self.dtype).element_size()


class Graphs:
    """The prefill and step graphs of an export over a pool of ``slots`` state rows.

    The pool holds every row's state; a graph call writes into scratch buffers that are copied
    back only when it succeeded, so a failed call leaves every state as it was.
    """

    def __init__(self, export_dir: str | os.PathLike, backend: str = "ort-cpu", *, threads: int | None = None,
                 device_id: int = 0):
        if backend not in RUNTIMES:
            raise UsageError(f"--backend must be one of {', '.join(RUNTIMES)}, got {backend!r}")
        if backend == "trt":
            raise MissingRuntimeError(
                "gla-export serve runs on ONNX Runtime (ort-cpu, ort-cuda) for now: TensorRT engines are built for a "
                "fixed optimisation profile of batch sizes that the continuous batcher's changing batch would have "
                "to be planned around (use `gla-export generate --backend trt` for TensorRT)")
        self.export_dir = Path(export_dir)
        self.metadata = open_export(self.export_dir)
        meta = self.metadata
        self.backend = backend
        self.vocab_size = int(meta["model"]["vocab_size"])
        growing = [s.input for s in meta.states if s.grows]
        if growing:  # a hybrid's full-attention KV cache: the slots have fixed sizes
            raise ModelError(
                f"gla-export serve keeps each conversation in a fixed-size state slot, and this hybrid export's "
                f"full-attention KV caches ({growing[0]}, ...) grow with the context: serve hybrids whose attention "
                "layers are all windowed, or decode this one with `gla-export generate`")
        self.specs = [StateSpec(s["input"], s["output"], tuple(int(d) for d in s["shape"][1:]), torch_dtype(s["dtype"]))
                      for s in meta["states"]]
        self.state_nbytes = sum(s.nbytes for s in self.specs)
        self.tokenizer: Tokenizer = load_tokenizer(self.export_dir, meta)
        eos = meta["model"].get("eos_token_id")
        self.eos_token_id = int(eos) if eos is not None else self.tokenizer.eos_token_id
        self.weights_nbytes = (self.export_dir / meta["files"]["weights"]).stat().st_size \
            if (self.export_dir / meta["files"]["weights"]).is_file() else 0
        prefill_in = {i["name"]: i["dtype"] for i in meta["graphs"]["prefill"]["inputs"]}
        step_in = {i["name"]: i["dtype"] for i in meta["graphs"]["step"]["inputs"]}
        self.has_mask = "attention_mask" in prefill_in
        # padding over a non-zero past is exact unless an old export has short convolutions (docs/export.md)
        conv = any(s["kind"] == "conv_state" for s in meta["states"])
        self.pad_with_past = self.has_mask and (bool(meta.get("padding_with_past")) or not conv)
        self._ids = {"prefill": torch_dtype(prefill_in["input_ids"]), "step": torch_dtype(step_in["input_ids"]),
                     "mask": torch_dtype(prefill_in.get("attention_mask", "int64"))}
        self._load_sessions(threads, device_id)
        self.identity = model_identity(self.export_dir, meta)
        if self.device.type == "cpu":
            # the server's own tensor work is row copies; torch's OpenMP threads beside ONNX Runtime's
            # turned a 1 MiB copy into 80 ms on a busy 2-core machine
            torch.set_num_threads(1)
        self.slots = 0

    # -- sessions ----------------------------------------------------------------------------------

    def _load_sessions(self, threads: int | None, device_id: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingRuntimeError("onnxruntime is not installed: pip install 'gla-export[cpu]'") from e
        meta = self.metadata
        cuda = self.backend == "ort-cuda"
        if cuda:
            if not torch.cuda.is_available():
                raise MissingRuntimeError("--backend ort-cuda needs a CUDA GPU and a CUDA build of PyTorch")
            self.device = torch.device("cuda", device_id)
            opts: dict[str, Any] = {"device_id": device_id}
            if meta["dtype"] == "float32":
                opts["use_tf32"] = "0"
            providers: list[Any] = [("cuda", opts), "cpu"]
            self._dev = ("cuda", device_id)
        else:
            if meta["dtype"] == "bfloat16":
                raise UsageError("this export is bfloat16 and ONNX Runtime has no bfloat16 CPU kernels: "
                                 "use --backend ort-cuda")
            self.device = torch.device("cpu")
            providers = ["cpu"]
            self._dev = ("cpu", 0)
        if meta["gla_op"]["form"] == "onnx":
            os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"  # LinearAttention is opset 27
        self.sessions = {}
        for graph in ("prefill", "step"):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if threads:
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
            path = self.export_dir / meta["files"][graph]
            try:
                self.sessions[graph] = create_session(path, providers, so)
            except GlaExportError:
                raise
            except Exception as e:  # noqa: BLE001 - ONNX Runtime's own exception types
                raise ModelError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from e
        self.runtime_name = f"onnxruntime {ort.__version__} ({'CUDA' if cuda else 'CPU'})"

    # -- the pool ----------------------------------------------------------------------------------

    def allocate(self, slots: int) -> None:
        """Buffers for ``slots`` rows, all states zero."""
        dev, S = self.device, slots
        # zero_() commits the pages now: a first touch in the middle of serving costs page faults
        self._pool = {s.name: torch.empty((S, *s.shape), dtype=s.dtype, device=dev).zero_() for s in self.specs}
        self._scratch = {s.name: torch.empty((S, *s.shape), dtype=s.dtype, device=dev).zero_() for s in self.specs}
        self._ids_host = torch.zeros((S, 1), dtype=self._ids["step"])
        self._ids_np = self._ids_host.numpy()
        self._ids_buf = self._ids_host if dev.type == "cpu" else torch.zeros((S, 1), dtype=self._ids["step"], device=dev)
        self._step_bindings: dict[int, Any] = {}
        self._logits_buf = torch.zeros((S, 1, self.vocab_size), dtype=torch.float32, device=dev)
        self.slots = S

    def slot_nbytes(self) -> int:
        """Memory one slot costs: two copies of the state, its id and its logits row."""
        return 2 * self.state_nbytes + 8 + 4 * self.vocab_size

    def prefill_token_nbytes(self) -> int:
        """An upper estimate of the prefill's transient memory per token of a chunk: the logits
        (every position's, float32) and the activations of the widest layer, a dozen hidden-size
        float32 vectors per token (projections, gates, MLP), counted twice for ONNX Runtime's
        arena rounding."""
        m = self.metadata["model"]
        hidden = int(m["hidden_size"])
        inter = int(m["config"].get("intermediate_size") or 4 * hidden)
        return 2 * 4 * (self.vocab_size + 12 * hidden + 3 * inter)

    def _bind(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Any:
        b = self.sessions[graph].io_binding()
        for n, t in feeds.items():
            b.bind_input(n, *self._dev, ort_element_type(t.dtype), tuple(t.shape), t.data_ptr())
        for n, t in outputs.items():
            b.bind_output(n, *self._dev, ort_element_type(t.dtype), tuple(t.shape), t.data_ptr())
        return b

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
             binding: Any = None) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if binding is None or self.device.type == "cuda":
            # on a GPU ONNX Runtime copies an input for a CPU-fallback node when it is bound: bind anew
            binding = self._bind(graph, feeds, outputs)
        try:
            self.sessions[graph].run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in feeds.items() if not n.startswith("past_"))
            raise ModelError(f"the {graph} graph failed ({shapes}): {first_line(e)}") from e

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token to each of rows ``0..n-1`` (n = len(tokens)); the next-token logits [n, V]."""
        n = len(tokens)
        self._ids_np[:n, 0] = tokens
        ids = self._ids_buf[:n]
        if ids.device.type != "cpu":
            ids.copy_(self._ids_host[:n], non_blocking=False)
        # the step writes a scratch copy, taken back only when it succeeded: a failed step leaves the pool intact
        feeds = {"input_ids": ids, **{k: v[:n] for k, v in self._pool.items()}}
        outputs = {"logits": self._logits_buf[:n], **{s.output: self._scratch[s.name][:n] for s in self.specs}}
        binding = self._step_bindings.get(n)
        if binding is None and self.device.type == "cpu":
            binding = self._step_bindings[n] = self._bind("step", feeds, outputs)
        self._run("step", feeds, outputs, binding)
        for k, v in self._pool.items():
            v[:n].copy_(self._scratch[k][:n])
        return self._logits_buf[:n, 0].to("cpu").numpy()

    def prefill(self, rows: list[int], chunks: list[np.ndarray]) -> np.ndarray:
        """Feed ``chunks[i]`` to row ``rows[i]`` (continuing its state); the logits after each
        chunk's last token [len(rows), V]. Rows are left-padded when the export allows it over a
        past (else called in groups of equal length)."""
        out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        if self.pad_with_past:
            groups = [list(range(len(rows)))]
        else:
            by_len: dict[int, list[int]] = {}
            for i, c in enumerate(chunks):
                by_len.setdefault(len(c), []).append(i)
            groups = list(by_len.values())
        for g in groups:
            out[g] = self._prefill([rows[i] for i in g], [chunks[i] for i in g])
        return out

    def _prefill(self, rows: list[int], chunks: list[np.ndarray]) -> np.ndarray:
        dev, n = self.device, len(rows)
        L = max(len(c) for c in chunks)
        ids = np.zeros((n, L), dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        for i, c in enumerate(chunks):
            ids[i, L - len(c):] = c
            mask[i, L - len(c):] = 1
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        cur = self._pool
        past = {k: v.index_select(0, idx) for k, v in cur.items()}
        present = {k: torch.empty_like(v) for k, v in past.items()}
        feeds = {"input_ids": torch.from_numpy(ids).to(dev, self._ids["prefill"]), **past}
        if self.has_mask:
            feeds["attention_mask"] = torch.from_numpy(mask).to(dev, self._ids["mask"])
        logits = torch.empty((n, L, self.vocab_size), dtype=torch.float32, device=dev)
        self._run("prefill", feeds, {"logits": logits, **{s.output: present[s.name] for s in self.specs}})
        for k, v in cur.items():
            v.index_copy_(0, idx, present[k])
        return logits[:, -1].to("cpu").numpy()

    # -- rows --------------------------------------------------------------------------------------

    def zero(self, row: int) -> None:
        for v in self._pool.values():
            v[row].zero_()

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        for v in self._pool.values():
            tmp = v[a].clone()
            v[a].copy_(v[b])
            v[b].copy_(tmp)

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """A CPU copy of ``row``'s states, each ``[1, ...]``."""
        return {k: v[row:row + 1].to("cpu", copy=True) for k, v in self._pool.items()}

    def write(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        cur = self._pool
        for s in self.specs:
            t = tensors.get(s.name)
            if t is None or tuple(t.shape) != (1, *s.shape) or t.dtype != s.dtype:
                raise StateFileError(f"a cached state tensor {s.name} does not fit this export")
            cur[s.name][row].copy_(t[0])


def available_memory(device: torch.device) -> int:
    """Bytes this process may still use on ``device`` (free GPU memory, or the host's available)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a test dependency, /proc is Linux's
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0))


def state_to_file(path: Path, tensors: dict[str, torch.Tensor], tokens: np.ndarray, identity: str,
                  metadata: dict[str, Any]) -> None:
    """A prefix-cache entry as a state file (the format of gla_export.runtime.state): the token
    prefix it stands for in the header's ``info``, no pending token."""
    state = ConversationState(identity, tensors, None, int(len(tokens)), 0, None, None,
                              {"prefix_tokens": [int(t) for t in tokens]})
    save_state(path, state, metadata)


def state_from_file(path: Path, identity: str) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    st = load_state(path, identity)
    tokens = st.info.get("prefix_tokens")
    if not isinstance(tokens, list) or len(tokens) != st.consumed:
        raise StateFileError(f"{path}: not a prefix-cache state (no prefix_tokens of length {st.consumed})")
    return st.tensors, np.asarray(tokens, dtype=np.int64)
