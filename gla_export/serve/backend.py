"""The serving layer's one door into the rest of gla_export.

Everything ``gla_export.serve`` needs from the runtime and export layers is imported here and
nowhere else, so that a change of those layers is mended in this file alone: the export's
metadata (:func:`open_export`), the runtime adapters (:mod:`gla_export.runtime.engines`: ONNX
Runtime on the CPU or CUDA, TensorRT engines) that run the graphs' documented inputs and outputs
(docs/export.md: ``input_ids``, ``attention_mask``, ``past_key_values.{i}.*`` → ``logits``,
``present.{i}.*``) on torch buffers passed by pointer, the tokenizer, the samplers (host and
device) and the state-file format.

What the runtime layer does not offer and the server needs is written here: :class:`Graphs`
runs the two graphs on a *pool* of state rows: a batched step over the first ``n`` rows, and a
left-padded prefill of any rows that continues their states, its results stored only when the
call succeeded (a failed call leaves every row as it was).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._dtypes import torch_dtype
from ..errors import GlaExportError, MissingRuntimeError, ModelError, UsageError, first_line
from ..export.metadata import open_export
from ..runtime.bench import rss_bytes
from ..runtime.decoder import CAPTURE_SIZES
from ..runtime.device_sampling import sample_on_device
from ..runtime.engines import RUNTIMES, Runtime, check_runtime, open_runtime
from ..runtime.sampling import Sampler, SamplingParams
from ..runtime.state import ConversationState, StateFileError, load_state, model_identity, save_state
from ..runtime.tokenizers import TextDecoder, Tokenizer, TokenStream, eos_token_ids, load_tokenizer

__all__ = [
    "ConversationState", "GlaExportError", "Graphs", "MissingRuntimeError", "ModelError", "Sampler",
    "SamplingParams", "StateFileError", "StateSpec", "TextDecoder", "TokenStream", "Tokenizer", "UsageError",
    "load_state", "load_tokenizer", "model_identity", "open_export", "rss_bytes", "sample_on_device", "save_state",
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

    The pool is two sets of state buffers, A and B, of ``slots`` rows each (what the decoder's
    double buffering holds per row), and every row's state lives in one of them (``_where``). A
    step over rows ``0..n-1`` reads them from one set and writes the other, and those rows then
    live in the other set: nothing is copied back, and a step that failed leaves the rows where
    they were, intact. Rows are gathered into one set only when the batch's composition changed
    (a row joined the decoding block from the other set). The step's bindings (ONNX Runtime I/O
    bindings, TensorRT tensor addresses, CUDA graphs) are made once per (rows, direction) and
    reused: the buffers never move.

    A prefill reads its rows wherever they live into fresh tensors and writes its results back to
    the same places only when the call succeeded, so a failed prefill leaves every row as it was.
    """

    def __init__(self, export_dir: str | os.PathLike, backend: str = "ort-cpu", *, threads: int | None = None,
                 device_id: int = 0, cuda_graph: bool = False, sample_on_device: bool = False,
                 engines_dir: str | os.PathLike | None = None, plugin: str | os.PathLike | None = None,
                 max_context: int | None = None):
        if backend not in RUNTIMES:
            raise UsageError(f"--backend must be one of {', '.join(RUNTIMES)}, got {backend!r}")
        if cuda_graph and backend != "ort-cuda":
            raise UsageError(f"--cuda-graph is an ort-cuda option (the {backend} backend has no captured step)")
        if sample_on_device and backend == "ort-cpu":
            raise UsageError("--sample-on-device needs a GPU backend (ort-cuda or trt): on ort-cpu the logits "
                             "are on the host already")
        if backend != "trt" and (engines_dir is not None or plugin is not None):
            raise UsageError("--engines-dir and --plugin are options of --backend trt")
        self.export_dir = Path(export_dir)
        self.metadata = open_export(self.export_dir)
        meta = self.metadata
        self.backend = backend
        self.vocab_size = int(meta.model.vocab_size)
        # a hybrid's full-attention KV caches grow with the context: each slot holds max_context positions
        self.kv_specs = [StateSpec(s.input, s.output, (int(s.shape[1]), int(s.shape[3])), torch_dtype(s.dtype))
                         for s in meta.states if s.grows]
        if self.kv_specs and max_context is None:
            raise ModelError(
                f"this hybrid export's full-attention KV caches ({self.kv_specs[0].name}, ...) grow with the context "
                f"({meta.state_bytes_per_token} bytes per token), and a state slot has a fixed size: give "
                "--max-context TOKENS (each slot then holds that many tokens' caches)")
        if max_context is not None and (not self.kv_specs or max_context < 1):
            raise UsageError("--max-context is for hybrid exports with full-attention layers (this export's states "
                             "have fixed sizes)" if not self.kv_specs else "--max-context must be at least 1")
        self.max_context: int | None = max_context
        self.kv_token_nbytes = int(meta.state_bytes_per_token) if self.kv_specs else 0
        self.specs = [StateSpec(s.input, s.output, tuple(int(d) for d in s.row_shape), torch_dtype(s.dtype))
                      for s in meta.states if not s.grows]
        self.state_nbytes = sum(s.nbytes for s in self.specs)
        self.tokenizer: Tokenizer = load_tokenizer(self.export_dir, meta)
        self.eos_token_ids: frozenset[int] = eos_token_ids(meta, self.tokenizer)
        weights = self.export_dir / meta["files"]["weights"]
        self.weights_nbytes = weights.stat().st_size if weights.is_file() else 0
        self.runtime = _open_runtime(backend, meta, threads=threads, device_id=device_id,
                                     cuda_graph=cuda_graph and not self.kv_specs, engines_dir=engines_dir, plugin=plugin)
        rt = self.runtime
        self.device = rt.device
        self.cuda_graph = bool(getattr(rt, "cuda_graph", False))
        self.cuda_graph_off: str | None = None if self.cuda_graph else (
            "a hybrid's full-attention KV caches change shape every step" if self.kv_specs and cuda_graph else
            getattr(rt, "cuda_graph_off", None) or "not an ort-cuda backend")
        self.sample_on_device = bool(sample_on_device) and self.device.type == "cuda"
        self.has_mask = rt.has_mask
        # padding over a non-zero past is exact unless an old export has short convolutions (docs/export.md)
        conv = any(s.kind == "conv_state" for s in meta.states)
        self.pad_with_past = self.has_mask and (bool(meta.padding_with_past) or not conv)
        step, prefill = meta.graphs["step"], meta.graphs["prefill"]
        mask = prefill.input("attention_mask")
        self._ids = {"prefill": torch_dtype(prefill.input("input_ids").dtype),
                     "step": torch_dtype(step.input("input_ids").dtype),
                     "mask": torch_dtype(mask.dtype if mask is not None else "int64")}
        input_dtypes = getattr(rt, "input_dtypes", None)
        if input_dtypes:  # TensorRT's engines decide (a builder may have narrowed int64 ids)
            self._ids["prefill"] = self._ids["step"] = input_dtypes["input_ids"]
            self._ids["mask"] = input_dtypes.get("attention_mask", torch.int64)
        self.max_rows: int | None = rt.max_batch  # TensorRT's profile bounds the pool and the prefill
        self.max_prefill_tokens: int | None = rt.max_seq
        self.identity = model_identity(self.export_dir, meta)
        if self.device.type == "cpu":
            # the server's own tensor work is row copies; torch's OpenMP threads beside ONNX Runtime's
            # turned a 1 MiB copy into 80 ms on a busy 2-core machine
            torch.set_num_threads(1)
        self.slots = 0

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    # -- the pool ----------------------------------------------------------------------------------

    def allocate(self, slots: int) -> None:
        """Buffers for ``slots`` rows, all states zero (and, with CUDA graphs, the step captured
        for every batch size it will run: see :data:`CAPTURE_SIZES`)."""
        if self.max_rows is not None and slots > self.max_rows:
            raise UsageError(f"{slots} slots exceed the TensorRT engines' maximum batch {self.max_rows} "
                             "(rebuild them with a larger --max-batch, or lower --max-slots)")
        dev, S = self.device, slots
        # zero_() commits the pages now: a first touch in the middle of serving costs page faults
        self._bufs = [{s.name: torch.empty((S, *s.shape), dtype=s.dtype, device=dev).zero_() for s in self.specs}
                      for _ in range(2)]
        self._where: list[int | None] = [0] * S  # which set holds each row's state (None: no state)
        pin = dev.type == "cuda"
        self._ids_host = torch.zeros((S, 1), dtype=self._ids["step"], pin_memory=pin)
        self._ids_np = self._ids_host.numpy()
        self._ids_dev = self._ids_host if not pin else torch.zeros((S, 1), dtype=self._ids["step"], device=dev)
        self._logits = torch.zeros((S, 1, self.vocab_size), dtype=torch.float32, device=dev)
        self._handles: dict[tuple[int, int], Any] = {}
        # full-attention KV caches: one store, each row's keys right-aligned in its max_context positions
        # (the graphs mask the slots before a row's last `position` ones), `_len` its positions in use
        M = self.max_context or 0
        self._kv = {s.name: torch.zeros((S, s.shape[0], M, s.shape[1]), dtype=s.dtype, device=dev)
                    for s in self.kv_specs}
        self._len = [0] * S
        self.slots = S
        # graph sizes: with CUDA graphs a batch of n rows runs in the captured graph of the smallest
        # size >= n (its extra rows are padding), the pool's own size the last one
        self._sizes = [c for c in CAPTURE_SIZES if c < S] + [S]
        if self.cuda_graph:
            self._capture()

    def _capture(self) -> None:
        # ONNX Runtime captures a graph id at its second run: run each (size, direction) three times
        # now, on zero states, so that serving never pays for a capture and a step graph that cannot
        # be captured is found here (then the server goes on without graphs; cuda_graph_off says why)
        try:
            for c in self._sizes:
                for x in (0, 1, 0, 1, 0, 1):
                    self.runtime.run_step(self._handle(c, x))
        except ModelError as e:
            self.runtime.disable_cuda_graph(f"capture failed: {e}")
            self.cuda_graph, self.cuda_graph_off = False, self.runtime.cuda_graph_off
            self._handles.clear()
        self.runtime.sync()
        for bufs in self._bufs:
            for t in bufs.values():
                t.zero_()

    def slot_nbytes(self) -> int:
        """Memory one slot costs: two copies of the state, its id and its logits row; with
        full-attention layers, its KV caches at ``max_context`` three times (the store, and a
        step's gathered past and present)."""
        return 2 * self.state_nbytes + 8 + 4 * self.vocab_size + 3 * (self.max_context or 0) * self.kv_token_nbytes

    def prefill_token_nbytes(self) -> int:
        """An upper estimate of the prefill's transient memory per token of a chunk: the logits
        (every position's, float32) and the activations of the widest layer, a dozen hidden-size
        float32 vectors per token (projections, gates, MLP), counted twice for ONNX Runtime's
        arena rounding."""
        m = self.metadata.model
        hidden = int(m.hidden_size or m.config.get("hidden_size"))
        inter = int(m.config.get("intermediate_size") or 4 * hidden)
        return 2 * 4 * (self.vocab_size + 12 * hidden + 3 * inter)

    def _handle(self, rows: int, x: int) -> Any:
        """The step over rows ``0..rows-1`` reading set ``x`` and writing the other, bound once."""
        h = self._handles.get((rows, x))
        if h is None:
            src, dst = self._bufs[x], self._bufs[1 - x]
            h = self._handles[(rows, x)] = self.runtime.bind_step(
                {"input_ids": self._ids_dev[:rows], **{k: v[:rows] for k, v in src.items()}},
                {"logits": self._logits[:rows], **{s.output: dst[s.name][:rows] for s in self.specs}})
        return h

    def _move(self, row: int, to: int) -> None:
        """Copy ``row``'s state into set ``to`` (where it then lives)."""
        at = self._where[row]
        if at is not None and at != to:
            for k, v in self._bufs[to].items():
                v[row].copy_(self._bufs[at][k][row])
        self._where[row] = to

    def step(self, tokens: np.ndarray) -> torch.Tensor:
        """Feed one token to each of rows ``0..n-1`` (n = len(tokens)); the next-token logits
        ``[n, V]`` float32 on the pool's device, a view valid until the next call."""
        n = len(tokens)
        c = next(s for s in self._sizes if s >= n) if self.cuda_graph else n
        if self._kv and max(self._len[:n]) >= (self.max_context or 0):
            raise UsageError(f"a row's KV cache is full (--max-context {self.max_context}): it cannot take a token")
        where = self._where
        head = where[:n]
        # read from the set most of the rows are in (all of them, unless the batch changed)
        x = 1 if 2 * head.count(1) > n else 0
        y = 1 - x
        if head.count(x) != n:
            for r in range(n):
                if where[r] != x:
                    self._move(r, x)
        for r in range(n, c):  # padding rows of a captured graph: the step overwrites their rows in y
            if where[r] == y:
                self._move(r, x)
        self._ids_np[:n, 0] = tokens
        if c > n:
            self._ids_np[n:c, 0] = 0
        if self._ids_dev is not self._ids_host:
            self._ids_dev[:c].copy_(self._ids_host[:c])
        if self.device.type == "cuda":
            self.runtime.sync()  # the row copies above ran on torch's stream
        try:
            if self._kv:
                self._run_kv_step(n, x)
            else:
                self.runtime.run_step(self._handle(c, x))
        except GlaExportError:
            raise
        except Exception as e:  # noqa: BLE001 - a runtime's own exception types
            raise ModelError(f"the step graph failed ({n} rows): {first_line(e)}") from e
        where[:n] = [y] * n
        if self._kv:
            self._len[:n] = [v + 1 for v in self._len[:n]]
        return self._logits[:n, 0]

    def _run_kv_step(self, n: int, x: int) -> None:
        """A step with full-attention KV caches: their shapes change every step, so the buffers are
        bound for this call; the rows' caches right-aligned to the longest (``L``) go in, ``L + 1``
        positions come out and are stored back only after the call succeeded."""
        M, L = self.max_context or 0, max(self._len[:n])
        past = {k: v[:n, :, M - L:].contiguous() for k, v in self._kv.items()}
        present = {s.name: torch.empty((n, s.shape[0], L + 1, s.shape[1]), dtype=s.dtype, device=self.device)
                   for s in self.kv_specs}
        src, dst = self._bufs[x], self._bufs[1 - x]
        self.runtime.run(
            "step", {"input_ids": self._ids_dev[:n], **{k: v[:n] for k, v in src.items()}, **past},
            {"logits": self._logits[:n], **{s.output: dst[s.name][:n] for s in self.specs},
             **{s.output: present[s.name] for s in self.kv_specs}})
        for k, v in self._kv.items():
            v[:n, :, M - L - 1:].copy_(present[k])

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
        for r in rows:
            if self._where[r] is None:
                self.zero(r)
        M = self.max_context or 0
        if self._kv and any(self._len[r] + len(c) > M for r, c in zip(rows, chunks)):
            raise UsageError(f"a prompt does not fit its slot's KV caches (--max-context {M})")
        L_past = max(self._len[r] for r in rows) if self._kv else 0
        # (positions in the call, rows) per set the rows live in
        parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for b in (0, 1):
            pos = [i for i, r in enumerate(rows) if self._where[r] == b]
            if pos:
                parts.append((b, torch.tensor(pos, dtype=torch.long, device=dev),
                              torch.tensor([rows[i] for i in pos], dtype=torch.long, device=dev)))
        past = {}
        for s in self.specs:
            if len(parts) == 1:
                b, _, idx = parts[0]
                past[s.name] = self._bufs[b][s.name].index_select(0, idx)
            else:
                t = past[s.name] = torch.empty((n, *s.shape), dtype=s.dtype, device=dev)
                for b, pos, idx in parts:
                    t.index_copy_(0, pos, self._bufs[b][s.name].index_select(0, idx))
        present = {k: torch.empty_like(v) for k, v in past.items()}
        all_rows = torch.tensor(rows, dtype=torch.long, device=dev)
        for s in self.kv_specs:  # the rows' caches right-aligned to the longest; L_past + L positions come out
            past[s.name] = self._kv[s.name][:, :, M - L_past:].index_select(0, all_rows)
            present[s.name] = torch.empty((n, s.shape[0], L_past + L, s.shape[1]), dtype=s.dtype, device=dev)
        feeds = {"input_ids": torch.from_numpy(ids).to(dev, self._ids["prefill"]), **past}
        if self.has_mask:
            feeds["attention_mask"] = torch.from_numpy(mask).to(dev, self._ids["mask"])
        logits = torch.empty((n, L, self.vocab_size), dtype=torch.float32, device=dev)
        try:
            self.runtime.run("prefill", feeds, {"logits": logits, **{s.output: present[s.name]
                                                                     for s in (*self.specs, *self.kv_specs)}})
        except GlaExportError:
            raise
        except Exception as e:  # noqa: BLE001 - a runtime's own exception types
            raise ModelError(f"the prefill graph failed (input_ids {[n, L]}): {first_line(e)}") from e
        for b, pos, idx in parts:
            for k, v in self._bufs[b].items():
                v.index_copy_(0, idx, present[k] if len(parts) == 1 else present[k].index_select(0, pos))
        if self._kv:  # each row's real keys are the last ones (the graphs close the padding): keep the last W
            W = min(L_past + L, M)
            for k, v in self._kv.items():
                v[:, :, M - W:].index_copy_(0, all_rows, present[k][:, :, L_past + L - W:])
            for r, c in zip(rows, chunks):
                self._len[r] += len(c)
        return logits[:, -1].to("cpu").numpy()

    # -- rows --------------------------------------------------------------------------------------

    def zero(self, row: int) -> None:
        b = self._where[row] or 0
        for v in (*self._bufs[b].values(), *self._kv.values()):
            v[row].zero_()
        self._where[row] = b
        self._len[row] = 0

    def discard(self, row: int) -> None:
        """``row`` holds no state any more (its slot was freed): no step or gather copies it."""
        self._where[row] = None

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        wa, wb = self._where[a], self._where[b]
        if wa is not None:
            saved = {k: v[a].clone() for k, v in self._bufs[wa].items()}
        if wb is not None:
            for k, v in self._bufs[wb].items():
                v[a].copy_(v[b])
        if wa is not None:
            for k, v in self._bufs[wa].items():
                v[b].copy_(saved[k])
        self._where[a], self._where[b] = wb, wa
        for v in self._kv.values():
            tmp = v[a].clone()
            v[a].copy_(v[b])
            v[b].copy_(tmp)
        self._len[a], self._len[b] = self._len[b], self._len[a]

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """A CPU copy of ``row``'s states, each ``[1, ...]``."""
        b = self._where[row]
        if b is None:
            raise UsageError(f"row {row} holds no state")
        out = {k: v[row:row + 1].to("cpu", copy=True) for k, v in self._bufs[b].items()}
        M, n = self.max_context or 0, self._len[row]
        for k, v in self._kv.items():  # the row's keys and values: its last `position` slots
            out[k] = v[row:row + 1, :, M - n:].to("cpu", copy=True)
        return out

    def write(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        for s in self.specs:
            t = tensors.get(s.name)
            if t is None or tuple(t.shape) != (1, *s.shape) or t.dtype != s.dtype:
                raise StateFileError(f"a cached state tensor {s.name} does not fit this export")
        M, lengths = self.max_context or 0, set()
        for s in self.kv_specs:
            t = tensors.get(s.name)
            if t is None or t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (1, *s.shape) or t.dtype != s.dtype:
                raise StateFileError(f"a cached state tensor {s.name} does not fit this export")
            lengths.add(int(t.shape[2]))
        if len(lengths) > 1 or (lengths and max(lengths) > M):
            raise StateFileError(f"cached KV caches of {sorted(lengths)} positions do not fit a slot "
                                 f"(--max-context {M})")
        b = self._where[row] or 0
        for s in self.specs:
            self._bufs[b][s.name][row].copy_(tensors[s.name][0])
        self._where[row] = b
        n = lengths.pop() if lengths else 0
        for k, v in self._kv.items():
            v[row, :, :M - n].zero_()
            v[row, :, M - n:].copy_(tensors[k][0])
        self._len[row] = n


def _open_runtime(backend: str, meta: Any, *, threads: int | None, device_id: int, cuda_graph: bool,
                  engines_dir: str | os.PathLike | None, plugin: str | os.PathLike | None) -> Runtime:
    """The runtime adapter of ``backend`` (:mod:`gla_export.runtime.engines`), its failures as one-line errors."""
    try:
        if backend == "trt":
            check_runtime("trt", meta, engines_dir=engines_dir, plugin=plugin)
        return open_runtime(backend, meta, device_id=device_id, threads=threads, engines_dir=engines_dir,
                            plugin=plugin, cuda_graph=cuda_graph)
    except GlaExportError:
        raise
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's and TensorRT's own exception types
        raise ModelError(f"{backend} cannot load the export {meta.export_dir}: {first_line(e)}") from e


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
