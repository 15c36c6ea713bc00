"""The server ends a request at any id of a listed ``eos_token_id`` (tests/runtime/test_eos_ids.py
for the decoder)."""

from __future__ import annotations

import torch
from test_scheduler import Harness, tokens

from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import StatefulDecoder


def test_a_listed_eos_id_ends_the_request(tmp_path):
    def export(name, eos):
        torch.manual_seed(0)
        model = GLAForCausalLM(GLAConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                         bos_token_id=256, eos_token_id=eos, tie_word_embeddings=True,
                                         initializer_range=0.3)).eval()
        return export_model(model, tmp_path / name, gla_op="decomposed", validate=False, progress=False).out_dir

    prompt = [256, *b"In the beginning"]
    base = StatefulDecoder(export(tmp_path / "one", 257), threads=1).generate(
        prompt_ids=prompt, max_new_tokens=16, ignore_eos=True).run()[0].tokens
    j = next(j for j in range(2, 16) if base[j] not in base[:j] and base[j] != 257)
    with Harness(export("list", [257, base[j]])) as h:
        (stopped,) = h.run([prompt], n=16, ignore_eos=False)
        (ignored,) = h.run([prompt], n=16)
    assert stopped[-1]["finish_reason"] == "stop" and tokens(stopped) == base[:j + 1]
    assert ignored[-1]["finish_reason"] == "length" and tokens(ignored) == base
