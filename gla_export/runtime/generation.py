"""Generation on a :class:`~gla_export.runtime.decoder.StatefulDecoder`: the token events, the
per-row results and the sampling loop (prefill the prompts, then sample and step until each row
stops). The decoder's buffers, prefill and step are in decoder.py; this module only calls them.

The decoder's lock is held while a round of tokens is computed, never across a ``yield``: a
:class:`Generation` that its consumer pauses or abandons blocks no other thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .sampling import Sampler, SamplingParams
from .state import ConversationState

FINISH_EOS, FINISH_STOP, FINISH_LENGTH, FINISH_INTERRUPTED = "eos", "stop", "length", "interrupted"


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


class GenerationMixin:
    """:meth:`generate` and its helpers, for :class:`~gla_export.runtime.decoder.StatefulDecoder`."""

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

        Threads: the decoder is locked only while a round of tokens is computed, so a Generation
        left paused (or dropped) blocks no other thread; another call that changes the decoder's
        buffers in the meantime ends the paused one with a UsageError at its next round.
        """
        n, prompt_rows, id_rows, state_rows, sampling_rows = _normalise(prompts, prompt_ids, states, sampling)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        stops = set(int(t) for t in stop_token_ids) if stop_token_ids is not None else set()
        eos = frozenset() if ignore_eos else self.eos_token_ids
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

            def sample_round(logits: np.ndarray | None, chosen: np.ndarray | None = None) -> list[TokenEvent]:
                events = []
                for i in range(n):
                    if not active[i]:
                        continue
                    tok = samplers[i].sample(logits[i]) if chosen is None else int(chosen[i])
                    next_ids[i] = tok
                    counts[i] += 1
                    generated[i] += 1
                    piece = streams[i].bytes_for(tok)
                    if keep_tokens:
                        tokens[i].append(tok)
                        text[i] += piece
                    reason = FINISH_EOS if tok in eos else FINISH_STOP if tok in stops else \
                        FINISH_LENGTH if counts[i] >= max_new_tokens else None
                    if reason is not None:
                        piece += finish(i, reason)
                    events.append(TokenEvent(i, tok, piece))
                return events

            events = sample_round(logits)
            version = self._version
        # a GPU decoder that picks tokens on the device (its sample_on_device): decided once, not per step
        pick_on_device = None
        if getattr(self, "sample_on_device", False):
            from .device_sampling import sample_on_device as pick_on_device
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
                if pick_on_device is not None:
                    chosen = pick_on_device(self._step_on_device(next_ids),
                                            [samplers[i] if active[i] else None for i in range(n)])
                    events += sample_round(None, chosen)
                else:
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
    "FINISH_EOS",
    "FINISH_INTERRUPTED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Generation",
    "GenerationMixin",
    "RowResult",
    "TokenEvent",
]

