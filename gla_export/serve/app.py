"""The HTTP side: an OpenAI-compatible FastAPI app over one :class:`Server`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /health`` (the process and its
scheduler are alive), ``GET /ready`` (accepting requests), ``GET /metrics`` (Prometheus),
``GET /stats`` (JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import backend
from .cache import PrefixCache
from .chat import ChatTemplate
from .config import MiB, ServeConfig
from .metrics import Metrics
from .protocol import (CHAT_FIELDS, COMPLETION_FIELDS, ApiError, Limits, chat_messages, check_fields, chunk_object,
                       completion_object, completion_prompt, gen_params, now, openai_usage)
from .scheduler import Options, QueueFull, Request, Scheduler, ShuttingDown


@dataclass
class MemoryPlan:
    limit: int
    base: int
    cache: int
    prefill: int
    slot: int
    slots: int
    token_budget: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def plan_memory(graphs: backend.Graphs, cfg: ServeConfig) -> MemoryPlan:
    """How the memory bound is shared: what the process holds once the graphs are loaded (the
    base), the prefix cache, the prefill's transient memory (token budget × per-token bytes)
    and the slots, each two states and a logits row plus one token's activations of the step.
    Slots = what is left / slot bytes, at most ``max_slots`` (the widest step worth running)."""
    dev = graphs.device
    if dev.type == "cuda":
        import torch

        base = int(torch.cuda.memory_allocated(dev)) + 2 * graphs.weights_nbytes
    else:
        base = backend.rss_bytes()
    limit = cfg.memory_limit or (base + int(0.8 * backend.available_memory(dev)))
    room = limit - base
    if room <= 0:
        raise backend.UsageError(f"--memory-limit {limit / MiB:.0f} MiB is below what the model itself takes "
                                 f"({base / MiB:.0f} MiB)")
    per_token = graphs.prefill_token_nbytes()
    token_budget = max(16, min(cfg.token_budget, room // 4 // per_token))
    prefill = token_budget * per_token
    slot = graphs.slot_nbytes() + per_token
    cache = cfg.cache_bytes if cfg.cache_bytes is not None else max((room - prefill) // 4, 0)
    slots = min(cfg.max_slots, graphs.max_rows or cfg.max_slots, (room - prefill - cache) // slot)
    if slots < 1:
        raise backend.UsageError(
            f"--memory-limit {limit / MiB:.0f} MiB leaves no room for one state slot ({slot} bytes) after the model "
            f"({base / MiB:.0f} MiB), the prefill ({prefill / MiB:.1f} MiB) and the cache ({cache / MiB:.1f} MiB)")
    return MemoryPlan(limit, base, cache, prefill, slot, int(slots), int(token_budget))


class Server:
    """The model, the pool, the prefix cache and the scheduler of one process."""

    def __init__(self, export_dir: str | os.PathLike, cfg: ServeConfig):
        self.cfg = cfg
        self.export_dir = Path(export_dir)
        self.graphs = backend.Graphs(export_dir, cfg.backend, threads=cfg.threads, device_id=cfg.device_id,
                                     cuda_graph=cfg.cuda_graph, sample_on_device=cfg.sample_on_device,
                                     engines_dir=cfg.engines_dir, plugin=cfg.plugin, max_context=cfg.max_context)
        self.plan = plan_memory(self.graphs, cfg)
        self.cache = PrefixCache(self.plan.cache, directory=cfg.cache_dir, identity=self.graphs.identity,
                                 metadata=self.graphs.metadata, disk_max_bytes=cfg.cache_dir_bytes)
        self.metrics = Metrics()
        # TensorRT's prefill profile bounds a call's tokens per row
        chunk = min(cfg.prefill_chunk, self.graphs.max_prefill_tokens or cfg.prefill_chunk)
        opts = Options(slots=self.plan.slots, max_queue=cfg.max_queue, prefill_chunk=chunk,
                       token_budget=self.plan.token_budget, prefill_share=cfg.prefill_share,
                       snapshot_interval=cfg.snapshot_interval)
        self.scheduler = Scheduler(self.graphs, self.cache, opts, self.metrics)
        self.template = ChatTemplate(self.export_dir)
        self.model_name = cfg.model_name or self.export_dir.resolve().name
        self.limits = Limits(cfg.max_tokens, cfg.max_prompt_tokens, self.graphs.vocab_size)
        self.started = now()
        self._stopped = threading.Event()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Finish (or, past the drain timeout, cancel) what is in flight and persist the cache."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.scheduler.shutdown(self.cfg.drain_timeout)
        self.cache.persist()
        self.cache.close()

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "backend": self.cfg.backend, "runtime": self.graphs.runtime_name,
                "state_bytes": self.graphs.state_nbytes, "memory": self.plan.as_dict(),
                "chat_template": self.template.kind}

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        return {"scheduler": self.scheduler.stats(), "cache": self.cache.stats(),
                "prompt_tokens": m.prompt_tokens._value.get(), "prefill_tokens": m.prefill_tokens._value.get(),
                "prefill_tokens_saved": m.saved_tokens._value.get(),
                "generation_tokens": m.generated_tokens._value.get()}

    def encode(self, prompt: str | list[int]) -> np.ndarray:
        if isinstance(prompt, list):
            ids = prompt
        else:
            try:
                ids = self.graphs.tokenizer.encode(prompt, add_bos=True)
            except backend.GlaExportError as e:
                raise ApiError(400, str(e), param="prompt") from e
            except (UnicodeError, ValueError) as e:
                raise ApiError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from e
        if not ids:
            raise ApiError(400, "the prompt is empty and the tokenizer adds no BOS token", param="prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than --max-prompt-tokens "
                                f"{self.limits.max_prompt_tokens}", param="prompt")
        M = self.graphs.max_context
        if M is not None and len(ids) > M:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than --max-context {M}", param="prompt")
        return np.asarray(ids, dtype=np.int64)


# ---- the ASGI app ------------------------------------------------------------------------------------


class BodyLimit:
    """Refuses a body announced by Content-Length as over ``max_bytes`` (413) before anything
    reads it, and a malformed Content-Length (400); chunked bodies are counted as they are read
    (``read_body``)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, ApiError(400, f"invalid Content-Length {length.decode(errors='replace')!r}"))
            if int(length) > self.max_bytes:
                return await _send_error(send, ApiError(413, f"the body ({int(length)} bytes) is larger than "
                                                             f"--max-body-bytes {self.max_bytes}"))
        await self.app(scope, receive, send)


async def _send_error(send, err: ApiError) -> None:
    data = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def create_app(server: Server, served_by: str | None = None):
    """The ASGI app of ``server``; ``served_by`` (a replica's name) goes into every answer's
    ``X-Served-By`` header and /health."""

    @asynccontextmanager
    async def lifespan(app):
        if not server.scheduler.is_alive():
            server.start()
        yield
        await run_in_threadpool(server.stop)

    app = FastAPI(title="gla-export serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    m = server.metrics

    extra = {"X-Served-By": served_by} if served_by else {}

    def answer(endpoint: str, status: int, body: Any) -> JSONResponse:
        m.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=extra)

    def error(endpoint: str, err: ApiError) -> JSONResponse:
        resp = answer(endpoint, err.status, err.body())
        if err.status == 429:
            resp.headers["Retry-After"] = "1"
        return resp

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(request.url.path, exc)

    @app.get("/health")
    async def health():
        alive = server.scheduler.is_alive()
        return answer("/health", 200 if alive else 503, {"status": "ok" if alive else "dead", **server.info(),
                                                         "served_by": served_by})

    @app.get("/ready")
    async def ready():
        ok = server.scheduler.ready
        return answer("/ready", 200 if ok else 503, {"ready": ok})

    @app.get("/stats")
    async def stats():
        return answer("/stats", 200, server.stats())

    @app.get("/metrics")
    async def metrics():
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return answer("/v1/models", 200, {"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": server.started, "owned_by": "gla-export"}]})

    async def read_body(request: HttpRequest, fields: set[str]) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > server.cfg.max_body_bytes:
                raise ApiError(413, f"the body is larger than --max-body-bytes {server.cfg.max_body_bytes}")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the body is not UTF-8: {e.reason} at byte {e.start}") from None
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        body = check_fields(body, fields)
        model = body.get("model")
        if model not in (None, server.model_name):
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves {server.model_name!r}",
                           param="model", code="model_not_found")
        return body

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_body(request, COMPLETION_FIELDS)
        params, stream, usage = gen_params(body, server.limits, chat=False, default_stop=[])
        prompt = completion_prompt(body, server.limits)
        ids = await run_in_threadpool(server.encode, prompt)
        return await generate(request, "/v1/completions", ids, params, stream, usage, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await read_body(request, CHAT_FIELDS)
        params, stream, usage = gen_params(body, server.limits, chat=True, default_stop=server.template.default_stop)
        messages = chat_messages(body)
        try:
            text = server.template.render(messages)
        except Exception as e:  # noqa: BLE001 - a template's own error
            raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from e
        ids = await run_in_threadpool(server.encode, text)
        return await generate(request, "/v1/chat/completions", ids, params, stream, usage, chat=True)

    hubs: dict[int, _Hub] = {}

    async def next_event(request: HttpRequest, box: _Mailbox, req: Request) -> dict:
        """The scheduler's next event; cancels the request when the client has gone."""
        while True:
            if box.items:
                return box.items.popleft()
            try:
                await asyncio.wait_for(box.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()

    async def generate(request: HttpRequest, endpoint: str, ids: np.ndarray, params, stream: bool,
                       include_usage: bool, *, chat: bool):
        loop = asyncio.get_running_loop()
        hub = hubs.get(id(loop))
        if hub is None:
            hub = hubs[id(loop)] = _Hub(loop)
        box = _Mailbox(hub)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = Request(rid, ids, params, box.put, timeout=server.cfg.request_timeout)
        try:
            server.scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", type="rate_limit_error") from None
        except ShuttingDown as e:
            raise ApiError(503, str(e)) from None
        created, model = now(), server.model_name
        if not stream:
            parts = []
            try:
                event = await next_event(request, box, req)
                while event["type"] == "token":
                    parts.append(event["text"])
                    event = await next_event(request, box, req)
            except BaseException:
                req.cancel()
                raise
            if event["type"] == "error":
                raise ApiError(event["status"], event["message"])
            return answer(endpoint, 200, completion_object(rid, model, "".join(parts), event["finish_reason"],
                                                           event["usage"], chat, created))

        def encode(event: dict) -> tuple[bytes, bool]:
            """An event as SSE bytes, and whether it ends the stream."""
            if event["type"] == "token":
                return (_sse(chunk_object(rid, model, event["text"], None, chat, created)) if event["text"] else b""), \
                    False
            if event["type"] == "done":
                out = _sse(chunk_object(rid, model, None if chat else "", event["finish_reason"], chat, created))
                if include_usage:
                    out += _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": model, "choices": [],
                                 "usage": openai_usage(event["usage"])})
                return out + b"data: [DONE]\n\n", True
            return _sse(ApiError(event["status"], event["message"]).body()) + b"data: [DONE]\n\n", True

        async def events():
            # headers go at once (a long prompt's first token may be minutes away); a failure after
            # this point arrives as an error event, which the openai client raises as an APIError.
            # Events that arrived together leave in one write.
            done = False
            try:
                if chat:
                    yield _sse(chunk_object(rid, model, "", None, chat, created, first=True))
                while not done:
                    if not box.items:
                        await box.wait()
                    out = []
                    while box.items and not done:
                        data, done = encode(box.items.popleft())
                        out.append(data)
                    if out:
                        yield b"".join(out)
            finally:
                if not done:
                    req.cancel()  # the client went away (or the server is stopping): free the slot

        m.requests.labels(endpoint, "200").inc()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid, **extra})

    return BodyLimit(app, server.cfg.max_body_bytes)


class _Hub:
    """Wakes the event loop for events of the scheduler thread: one wake-up for all the events
    that arrive before the loop gets to them (not one per token per stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: set[_Mailbox] = set()
        self.scheduled = False

    def mark(self, box: _Mailbox) -> None:
        with self.lock:
            self.pending.add(box)
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._dispatch)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def _dispatch(self) -> None:
        with self.lock:
            boxes, self.pending, self.scheduled = self.pending, set(), False
        for box in boxes:
            box.event.set()


class _Mailbox:
    """One request's events: appended by the scheduler thread, read by the request's task."""

    def __init__(self, hub: _Hub):
        self.hub = hub
        self.items: deque = deque()
        self.event = asyncio.Event()

    def put(self, event: dict) -> None:
        self.items.append(event)
        self.hub.mark(self)

    async def wait(self) -> None:
        self.event.clear()
        if not self.items:
            await self.event.wait()


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, *, on_listening=None, log_level: str = "warning"):
    """Run ``server`` with uvicorn until SIGINT/SIGTERM; ``on_listening(url)`` once the socket is bound."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        server.stop()
        raise backend.UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    config = uvicorn.Config(create_app(server), log_level=log_level, timeout_graceful_shutdown=server.cfg.drain_timeout,
                            access_log=False, lifespan="on")
    userver = uvicorn.Server(config)
    if on_listening is not None:
        bound = sock.getsockname()[1]
        on_listening(f"http://{host if ':' not in host else f'[{host}]'}:{bound}")
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully: with these
    # handlers in place that is a no-op, and the process exits 0 after a graceful shutdown
    import signal

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        userver.run(sockets=[sock])
    finally:
        server.stop()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return userver


__all__ = ["MemoryPlan", "Server", "ServeConfig", "create_app", "plan_memory", "serve"]
