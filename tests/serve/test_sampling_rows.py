"""How the scheduler picks each decoding row's token from a step's logits: greedy rows in one
argmax, sampled rows by their own seeded samplers, or all on the device (``--sample-on-device``,
whose torch code runs on the CPU here too); a row whose logits cannot be sampled fails alone."""

from __future__ import annotations

import threading

import pytest
from test_scheduler import Harness, tokens

from gla_export.runtime.decoder import StatefulDecoder
from gla_export.serve import backend
from gla_export.serve.scheduler import GenParams, Request

PARAMS = [backend.SamplingParams(), backend.SamplingParams(temperature=0.9, seed=5),
          backend.SamplingParams(temperature=1.0, top_k=12, seed=6), backend.SamplingParams(),
          backend.SamplingParams(temperature=0.7, top_p=0.8, seed=7)]
PROMPTS = ["In the beginning", "Hello", "x", "The quick brown fox", "abc"]


def submit_all(h: Harness, prompts, params, n=16):
    subs = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        events, done = [], threading.Event()
        req = Request(str(i), h.graphs.tokenizer.encode(p), GenParams(n, sp, ignore_eos=True),
                      lambda e, ev=events, d=done: (ev.append(e), e["type"] != "token" and d.set()))
        h.sched.submit(req)
        subs.append((req, events, done))
    for _, _, done in subs:
        assert done.wait(60)
    return subs


@pytest.fixture(scope="module")
def reference(tiny_export):
    dec = StatefulDecoder(tiny_export, threads=1)
    return [dec.generate(p, max_new_tokens=16, ignore_eos=True, sampling=sp).run()[0].tokens
            for p, sp in zip(PROMPTS, PARAMS)]


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device-sampler"])
def test_mixed_batches_pick_the_decoders_tokens(tiny_export, reference, on_device):
    with Harness(tiny_export, slots=5) as h:
        h.graphs.sample_on_device = on_device
        subs = submit_all(h, PROMPTS, PARAMS)
    for (req, events, _), want in zip(subs, reference):
        assert tokens(events) == want, req.id
        assert req.sampler.sampled == 16  # one count per token, greedy rows included (state files record it)


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device-sampler"])
def test_a_row_that_cannot_be_sampled_fails_alone(tiny_export, reference, monkeypatch, on_device):
    with Harness(tiny_export, slots=5) as h:
        h.graphs.sample_on_device = on_device
        real = h.graphs.step

        def step(toks):
            logits = real(toks)
            bad = next((i for i, r in enumerate(h.sched.rows[:len(toks)]) if r.id == "2"), None)
            if bad is not None:
                logits[bad] = float("nan")
            return logits

        monkeypatch.setattr(h.graphs, "step", step)
        subs = submit_all(h, PROMPTS, PARAMS)
    for i, ((req, events, _), want) in enumerate(zip(subs, reference)):
        if i == 2:
            assert events[-1]["type"] == "error" and "sampling failed" in events[-1]["message"]
        else:
            assert tokens(events) == want, req.id
