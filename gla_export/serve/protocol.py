"""The OpenAI request bodies: validation of every field (an :class:`ApiError` with status 400
and a message naming the field), and the response objects."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from . import backend
from .scheduler import GenParams


class ApiError(Exception):
    """An HTTP error answered in OpenAI's form: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 4096  # per request
    max_prompt_tokens: int = 2_000_000
    vocab_size: int = 0


# fields each endpoint accepts; a few of OpenAI's are accepted only at their neutral value
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
           "presence_penalty", "frequency_penalty", "logit_bias", "user", "ignore_eos", "stop_token_ids", "logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "response_format", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls"}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _bad(name, f"must be a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(name, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {v}")
    return v


def _neutral(body: dict, name: str, ok: tuple) -> None:
    if name in body and body[name] not in ok:
        raise _bad(name, f"is not supported by this server (only {', '.join(map(repr, ok))})")


def check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown fields: {', '.join(unknown)}", param=unknown[0])
    return body


def gen_params(body: dict, limits: Limits, *, chat: bool, default_stop: list[str]) -> tuple[GenParams, bool, bool]:
    """The generation parameters, ``stream`` and ``stream_options.include_usage``."""
    _neutral(body, "n", (1,))
    _neutral(body, "best_of", (1,))
    _neutral(body, "echo", (False,))
    _neutral(body, "suffix", (None, ""))
    _neutral(body, "logprobs", (None, False) if chat else (None, 0))
    _neutral(body, "top_logprobs", (None, 0))
    _neutral(body, "presence_penalty", (0, 0.0))
    _neutral(body, "frequency_penalty", (0, 0.0))
    _neutral(body, "logit_bias", (None, {}))
    _neutral(body, "tools", (None, []))
    _neutral(body, "tool_choice", (None, "none"))
    _neutral(body, "parallel_tool_calls", (None, False, True))
    if "response_format" in body and body["response_format"] not in (None, {"type": "text"}):
        raise _bad("response_format", "only {\"type\": \"text\"} is supported")
    if "user" in body and not isinstance(body["user"], (str, type(None))):
        raise _bad("user", "must be a string")
    if "model" in body and not isinstance(body["model"], (str, type(None))):
        raise _bad("model", "must be a string")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 16 if not chat else min(limits.max_tokens, 256), 1, limits.max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1, 1 << 30)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0 or seed >= 2**63):
        raise _bad("seed", f"must be an integer in [0, 2^63), got {seed!r}")
    stop = body.get("stop")
    if stop is None:
        stops = list(default_stop)
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("stop", "must be a string or a list of strings")
    if len(stops) > 16 or any(len(s) > 256 for s in stops):
        raise _bad("stop", "at most 16 strings of at most 256 characters")
    for s in stops:
        _check_text(s, "stop")
    ids = body.get("stop_token_ids")
    if ids is not None and (not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < limits.vocab_size for t in ids)):
        raise _bad("stop_token_ids", f"must be a list of token ids in [0, {limits.vocab_size})")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "must be true or false")
    stream = body.get("stream", False)
    if not isinstance(stream, (bool, type(None))):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise _bad("stream_options", "must be an object with include_usage")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage", "must be true or false")
    sampling = backend.SamplingParams(temperature=temperature, top_k=max(int(top_k), 0), top_p=top_p, seed=seed)
    return GenParams(max_tokens, sampling, stops, frozenset(ids or ()), ignore_eos), bool(stream), include_usage


def _check_text(text: str, param: str) -> None:
    """Text that UTF-8 cannot encode (a lone surrogate such as "\\ud800") is refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(param, f"is not valid Unicode text: {e.reason} at position {e.start} "
                          f"({text[e.start]!r})") from None


def completion_prompt(body: dict, limits: Limits) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad:
            raise _bad("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
        return prompt
    if prompt is None:
        raise _bad("prompt", "is required")
    raise _bad("prompt", "must be a string, a list of token ids, or a list of one of those (n = 1)")


def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role", f"must be system, developer, user or assistant, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}]", "only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "must be a string or a list of text parts")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise _bad(where, f"unsupported keys {sorted(extra)}")
        _check_text(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def completion_object(rid: str, model: str, text: str, reason: str | None, usage: dict | None,
                      chat: bool, created: int) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = openai_usage(usage)
    return out


def chunk_object(rid: str, model: str, text: str | None, reason: str | None, chat: bool, created: int,
                 first: bool = False) -> dict:
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def openai_usage(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


def now() -> int:
    return int(time.time())
