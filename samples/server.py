#!/usr/bin/env python3
"""A small HTTP service that chats with a gla-export export, many conversations at once.

    python samples/server.py EXPORT_DIR --port 8000
    curl -N localhost:8000/generate -d '{"conversation_id": "ann", "prompt": "In the beginning", "max_new_tokens": 40}'

``POST /generate`` takes a JSON object: ``prompt`` (text; default ""), ``conversation_id``
(optional: continue that conversation; a new id is made when absent), ``max_new_tokens``, and
optionally ``temperature``, ``top_k``, ``top_p``, ``seed`` (a continued conversation keeps its
sampler unless they are given). The answer streams as newline-delimited JSON (chunked
transfer): ``{"token": 72, "text": "H"}`` per token, then ``{"done": true, "conversation_id":
..., "finish_reason": "eos" | "length" | "cancelled", "generated": ..., "context_tokens": ...,
"resumed": true | false}``. ``"stream": false`` returns one JSON object with the whole text.
``GET /health`` and ``GET /stats`` report; ``DELETE /conversations/ID`` forgets one.

How it works: one thread owns a :class:`StatefulDecoder` with ``--slots`` batch rows and runs
the loop: admit waiting requests into free rows (restore the conversation's state from the
:class:`StateCache`, read the prompt), then one batched step for every busy row, then hand
each row's token to its request. A finished conversation's state goes back into the cache
(least recently used conversations are forgotten beyond ``--cache-mib``). The state, not the
text, is the conversation: continuing one costs the new prompt only, never the history.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gla_export.errors import GlaExportError, UsageError
from gla_export.runtime.decoder import StatefulDecoder
from gla_export.runtime.sampling import Sampler, SamplingParams
from gla_export.runtime.state import StateCache
from gla_export.runtime.tokenizers import TextDecoder, TokenStream


@dataclass
class Job:
    """One /generate request, as the decoding thread sees it."""

    conversation_id: str
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams | None
    events: queue.Queue = field(default_factory=queue.Queue)  # dicts for the client; None ends the answer
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Active:
    """A job in a batch row."""

    job: Job
    sampler: Sampler
    stream: TokenStream
    text: TextDecoder
    resumed: bool
    generated: int  # in the whole conversation
    count: int = 0  # in this request
    token: int = 0  # sampled, sent, not yet fed to the model


class Scheduler(threading.Thread):
    def __init__(self, decoder: StatefulDecoder, cache: StateCache, slots: int):
        super().__init__(name="decoder", daemon=True)
        self.decoder, self.cache = decoder, cache
        decoder.resize(slots)
        self.rows: list[Active | None] = [None] * slots
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: deque[Job] = deque()  # admitted in order once a row (and their conversation) is free
        self.lock = threading.Lock()  # guards the cache against DELETE while a row takes a state

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def run(self) -> None:
        while True:
            try:
                self._admit(block=not any(self.rows) and not self.waiting)
                if any(self.rows):
                    self._step()
            except Exception as e:  # noqa: BLE001 - report to every client in flight, keep serving
                print(f"server: decoding failed: {type(e).__name__}: {e}", file=sys.stderr)
                for row, a in enumerate(self.rows):
                    if a is not None:
                        a.job.events.put({"error": f"decoding failed: {e}"})
                        a.job.events.put(None)
                        self.rows[row] = None

    def _admit(self, block: bool) -> None:
        jobs = list(self.waiting)
        self.waiting.clear()
        if block:
            jobs.append(self.inbox.get())
        while True:
            try:
                jobs.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            busy = {a.job.conversation_id for a in self.rows if a is not None}
            free = [row for row, a in enumerate(self.rows) if a is None]
            if job.conversation_id in busy or not free:
                self.waiting.append(job)  # one request per conversation at a time, in arrival order
            else:
                self._start(free[0], job)

    def _start(self, row: int, job: Job) -> None:
        with self.lock:
            state = self.cache.pop(job.conversation_id)  # the row owns the conversation while it runs
        try:
            feed, sampler = self.decoder.start(row, prompt=job.prompt if job.prompt or state is None else None,
                                               state=state, sampling=job.sampling)
        except GlaExportError as e:
            if state is not None:
                self.cache.put(job.conversation_id, state)
            job.events.put({"error": str(e)})
            job.events.put(None)
            return
        generated = state.generated if state is not None else 0
        a = Active(job, sampler, self.decoder.tokenizer.stream(), TextDecoder(), state is not None, generated)
        self.rows[row] = a
        self._take(row, self.decoder.prefill([feed], rows=[row])[0])

    def _step(self) -> None:
        logits = self.decoder.step([a.token if a is not None else 0 for a in self.rows])
        for row, a in enumerate(self.rows):
            if a is not None:
                self._take(row, logits[row])

    def _take(self, row: int, logits) -> None:  # noqa: ANN001
        """Sample the row's next token, send it, and finish the row when it is done."""
        a = self.rows[row]
        a.token = a.sampler.sample(logits)
        a.count += 1
        a.generated += 1
        text = a.text.feed(a.stream.bytes_for(a.token))
        a.job.events.put({"token": a.token, "text": text})
        eos = a.token == self.decoder.eos_token_id
        if eos or a.count >= a.job.max_new_tokens or a.job.cancelled.is_set():
            reason = "eos" if eos else "cancelled" if a.job.cancelled.is_set() else "length"
            tail = a.text.feed(a.stream.flush()) + a.text.flush()
            if tail:
                a.job.events.put({"token": None, "text": tail})
            state = self.decoder.snapshot(row, pending_token=a.token, sampler=a.sampler, generated=a.generated,
                                          finish_reason=reason, device="cpu")
            with self.lock:
                self.cache.put(a.job.conversation_id, state)
            a.job.events.put({"done": True, "conversation_id": a.job.conversation_id, "finish_reason": reason,
                              "generated": a.generated, "context_tokens": state.consumed, "resumed": a.resumed})
            a.job.events.put(None)
            self.rows[row] = None


def parse_job(body: bytes, max_tokens_limit: int) -> Job:
    try:
        req = json.loads(body or b"{}")
    except ValueError as e:
        raise UsageError(f"the body is not JSON: {e}") from e
    if not isinstance(req, dict):
        raise UsageError("the body must be a JSON object")
    fields = {"prompt", "conversation_id", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stream"}
    unknown = set(req) - fields
    if unknown:
        raise UsageError(f"unknown fields: {sorted(unknown)}")
    prompt = req.get("prompt", "")
    if not isinstance(prompt, str):
        raise UsageError("prompt must be a string")
    cid = req.get("conversation_id") or uuid.uuid4().hex
    if not isinstance(cid, str) or len(cid) > 200:
        raise UsageError("conversation_id must be a string of at most 200 characters")
    n = req.get("max_new_tokens", 64)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_tokens_limit:
        raise UsageError(f"max_new_tokens must be an integer in [1, {max_tokens_limit}]")
    given = {k: req[k] for k in ("temperature", "top_k", "top_p", "seed") if req.get(k) is not None}
    sampling = SamplingParams(**given) if given else None
    return Job(cid, prompt, n, sampling)


def make_handler(scheduler: Scheduler, cache: StateCache, info: dict, max_tokens_limit: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streaming and keep-alive

        def log_message(self, fmt, *args):  # noqa: ANN001, ANN002
            pass  # quiet; errors are reported on stderr where they happen

        def _json(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {"status": "ok", **info})
            elif self.path == "/stats":
                self._json(200, {"cache": cache.stats(), "busy_rows": sum(a is not None for a in scheduler.rows),
                                 "waiting": len(scheduler.waiting) + scheduler.inbox.qsize()})
            else:
                self._json(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_DELETE(self) -> None:
            prefix = "/conversations/"
            if not self.path.startswith(prefix):
                self._json(404, {"error": f"no such endpoint: DELETE {self.path}"})
                return
            with scheduler.lock:
                found = cache.pop(self.path[len(prefix):]) is not None
            self._json(200 if found else 404, {"deleted": found})

        def do_POST(self) -> None:
            if self.path != "/generate":
                self._json(404, {"error": f"no such endpoint: POST {self.path}"})
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                job = parse_job(body, max_tokens_limit)
                stream = json.loads(body or b"{}").get("stream", True)
            except UsageError as e:
                self._json(400, {"error": str(e)})
                return
            scheduler.submit(job)
            if not stream:
                events = list(iter(job.events.get, None))
                if events and "error" in events[-1]:
                    self._json(400, events[-1])
                    return
                text = "".join(e.get("text", "") for e in events[:-1])
                tokens = [e["token"] for e in events[:-1] if e.get("token") is not None]
                self._json(200, {**events[-1], "text": text, "tokens": tokens})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Conversation-Id", job.conversation_id)
            self.end_headers()
            try:
                for event in iter(job.events.get, None):
                    data = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                job.cancelled.set()  # the row stops at its next token; the conversation keeps what was generated

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve an export over HTTP: POST /generate with a conversation_id.")
    ap.add_argument("export_dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    ap.add_argument("--backend", default="ort-cpu", choices=["ort-cpu", "ort-cuda", "trt"])
    ap.add_argument("--slots", type=int, default=4, help="conversations decoded together (batch rows)")
    ap.add_argument("--cache-mib", type=float, default=256, help="memory for the states of idle conversations")
    ap.add_argument("--max-new-tokens-limit", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()

    try:
        decoder = StatefulDecoder(args.export_dir, args.backend, batch_size=args.slots, threads=args.threads)
        cache = StateCache(max(1, int(args.cache_mib * 2**20)))
    except GlaExportError as e:
        sys.exit(f"server: {e}")
    if cache.max_bytes < decoder.state_nbytes:
        sys.exit(f"server: --cache-mib {args.cache_mib} holds no conversation "
                 f"(one state is {decoder.state_nbytes} bytes)")
    scheduler = Scheduler(decoder, cache, args.slots)
    scheduler.start()
    info = {"backend": args.backend, "runtime": decoder.runtime_name, "slots": args.slots,
            "state_bytes": decoder.state_nbytes, "cache_conversations": cache.max_bytes // decoder.state_nbytes}
    handler = make_handler(scheduler, cache, info, args.max_new_tokens_limit)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"listening on http://{args.host}:{server.server_port} ({decoder.runtime_name}, {args.slots} slots, "
          f"room for {info['cache_conversations']} idle conversations)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
