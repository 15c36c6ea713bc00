"""The server's pool of state rows (serve.backend.Graphs): every row keeps its own conversation's
state through steps of changing batches, swaps, prefills and zeroing, with no state copied after a
step (rows are gathered only when the batch changes), and the padding rows of a captured step's
size never touch a state they do not own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gla_export.runtime.decoder import StatefulDecoder
from gla_export.serve import backend


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-6))


@pytest.fixture(scope="module")
def reference(tiny_export):
    dec = StatefulDecoder(tiny_export, threads=1)

    def state_after(tokens: list[int]) -> dict[str, torch.Tensor]:
        dec.reset()
        if tokens:
            dec.prefill([tokens])
        return dec.snapshot(0).tensors

    return state_after


def check_rows(g: backend.Graphs, fed: dict[int, list[int]], reference) -> None:
    for row, tokens in fed.items():
        got, want = g.read(row), reference(tokens)
        for name, t in want.items():
            assert rel(got[name], t) < 1e-4, (row, name, len(tokens))


def count_moves(g: backend.Graphs, monkeypatch) -> list[tuple[int, int]]:
    moves = []
    real = g._move

    def move(row, to):
        if g._where[row] not in (None, to):
            moves.append((row, to))
        real(row, to)

    monkeypatch.setattr(g, "_move", move)
    return moves


def test_rows_keep_their_states_through_any_sequence_of_calls(tiny_export, reference):
    g = backend.Graphs(tiny_export, threads=1)
    g.allocate(5)
    rng = np.random.default_rng(1)
    fed: dict[int, list[int]] = {r: [] for r in range(5)}
    mixed = 0  # calls after which the rows were spread over both sets
    for _ in range(60):
        op = rng.choice(["step", "step", "step", "swap", "prefill", "zero"])
        if op == "step":
            n = int(rng.integers(1, 6))
            toks = rng.integers(0, 256, n)
            g.step(toks)
            for r in range(n):
                fed[r].append(int(toks[r]))
        elif op == "swap":
            a, b = (int(x) for x in rng.integers(0, 5, 2))
            g.swap(a, b)
            fed[a], fed[b] = fed[b], fed[a]
        elif op == "prefill":
            rows = [int(r) for r in rng.choice(5, size=int(rng.integers(1, 4)), replace=False)]
            chunks = [rng.integers(0, 256, int(rng.integers(1, 6))) for _ in rows]
            g.prefill(rows, chunks)
            for r, c in zip(rows, chunks):
                fed[r].extend(int(t) for t in c)
        else:
            r = int(rng.integers(0, 5))
            g.zero(r)
            fed[r] = []
        mixed += set(g._where) == {0, 1}
    assert mixed >= 10
    check_rows(g, fed, reference)


def test_a_steady_batch_copies_no_state_and_a_joining_row_one(tiny_export, reference, monkeypatch):
    g = backend.Graphs(tiny_export, threads=1)
    g.allocate(4)
    moves = count_moves(g, monkeypatch)
    ptrs = {t.data_ptr() for bufs in g._bufs for t in bufs.values()}
    fed: dict[int, list[int]] = {r: [] for r in range(4)}
    for i in range(9):  # three rows decode: each step reads one set and writes the other, nothing else
        g.step(np.array([10 + i, 20 + i, 30 + i]))
        for r in range(3):
            fed[r].append((r + 1) * 10 + i)
    assert moves == []
    g.prefill([3], [np.array([7, 8, 9])])  # a fourth row read its prompt where it lives, then joins
    fed[3] += [7, 8, 9]
    for i in range(4):
        g.step(np.array([1, 2, 3, 4]))
        for r in range(4):
            fed[r].append(r + 1)
    assert moves == [(3, 1)]  # one row gathered, once (the others were in set 1 after nine steps)
    assert {t.data_ptr() for bufs in g._bufs for t in bufs.values()} == ptrs
    check_rows(g, fed, reference)


def test_a_failed_step_leaves_every_row_as_it_was(tiny_export, monkeypatch):
    g = backend.Graphs(tiny_export, threads=1)
    g.allocate(3)
    g.prefill([0, 1, 2], [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])])
    g.step(np.array([7, 8]))
    before = [g.read(r) for r in range(3)]

    def broken(handle):
        for t in g._bufs[0].values():  # rows 0-1 of the set the step writes (rows 0-1 live in set 1), spoilt
            t[:2].fill_(float("nan"))
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(g.runtime, "run_step", broken)
    with pytest.raises(backend.ModelError, match="the step graph failed .*out of memory"):
        g.step(np.array([1, 1]))
    for r in range(3):
        for name, t in g.read(r).items():
            assert torch.equal(t, before[r][name]), (r, name)


def test_padding_rows_of_a_captured_size_never_touch_states(tiny_export, reference):
    """With CUDA graphs a batch of n rows runs in the graph of the next captured size, its extra
    rows padding whose outputs are garbage; the same logic on the CPU (uncaptured bindings)."""
    g = backend.Graphs(tiny_export, threads=1)
    g.cuda_graph = True  # the sizes and padding of the captured path; ONNX Runtime CPU runs them plainly
    g.allocate(7)
    assert g._sizes == [1, 2, 4, 7]
    fed: dict[int, list[int]] = {r: [] for r in range(7)}
    g.prefill([4, 5, 6], [np.array([1, 2]), np.array([3]), np.array([4, 5, 6])])  # prompts being read
    for r, c in ((4, [1, 2]), (5, [3]), (6, [4, 5, 6])):
        fed[r] += c
    for i in range(5):  # 3 rows run in the graph of 4, 5 in the graph of 7: rows 3..6 are padding
        n = 3 if i % 2 == 0 else 5
        g.step(np.arange(n) + i)
        for r in range(n):
            fed[r].append(r + i)
    check_rows(g, fed, reference)
