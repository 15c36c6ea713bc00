"""samples/: the server started from the library API (as a user would, talked to with httpx on
loopback; gla_export.serve and tests/serve test it in depth) and the minimal onnxruntime-only
script."""

from __future__ import annotations

import os
import subprocess
import sys
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
    """The sample in a child process on a free loopback port: (base URL, process)."""
    pytest.importorskip("fastapi")
    log = tmp_path_factory.mktemp("server-log") / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe nobody reads: the server must never block on it
        proc = subprocess.Popen([sys.executable, str(SAMPLES / "server.py"), str(export_dir), "--port", "0",
                                 "--threads", "1", "--memory-limit-mib", "1024"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env())
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {log.read_text()[-3000:]}")
    yield line.split()[2], proc
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_sample_server_answers_like_the_decoder(server, export_dir):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "In the beginning", "max_tokens": 16, "temperature": 0,
                                                  "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    dec = StatefulDecoder(export_dir, threads=1)
    ref = dec.generate("In the beginning", max_new_tokens=16, ignore_eos=True).run()[0]
    assert body["choices"][0]["text"] == ref.text


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
