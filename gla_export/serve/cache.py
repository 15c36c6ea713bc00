"""The prefix state cache: recurrent states keyed by the token ids they have read.

A GLA state has the same size after any number of tokens, so a snapshot can be taken at any
token and stands for exactly the prefix it read. Entries live in a radix tree over token ids
(an edge holds a run of ids, a node the state after the ids on its path, or none); a request
starts from the deepest cached node on its prompt's path and prefills only the rest. Entries
are evicted least recently used first, so that states plus edge labels stay within
``max_bytes``.

With a ``directory``, every entry is also written there as a state file (the format of
gla_export.runtime.state, the prefix in the header's ``info.prefix_tokens``) by a background
thread, and a lookup that finds nothing deeper in memory looks there: the cache survives a
restart, and servers sharing the directory (replicas) continue each other's conversations.
Files are named ``{length:09d}-{sha256 of the int64 ids}.glastate``; a lookup hashes its prompt
once, incrementally, at the lengths present in the directory.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from . import backend

SUFFIX = ".glastate"


class _Node:
    __slots__ = ("edge", "children", "parent", "state", "depth", "on_disk")

    def __init__(self, edge: np.ndarray, parent: _Node | None, depth: int):
        self.edge = edge
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.state: dict[str, Any] | None = None
        self.depth = depth
        self.on_disk = False


def _common(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def file_name(tokens: np.ndarray) -> str:
    return f"{len(tokens):09d}-{hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()}{SUFFIX}"


class PrefixCache:
    """See the module docstring. Thread-safe (the scheduler inserts and looks up, HTTP threads
    read statistics, the writer thread persists)."""

    def __init__(self, max_bytes: int, *, directory: str | os.PathLike | None = None, identity: str = "",
                 metadata: dict[str, Any] | None = None, disk_max_bytes: int | None = None):
        self.max_bytes = int(max_bytes)
        self.root = _Node(np.zeros(0, dtype=np.int32), None, 0)
        self._lru: OrderedDict[int, _Node] = OrderedDict()
        self._lock = threading.RLock()
        self.state_bytes = self.label_bytes = 0
        self.hits = self.misses = self.disk_hits = self.evictions = self.inserts = 0
        self.directory = Path(directory) if directory is not None else None
        self.identity, self.metadata = identity, metadata
        self.disk_max_bytes = disk_max_bytes
        self._listing: tuple[int, dict[int, set[str]]] = (-1, {})
        self._writes: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self.write_errors = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
            self._writer.start()

    # -- memory ---------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.state_bytes + self.label_bytes

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, tokens: np.ndarray, limit: int | None = None) -> tuple[int, dict[str, Any] | None, int]:
        """The deepest cached state for a prefix of ``tokens`` of at most ``limit`` ids:
        ``(length, tensors or None, common)``, where ``common`` is the longest prefix that
        ``tokens`` shares with any cached key (where a new branch would start)."""
        tokens = np.asarray(tokens)
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        with self._lock:
            node, i, best = self.root, 0, None
            while i < len(tokens):
                child = node.children.get(int(tokens[i]))
                if child is None:
                    break
                k = _common(child.edge, tokens[i:])
                i += k
                if k < len(child.edge):
                    break
                node = child
                if node.state is not None and node.depth <= limit:
                    best = node
            common = i
            depth, state = (best.depth, best.state) if best is not None else (0, None)
        if self.directory is not None:
            found = self._disk_lookup(tokens, depth, limit)
            if found is not None:
                depth, state = found
                self.disk_hits += 1
        with self._lock:
            if state is None:
                self.misses += 1
            else:
                self.hits += 1
                if best is not None and best.depth == depth:
                    self._lru.move_to_end(id(best))
        return depth, state, common

    def insert(self, tokens: np.ndarray, state: dict[str, Any], *, persist: bool = True) -> bool:
        """Cache ``state`` as the state after ``tokens``; False when it cannot fit at all."""
        tokens = np.asarray(tokens, dtype=np.int32)
        size = sum(int(t.numel() * t.element_size()) for t in state.values())
        if len(tokens) == 0 or size + 4 * len(tokens) > self.max_bytes:
            return False
        with self._lock:
            node, i = self.root, 0
            while i < len(tokens):
                child = node.children.get(int(tokens[i]))
                if child is None:
                    leaf = _Node(tokens[i:].copy(), node, len(tokens))
                    node.children[int(tokens[i])] = leaf
                    self.label_bytes += leaf.edge.nbytes
                    node, i = leaf, len(tokens)
                    break
                k = _common(child.edge, tokens[i:])
                if k == len(child.edge):
                    node, i = child, i + k
                    continue
                mid = _Node(child.edge[:k].copy(), node, node.depth + k)
                rest = child.edge[k:].copy()
                self.label_bytes += mid.edge.nbytes + rest.nbytes - child.edge.nbytes
                child.edge, child.parent = rest, mid
                mid.children[int(rest[0])] = child
                node.children[int(mid.edge[0])] = mid
                node, i = mid, i + k
            if node.state is not None:
                self.state_bytes -= sum(int(t.numel() * t.element_size()) for t in node.state.values())
            node.state = state
            self.state_bytes += size
            self.inserts += 1
            self._lru[id(node)] = node
            self._lru.move_to_end(id(node))
            self._evict()
            kept = node.state is state
        if kept and persist and self.directory is not None and not node.on_disk:
            self._writes.put((node, tokens.astype(np.int64), state))
        return kept

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._lru:
            _, node = self._lru.popitem(last=False)
            self.state_bytes -= sum(int(t.numel() * t.element_size()) for t in node.state.values())
            node.state = None
            self.evictions += 1
            self._prune(node)

    def _prune(self, node: _Node) -> None:
        while node is not self.root and node.state is None and len(node.children) <= 1:
            parent = node.parent
            if not node.children:
                del parent.children[int(node.edge[0])]
                self.label_bytes -= node.edge.nbytes
            else:  # one child: merge the two edges
                (child,) = node.children.values()
                merged = np.concatenate([node.edge, child.edge])
                self.label_bytes += merged.nbytes - node.edge.nbytes - child.edge.nbytes
                child.edge, child.parent = merged, parent
                parent.children[int(merged[0])] = child
            node = parent

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._lru), "bytes": self.nbytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses, "disk_hits": self.disk_hits, "evictions": self.evictions,
                    "inserts": self.inserts, "write_errors": self.write_errors}

    # -- disk -----------------------------------------------------------------------------------------

    def _lengths_on_disk(self) -> dict[int, set[str]]:
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return {}
        if mtime != self._listing[0]:
            by_len: dict[int, set[str]] = {}
            for name in os.listdir(self.directory):
                if name.endswith(SUFFIX) and name[:9].isdigit():
                    by_len.setdefault(int(name[:9]), set()).add(name)
            self._listing = (mtime, by_len)
        return self._listing[1]

    def _disk_lookup(self, tokens: np.ndarray, depth: int, limit: int) -> tuple[int, dict[str, Any]] | None:
        lengths = sorted(n for n in self._lengths_on_disk() if depth < n <= limit)
        if not lengths:
            return None
        ids = np.ascontiguousarray(tokens[:lengths[-1]], dtype=np.int64)
        h, at, names = hashlib.sha256(), 0, []
        for n in lengths:  # one pass over the prompt: hash states at each length present
            h.update(ids[at:n].tobytes())
            at = n
            names.append(f"{n:09d}-{h.copy().hexdigest()}{SUFFIX}")
        listing = self._listing[1]
        for n, name in zip(reversed(lengths), reversed(names)):
            if name not in listing.get(n, ()):
                continue
            try:
                state, key = backend.state_from_file(self.directory / name, self.identity)
            except backend.GlaExportError:
                continue  # another model's, or half a file from a dead writer: not ours to use
            if len(key) != n or not np.array_equal(key, ids[:n]):
                continue
            self.insert(key, state, persist=False)
            with self._lock:
                node = self._find(key)
                if node is not None:
                    node.on_disk = True
            return n, state
        return None

    def _find(self, tokens: np.ndarray) -> _Node | None:
        node, i = self.root, 0
        while i < len(tokens):
            node = node.children.get(int(tokens[i]))
            if node is None or _common(node.edge, tokens[i:]) < len(node.edge):
                return None
            i += len(node.edge)
        return node

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                node, tokens, state = item
                if node.on_disk:
                    continue
                try:
                    backend.state_to_file(self.directory / file_name(tokens), state, tokens, self.identity,
                                          self.metadata)
                    node.on_disk = True
                    self._trim_disk()
                except Exception:  # noqa: BLE001 - a full disk must not stop serving; counted
                    self.write_errors += 1
            finally:
                self._writes.task_done()

    def _trim_disk(self) -> None:
        if self.disk_max_bytes is None:
            return
        files = []
        for p in self.directory.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files)
        for _, size, p in sorted(files):
            if total <= self.disk_max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size

    def persist(self, timeout: float = 60.0) -> int:
        """Write every entry that is not on disk yet and wait for the writer (at shutdown); the
        number of files written or queued. Nothing without a directory."""
        if self.directory is None:
            return 0
        with self._lock:
            pending = []
            stack = [self.root]
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                if node.state is not None and not node.on_disk:
                    pending.append((node, self._path_tokens(node), node.state))
        for item in pending:
            self._writes.put(item)
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(pending)

    def _path_tokens(self, node: _Node) -> np.ndarray:
        parts = []
        while node is not self.root:
            parts.append(node.edge)
            node = node.parent
        return np.concatenate(parts[::-1]).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(timeout=30)
            self._writer = None
