"""``eos_token_id`` as a list (Hugging Face generation configs list several stop ids): the config
check accepts it, so the decoder must too; any of the ids ends a row."""

from __future__ import annotations

import pytest
import torch

from gla_export.errors import ModelError
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import FINISH_EOS, FINISH_LENGTH, StatefulDecoder
from gla_export.runtime.tokenizers import stop_ids

BASE = dict(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_heads=2, bos_token_id=256,
            tie_word_embeddings=True, initializer_range=0.3)


def _export(path, eos):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**BASE, eos_token_id=eos)).eval()
    return export_model(model, path, gla_op="decomposed", validate=False, progress=False).out_dir


@pytest.mark.parametrize("value,ids", [(5, {5}), ([5, 7], {5, 7}), ((7,), {7}), (None, set()), ([], set())])
def test_stop_ids_reads_one_id_or_a_list(value, ids):
    assert stop_ids(value) == frozenset(ids)


@pytest.mark.parametrize("value", ["2", [1, "2"], [True], -1, 2.0])
def test_stop_ids_refuses_anything_else(value):
    with pytest.raises(ModelError, match="eos_token_id must be a token id or a list of token ids"):
        stop_ids(value)


def test_a_list_of_eos_ids_ends_a_row_at_any_of_them(tmp_path):
    prompt = [256, *b"In the beginning"]
    single = StatefulDecoder(_export(tmp_path / "one", 257), threads=1)
    base = single.generate(prompt_ids=prompt, max_new_tokens=16, ignore_eos=True).run()[0].tokens
    j = next(j for j in range(2, 16) if base[j] not in base[:j] and base[j] != 257)  # a token's first appearance
    dec = StatefulDecoder(_export(tmp_path / "list", [257, base[j]]), threads=1)  # int(eos) raised TypeError here
    assert dec.eos_token_ids == {257, base[j]} and dec.eos_token_id == min(257, base[j])
    res = dec.generate(prompt_ids=prompt, max_new_tokens=16).run()[0]
    assert res.finish_reason == FINISH_EOS and res.tokens == base[:j + 1]
    res = dec.generate(prompt_ids=prompt, max_new_tokens=16, ignore_eos=True).run()[0]
    assert res.finish_reason == FINISH_LENGTH and res.tokens == base
    dec.eos_token_id = base[j + 1] if base[j + 1] not in base[:j + 1] else 300  # setting one id replaces the list
    assert dec.eos_token_ids == {dec.eos_token_id}
