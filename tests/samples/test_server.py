"""samples/: the HTTP service (started as a user would, talked to with httpx on loopback) and
the minimal onnxruntime-only script."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import StatefulDecoder

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GLAConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, use_short_conv=True,
                       bos_token_id=256, eos_token_id=257, tie_word_embeddings=True, initializer_range=0.3)
    return GLAForCausalLM(config).eval()


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    return export_model(model, tmp_path_factory.mktemp("server") / "export", gla_op="decomposed", validate=False,
                        progress=False).out_dir


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    """The service in a child process on a free loopback port: (base URL, process)."""
    log = tmp_path_factory.mktemp("server-log") / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe nobody reads: the server must never block on it
        proc = subprocess.Popen([sys.executable, str(SAMPLES / "server.py"), str(export_dir), "--port", "0",
                                 "--slots", "2", "--threads", "1", "--cache-mib", "1"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env())
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {log.read_text()[-3000:]}")
    url = line.split()[2]
    yield url, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "decoding failed" not in log.read_text(), log.read_text()[-3000:]


def generate(url: str, conversation_id: str | None, prompt: str, n: int = 16, **kw) -> tuple[list[int], str, dict]:
    """Stream one answer: (tokens, text, the final event)."""
    body = {"prompt": prompt, "max_new_tokens": n, **kw}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    tokens, text, final = [], "", None
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["content-type"] == "application/x-ndjson"
        import json

        for line in r.iter_lines():
            event = json.loads(line)
            assert "error" not in event, event
            if event.get("done"):
                final = event
            else:
                if event["token"] is not None:
                    tokens.append(event["token"])
                text += event["text"]
    assert final is not None
    return tokens, text, final


def test_interleaved_conversations_keep_their_own_state(server, export_dir):
    url, _ = server
    a1, _, fa1 = generate(url, "alice", "In the beginning")
    b1, _, fb1 = generate(url, "bob", "Hello")
    a2, _, fa2 = generate(url, "alice", " and then")
    b2, _, fb2 = generate(url, "bob", "!")
    assert (fa1["resumed"], fb1["resumed"], fa2["resumed"], fb2["resumed"]) == (False, False, True, True)
    # BOS + prompt, the 16 tokens of the first answer, the second prompt, 15 of the second answer (its last is pending)
    assert fa2["generated"] == 32 and fa2["context_tokens"] == 1 + len("In the beginning") + 16 + len(" and then") + 15
    # the same conversations, one after the other this time
    r1, _, _ = generate(url, "alice-again", "In the beginning")
    r2, _, _ = generate(url, "alice-again", " and then")
    s1, _, _ = generate(url, "bob-again", "Hello")
    s2, _, _ = generate(url, "bob-again", "!")
    assert (r1, r2, s1, s2) == (a1, a2, b1, b2)
    # and the state is what makes the difference: a new conversation with the second prompt answers otherwise
    fresh, _, _ = generate(url, None, " and then")
    assert fresh != a2
    # against the library: alice's whole text decoded in one go
    dec = StatefulDecoder(export_dir, threads=1)
    ids = dec.encode("In the beginning") + a1 + list(b" and then")
    whole = dec.generate(prompt_ids=ids, max_new_tokens=16, ignore_eos=True).run()[0].tokens
    agree = next((j for j, (x, y) in enumerate(zip(whole, a2, strict=True)) if x != y), len(a2))
    assert agree >= 8, (whole, a2)  # prefill-vs-step rounding may part a near tie late, never early


def test_concurrent_streams_are_batched_and_independent(server):
    url, _ = server
    ref = {cid: generate(url, f"{cid}-ref", prompt, n=40)[0] for cid, prompt in (("c1", "Abc"), ("c2", "The quick brown fox"))}
    got, errors = {}, []

    def client(cid: str, prompt: str) -> None:
        try:
            got[cid] = generate(url, cid, prompt, n=40)[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=a) for a in (("c1", "Abc"), ("c2", "The quick brown fox"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == ref


def test_sampling_options_and_non_streaming(server):
    url, _ = server
    body = {"prompt": "x", "max_new_tokens": 12, "temperature": 1.0, "top_k": 20, "seed": 3, "stream": False}
    a = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    b = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 12 and a["conversation_id"] != b["conversation_id"]
    assert a["finish_reason"] == "length" and isinstance(a["text"], str)


def test_bad_requests_are_answered_400(server):
    url, _ = server
    for body, message in ((b"{not json", "not JSON"), (b'{"prompt": 5}', "prompt must be a string"),
                          (b'{"max_new_tokens": 0}', "max_new_tokens"), (b'{"top_p": 2}', "top_p"),
                          (b'{"promt": "x"}', "unknown fields")):
        r = httpx.post(f"{url}/generate", content=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    assert httpx.get(f"{url}/nowhere", timeout=30).status_code == 404


def test_health_stats_and_forgetting_a_conversation(server):
    url, _ = server
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["slots"] == 2 and health["backend"] == "ort-cpu"
    generate(url, "forget-me", "Hi", n=4)
    assert httpx.get(f"{url}/stats", timeout=30).json()["cache"]["conversations"] >= 1
    assert httpx.delete(f"{url}/conversations/forget-me", timeout=30).json() == {"deleted": True}
    assert httpx.delete(f"{url}/conversations/forget-me", timeout=30).status_code == 404
    assert generate(url, "forget-me", "Hi", n=4)[2]["resumed"] is False


def test_minimal_script_matches_the_decoder(export_dir):
    out = subprocess.run([sys.executable, str(SAMPLES / "minimal_ort_step.py"), str(export_dir), "--prompt", "Hello",
                          "--max-new-tokens", "20", "--threads", "1", "--print-ids"],
                         capture_output=True, text=True, timeout=120, env=env())
    assert out.returncode == 0, out.stderr
    got = [int(x) for x in out.stdout.split()]
    # the script reads the prompt token by token through step.onnx: the same calls as step()
    dec = StatefulDecoder(export_dir, threads=1)
    logits = None
    for t in dec.encode("Hello"):
        logits = dec.step([t])
    ref = []
    for _ in range(20):
        tok = int(logits[0].argmax())
        if tok == dec.eos_token_id:
            break
        ref.append(tok)
        logits = dec.step([tok])
    assert got == ref and len(ref) > 0
