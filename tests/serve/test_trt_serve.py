"""``gla-export serve --backend trt``: the server's pool on TensorRT engines. TensorRT cannot run
on any machine we have (CPU here; the GPU machine's TensorRT-RTX refuses compute capability 9.0),
so the wiring runs on the stand-in of tests/runtime/test_decoder.py (ONNX Runtime behind
TensorRT's Python API, reading and writing the raw addresses the pool binds), and the CLI's
refusals are checked where TensorRT cannot run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_scheduler import Harness, tokens

from gla_export.runtime.decoder import StatefulDecoder
from gla_export.serve import backend

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["In the beginning", "Hello there, how are you doing today?", "x", "The quick brown fox jumps"]


def _test_decoder():
    spec = importlib.util.spec_from_file_location("_gla_test_decoder", ROOT / "tests/runtime/test_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_engines(tiny_export, tmp_path, monkeypatch):
    """The tiny export with 'engines' (JSON naming the ONNX graphs; profile: batch 1..3, prefill
    up to 4 tokens) and the stand-in installed as the module that built them."""
    path = _test_decoder().install_fake_engines(tiny_export, tmp_path / "export", monkeypatch, max_batch=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # TrtRuntime.check: "a GPU is there"
    return path


def test_trt_pool_serves_the_decoders_tokens(fake_engines):
    dec = StatefulDecoder(fake_engines, threads=1)
    want = [dec.generate(p, max_new_tokens=12, ignore_eos=True).run()[0].tokens for p in PROMPTS]
    g = backend.Graphs(fake_engines, "trt")
    assert g.runtime_name == "fake_tensorrt fake" and g.max_rows == 3 and g.max_prefill_tokens == 4
    with pytest.raises(backend.UsageError, match="4 slots exceed the TensorRT engines' maximum batch 3"):
        g.allocate(4)
    with _trt_harness(fake_engines) as h:  # 4 requests over 3 slots, prompts read 4 tokens at a time
        got = [tokens(ev) for ev in h.run(PROMPTS, n=12)]
    assert got == want


def _trt_harness(path) -> Harness:
    h = Harness.__new__(Harness)
    from gla_export.serve.cache import PrefixCache
    from gla_export.serve.metrics import Metrics
    from gla_export.serve.scheduler import Options, Scheduler

    h.graphs = backend.Graphs(path, "trt")
    h.cache, h.metrics = PrefixCache(1 << 24), Metrics()
    h.sched = Scheduler(h.graphs, h.cache, Options(slots=3, prefill_chunk=4, token_budget=12), h.metrics)
    return h


def test_server_caps_the_pool_and_the_chunk_at_the_engines_profile(fake_engines):
    from gla_export.serve.app import ServeConfig, Server

    server = Server(fake_engines, ServeConfig(backend="trt", memory_limit=1 << 40, prefill_chunk=256))
    assert server.plan.slots == 3 and server.scheduler.opt.prefill_chunk == 4


def _serve(args: list[str]) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", "from gla_export.cli import main; main()", "serve", *args],
                          check=False, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
def test_cli_says_in_one_line_why_trt_cannot_serve_here(tiny_export, tmp_path):
    r = _serve([str(tiny_export), "--backend", "trt", "--port", "0"])
    assert r.returncode == 2 and "no TensorRT engines" in r.stderr and "gla-export build" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # engines that a TensorRT module built, on a machine without a GPU
    path = shutil.copytree(tiny_export, tmp_path / "export")
    from gla_export.runtime import tensorrt as trt_build

    (path / trt_build.ENGINES_DIR).mkdir()
    (path / trt_build.ENGINES_DIR / trt_build.INFO_FILE).write_text(json.dumps({"runtime": {"module": "tensorrt_rtx"}}))
    for f in trt_build.ENGINE_FILES.values():
        (path / trt_build.ENGINES_DIR / f).write_bytes(b"")
    r = _serve([str(path), "--backend", "trt", "--port", "0"])
    # MissingRuntimeError (exit 5): no GPU here, or no tensorrt_rtx where it is not installed
    assert r.returncode == 5 and ("needs a CUDA GPU" in r.stderr or "not installed" in r.stderr), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _serve([str(tiny_export), "--cuda-graph", "--port", "0"])
    assert r.returncode == 2 and "--cuda-graph is an ort-cuda option" in r.stderr, r.stderr
    r = _serve([str(tiny_export), "--sample-on-device", "--port", "0"])
    assert r.returncode == 2 and "--sample-on-device needs a GPU backend" in r.stderr, r.stderr
    r = _serve([str(tiny_export), "--engines-dir", str(tmp_path), "--port", "0"])
    assert r.returncode == 2 and "options of --backend trt" in r.stderr, r.stderr
