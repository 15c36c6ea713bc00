"""The prefix cache alone: the radix tree, eviction by bytes, persistence (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gla_export.serve.cache import PrefixCache, file_name

pytest.importorskip("prometheus_client")
SPEC = {"past_key_values.0.recurrent_state": (1, 2, 4, 4)}
STATE_BYTES = 2 * 4 * 4 * 4


def state(v: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(shape, float(v)) for k, shape in SPEC.items()}


def value(s) -> float:
    return float(next(iter(s.values())).flatten()[0])


def ids(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def test_longest_cached_prefix_within_the_limit():
    c = PrefixCache(1 << 20)
    c.insert(ids(1, 2, 3), state(3))
    c.insert(ids(1, 2, 3, 4, 5), state(5))
    c.insert(ids(1, 2, 9), state(9))  # splits the edge 1,2,3 at 1,2
    assert len(c) == 3
    depth, s, common = c.lookup(ids(1, 2, 3, 4, 5, 6))
    assert depth == 5 and value(s) == 5 and common == 5
    depth, s, _ = c.lookup(ids(1, 2, 3, 4, 5), limit=4)  # at least one token must be left to read
    assert depth == 3 and value(s) == 3
    depth, s, common = c.lookup(ids(1, 2, 7))
    assert (depth, s, common) == (0, None, 2)  # shares 1,2 with cached keys, but no state ends there
    depth, s, common = c.lookup(ids(1, 2, 3, 4, 8))
    assert depth == 3 and common == 4
    assert (c.hits, c.misses) == (3, 1)


def test_eviction_is_lru_by_bytes_and_prunes_the_tree():
    per = STATE_BYTES + 4 * 3  # a state and its 3-token label
    c = PrefixCache(2 * per + 8)
    c.insert(ids(1, 2, 3), state(1))
    c.insert(ids(4, 5, 6), state(2))
    c.lookup(ids(1, 2, 3, 0))  # 1,2,3 is now the most recently used
    c.insert(ids(7, 8, 9), state(3))
    assert c.evictions == 1 and c.lookup(ids(4, 5, 6, 0))[1] is None
    assert c.lookup(ids(1, 2, 3, 0))[1] is not None and c.nbytes <= c.max_bytes
    assert set(c.root.children) == {1, 7}  # the evicted branch is gone from the tree
    assert not c.insert(np.arange(10_000), state(0))  # larger than the whole cache: refused


def test_interior_node_merges_when_its_state_goes():
    c = PrefixCache(STATE_BYTES * 2 + 4 * 6 + 4)
    c.insert(ids(1, 2), state(1))
    c.insert(ids(1, 2, 3, 4), state(2))
    c.insert(ids(5), state(3))  # evicts 1,2 (least recent): 1,2 + 3,4 merge back into one edge
    (child,) = [n for k, n in c.root.children.items() if k == 1]
    assert list(child.edge) == [1, 2, 3, 4] and value(child.state) == 2
    assert c.label_bytes == 4 * 5


def test_persisted_entries_survive_a_restart_and_are_shared(tmp_path):
    meta = None
    a = PrefixCache(1 << 20, directory=tmp_path, identity="model-a", metadata=meta)
    a.insert(ids(1, 2, 3, 4), state(4))
    a.insert(ids(1, 2), state(2))
    a.persist()
    a.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([file_name(ids(1, 2)), file_name(ids(1, 2, 3, 4))])
    b = PrefixCache(1 << 20, directory=tmp_path, identity="model-a")  # a new process, or another replica
    depth, s, _ = b.lookup(ids(1, 2, 3, 4, 5))
    assert depth == 4 and value(s) == 4 and b.disk_hits == 1
    assert b.lookup(ids(1, 2, 3, 4, 5))[0] == 4 and b.disk_hits == 1  # now from memory
    other = PrefixCache(1 << 20, directory=tmp_path, identity="model-b")  # another model's files are not used
    assert other.lookup(ids(1, 2, 3, 4, 5))[1] is None
    for cache in (b, other):
        cache.close()


def test_disk_is_bounded(tmp_path):
    c = PrefixCache(1 << 20, directory=tmp_path, identity="m", disk_max_bytes=1)
    c.insert(ids(1), state(1))
    c.insert(ids(2), state(2))
    c.persist()
    c.close()
    assert len(list(tmp_path.iterdir())) <= 1
