"""A conversation's state: snapshots, state files, and the LRU state cache.

With a recurrent model the state, not the token history, is the conversation: every layer's
state (a few hundred KiB to a few tens of MiB, whatever the context length) plus what decoding
needs to go on exactly as if it had never stopped:

- the *pending token*: sampled and already shown to the user but not yet fed to the model (the
  step that consumes it is the first thing a resumed conversation runs);
- the sampler: parameters, seed and the random generator's position (:mod:`.sampling`);
- counters (tokens consumed, tokens generated) and why the last generation stopped.

State files (``gla-export generate --save-state``) are little-endian binary::

    0   8 bytes   magic b"GLASTATE"
    8   u32       format version (STATE_FORMAT_VERSION)
    12  u32       flags (0)
    16  u64       length H of the header
    24  H bytes   header, UTF-8 JSON: identity, model summary, tensors (name, dtype, shape,
                  offset into the data, nbytes), pending token, counters, sampler state
    ..  data      every tensor's bytes, each at a 64-byte aligned offset from the data start
    -32 32 bytes  SHA-256 of every byte before it

A file is refused (:class:`StateFileError`, exit code 2) when it is truncated, not a state file,
from a newer format, corrupt (checksum), or from another model: the header's identity must
equal :func:`model_identity` of the export, a hash of the model's configuration, the state
layout and the weights file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from .._dtypes import FLOAT_NAMES, torch_dtype
from ..errors import UsageError

if TYPE_CHECKING:
    from ..export.metadata import ExportMetadata

STATE_MAGIC = b"GLASTATE"
STATE_FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQ")
_DIGEST = 32
_ALIGN = 64
# the state types a state file may hold; int64: a hybrid model's position (real tokens seen)
DTYPES = {name: torch_dtype(name) for name in (*FLOAT_NAMES, "int64")}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# weights files up to this size are hashed whole; larger ones by size and sampled blocks
FULL_HASH_LIMIT = 256 * 2**20
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 64 * 1024


class StateFileError(UsageError):
    """A state file cannot be used: truncated, corrupt, from a newer format or another model."""


# ---- model identity ------------------------------------------------------------------------------


def weights_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a weights file: its size and SHA-256 (whole file up to FULL_HASH_LIMIT, else of
    the size and 64 evenly spaced 64 KiB blocks — re-hashing gigabytes per start is not worth it:
    a re-export of a different model changes the configuration or nearly every block)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return {"size": size, "sha256": h.hexdigest(), "sampled": False}
        h.update(str(size).encode())
        step = (size - _SAMPLE_BYTES) // (_SAMPLE_BLOCKS - 1)
        for i in range(_SAMPLE_BLOCKS):
            f.seek(i * step)
            h.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "sha256": h.hexdigest(), "sampled": True}


def model_identity(export_dir: str | os.PathLike, metadata: ExportMetadata | dict[str, Any]) -> str:
    """Hex SHA-256 naming the model a state belongs to: the configuration, the state layout
    (names, shapes, dtypes) and the weights file. The GLA op's form is left out on purpose: a
    state from a ``custom`` export continues correctly in a ``decomposed`` export of the same
    weights."""
    from ..export.metadata import as_metadata

    meta = as_metadata(metadata)
    weights = Path(export_dir) / meta.files["weights"]
    ident = {  # the JSON of identities written before ExportMetadata: states saved then still match
        "architecture": meta.model.architecture,
        "config": meta.model.config,
        "dtype": meta.dtype,
        "states": [{"input": s.input, "kind": s.kind, "shape": list(s.shape), "dtype": s.dtype} for s in meta.states],
        "weights": weights_fingerprint(weights) if weights.is_file() else None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_summary(metadata: ExportMetadata | dict[str, Any]) -> dict[str, Any]:
    from ..export.metadata import as_metadata

    meta = as_metadata(metadata)
    m = meta.model
    return {k: getattr(m, k) for k in ("architecture", "num_layers", "hidden_size", "num_heads", "vocab_size")} | {
        "dtype": meta.dtype, "state_dtype": meta.state_dtype}


# ---- one conversation's state --------------------------------------------------------------------


@dataclass
class ConversationState:
    """One conversation (batch row) at a point where decoding stopped (see the module docstring).

    ``tensors``: every state tensor by its graph input name (``past_key_values.{i}.…``), each
    with a leading batch dimension of 1, in the export's state dtype.
    """

    identity: str
    tensors: dict[str, torch.Tensor]
    pending_token: int | None
    consumed: int
    generated: int = 0
    sampler: dict[str, Any] | None = None
    finish_reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: str | torch.device) -> ConversationState:
        """A copy on ``device`` (self when it is already there)."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors.values()):
            return self
        return self._replace(tensors={n: t.to(device, copy=True) for n, t in self.tensors.items()})

    def clone(self) -> ConversationState:
        return self._replace(tensors={n: t.clone() for n, t in self.tensors.items()})

    def _replace(self, **changes: Any) -> ConversationState:
        fields = dict(self.__dict__)
        fields.update(changes)
        fields["sampler"] = json.loads(json.dumps(fields["sampler"])) if fields["sampler"] is not None else None
        fields["info"] = dict(fields["info"])
        return ConversationState(**fields)


# ---- state files ----------------------------------------------------------------------------------


def save_state(path: str | os.PathLike, state: ConversationState, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``state`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    _check_byteorder()
    path = Path(path)
    tensors, offset, blobs = [], 0, []
    for name, t in state.tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise UsageError(f"state tensor {name} has dtype {t.dtype}, which state files do not store")
        data = t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        pad = -offset % _ALIGN
        offset += pad
        tensors.append({"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "offset": offset,
                        "nbytes": len(data)})
        blobs.append((pad, data))
        offset += len(data)
    header = {
        "format": "gla-export-state",
        "format_version": STATE_FORMAT_VERSION,
        "identity": state.identity,
        "model": model_summary(metadata) if metadata else None,
        "tensors": tensors,
        "pending_token": state.pending_token,
        "consumed": state.consumed,
        "generated": state.generated,
        "sampler": state.sampler,
        "finish_reason": state.finish_reason,
        "info": state.info,
        "producer": {"name": "gla-export", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:

            def put(b: bytes) -> None:
                h.update(b)
                f.write(b)

            put(_PREAMBLE.pack(STATE_MAGIC, STATE_FORMAT_VERSION, 0, len(head)))
            put(head)
            for pad, data in blobs:
                put(b"\0" * pad)
                put(data)
            f.write(h.digest())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_state_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a state file (checksum verified)."""
    return _read(Path(path))[0]


def load_state(path: str | os.PathLike, identity: str | None = None,
               device: str | torch.device = "cpu") -> ConversationState:
    """Read a state file; with ``identity``, refuse a file from another model (StateFileError)."""
    header, data = _read(Path(path))
    if identity is not None and header.get("identity") != identity:
        theirs = header.get("model") or {}
        raise StateFileError(
            f"{path} belongs to another model (state identity {str(header.get('identity'))[:12]}…, "
            f"this export {identity[:12]}…; saved from {_describe(theirs)})"
        )
    tensors = {}
    for t in header["tensors"]:
        try:
            dtype = DTYPES[t["dtype"]]
            start, n = int(t["offset"]), int(t["nbytes"])
            shape = [int(s) for s in t["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{path}: malformed tensor entry {t!r}") from e
        if start < 0 or start + n > len(data) or n != _numel(shape) * torch.tensor([], dtype=dtype).element_size():
            raise StateFileError(f"{path}: tensor {t.get('name')} does not fit the file (corrupt header)")
        raw = torch.zeros(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
        if n:
            raw = torch.frombuffer(bytearray(data[start:start + n]), dtype=torch.uint8)
        tensors[t["name"]] = raw.view(dtype).reshape(shape).to(device)
    try:
        pending = header.get("pending_token")
        return ConversationState(
            identity=str(header["identity"]),
            tensors=tensors,
            pending_token=None if pending is None else int(pending),
            consumed=int(header.get("consumed", 0)),
            generated=int(header.get("generated", 0)),
            sampler=header.get("sampler"),
            finish_reason=header.get("finish_reason"),
            info=dict(header.get("info") or {}),
        )
    except (TypeError, ValueError) as e:
        raise StateFileError(f"{path}: malformed header ({e})") from e


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _describe(model: dict[str, Any]) -> str:
    if not model:
        return "an unknown model"
    return (f"{model.get('architecture')} with {model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
            f"vocab {model.get('vocab_size')}, {model.get('dtype')}")


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise StateFileError("state files are little-endian; this platform is big-endian")


def _read(path: Path) -> tuple[dict[str, Any], memoryview]:
    _check_byteorder()
    try:
        blob = path.read_bytes()
    except FileNotFoundError as e:
        raise StateFileError(f"state file {path} does not exist") from e
    except OSError as e:
        raise StateFileError(f"cannot read state file {path}: {e.strerror or e}") from e
    if len(blob) < _PREAMBLE.size + _DIGEST or blob[:8] != STATE_MAGIC:
        if blob[:8] == STATE_MAGIC:
            raise StateFileError(f"{path} is truncated ({len(blob)} bytes)")
        raise StateFileError(f"{path} is not a gla-export state file (no {STATE_MAGIC.decode()} magic)")
    magic, version, _flags, head_len = _PREAMBLE.unpack_from(blob)
    if version > STATE_FORMAT_VERSION:
        raise StateFileError(
            f"{path} has state format version {version}, newer than this gla-export reads "
            f"({STATE_FORMAT_VERSION}): upgrade gla-export"
        )
    if version < 1:
        raise StateFileError(f"{path} has an invalid state format version {version}")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"{path} is corrupt or truncated (SHA-256 checksum mismatch)")
    start = _PREAMBLE.size + head_len
    if start > len(body):
        raise StateFileError(f"{path}: header length {head_len} exceeds the file")
    try:
        header = json.loads(bytes(blob[_PREAMBLE.size:start]))
    except ValueError as e:
        raise StateFileError(f"{path}: unreadable header ({e})") from e
    if not isinstance(header, dict) or "identity" not in header or not isinstance(header.get("tensors"), list):
        raise StateFileError(f"{path}: header lacks identity or tensors")
    return header, memoryview(body)[start:]


# ---- the state cache --------------------------------------------------------------------------------


class StateCache:
    """Conversation snapshots keyed by conversation id, least recently used evicted first so that
    the tensors held stay within ``max_bytes``.

    Snapshots live on ``device`` (default: the CPU, where memory is cheap; pass the decoder's
    device to keep them beside the model). Thread-safe: a server's request threads may call it.
    """

    def __init__(self, max_bytes: int, device: str | torch.device = "cpu"):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise UsageError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.device = torch.device(device)
        self._items: OrderedDict[str, ConversationState] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def put(self, key: str, state: ConversationState) -> list[str]:
        """Store ``state`` (moved to the cache's device) as the most recently used entry; returns
        the keys evicted to make room. A state larger than the whole budget is refused."""
        size = state.nbytes
        if size > self.max_bytes:
            raise UsageError(
                f"a conversation state of {size} bytes does not fit a state cache of {self.max_bytes} bytes")
        state = state.to(self.device)
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            while self._items and self.nbytes + size > self.max_bytes:
                k, v = self._items.popitem(last=False)
                self.nbytes -= v.nbytes
                self.evictions += 1
                evicted.append(k)
            self._items[key] = state
            self.nbytes += size
        return evicted

    def get(self, key: str) -> ConversationState | None:
        """The snapshot of ``key`` (now the most recently used), or None."""
        with self._lock:
            state = self._items.get(key)
            if state is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return state

    def pop(self, key: str) -> ConversationState | None:
        with self._lock:
            state = self._items.pop(key, None)
            if state is not None:
                self.nbytes -= state.nbytes
            return state

    def keys(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"conversations": len(self._items), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
