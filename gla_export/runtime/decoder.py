"""Constant-memory decoding of an export: prefill once with ``prefill.onnx``, then one
``step.onnx`` call per token, the recurrent states carried from call to call.

Runtimes (``backend``; the adapters are in :mod:`.engines`, generation in :mod:`.generation`):

- ``ort-cpu``: ONNX Runtime on the CPU;
- ``ort-cuda``: ONNX Runtime's CUDA execution provider; the states never leave the GPU;
- ``trt``: TensorRT engines built by ``gla-export build`` (the ``tensorrt`` Python package).

Memory does not grow with the context. Every buffer a decode step touches is allocated when
the batch is set up: two sets of state tensors (the step reads one and writes the other, then
they swap roles), the ``input_ids`` and ``logits`` buffers, and for ONNX Runtime two I/O bindings
(one per direction of the swap) bound to those buffers. A step writes the new tokens into the
ids buffer and runs. Prompts (prefill) allocate their activations per call, optionally in
chunks of ``prefill_chunk`` tokens to bound that too.

Hybrid models (docs/export.md, section 3.1): a windowed attention layer's KV cache has a fixed
size and is a state like any other. A full-attention layer's cache grows by one slot per token,
so such an export does not decode in constant memory: its caches (one length for the whole
batch, the longest row's) are not double-buffered but replaced by every graph call, which binds
them for that call. Each row's cache is right-aligned: its last ``position`` slots hold its keys
and values, a shorter row's slots before them are zeros that the graphs mask out (by the
``position`` state). Rows prefilled alone and restored rows are zero-extended on the left to
the batch's length; a snapshot keeps a row's last ``position`` slots; a reset or restore drops
the leading slots no row uses.

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

from typing import TYPE_CHECKING

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .._dtypes import torch_dtype
from ..errors import ModelError, UsageError
from .engines import RUNTIMES, open_runtime
from .generation import (  # noqa: F401 - re-exported: the decoder's public names
    FINISH_EOS,
    FINISH_INTERRUPTED,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    GenerationMixin,
    RowResult,
    TokenEvent,
)
from .sampling import Sampler
from .state import ConversationState, StateFileError, model_identity
from .tokenizers import Tokenizer, eos_token_ids, load_tokenizer, stop_ids

if TYPE_CHECKING:
    from ..export.metadata import ExportMetadata


@dataclass(frozen=True)
class StateSpec:
    """One state buffer of the decoder: a state tensor of the graphs without its batch dimension."""

    name: str  # graph input, past_key_values.{layer}.{kind}
    output: str  # graph output, present.{layer}.{kind}
    layer: int  # -1: shared by the layers (a hybrid's position)
    kind: str  # recurrent_state | conv_state | key | value | position
    shape: tuple[int, ...]  # a growing KV cache: [Hkv, 0, d], its empty-context shape
    dtype: torch.dtype
    grows: bool = False  # a full-attention layer's KV cache: its axis 1 (2 with the batch) grows

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (a growing cache: 0, its empty-context size)."""
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()


# batch sizes the captured step graphs are made for: a batch of B rows runs in the graph of the
# smallest size >= B, its extra rows padding (they decode token 0 and are never read); batches
# past the last size get a graph of their own size
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def capture_size(batch_size: int, sizes: Sequence[int] = CAPTURE_SIZES) -> int:
    """The rows of the captured graph that runs a batch of ``batch_size`` rows."""
    for s in sorted(sizes):
        if s >= batch_size:
            return s
    return batch_size


def buffer_specs(metadata: ExportMetadata) -> list[StateSpec]:
    """The decoder's state buffers, one per state the metadata lists (its dtypes were checked when
    it was read). A hybrid's shared position (layer None in the metadata) gets layer -1; a
    full-attention layer's KV cache (``[batch, Hkv, past_sequence, d]``, growing) its empty-context
    shape ``(Hkv, 0, d)`` and ``grows``."""
    specs = []
    for s in metadata.states:
        layer = -1 if s.layer is None else s.layer
        if s.grows:
            if s.kind not in ("key", "value") or len(s.shape) != 4 or not all(isinstance(d, int) for d in
                                                                               (s.shape[1], s.shape[3])):
                raise ModelError(f"state {s.input} grows with the context but is not a [batch, heads, sequence, "
                                 f"head_dim] KV cache (shape {list(s.shape)}): the decoder cannot drive it")
            shape = (int(s.shape[1]), 0, int(s.shape[3]))
            specs.append(StateSpec(s.input, s.output, layer, s.kind, shape, torch_dtype(s.dtype), grows=True))
        else:
            specs.append(StateSpec(s.input, s.output, layer, s.kind, s.row_shape, torch_dtype(s.dtype)))
    if any(s.grows for s in specs) and not any(s.kind == "position" for s in specs):
        raise ModelError("the export has growing KV caches but no position state: the export is damaged")
    return specs


class StatefulDecoder(GenerationMixin):
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
        cuda_graph: for ``ort-cuda`` (opt-in: off by default until the captured path has passed its
            GPU tests; see docs/decoding.md): run the step graph as CUDA graphs
            captured by ONNX Runtime, one pair per batch size in :data:`CAPTURE_SIZES` that is used
            (the two directions of the state swap), kept across :meth:`resize` so that a batch
            change replays instead of capturing again; the batch is padded to that size.
            ``runtime_name`` says whether it is on; ``cuda_graph_off`` why not.
        sample_on_device: for ``ort-cuda`` and ``trt`` (opt-in, like ``cuda_graph``): :meth:`generate` picks
            the tokens on the GPU (:mod:`.device_sampling`), so only the token ids come to the
            host each step, not ``[batch, V]`` logits.
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
        cuda_graph: bool | None = None,
        sample_on_device: bool | None = None,
    ):
        if backend not in RUNTIMES:
            raise UsageError(f"backend must be one of {', '.join(RUNTIMES)}, got {backend!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise UsageError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.export_dir = Path(export_dir)
        self.backend = backend
        from ..export.metadata import open_export

        self.metadata: ExportMetadata = open_export(self.export_dir)
        self.specs = buffer_specs(self.metadata)
        # the double-buffered states (fixed sizes) and the full-attention KV caches (growing along
        # axis 2; one tensor each, replaced by every call)
        self._fixed = [s for s in self.specs if not s.grows]
        self._grow = [s for s in self.specs if s.grows]
        self._pos_name = next((s.name for s in self.specs if s.kind == "position"), None)
        self.vocab_size = self.metadata.model.vocab_size
        self.tokenizer: Tokenizer = load_tokenizer(self.export_dir, self.metadata)
        # one id or a list of them (Hugging Face generation configs): any of them ends a row
        self.eos_token_ids: frozenset[int] = eos_token_ids(self.metadata, self.tokenizer)
        self.bos_token_id: int | None = self.tokenizer.bos_token_id
        step, prefill = self.metadata.graphs["step"], self.metadata.graphs["prefill"]
        self._runtime = open_runtime(backend, self.metadata, device_id=device_id, threads=threads,
                                     engines_dir=engines_dir, plugin=plugin,
                                     cuda_graph=False if self._grow else bool(cuda_graph))
        self.cuda_graph = bool(getattr(self._runtime, "cuda_graph", False))
        self.cuda_graph_off: str | None = getattr(self._runtime, "cuda_graph_off", "not an ort-cuda runtime")
        if self._grow and self._runtime.device.type == "cuda":  # a captured graph has fixed shapes
            self.cuda_graph_off = "a hybrid's full-attention KV caches change shape every step"
        if sample_on_device and self._runtime.device.type != "cuda":
            raise UsageError(f"sampling on the device needs a GPU runtime (ort-cuda or trt), not {backend}")
        self.sample_on_device = self._runtime.device.type == "cuda" and bool(sample_on_device)
        self._pools: dict[int, dict] = {}  # captured graphs' buffers by graph rows (kept across resize)
        mask = prefill.input("attention_mask")
        self._id_dtypes = {
            "step": torch_dtype(step.input("input_ids").dtype),
            "prefill": torch_dtype(prefill.input("input_ids").dtype),
            "mask": torch_dtype(mask.dtype if mask is not None else "int64"),
        }
        input_dtypes = getattr(self._runtime, "input_dtypes", None)
        if input_dtypes:  # TensorRT's engines decide (a builder may have narrowed int64 ids)
            self._id_dtypes["prefill"] = self._id_dtypes["step"] = input_dtypes["input_ids"]
            self._id_dtypes["mask"] = input_dtypes.get("attention_mask", torch.int64)
        # padding is exact over any past, except in exports older than the metadata's
        # padding_with_past for models with short convolutions (their padding took slots of the
        # convolution windows): there, rows that hold a context are prefilled in groups of equal length
        conv = any(s.kind == "conv_state" for s in self.specs)
        self._padding_with_past = bool(self.metadata.padding_with_past) or not conv
        self.prefill_chunk = prefill_chunk
        if self._runtime.max_seq is not None:
            self.prefill_chunk = min(prefill_chunk or self._runtime.max_seq, self._runtime.max_seq)
        self.device = self._runtime.device
        self._lock = threading.RLock()  # one graph call at a time: the buffers are shared
        self._version = 0  # counts the calls that change the buffers (a generation checks it between rounds)
        self.batch_size = 0
        self.resize(batch_size)

    # -- properties ------------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence id (the lowest of :attr:`eos_token_ids` when the config lists several);
        setting it makes it the only one."""
        return min(self.eos_token_ids) if self.eos_token_ids else None

    @eos_token_id.setter
    def eos_token_id(self, value: int | list[int] | None) -> None:
        self.eos_token_ids = stop_ids(value)

    @property
    def runtime_name(self) -> str:
        return self._runtime.name

    @property
    def has_attention_mask(self) -> bool:
        return self._runtime.has_mask

    @cached_property
    def identity(self) -> str:
        """The model identity that state files and snapshots carry (see :func:`.state.model_identity`)."""
        return model_identity(self.export_dir, self.metadata)

    @property
    def state_nbytes(self) -> int:
        """Bytes of one conversation's state: what a snapshot holds, whatever its context length
        (a hybrid with full-attention layers: the part that does not grow; a snapshot adds
        :attr:`state_bytes_per_token` per token of its context)."""
        return sum(s.row_nbytes for s in self.specs)

    @property
    def state_bytes_per_token(self) -> int:
        """What one row's state grows by per token (0 unless full-attention layers keep KV caches)."""
        return int(self.metadata.state_bytes_per_token or 0)

    @property
    def kv_length(self) -> int:
        """The length of the full-attention KV caches (the longest row's context; 0 without them)."""
        return self._kv[self._grow[0].name].shape[2] if self._grow else 0

    # -- buffers ---------------------------------------------------------------------------------------

    def resize(self, batch_size: int) -> None:
        """Allocate the buffers for ``batch_size`` rows (all states reset to zero)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        if self._runtime.max_batch is not None and batch_size > self._runtime.max_batch:
            raise UsageError(f"batch_size {batch_size} exceeds the engines' maximum batch {self._runtime.max_batch} "
                             "(rebuild them with a larger --max-batch)")
        with self._lock:
            self._version += 1
            self._step_handles = None
            B = batch_size
            pool = self._pool(capture_size(B) if self.cuda_graph else B)
            for st in pool["states"]:
                for t in st.values():
                    t.zero_()
            pool["ids_host"].zero_()
            # the batch's rows are the first B of the pool's (contiguous views: prefill binds them too)
            self._states = [{name: t[:B] for name, t in st.items()} for st in pool["states"]]
            self._kv = {s.name: torch.zeros((B, *s.shape), dtype=s.dtype, device=self.device) for s in self._grow}
            self._cur = 0
            self._ids_host, self._ids_dev = pool["ids_host"], pool["ids_dev"]
            self._logits_dev, self._logits_host = pool["logits_dev"], pool["logits_host"]
            self._ids_np = self._ids_host.numpy()[:B, 0]
            self._logits_np = self._logits_host.numpy()[:B, 0, :]
            self._step_handles = pool["handles"]
            self._runtime.sync()
            self._consumed = [0] * B
            self.batch_size = B

    def _pool(self, rows: int) -> dict:
        """The step's buffers and bindings for a graph of ``rows`` rows: made once per size and kept
        while CUDA graphs are on (a captured graph holds their addresses), fresh otherwise."""
        if rows in self._pools:
            return self._pools[rows]
        dev = self.device
        pin = dev.type == "cuda"
        states = [{s.name: torch.zeros((rows, *s.shape), dtype=s.dtype, device=dev) for s in self._fixed}
                  for _ in range(2)]
        ids, V = self._id_dtypes["step"], self.vocab_size
        ids_host = torch.zeros((rows, 1), dtype=ids, pin_memory=pin)
        ids_dev = ids_host if not pin else torch.zeros((rows, 1), dtype=ids, device=dev)
        logits_dev = torch.zeros((rows, 1, V), dtype=torch.float32, device=dev)
        logits_host = logits_dev if not pin else torch.zeros((rows, 1, V), pin_memory=True)
        # growing KV caches change size every call: such a step binds its buffers each time (run)
        handles = None if self._grow else [
            self._runtime.bind_step(
                {"input_ids": ids_dev, **states[p]},
                {"logits": logits_dev, **{s.output: states[1 - p][s.name] for s in self._fixed}},
            )
            for p in (0, 1)
        ]
        pool = {"states": states, "ids_host": ids_host, "ids_dev": ids_dev, "logits_dev": logits_dev,
                "logits_host": logits_host, "handles": handles}
        if self.cuda_graph:
            # capture both graphs now (ONNX Runtime captures a graph id at its second run), so that
            # decoding never pays for a capture, and a step graph that cannot be captured is found
            # here: then the decoder goes on without graphs (``cuda_graph_off`` says why)
            try:
                for p in (0, 1, 0, 1, 0, 1):
                    self._runtime.run_step(handles[p])
            except ModelError as e:
                self._runtime.disable_cuda_graph(f"capture failed: {e}")
                self.cuda_graph, self.cuda_graph_off = False, self._runtime.cuda_graph_off
                self._pools.clear()
                return self._pool(rows)
            self._pools[rows] = pool
        return pool

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
            for t in (*cur.values(), *self._kv.values()):
                if len(rows) == self.batch_size:
                    t.zero_()
                else:
                    for r in rows:
                        t[r].zero_()
            for r in rows:
                self._consumed[r] = 0
            self._trim_kv()
            self._runtime.sync()

    # -- growing KV caches (hybrids' full-attention layers) ----------------------------------------------
    #
    # Every row's cache is right-aligned: its last ``position`` slots hold its keys and values, the
    # slots before are zeros the graphs mask out (by the position state). Rows share one length,
    # the longest row's; a shorter row is zero-extended on the left.

    def _grow_kv(self, length: int) -> None:
        """Zero-extend every row's cache on the left to ``length`` slots."""
        for name, t in self._kv.items():
            L = t.shape[2]
            if length > L:
                new = torch.zeros((t.shape[0], t.shape[1], length, t.shape[3]), dtype=t.dtype, device=t.device)
                new[:, :, length - L:] = t
                self._kv[name] = new

    def _trim_kv(self) -> None:
        """Drop the leading slots no row uses (after a reset or restore shortened the longest row)."""
        if not self._grow:
            return
        longest = int(self._states[self._cur][self._pos_name].max()) if self.batch_size else 0
        for name, t in self._kv.items():
            if longest < t.shape[2]:
                self._kv[name] = t[:, :, t.shape[2] - longest:].contiguous()

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
            tensors = {s.name: cur[s.name][row:row + 1].to(device or self.device, copy=True) for s in self._fixed}
            if self._grow:  # the row's own keys and values: the last `position` slots
                n = int(cur[self._pos_name][row])
                for s in self._grow:
                    t = self._kv[s.name]
                    tensors[s.name] = t[row:row + 1, :, t.shape[2] - n:].to(device or self.device, copy=True).contiguous()
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
            want = (1, *s.shape)
            got = tuple(t.shape)
            if s.grows and len(got) == 4:  # any length along the growing axis
                got = (*got[:2], 0, got[3])
            if got != want or t.dtype != s.dtype:
                shown = [1, s.shape[0], "context", s.shape[2]] if s.grows else list(want)
                raise StateFileError(f"state tensor {s.name} is {t.dtype} {list(t.shape)}, expected {s.dtype} {shown}")
        n_real = int(state.tensors[self._pos_name][0]) if self._grow else 0
        short = [s.name for s in self._grow if state.tensors[s.name].shape[2] < n_real]
        if n_real < 0 or short:
            raise StateFileError(f"the conversation state's KV caches {short[:2]} hold fewer slots than its position "
                                 f"({n_real}): the state is damaged")
        if set(state.tensors) != {s.name for s in self.specs}:
            extra = sorted(set(state.tensors) - {s.name for s in self.specs})
            raise StateFileError(f"the conversation state has tensors this export does not: {extra}")
        with self._lock:
            self._version += 1
            cur = self._states[self._cur]
            for s in self._fixed:
                cur[s.name][row].copy_(state.tensors[s.name][0])
            if self._grow:
                self._grow_kv(n_real)
                for s in self._grow:
                    t, src = self._kv[s.name], state.tensors[s.name]
                    t[row].zero_()
                    if n_real:
                        t[row, :, t.shape[2] - n_real:].copy_(src[0, :, src.shape[2] - n_real:])
                self._trim_kv()
            self._consumed[row] = state.consumed
            self._runtime.sync()

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
            self._step_on_device(tokens)
            if self._logits_host is not self._logits_dev:  # the batch's rows, not a captured graph's padding
                B = self.batch_size
                self._logits_host[:B].copy_(self._logits_dev[:B])
            return self._logits_np

    def step_on_device(self, tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
        """:meth:`step` with the logits left where the graph wrote them: a ``[batch_size, V]`` torch
        view on the decoder's device (a GPU's for ort-cuda), valid until the next call; for
        sampling on the device, where only the chosen ids come back to the host."""
        with self._lock:
            return self._step_on_device(tokens)

    def _step_on_device(self, tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
        """:meth:`step` without the copy of the logits to the host: their ``[batch_size, V]`` view on
        the decoder's device, valid until the next call (the lock is the caller's)."""
        self._version += 1
        ids = self._ids_np
        if len(tokens) != self.batch_size:
            raise UsageError(
                f"step needs one token per row: got {len(tokens)} tokens for a batch of {self.batch_size}")
        ids[:] = tokens
        self._check_ids(ids, "tokens")
        if self._ids_dev is not self._ids_host:
            self._ids_dev.copy_(self._ids_host)
        if self._grow:
            self._run_growing_step()
        else:
            self._runtime.run_step(self._step_handles[self._cur])
        self._cur ^= 1
        for r in range(self.batch_size):
            self._consumed[r] += 1
        return self._logits_dev[:self.batch_size, 0, :]

    def _run_growing_step(self) -> None:
        """One step of a hybrid with full-attention layers: the caches come out one slot longer, so
        the buffers are bound for this call (the double-buffered states as for any step)."""
        B = self.batch_size
        cur, other = self._states[self._cur], self._states[1 - self._cur]
        out_kv = {s.name: self._new_kv(s, B, self.kv_length + 1) for s in self._grow}
        self._runtime.run(
            "step",
            {"input_ids": self._ids_dev[:B], **cur, **self._kv},
            {"logits": self._logits_dev[:B], **{s.output: other[s.name] for s in self._fixed},
             **{s.output: out_kv[s.name] for s in self._grow}},
        )
        self._kv = out_kv

    def _new_kv(self, s: StateSpec, rows: int, length: int) -> torch.Tensor:
        return torch.empty((rows, s.shape[0], length, s.shape[2]), dtype=s.dtype, device=self.device)

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
            elif self._runtime.has_mask and (self._padding_with_past or not any(self._consumed[r] for r in rows)):
                # one padded prefill, but single tokens go through the step graph as in uninterrupted decoding
                groups = [g for g in (by_len.pop(1, None), sorted(i for g in by_len.values() for i in g)) if g]
            else:
                groups = list(by_len.values())
            out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
            for g in groups:
                out[g] = self._run_prompt([rows[i] for i in g], [lists[i] for i in g])
            return out

    def _run_prompt(self, rows: list[int], lists: list[np.ndarray]) -> np.ndarray:
        eng, dev, n = self._runtime, self.device, len(rows)
        L = max(len(ids) for ids in lists)
        full = rows == list(range(self.batch_size))
        cur = self._states[self._cur]
        if full:
            bufs = [cur, self._states[1 - self._cur]]
            kv = dict(self._kv)
        else:
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            src = {name: t.index_select(0, idx) for name, t in cur.items()}
            bufs = [src, {name: torch.empty_like(t) for name, t in src.items()}]
            kv = {name: t.index_select(0, idx) for name, t in self._kv.items()}
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
            feeds.update(kv)
            logits = torch.empty((n, stop - start, self.vocab_size), dtype=torch.float32, device=dev)
            kv_out = {s.name: self._new_kv(s, n, kv[s.name].shape[2] + stop - start) for s in self._grow}
            outputs = {"logits": logits, **{s.output: bufs[1 - p][s.name] for s in self._fixed},
                       **{s.output: kv_out[s.name] for s in self._grow}}
            eng.run(graph, feeds, outputs)
            kv = kv_out
            p ^= 1
        if full:
            if p == 1:
                self._cur ^= 1
            self._kv = kv
        else:
            for name, t in cur.items():
                t.index_copy_(0, idx, bufs[p][name])
            if kv:  # the other rows' caches zero-extended on the left to the new length
                self._grow_kv(next(iter(kv.values())).shape[2])
                for name, t in kv.items():
                    self._kv[name].index_copy_(0, idx, t)
            eng.sync()
        for r, t in zip(rows, lists, strict=True):
            self._consumed[r] += len(t)
        assert logits is not None
        return logits[:, -1, :].to("cpu", torch.float32).numpy()


__all__ = [
    "FINISH_EOS",
    "FINISH_INTERRUPTED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "RUNTIMES",
    "Generation",
    "RowResult",
    "StateSpec",
    "StatefulDecoder",
    "TokenEvent",
    "buffer_specs",
]
