"""The app in-process (httpx's ASGI transport): error events in a stream, the chat template of
an export's tokenizer_config.json, and the CLI's one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
import torch

from gla_export.serve.app import ServeConfig, Server, create_app
from gla_export.serve.chat import PLAIN_STOP, ChatTemplate


@pytest.fixture(scope="module")
def server(tiny_export):
    s = Server(tiny_export, ServeConfig(threads=1, memory_limit=1 << 30, model_name="tiny"))
    s.start()
    yield s
    s.stop()


async def post(server, path: str, body: dict):
    transport = httpx.ASGITransport(app=create_app(server, served_by="r1"))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(path, json=body)
        return r


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failure_after_the_headers_is_an_error_event(server, monkeypatch, anyio_backend):
    def broken(rows, chunks):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(server.graphs, "prefill", broken)
    r = await post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.headers["x-served-by"] == "r1"
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events == [{"error": {"message": "prefill failed: MemoryError: std::bad_alloc", "type": "server_error",
                                 "param": None, "code": None}}]
    r = await post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})  # not streamed: a status
    assert r.status_code == 500 and "bad_alloc" in r.json()["error"]["message"]
    monkeypatch.undo()
    r = await post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_chat_templates(tmp_path):
    plain = ChatTemplate(tmp_path)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": " Hello."}, {"role": "user", "content": "Again"}]
    assert plain.kind == "plain" and plain.default_stop == [PLAIN_STOP]
    assert plain.render(messages) == "Be kind.\n\nUser: Hi\nAssistant: Hello.\nUser: Again\nAssistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}"}))
    hf = ChatTemplate(tmp_path)
    assert hf.kind == "tokenizer_config.json" and hf.default_stop == []
    assert hf.render(messages[1:2]) == "<s>[user]Hi</s>[assistant]"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ ''.__class__.__mro__ }}"}))
    with pytest.raises(Exception):  # the sandbox refuses what a template must not reach
        ChatTemplate(tmp_path).render(messages)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from gla_export.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tiny_export, tmp_path):
    r = cli("serve", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not an export directory" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = cli("serve", str(tiny_export), "--port", str(busy.getsockname()[1]), "--memory-limit", "1GiB")
    assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr


def test_configurations_that_cannot_serve_are_refused(tiny_export):
    from gla_export.errors import MissingRuntimeError, UsageError

    # trt is served through the engines of `gla-export build` (tests/serve/test_trt_serve.py)
    with pytest.raises(UsageError, match="no TensorRT engines .* run `gla-export build"):
        Server(tiny_export, ServeConfig(backend="trt"))
    with pytest.raises(UsageError, match="--cuda-graph is an ort-cuda option"):
        Server(tiny_export, ServeConfig(cuda_graph=True))
    with pytest.raises(UsageError, match="--sample-on-device needs a GPU backend"):
        Server(tiny_export, ServeConfig(sample_on_device=True))
    if not torch.cuda.is_available():
        with pytest.raises(MissingRuntimeError):
            Server(tiny_export, ServeConfig(backend="ort-cuda"))
    with pytest.raises(UsageError, match="memory-limit"):
        Server(tiny_export, ServeConfig(memory_limit=1 << 20))
