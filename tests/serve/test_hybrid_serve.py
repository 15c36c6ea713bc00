"""gla-export serve on hybrid exports (issue 13): a hybrid whose attention layers are all windowed
(fixed-size KV caches and the int64 position in each slot) serves the decoder's greedy tokens; one
with a full-attention layer (a growing cache, which a fixed-size slot cannot hold) is refused in
one line."""

from __future__ import annotations

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


def test_full_attention_hybrid_is_refused_in_one_line(tmp_path):
    out = _export(tmp_path, dict(layers=[1], num_heads=2))
    with pytest.raises(ModelError, match=r"full-attention KV caches \(past_key_values\.1\.key, \.\.\.\) grow"):
        backend.Graphs(out, threads=1)
