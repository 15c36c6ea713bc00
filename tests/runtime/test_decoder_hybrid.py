"""StatefulDecoder on hybrid exports (issue 13): an all-windowed hybrid (fixed-size KV caches and
the position state) decodes on ort-cpu with PyTorch's logits; a hybrid with a full-attention
layer (a growing cache) is refused with a clear error until the decoder drives growing caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gla_export.errors import ModelError
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import StatefulDecoder
from gla_export.testing import rel_err

TOL = 1e-5
WINDOWED = dict(vocab_size=258, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True, initializer_range=0.3,
                hidden_size=64, num_hidden_layers=3, num_heads=2, use_short_conv=True,
                attn=[dict(layers=[0], num_heads=4, num_kv_heads=2, window_size=5, qkv_bias=True),
                      dict(layers=[2], num_heads=2, window_size=2)])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**WINDOWED)).eval()
    out = {}
    for form in ("decomposed", "custom"):
        res = export_model(model, tmp_path_factory.mktemp(f"hybrid-{form}"), gla_op=form, validate=False, progress=False)
        out[form] = res.out_dir
    return model, out


@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_windowed_hybrid_prefill_and_steps_match_pytorch(windowed, form):
    model, paths = windowed
    dec = StatefulDecoder(paths[form], "ort-cpu", threads=1)
    rng = np.random.default_rng(2)
    ids = [256, *rng.integers(0, 256, 9).tolist()]
    more = rng.integers(0, 258, 12).tolist()  # past both windows
    with torch.no_grad():
        ref = model(torch.tensor([ids + more])).logits[0]
    got = dec.prefill([ids])
    assert rel_err(torch.from_numpy(got[0]), ref[len(ids) - 1]) < TOL
    nbytes = dec.state_nbytes
    for j, tok in enumerate(more):
        got = dec.step([tok])
        assert rel_err(torch.from_numpy(got[0].copy()), ref[len(ids) + j]) < TOL, f"step {j}"
    assert dec.state_nbytes == nbytes  # the same state size at every context length
    snap = dec.snapshot(0)
    assert int(snap.tensors["past_key_values.position"][0]) == len(ids) + len(more)
    with torch.no_grad():
        st = model(torch.tensor([ids + more])).states
    assert rel_err(snap.tensors["past_key_values.0.key"], st[0].key) < TOL
    assert rel_err(snap.tensors["past_key_values.2.value"], st[2].value) < TOL


def test_windowed_hybrid_padded_batch_and_restore(windowed):
    _, paths = windowed
    prompts = ["A", "In the beginning", "Hello, world"]
    dec = StatefulDecoder(paths["decomposed"], "ort-cpu", threads=1)
    batch = dec.generate(prompts, max_new_tokens=10).run()
    for i, p in enumerate(prompts):
        alone = StatefulDecoder(paths["decomposed"], "ort-cpu", threads=1).generate(p, max_new_tokens=10).run()[0]
        assert batch[i].tokens == alone.tokens, f"row {i} ({p!r})"
    # a saved conversation (KV caches and position included) continues identically in a fresh decoder
    cont = dec.generate(states=[batch[1].state], prompts=[" and"], max_new_tokens=6).run()[0]
    again = StatefulDecoder(paths["decomposed"], "ort-cpu", threads=1)
    again.resize(3)
    cont2 = again.generate(states=[batch[1].state], prompts=[" and"], max_new_tokens=6).run()[0]
    assert cont.tokens == cont2.tokens and len(cont.tokens) == 6


def test_windowed_hybrid_state_file_round_trip(windowed, tmp_path):
    """A state file holds the KV caches and the position (int64) and continues exactly."""
    from gla_export.runtime.state import load_state, save_state

    _, paths = windowed
    dec = StatefulDecoder(paths["decomposed"], "ort-cpu", threads=1)
    first = dec.generate("Once upon", max_new_tokens=7).run()[0]
    path = save_state(tmp_path / "conv.glastate", first.state, dec.metadata)
    loaded = load_state(path, dec.identity)
    assert loaded.tensors["past_key_values.position"].dtype == torch.int64
    for name, t in first.state.tensors.items():
        assert torch.equal(loaded.tensors[name], t), name
    a = dec.generate(states=[first.state], prompts=[" a"], max_new_tokens=5).run()[0]
    b = StatefulDecoder(paths["decomposed"], "ort-cpu", threads=1).generate(states=[loaded], prompts=[" a"],
                                                                            max_new_tokens=5).run()[0]
    assert a.tokens == b.tokens


def test_full_attention_hybrid_is_refused_clearly(tmp_path):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**{**WINDOWED, "attn": dict(layers=[1], num_heads=2)})).eval()
    res = export_model(model, tmp_path / "out", gla_op="decomposed", validate=False, progress=False)
    with pytest.raises(ModelError, match=r"past_key_values\.1\.key grows with the context"):
        StatefulDecoder(res.out_dir, "ort-cpu", threads=1)


def test_verify_covers_hybrid_kv_caches(tmp_path):
    """``gla-export verify`` on ort-cpu: a full-attention cache (growing) and a windowed one,
    compared with PyTorch in prefill, step and decode."""
    from gla_export.runtime.verify import verify

    torch.manual_seed(0)
    attn = [dict(layers=[0], num_heads=2), dict(layers=[2], num_heads=4, num_kv_heads=1, window_size=3)]
    model = GLAForCausalLM(GLAConfig(**{**WINDOWED, "attn": attn})).eval()
    model_dir = tmp_path / "model"
    from gla_export.models import save_model

    save_model(model, model_dir)
    res = export_model(model_dir, tmp_path / "out", gla_op="decomposed", validate=False, progress=False)
    rep = verify(res.out_dir, backends=["ort-cpu"], batch=2, prompt_len=9, steps=4, device="cpu")
    assert rep.passed
    outputs = {r.output for r in rep.rows}
    assert {"key", "value", "position"} <= outputs and {r.case for r in rep.rows} == {"prefill", "step", "decode"}
