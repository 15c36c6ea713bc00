"""ExportMetadata of hybrid exports (issue 13): attention layers carry key/value states instead of
a recurrent state, the shared position has layer None, growing caches have no fixed row shape,
and the decoder's buffers take the position as layer -1 and a growing cache's empty shape."""

from __future__ import annotations

import json

import pytest
import torch

from gla_export.errors import ModelError
from gla_export.export import export_model
from gla_export.export.metadata import METADATA_FILE, open_export
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import buffer_specs

BASE = dict(vocab_size=258, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True, hidden_size=32,
            num_hidden_layers=3, num_heads=2, use_short_conv=True)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """Layer 0 full attention (a growing cache), layer 2 windowed (fixed), layer 1 GLA."""
    torch.manual_seed(0)
    attn = [dict(layers=[0], num_heads=2), dict(layers=[2], num_heads=2, window_size=4)]
    model = GLAForCausalLM(GLAConfig(**{**BASE, "attn": attn})).eval()
    return export_model(model, tmp_path_factory.mktemp("meta-hybrid") / "out", gla_op="decomposed", validate=False,
                        progress=False).out_dir


def test_hybrid_states_typed(hybrid):
    meta = open_export(hybrid)
    by_input = {s.input: s for s in meta.states}
    full, win = by_input["past_key_values.0.key"], by_input["past_key_values.2.value"]
    pos = by_input["past_key_values.position"]
    assert full.grows and full.bytes_per_token > 0 and full.window_size is None
    assert full.shape[2] == "past_sequence" and full.output_shape[2] == "present_sequence"
    assert not win.grows and win.window_size == 4 and win.row_shape == (2, 4, 16) and win.output_shape == win.shape
    assert pos.layer is None and pos.kind == "position" and pos.dtype == "int64" and pos.row_shape == ()
    assert by_input["past_key_values.1.recurrent_state"].output_shape == by_input["past_key_values.1.recurrent_state"].shape
    assert meta.state_bytes_per_token == 2 * full.bytes_per_token and meta.attention_layers is not None
    with pytest.raises(ModelError, match="grows with the context"):
        _ = full.row_shape
    specs = {s.name: s for s in buffer_specs(meta)}  # a growing cache: its empty-context shape
    assert specs["past_key_values.0.key"].grows and specs["past_key_values.0.key"].shape == (2, 0, 16)
    assert not specs["past_key_values.2.key"].grows and specs["past_key_values.position"].layer == -1


def test_windowed_hybrid_buffers_take_the_position_as_layer_minus_one(tmp_path):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**{**BASE, "attn": dict(layers=[1], num_heads=2, window_size=3)})).eval()
    out = export_model(model, tmp_path / "out", gla_op="decomposed", validate=False, progress=False).out_dir
    specs = {s.name: s for s in buffer_specs(open_export(out))}
    assert specs["past_key_values.position"].layer == -1 and specs["past_key_values.position"].shape == ()
    assert specs["past_key_values.1.key"].shape == (2, 3, 16) and specs["past_key_values.1.key"].layer == 1


def _edit(export, change):
    meta = json.loads((export / METADATA_FILE).read_text())
    change(meta)
    (export / METADATA_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.__setitem__("states", [s for s in m["states"] if s["input"] != "past_key_values.0.value"]),
     r"no entry for the step graph's inputs \['past_key_values.0.value'\]"),
    (lambda m: m["states"][0].__setitem__("memory", "sometimes"), "memory 'sometimes'"),
], ids=["attention-layer-without-value", "bad-memory"])
def test_damaged_hybrid_metadata(hybrid, tmp_path, damage, message):
    import shutil

    dst = tmp_path / "export"
    shutil.copytree(hybrid, dst)
    _edit(dst, damage)
    with pytest.raises(ModelError, match=message):
        open_export(dst)


def test_attention_layer_needs_key_and_value(hybrid):
    """A layer with a key but no value (and no recurrent state) is a truncated state list."""
    from gla_export.export.metadata import ExportMetadata

    raw = json.loads((hybrid / METADATA_FILE).read_text())
    raw["states"] = [s for s in raw["states"] if s["input"] != "past_key_values.2.value"]
    raw["graphs"]["step"]["inputs"] = [i for i in raw["graphs"]["step"]["inputs"] if i["name"] != "past_key_values.2.value"]
    with pytest.raises(ModelError, match=r"no recurrent state or KV cache for layers \[2\]"):
        ExportMetadata.from_dict(raw)
