"""gla-export serve on hybrid exports (issue 13): a hybrid whose attention layers are all windowed
(fixed-size KV caches and the int64 position in each slot) serves the decoder's greedy tokens; one
with a full-attention layer (a growing cache) serves within ``--max-context`` tokens per slot, and
is refused in one line without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_scheduler import Harness, tokens

from gla_export.errors import ModelError
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import StatefulDecoder
from gla_export.serve import backend

BASE = dict(vocab_size=258, hidden_size=64, num_hidden_layers=3, num_heads=2, use_short_conv=True, bos_token_id=256,
            eos_token_id=257, tie_word_embeddings=True, initializer_range=0.3)


def _export(tmp_path, attn):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**BASE, attn=attn)).eval()
    return export_model(model, tmp_path / "out", gla_op="decomposed", validate=False, progress=False).out_dir


def test_windowed_hybrid_serves_the_decoders_tokens(tmp_path):
    out = _export(tmp_path, [dict(layers=[0], num_heads=4, num_kv_heads=2, window_size=4),
                             dict(layers=[2], num_heads=2, window_size=2)])
    prompts = ["In the beginning", "x", "Hello there"]
    dec = StatefulDecoder(out, threads=1)
    want = [dec.generate(p, max_new_tokens=12, ignore_eos=True).run()[0].tokens for p in prompts]
    with Harness(out) as h:
        got = [tokens(ev) for ev in h.run(prompts, n=12)]
    assert got == want


FULL = dict(layers=[1], num_heads=2)


def test_full_attention_hybrid_serves_the_decoders_tokens_within_max_context(tmp_path):
    out = _export(tmp_path, [FULL, dict(layers=[2], num_heads=2, window_size=3)])
    prompts = ["In the beginning", "x", "Hello there, how are you?", "abc", "The quick brown fox"]
    dec = StatefulDecoder(out, threads=1)
    want = [dec.generate(p, max_new_tokens=12, ignore_eos=True).run()[0].tokens for p in prompts]
    # 5 requests over 3 slots, prompts read 4 tokens at a time beside the decoding rows
    with Harness(out, slots=3, prefill_chunk=4, token_budget=10, max_context=64) as h:
        assert h.graphs.slot_nbytes() > 3 * 64 * h.graphs.kv_token_nbytes > 0
        got = [tokens(ev) for ev in h.run(prompts, n=12)]
        assert got == want
        # a follow-up turn starts from the cached state (caches included) and reads only its new tokens
        first = h.graphs.tokenizer.encode(prompts[0]) + want[0][:11]
        (ev,) = h.run([first + list(b" and")], n=6)
        assert ev[-1]["usage"]["cached_tokens"] == len(first)
        whole = dec.generate(prompt_ids=first + list(b" and"), max_new_tokens=6, ignore_eos=True).run()[0].tokens
        assert tokens(ev) == whole
        # at the maximum context the answer ends with "length"; a longer prompt is refused
        (ev,) = h.run([[256, *range(1, 60)]], n=20)
        assert ev[-1]["finish_reason"] == "length" and len(tokens(ev)) == 64 - 60 + 1
        (ev,) = h.run([[256, *range(1, 70)]], n=2)
        assert ev[-1]["status"] == 400 and "--max-context 64" in ev[-1]["message"]


def test_max_context_is_asked_for_only_where_caches_grow(tmp_path, tiny_export):
    out = _export(tmp_path, FULL)
    with pytest.raises(ModelError, match=r"KV caches \(past_key_values\.1\.key, \.\.\.\) grow .* give --max-context"):
        backend.Graphs(out, threads=1)
    with pytest.raises(backend.UsageError, match="--max-context is for hybrid exports with full-attention layers"):
        backend.Graphs(tiny_export, threads=1, max_context=64)


def test_full_attention_slots_round_trip_through_state_files(tmp_path):
    out = _export(tmp_path, FULL)
    g = backend.Graphs(out, threads=1, max_context=32)
    g.allocate(2)
    prompt = np.array([256, *b"A state file"])
    g.prefill([0], [prompt])
    g.step(np.array([7]))
    backend.state_to_file(tmp_path / "s.gla", g.read(0), np.append(prompt, 7), g.identity, g.metadata)
    tensors, key = backend.state_from_file(tmp_path / "s.gla", g.identity)
    assert key.tolist() == [*prompt.tolist(), 7] and tensors["past_key_values.1.key"].shape[2] == len(prompt) + 1
    g.write(1, tensors)
    assert all(torch.equal(a, b) for a, b in zip(g.read(0).values(), g.read(1).values()))
    a, b = g.prefill([0, 1], [np.array([9, 9]), np.array([9, 9])])
    assert np.array_equal(a, b)
    g2 = backend.Graphs(out, threads=1, max_context=8)
    g2.allocate(1)
    with pytest.raises(backend.StateFileError, match=r"do not fit a slot \(--max-context 8\)"):
        g2.write(0, tensors)
