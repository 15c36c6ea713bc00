"""The server's pool on ONNX Runtime CUDA: the same tokens as the CPU decoder (GPU machine only)."""

from __future__ import annotations

import threading

import pytest
import torch

from gla_export.runtime.decoder import StatefulDecoder

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cuda_graph,on_device", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "cuda-graph", "sample-on-device", "cuda-graph+sample-on-device"])
def test_cuda_pool_batches_like_the_cpu_decoder(tiny_export, cuda_graph, on_device):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    from gla_export.serve import backend
    from gla_export.serve.cache import PrefixCache
    from gla_export.serve.metrics import Metrics
    from gla_export.serve.scheduler import GenParams, Options, Request, Scheduler

    prompts = ["In the beginning", "Hello there, how are you doing today?", "x", "The quick brown fox jumps"]
    dec = StatefulDecoder(tiny_export, threads=1)
    graphs = backend.Graphs(tiny_export, "ort-cuda", cuda_graph=cuda_graph, sample_on_device=on_device)
    assert graphs.sample_on_device == on_device
    sched = Scheduler(graphs, PrefixCache(1 << 24), Options(slots=3, prefill_chunk=5, token_budget=12), Metrics())
    assert graphs.cuda_graph == cuda_graph, graphs.cuda_graph_off  # captured for sizes 1, 2 and 3 at allocate
    assert all(t.device.type == "cuda" for bufs in graphs._bufs for t in bufs.values())
    ptrs = {t.data_ptr() for bufs in graphs._bufs for t in bufs.values()}
    sched.start()
    try:
        results = []
        for p in prompts:
            events, done = [], threading.Event()
            req = Request(p, graphs.tokenizer.encode(p), GenParams(20, backend.SamplingParams(), ignore_eos=True),
                          lambda e, ev=events, d=done: (ev.append(e), e["type"] != "token" and d.set()))
            sched.submit(req)
            results.append((p, events, done))
        for p, events, done in results:
            assert done.wait(120)
            got = [e["token"] for e in events if e["type"] == "token" and e["token"] is not None]
            ref = dec.generate(p, max_new_tokens=20, ignore_eos=True).run()[0].tokens
            agree = next((j for j, (x, y) in enumerate(zip(got, ref)) if x != y), 20)
            assert agree >= 8, (p, got, ref)  # float32 on two devices: a near tie may part late, never early
    finally:
        sched.shutdown(5)
    assert {t.data_ptr() for bufs in graphs._bufs for t in bufs.values()} == ptrs  # the states never moved
