"""The host sampler's choices (:mod:`.sampling`) made on the GPU, on the decoder's logits buffer,
so that only the chosen token ids (``[batch]`` int64) come to the host each step instead of
``[batch, V]`` float32 logits.

Torch on the decoder's own device buffers: ONNX Runtime has replayed the step's CUDA graph and
synchronised its stream when :meth:`~.decoder.StatefulDecoder._step_on_device` returns, so these
few kernels (one ``argmax`` for greedy; a sort, a scan and a search per group of rows otherwise)
read finished logits; they run outside ONNX Runtime's graph (a sampling subgraph appended to the
step graph would need per-row parameters and random numbers as graph inputs, and ONNX has no
stable descending sort).

Same tokens as the host sampler:

- greedy: exactly (``torch.argmax`` returns the first maximum, as ``np.argmax`` does, and reads
  the same float32 logits);
- temperature/top-k/top-p: each sampler draws its uniform number on the host from its own
  generator, exactly as the host sampler does (one draw per sampled token, so a conversation
  saved and resumed continues the same stream), and the inverse-CDF draw runs in float64 with the
  host's order of filters and ties (stable descending sort). The CDF's sums are taken in another
  order than NumPy's sequential ``cumsum`` (a parallel scan), so a draw whose number falls within
  a few float64 ulps of a boundary between two tokens may pick the neighbour: about 1e-15 of draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError
from .sampling import Sampler


def sample_on_device(logits: torch.Tensor, samplers: Sequence[Sampler | None]) -> np.ndarray:
    """One token per row of ``logits`` ``[n, V]`` (on any device): row ``i`` sampled by
    ``samplers[i]`` (None: the row is not sampled; its id is 0). Returns int64 ``[n]`` on the host."""
    n = logits.shape[0]
    if len(samplers) != n:
        raise UsageError(f"{len(samplers)} samplers for {n} rows of logits")
    if all(s is not None and s.params.greedy for s in samplers):
        # the common decode case: one argmax and one copy per token, no index lists sent to the device
        for s in samplers:
            s.sampled += 1
        return torch.argmax(logits, dim=-1).cpu().numpy()
    dev = logits.device
    out = torch.zeros(n, dtype=torch.int64, device=dev)
    bad = torch.zeros(n, dtype=torch.bool, device=dev)
    greedy = [i for i, s in enumerate(samplers) if s is not None and s.params.greedy]
    plain: list[int] = []  # no top-k/top-p: the CDF runs over the vocabulary in id order
    filtered: list[int] = []
    for i, s in enumerate(samplers):
        if s is None or s.params.greedy:
            continue
        (plain if s.params.top_k == 0 and s.params.top_p >= 1.0 else filtered).append(i)
    if greedy:
        idx = torch.tensor(greedy, device=dev)
        out[idx] = torch.argmax(logits.index_select(0, idx), dim=-1)
    for rows, filt in ((plain, False), (filtered, True)):
        if rows:
            idx = torch.tensor(rows, device=dev)
            u = [samplers[i].rng.random() for i in rows]  # one draw per token, as the host sampler
            tok, nan = _draw_rows(logits.index_select(0, idx), [samplers[i] for i in rows], u, filt)
            out[idx] = tok
            bad[idx] = nan
    for s in samplers:
        if s is not None:
            s.sampled += 1
    packed = torch.where(bad, torch.full_like(out, -1), out).cpu().numpy()
    if (packed < 0).any():
        raise UsageError("the logits hold NaN or are all -inf: nothing can be sampled (is the model broken?)")
    return packed


def _draw_rows(logits: torch.Tensor, samplers: list[Sampler], u: list[float], filtered: bool):
    dev = logits.device
    m, V = logits.shape
    temp = torch.tensor([s.params.temperature for s in samplers], dtype=torch.float64, device=dev)
    x = logits.to(torch.float64) / temp[:, None]
    nan = torch.isnan(x).any(dim=-1) | ~torch.isfinite(x).any(dim=-1)
    uu = torch.tensor(u, dtype=torch.float64, device=dev)
    if filtered:
        xs, order = torch.sort(x, dim=-1, descending=True, stable=True)
        pos = torch.arange(V, device=dev)
        k = torch.tensor([s.params.top_k if 0 < s.params.top_k < V else V for s in samplers], device=dev)
        xs = torch.where(pos[None, :] < k[:, None], xs, torch.full_like(xs, -torch.inf))
        top_p = torch.tensor([s.params.top_p for s in samplers], dtype=torch.float64, device=dev)
        cum = torch.cumsum(_softmax(xs), dim=-1)
        keep = torch.searchsorted(cum, top_p[:, None].contiguous(), side="left")[:, 0] + 1
        keep = torch.where(top_p < 1.0, torch.minimum(keep, k), k)
        xs = torch.where(pos[None, :] < keep[:, None], xs, torch.full_like(xs, -torch.inf))
    else:
        xs, order = x, None
        keep = torch.full((m,), V, device=dev)
    cdf = torch.cumsum(_softmax(xs), dim=-1)
    target = (uu * cdf[:, -1])[:, None].contiguous()
    i = torch.searchsorted(cdf, target, side="right")[:, 0]
    i = torch.minimum(i, keep - 1)
    tok = i if order is None else order.gather(1, i[:, None])[:, 0]
    return tok, nan


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)
