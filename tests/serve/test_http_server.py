"""``gla-export serve`` started as a user would (a child process on a free loopback port), talked
to with the official ``openai`` client, httpx and raw sockets. Each finding of issue 14 has a
test here, run while other streams are going, which must finish intact."""

from __future__ import annotations

import json
import os
import signal
import sys
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

MEMORY_LIMIT = 1 << 30


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def cli() -> list[str]:
    return [sys.executable, "-c", "from gla_export.cli import main; main()"]


@contextmanager
def running(export_dir, tmp_path, *args: str):
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([*cli(), "serve", str(export_dir), "--port", "0", "--threads", "1",
                                 "--memory-limit", str(MEMORY_LIMIT), *args],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env())
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {log.read_text()[-3000:]}")
    try:
        yield line.split()[2], proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("the server did not stop within 30 s of SIGTERM")
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    with running(tiny_export, tmp, "--max-slots", "6", "--max-queue", "3", "--max-body-bytes", "1MiB",
                 "--prefill-chunk", "64", "--token-budget", "256", "--model-name", "tiny") as s:
        yield s


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def stream_text(url: str, prompt, n: int, out: dict, key) -> None:
    try:
        chunks = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                extra_body={"ignore_eos": True}, stream=True)
        text, reason = "", None
        for c in chunks:
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        out[key] = (text, reason)
    except Exception as e:  # noqa: BLE001
        out[key] = e


@contextmanager
def bystanders(url: str, n: int = 120):
    """Two streams running while the body of the with-statement misbehaves; they must finish
    with the same text as when run alone."""
    prompts = ["In the beginning", "The quick brown fox"]
    alone = {p: client(url).completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text for p in prompts}
    out: dict = {}
    threads = [threading.Thread(target=stream_text, args=(url, p, n, out, p)) for p in prompts]
    for t in threads:
        t.start()
    yield
    for t in threads:
        t.join(120)
    for p in prompts:
        assert out[p] == (alone[p], "length"), (p, out[p])


def test_openai_client_streaming_and_not(server):
    url, _, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    whole = c.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    assert whole.usage.prompt_tokens == len("In the beginning") + 1
    parts = list(c.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}, stream=True,
                                      stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == 24
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hello"}],
                                     max_tokens=16, temperature=0, stop=[])
    streamed = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Hello"}],
                                         max_tokens=16, temperature=0, stop=[], stream=True)
    deltas = list(streamed)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert chat.choices[0].finish_reason == deltas[-1].choices[0].finish_reason == "length"
    seeded = [c.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=1.0, seed=5,
                                   extra_body={"top_k": 20, "ignore_eos": True}).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_lone_surrogate_is_refused_and_others_finish(server):
    url, _, _ = server
    with bystanders(url):
        r = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 4}')
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
        body = {"model": "tiny", "messages": [{"role": "user", "content": "ok \ud800"}]}
        r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body).encode())
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
        r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "a\\udfff\\ud800b", "stream": true}')
        assert r.status_code == 400, r.text  # streaming requests are refused before any event
    assert client(url).completions.create(model="tiny", prompt="after", max_tokens=2).choices[0].finish_reason


def raw(url: str, head: bytes, body: bytes = b"") -> bytes:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return data


@pytest.mark.parametrize("length", [b"-1", b"abc"])
def test_malformed_content_length_is_answered_400(server, length):
    url, _, _ = server
    with bystanders(url, n=40):
        reply = raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + length + b"\r\n\r\n", b'{"prompt": "x"}')
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


def test_body_limits_and_field_validation(server):
    url, _, _ = server
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    r = httpx.post(f"{url}/v1/completions", content=big)
    assert r.status_code == 413 and "max-body-bytes" in r.json()["error"]["message"]
    chunked = httpx.post(f"{url}/v1/completions", content=iter([big[:600_000], big[600_000:]]))
    assert chunked.status_code == 413
    cases = [
        (b"{not json", "not JSON"), (b"[1]", "JSON object"), (b'{"prompt": 5}', "prompt"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"), (b'{"prompt": "x", "max_tokens": 100000}', "max_tokens"),
        (b'{"prompt": "x", "temperature": -1}', "temperature"), (b'{"prompt": "x", "top_p": 0}', "top_p"),
        (b'{"prompt": "x", "seed": -3}', "seed"), (b'{"prompt": "x", "stop": [1]}', "stop"),
        (b'{"prompt": "x", "n": 2}', "n"), (b'{"prompt": "x", "promt": 1}', "unknown fields"),
        (b'{"prompt": [1, 999999]}', "vocabulary"), (b'{"prompt": "x", "stream": "yes"}', "stream"),
        (b'{"prompt": "x", "logprobs": 3}', "logprobs"), (b'{"prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"prompt": "\xff"}', "UTF-8"),
    ]
    for body, message in cases:
        r = httpx.post(f"{url}/v1/completions", content=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
    chat_cases = [(b'{"messages": []}', "messages"), (b'{"messages": [{"role": "robot", "content": "x"}]}', "role"),
                  (b'{"messages": [{"role": "user", "content": 3}]}', "content")]
    for body, message in chat_cases:
        r = httpx.post(f"{url}/v1/chat/completions", content=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{url}/nowhere").status_code == 404


def test_huge_prompt_is_read_in_bounded_chunks(server):
    url, proc, _ = server
    ps = psutil.Process(proc.pid)
    base = ps.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    before = httpx.get(f"{url}/stats").json()
    prompt = "In the beginning was the Word. " * 30_000  # 930 KB: one piece would take GiBs
    with bystanders(url, n=60):
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2,
                                                                   "stream": True}, timeout=60) as r:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:  # its prefill goes on beside the two streams ...
                time.sleep(0.2)
        # ... and leaving frees its slot
    stop.set()
    watcher.join()
    read = wait_idle(url)["prefill_tokens"] - before["prefill_tokens"]
    assert read > 1000  # it was being read, a chunk at a time
    assert peak[0] < MEMORY_LIMIT and peak[0] - base < 200 * 2**20, (base, peak[0])
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": list(range(200)) * 20_000})
    assert r.status_code in (400, 413)


def wait_idle(url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{url}/stats").json()
        if stats["scheduler"]["running"] == 0 and stats["scheduler"]["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_disconnect_frees_the_slot(server):
    url, _, _ = server
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4000,
                                                               "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_idle(url)
    assert "gla_serve_generations_finished_total{reason=\"cancelled\"}" in httpx.get(f"{url}/metrics").text


def test_cache_stats_and_metrics_count_hits(server):
    url, _, _ = server
    before = httpx.get(f"{url}/stats").json()["cache"]
    c = client(url)
    first = [256, *b"A conversation about caching"]
    # one token: the state cached at its end read exactly the prompt (the token itself is pending;
    # the random model's bytes do not always come back whole through the text, so no longer answers)
    c.completions.create(model="tiny", prompt=first, max_tokens=1, temperature=0)
    r2 = c.completions.create(model="tiny", prompt=first + list(b" and more"), max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(first)
    after = httpx.get(f"{url}/stats").json()
    assert after["cache"]["misses"] >= before["misses"] + 1 and after["cache"]["hits"] >= before["hits"]
    assert after["cache"]["entries"] > 0 and after["cache"]["bytes"] > 0
    text = httpx.get(f"{url}/metrics").text
    for name in ("gla_serve_cache_hits_total", "gla_serve_cache_misses_total", "gla_serve_cache_bytes",
                 "gla_serve_time_to_first_token_seconds_count", "gla_serve_inter_token_latency_seconds_count",
                 "gla_serve_queue_depth", "gla_serve_batch_occupancy_count", "gla_serve_prefill_tokens_saved_total",
                 "gla_serve_requests_total", "gla_serve_generation_tokens_total"):
        assert name in text, name
    hits = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gla_serve_cache_hits_total"))
    assert hits == after["cache"]["hits"]


def test_full_queue_answers_429(server):
    url, _, _ = server
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    streams, codes = [], []
    with httpx.Client(timeout=60) as http:
        try:
            for i in range(12):  # 6 slots + 3 waiting, then 429
                s = http.stream("POST", f"{url}/v1/completions", json=body)
                r = s.__enter__()
                streams.append(s)
                codes.append(r.status_code)
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"
                    break
                if i < 6:  # into a slot before the next arrives (a loaded machine may admit late)
                    wait_for(lambda: httpx.get(f"{url}/stats").json()["scheduler"]["running"] == i + 1, poll=0.01)
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert codes[-1] == 429 and codes.count(200) >= 9, codes
    wait_idle(url)


def test_health_and_readiness(server):
    url, _, _ = server
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["memory"]["limit"] == MEMORY_LIMIT and health["memory"]["slots"] == 6
    assert httpx.get(f"{url}/ready").json() == {"ready": True}


def test_shutdown_finishes_streams_and_the_cache_survives_a_restart(tiny_export, tmp_path):
    cache_dir = tmp_path / "cache"
    prompt = [256, *b"Remember this conversation"]
    with running(tiny_export, tmp_path, "--cache-dir", str(cache_dir), "--drain-timeout", "20") as (url, proc, _):
        c = client(url)
        c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)  # caches `prompt`
        out: dict = {}
        # long enough to be seen decoding: 800 tokens of the tiny model could end between two polls
        t = threading.Thread(target=stream_text, args=(url, "A stream in flight", 4000, out, "s"))
        t.start()
        wait_for(lambda: httpx.get(f"{url}/stats").json()["scheduler"]["decoding"] == 1, poll=0.005)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(timeout=40) == 0
    assert out["s"][1] == "length" and len(out["s"][0]) > 0  # the stream in flight was finished, not cut
    assert any(cache_dir.iterdir())
    with running(tiny_export, tmp_path, "--cache-dir", str(cache_dir)) as (url, _, _):
        r2 = client(url).completions.create(model="tiny", prompt=prompt + [32, 33], max_tokens=2)
        stats = httpx.get(f"{url}/stats").json()["cache"]
    assert stats["disk_hits"] == 1 and r2.usage.prompt_tokens_details.cached_tokens == len(prompt)


def wait_for(cond, timeout: float = 30, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(poll)
