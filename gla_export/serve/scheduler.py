"""Continuous batching over a pool of state slots.

One thread owns the graphs. Each iteration it

1. admits waiting requests into free slots: the slot gets the deepest cached state on the
   prompt's path (:mod:`.cache`) or zeros, and only the rest of the prompt is left to read;
2. reads prompts in chunks: the prefilling requests share a per-iteration token budget, each
   taking at most ``prefill_chunk`` tokens (one left-padded prefill call for all of them); while
   other requests are decoding the budget is what fits in ``prefill_share`` of a decode step's
   time (measured), so a long prompt neither stalls the streams nor grows memory with its length;
3. runs one step for every decoding request (they hold slots ``0..n-1``: a request that starts or
   stops decoding swaps its slot with the boundary one, so the step reads one contiguous block);
4. samples each row's token with the request's own sampler, streams its text, and ends a request
   at EOS, a stop token or string, ``max_tokens``, a cancellation or its deadline.

A request's state is cached when it ends (the key: every token its state has read) and every
``snapshot_interval`` tokens of a long prompt, and where a prompt leaves a cached path (the end
of a shared system prompt, say) once that branch is longer than ``min_branch`` tokens.

Isolation: a graph call writes scratch buffers that the pool takes back only on success, so a
failed prefill (bad input, out of memory) fails the requests in it, each retried alone first to
find the one at fault, and nothing else; a failed step is retried once. Every failure ends its
request with an error event and frees its slot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backend
from .cache import PrefixCache
from .metrics import Metrics


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class GenParams:
    max_tokens: int = 16
    sampling: Any = None  # backend.SamplingParams
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


class _StopText:
    """Holds back text that could be the start of a stop string; finds the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf = self.buf[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Request:
    """One generation. ``emit`` receives dicts (thread-safe on the caller's side):
    ``{"type": "token", "text", "token"}``, then ``{"type": "done", "finish_reason", "usage"}`` or
    ``{"type": "error", "message", "status"}``."""

    def __init__(self, rid: str, prompt_ids: np.ndarray | list[int], params: GenParams,
                 emit: Callable[[dict], None], *, timeout: float | None = None):
        self.id = rid
        self.prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        self.params = params
        self.emit = emit
        self.cancelled = threading.Event()
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout if timeout else None
        self.row: int | None = None
        self.pos = 0  # prompt tokens in the slot's state
        self.cached = 0  # of which came from the prefix cache
        self.snap_points: list[int] = []
        self.generated: list[int] = []
        self.sampler = None
        self.stream = None
        self.text = None
        self.stop_text = _StopText(params.stop)
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.done = False

    def cancel(self) -> None:
        self.cancelled.set()

    def _fire(self, event: dict) -> None:
        try:
            self.emit(event)
        except Exception:  # noqa: BLE001 - a client gone away must not stop the scheduler
            pass


@dataclass
class Options:
    slots: int
    max_queue: int = 256
    prefill_chunk: int = 256  # tokens of one prompt per iteration at most
    token_budget: int = 1024  # tokens (padded prefill + step rows) per iteration at most
    prefill_share: float = 0.5  # while decoding: prefill time per iteration, as a fraction of a step's
    min_prefill: int = 16  # tokens per iteration a waiting prompt gets in any case
    snapshot_interval: int = 4096
    min_branch: int = 32


class Scheduler(threading.Thread):
    def __init__(self, graphs: backend.Graphs, cache: PrefixCache, options: Options, metrics: Metrics):
        super().__init__(name="gla-serve-scheduler", daemon=True)
        self.graphs, self.cache, self.opt, self.metrics = graphs, cache, options, metrics
        graphs.allocate(options.slots)
        self.rows: list[Request | None] = [None] * options.slots
        self.free = list(range(options.slots - 1, -1, -1))  # pop() gives the lowest
        self.n_dec = 0
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self.error: BaseException | None = None
        self.step_s = 0.0  # measured: seconds of a step (EMA)
        self.prefill_tok_s = 0.0  # measured: seconds per prefilled token
        self._ls = [0.0] * 5  # weighted sums (n, x, y, xx, xy) of prefill calls: x tokens, y seconds
        metrics.slots.set(options.slots)

    # -- the outside ---------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.opt.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.opt.max_queue})")
            self.waiting.append(req)
            self.metrics.queue_depth.set(len(self.waiting))
            self._cond.notify()

    @property
    def ready(self) -> bool:
        return self.is_alive() and self._accepting

    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    def stats(self) -> dict[str, Any]:
        return {"slots": self.opt.slots, "running": self.busy(), "decoding": self.n_dec,
                "prefilling": len(self.prefilling), "waiting": len(self.waiting),
                "step_ms": round(self.step_s * 1e3, 3), "prefill_us_per_token": round(self.prefill_tok_s * 1e6, 3)}

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish for up to ``drain_timeout`` seconds,
        cancel the rest, stop the thread."""
        if self.ident is None:  # never started
            self._accepting = False
            return
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (self.busy() or self.waiting) and self.is_alive():
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join(timeout=30)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.busy():
                        self._cond.wait(0.5)
                    if self._stopping:
                        break
                    admit = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.free)))]
                    self.metrics.queue_depth.set(len(self.waiting))
                for req in admit:
                    self._admit(req)
                self._reap_waiting()
                t0 = time.monotonic()
                self._iterate()
                self.metrics.step_seconds.observe(time.monotonic() - t0)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave clients waiting forever
            self.error = e
            raise
        finally:
            self._accepting = False
            with self._cond:
                rest = list(self.waiting) + [r for r in self.rows if r is not None]
                self.waiting.clear()
            for req in rest:
                self._fail(req, "the server stopped before this request finished", 503)

    def _reap_waiting(self) -> None:
        now = time.monotonic()
        with self._cond:
            gone = [r for r in self.waiting if r.cancelled.is_set() or (r.deadline and now > r.deadline)]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._end_cancelled(r, now)

    def _admit(self, req: Request) -> None:
        row = self.free.pop()
        req.row = row
        self.rows[row] = req
        try:
            L = len(req.prompt)
            M = self.graphs.max_context
            if M is not None and L > M:
                self._fail(req, f"the prompt has {L} tokens, more than this server's --max-context {M} (a hybrid's "
                                "full-attention KV caches per slot)", 400)
                return
            depth, state, common = self.cache.lookup(req.prompt, limit=L - 1)
            if state is not None:
                self.graphs.write(row, state)
                self.metrics.cache_hits.inc()
            else:
                self.graphs.zero(row)
                self.metrics.cache_misses.inc()
            req.pos = req.cached = depth
            iv = self.opt.snapshot_interval
            points = set(range((depth // iv + 1) * iv, L, iv)) if iv > 0 else set()
            if depth + self.opt.min_branch <= common < L:
                points.add(common)  # a new branch of a cached path: cache its fork
            req.snap_points = sorted(points)
            req.sampler = backend.Sampler(req.params.sampling)
            req.stream = self.graphs.tokenizer.stream()
            req.text = backend.TextDecoder()
            self.metrics.prompt_tokens.inc(L)
            self.metrics.saved_tokens.inc(depth)
            self.prefilling.append(req)
        except Exception as e:  # noqa: BLE001
            self._fail(req, f"could not start the request: {e}", 500)
        self._gauges()

    def _iterate(self) -> None:
        now = time.monotonic()
        for req in [r for r in self.rows if r is not None]:
            if req.cancelled.is_set() or (req.deadline and now > req.deadline):
                self._end_cancelled(req, now)
        if self.prefilling:
            self._prefill_round()
        if self.n_dec:
            self._step_round()
        self._gauges()

    def _prefill_cost(self) -> tuple[float, float]:
        """Measured cost of a prefill call, ``seconds = a + b * tokens`` (least squares over
        recent calls, older ones weighing less)."""
        n, sx, sy, sxx, sxy = self._ls
        if n == 0:
            return 0.0, 0.0
        mx, my = sx / n, sy / n
        var = sxx / n - mx * mx
        if var <= 1e-9 * max(mx * mx, 1.0):
            return 0.0, my / max(mx, 1.0)
        b = max((sxy / n - mx * my) / var, 1e-9)
        return max(my - b * mx, 0.0), b

    def _prefill_budget(self) -> int:
        budget = max(self.opt.token_budget - self.n_dec, self.opt.min_prefill)
        if self.n_dec and self.step_s > 0 and self._ls[0] > 0:
            a, b = self._prefill_cost()
            fits = int((self.opt.prefill_share * self.step_s - a) / b)
            budget = min(budget, max(fits, self.opt.min_prefill))
        return budget

    def _prefill_round(self) -> None:
        budget = self._prefill_budget()
        # the oldest prompt always goes on; then the ones closest to their first token
        order = self.prefilling[:1] + sorted(self.prefilling[1:], key=lambda r: len(r.prompt) - r.pos)
        batch: list[tuple[Request, int]] = []
        width = 0
        for req in order:
            end = next((p for p in req.snap_points if p > req.pos), len(req.prompt))
            n = min(end - req.pos, self.opt.prefill_chunk, budget)
            if batch:
                n = min(n, width)  # never widen the padded batch past its first row
                if (len(batch) + 1) * width > budget:
                    break
            if n <= 0:
                break
            batch.append((req, n))
            width = max(width, n)
        if not batch:
            return
        t0 = time.monotonic()
        done = self._run_prefill(batch)
        dt = time.monotonic() - t0
        self._ls = [0.95 * v for v in self._ls]
        tokens = len(batch) * width
        for i, v in enumerate((1.0, tokens, dt, tokens * tokens, tokens * dt)):
            self._ls[i] += v
        self.prefill_tok_s = self._prefill_cost()[1]
        for req, n, logits in done:
            req.pos += n
            self.metrics.prefill_tokens.inc(n)
            if req.pos >= len(req.prompt):
                self.prefilling.remove(req)
                self._promote(req)
                self._take(req, logits)
            elif req.pos in req.snap_points:
                self._snapshot(req, req.prompt[:req.pos])

    def _run_prefill(self, batch: list[tuple[Request, int]]) -> list[tuple[Request, int, np.ndarray]]:
        rows = [req.row for req, _ in batch]
        chunks = [req.prompt[req.pos:req.pos + n] for req, n in batch]
        try:
            logits = self.graphs.prefill(rows, chunks)
            return [(req, n, logits[i]) for i, (req, n) in enumerate(batch)]
        except Exception as e:  # noqa: BLE001 - find the request at fault: each alone
            if len(batch) == 1:
                self._fail(batch[0][0], f"prefill failed: {_one_line(e)}", 500)
                return []
        out = []
        for req, n in batch:
            out.extend(self._run_prefill([(req, n)]))
        return out

    def _step_round(self) -> None:
        n = self.n_dec
        reqs = self.rows[:n]
        tokens = np.array([r.generated[-1] for r in reqs], dtype=np.int64)
        t0 = time.monotonic()
        try:
            logits = self.graphs.step(tokens)
        except Exception:  # noqa: BLE001 - once more: the pool is intact after a failed step
            try:
                logits = self.graphs.step(tokens)
            except Exception as e:  # noqa: BLE001
                for r in list(reqs):
                    self._fail(r, f"decode step failed: {_one_line(e)}", 500)
                return
        picked = self._sample_rows(reqs, logits)
        dt = time.monotonic() - t0
        self.step_s = dt if self.step_s == 0 else 0.8 * self.step_s + 0.2 * dt
        self.metrics.occupancy.observe(n / self.opt.slots)
        for req, tok in zip(reqs, picked):
            if isinstance(tok, BaseException):
                self._fail(req, f"sampling failed: {_one_line(tok)}", 500)
            else:
                self._accept(req, tok)

    def _sample_rows(self, reqs: list[Request], logits: Any) -> list[int | BaseException]:
        """Each row's next token (or why it could not be sampled) from the step's ``[n, V]`` logits
        on the pool's device: on the device (``sample_on_device``: only the ids come to the host),
        else on the host, the greedy rows in one ``argmax``. A row whose logits cannot be sampled
        (NaN) fails alone: the device sampler refuses the whole batch, so the host decides then,
        with every generator where it was (seeded rows draw the numbers they would have drawn)."""
        samplers = [r.sampler for r in reqs]
        if self.graphs.sample_on_device:
            # where it refuses, the host decides from the same draws: each generator goes back first
            saved = [(s, s.sampled, None if s.params.greedy else s.rng.bit_generator.state) for s in samplers]
            try:
                return [int(t) for t in backend.sample_on_device(logits, samplers)]
            except backend.UsageError:
                for s, sampled, state in saved:
                    s.sampled = sampled
                    if state is not None:
                        s.rng.bit_generator.state = state
        host = logits.cpu().numpy()  # no copy on ort-cpu
        out: list[int | BaseException] = [0] * len(reqs)
        greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
        if greedy:
            for i, tok in zip(greedy, host[greedy].argmax(axis=-1).tolist() if len(greedy) < len(reqs)
                              else host.argmax(axis=-1).tolist()):
                samplers[i].sampled += 1  # as Sampler.sample counts a greedy token
                out[i] = tok
        for i, s in enumerate(samplers):
            if not s.params.greedy:
                try:
                    out[i] = s.sample(host[i])
                except Exception as e:  # noqa: BLE001
                    out[i] = e
        return out

    # -- one request ---------------------------------------------------------------------------------

    def _take(self, req: Request, logits: np.ndarray) -> None:
        """Sample ``req``'s next token from its row of logits and :meth:`_accept` it."""
        try:
            tok = req.sampler.sample(logits)
        except Exception as e:  # noqa: BLE001
            self._fail(req, f"sampling failed: {_one_line(e)}", 500)
            return
        self._accept(req, tok)

    def _accept(self, req: Request, tok: int) -> None:
        """Stream ``req``'s next token, end the request when it is done."""
        now = time.monotonic()
        req.generated.append(tok)
        self.metrics.generated_tokens.inc()
        if req.first_at is None:
            req.first_at = now
            self.metrics.ttft.observe(now - req.arrival)
        else:
            self.metrics.itl.observe(now - req.last_at)
        req.last_at = now
        p = req.params
        eos = tok in self.graphs.eos_token_ids and not p.ignore_eos
        piece = b"" if eos or tok in p.stop_token_ids else req.stream.bytes_for(tok)
        text, stopped = req.stop_text.feed(req.text.feed(piece))
        req._fire({"type": "token", "text": text, "token": tok})  # text may be "" (half a character)
        # the slot has read every token but this one: at max_context it cannot read this one
        full = self.graphs.max_context is not None and len(req.prompt) + len(req.generated) > self.graphs.max_context
        reason = "stop" if eos or stopped or tok in p.stop_token_ids else \
            "length" if len(req.generated) >= p.max_tokens or full else None
        if reason is not None:
            if not stopped:
                tail = req.stop_text.feed(req.text.feed(req.stream.flush()) + req.text.flush())[0] + \
                    req.stop_text.flush()
                if tail:
                    req._fire({"type": "token", "text": tail, "token": None})
            self._finish(req, reason)

    def _usage(self, req: Request) -> dict[str, int]:
        return {"prompt_tokens": int(len(req.prompt)), "completion_tokens": len(req.generated),
                "total_tokens": int(len(req.prompt)) + len(req.generated), "cached_tokens": req.cached}

    @staticmethod
    def _read(req: Request) -> np.ndarray:
        """The tokens a decoding row's state has read: the prompt and every generated token but the
        last (sampled, not yet fed)."""
        return np.concatenate([req.prompt, np.asarray(req.generated[:-1], dtype=np.int64)])

    def _finish(self, req: Request, reason: str) -> None:
        self._snapshot(req, self._read(req))
        self.metrics.finished.labels(reason).inc()
        req._fire({"type": "done", "finish_reason": reason, "usage": self._usage(req)})
        self._release(req)

    def _end_cancelled(self, req: Request, now: float) -> None:
        timed_out = bool(req.deadline and now > req.deadline) and not req.cancelled.is_set()
        if req.row is not None and req.pos > 0:  # what was read stays reusable
            self._snapshot(req, req.prompt[:req.pos] if req.pos < len(req.prompt) else self._read(req))
        self.metrics.finished.labels("timeout" if timed_out else "cancelled").inc()
        if timed_out:
            req._fire({"type": "error", "message": "the request timed out (--request-timeout)", "status": 504})
        else:
            req._fire({"type": "error", "message": "the request was cancelled", "status": 499})
        self._release(req)

    def _fail(self, req: Request, message: str, status: int) -> None:
        self.metrics.finished.labels("error").inc()
        req._fire({"type": "error", "message": message, "status": status})
        self._release(req)

    def _snapshot(self, req: Request, key: np.ndarray) -> None:
        try:
            self.cache.insert(key, self.graphs.read(req.row))
        except Exception:  # noqa: BLE001 - a cache that cannot take it is not the request's failure
            pass

    def _release(self, req: Request) -> None:
        if req.done:
            return
        req.done = True
        if req in self.prefilling:
            self.prefilling.remove(req)
        row = req.row
        if row is None:
            return
        if row < self.n_dec:
            last = self.n_dec - 1
            self._swap(row, last)
            self.n_dec -= 1
            row = last
        self.rows[row] = None
        self.graphs.discard(row)
        self.free.append(row)
        self.free.sort(reverse=True)
        req.row = None

    def _promote(self, req: Request) -> None:
        self._swap(req.row, self.n_dec)
        self.n_dec += 1

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        self.graphs.swap(a, b)
        ra, rb = self.rows[a], self.rows[b]
        self.rows[a], self.rows[b] = rb, ra
        if ra is not None:
            ra.row = b
        if rb is not None:
            rb.row = a
        if b in self.free or a in self.free:
            self.free = [b if f == a else a if f == b else f for f in self.free]
            self.free.sort(reverse=True)

    def _gauges(self) -> None:
        m = self.metrics
        m.running.set(self.busy())
        m.decoding.set(self.n_dec)
        m.queue_depth.set(len(self.waiting))
        m.cache_bytes.set(self.cache.nbytes)
        m.cache_entries.set(len(self.cache))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
