"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

One :class:`Sampler` per conversation. Its random generator (NumPy's PCG64) is part of the
conversation's state: :meth:`Sampler.state_dict` captures the exact position of the stream, so a
conversation saved and restored draws the same numbers it would have drawn without the
interruption. Each sampled token consumes exactly one draw (greedy consumes none), whatever
the logits, so the stream position is a function of the number of sampled tokens.

Order of the filters, as in Hugging Face's ``generate``: temperature, then top-k, then top-p
(the smallest set of the most likely tokens whose probability reaches ``top_p``). Ties are
broken towards the lower token id everywhere (stable sorts, ``argmax``), so results do not
depend on the platform's sort.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off;
    ``seed`` None draws a fresh seed (the sampler records it, so a run can be repeated)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sampler:
    """Samples one token at a time for one conversation (see the module docstring)."""

    def __init__(self, params: SamplingParams | None = None, *, seed: int | None = None):
        self.params = params or SamplingParams()
        seed = self.params.seed if seed is None else seed
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.sampled = 0  # tokens drawn so far; part of the position, reported in state files

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: the parameters, the seed, the generator's position."""
        return {
            "params": self.params.as_dict(),
            "seed": self.seed,
            "sampled": self.sampled,
            "bit_generator": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], params: SamplingParams | None = None) -> Sampler:
        """The sampler of ``state``; ``params`` (if given) replaces its parameters but keeps its position."""
        try:
            saved = SamplingParams(**state["params"])
            sampler = cls(params or saved, seed=int(state["seed"]))
            sampler.rng.bit_generator.state = state["bit_generator"]
            sampler.sampled = int(state["sampled"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"invalid sampler state: {e}") from e
        return sampler

    # -- sampling ------------------------------------------------------------------------------

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for one row of logits ``[V]``."""
        p = self.params
        if logits.ndim != 1:
            raise UsageError(f"logits must be one row [V], got shape {tuple(logits.shape)}")
        if p.greedy:
            self.sampled += 1
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / p.temperature
        u = self.rng.random()  # exactly one draw per token, before anything can fail or branch
        self.sampled += 1
        if np.isnan(x).any() or not np.isfinite(x).any():
            raise UsageError("the logits hold NaN or are all -inf: nothing can be sampled (is the model broken?)")
        if p.top_k == 0 and p.top_p >= 1.0:
            return _draw(x, None, u)
        order = np.argsort(-x, kind="stable")
        xs = x[order]
        if 0 < p.top_k < xs.shape[0]:
            xs, order = xs[: p.top_k], order[: p.top_k]
        if p.top_p < 1.0:
            probs = _softmax(xs)
            # smallest prefix whose mass reaches top_p; the most likely token always stays
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1
            xs, order = xs[:keep], order[:keep]
        return _draw(xs, order, u)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _draw(x: np.ndarray, ids: np.ndarray | None, u: float) -> int:
    """Inverse-CDF draw from softmax(x) with the uniform number ``u`` in [0, 1); ``ids`` maps
    positions of ``x`` to token ids (None: the positions are the ids)."""
    cdf = np.cumsum(_softmax(x))
    i = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), x.shape[0] - 1)
    return i if ids is None else int(ids[i])
