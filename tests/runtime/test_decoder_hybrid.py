"""StatefulDecoder on hybrid exports (issue 13): an all-windowed hybrid (fixed-size KV caches and
the position state) decodes on ort-cpu with PyTorch's logits, and so does a hybrid with a
full-attention layer (a KV cache that grows by one slot per token)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import StatefulDecoder
from gla_export.testing import ort_gqa_problem, rel_err

TOL = 1e-5
WINDOWED = dict(vocab_size=258, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True, initializer_range=0.3,
                hidden_size=64, num_hidden_layers=3, num_heads=2, use_short_conv=True,
                attn=[dict(layers=[0], num_heads=4, num_kv_heads=2, window_size=5, qkv_bias=True),
                      dict(layers=[2], num_heads=2, window_size=2)])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export_both_forms(config: dict, tmp_path_factory, prefix: str):
    """The model of ``config`` (seed 0) and its exports in both GLA forms, and the decomposed one with
    ONNX Runtime's GroupQueryAttention (``"gqa"``): ``(model, {form: dir})``."""
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**config)).eval()
    out = {}
    for form in ("decomposed", "custom", "gqa"):
        gla_op, attention_op = ("decomposed", "gqa") if form == "gqa" else (form, "decomposed")
        res = export_model(model, tmp_path_factory.mktemp(f"{prefix}-{form}"), gla_op=gla_op, attention_op=attention_op,
                           validate=False, progress=False)
        out[form] = res.out_dir
    return model, out


def _batch_equals_each_row_alone(path, max_new_tokens: int):
    """Greedy generation of three prompts as one padded batch on ort-cpu gives each row the tokens
    it gets alone; the decoder and the batch's results."""
    prompts = ["A", "In the beginning", "Hello, world"]
    dec = StatefulDecoder(path, "ort-cpu", threads=1)
    batch = dec.generate(prompts, max_new_tokens=max_new_tokens).run()
    for i, p in enumerate(prompts):
        alone = StatefulDecoder(path, "ort-cpu", threads=1).generate(p, max_new_tokens=max_new_tokens).run()[0]
        assert batch[i].tokens == alone.tokens, f"row {i} ({p!r})"
    return dec, batch


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return _export_both_forms(WINDOWED, tmp_path_factory, "hybrid")


@pytest.mark.parametrize("form", ["decomposed", "custom", "gqa"])
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


@pytest.mark.parametrize("form", ["decomposed", "gqa"])
def test_windowed_hybrid_padded_batch_and_restore(windowed, form):
    _, paths = windowed
    dec, batch = _batch_equals_each_row_alone(paths[form], 10)
    # a saved conversation (KV caches and position included) continues identically in a fresh decoder
    cont = dec.generate(states=[batch[1].state], prompts=[" and"], max_new_tokens=6).run()[0]
    again = StatefulDecoder(paths[form], "ort-cpu", threads=1)
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


FULL = {**WINDOWED, "attn": [dict(layers=[0], num_heads=4, num_kv_heads=2), dict(layers=[2], num_heads=2, window_size=3)]}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Layer 0 full attention (a growing KV cache), layer 2 windowed, layer 1 GLA."""
    return _export_both_forms(FULL, tmp_path_factory, "full")


@pytest.mark.parametrize("form", ["decomposed", "custom", "gqa"])
def test_full_attention_hybrid_decodes_with_pytorch_logits(full, form):
    """Prefill then steps on ort-cpu: PyTorch's logits at every position, the caches one slot
    longer per token, and a snapshot holds the row's keys exactly as PyTorch's cache."""
    model, paths = full
    dec = StatefulDecoder(paths[form], "ort-cpu", threads=1)
    rng = np.random.default_rng(3)
    ids = [256, *rng.integers(0, 256, 8).tolist()]
    more = rng.integers(0, 258, 7).tolist()
    with torch.no_grad():
        out = model(torch.tensor([ids + more]))
    ref = out.logits[0]
    got = dec.prefill([ids])
    assert rel_err(torch.from_numpy(got[0]), ref[len(ids) - 1]) < TOL and dec.kv_length == len(ids)
    for j, tok in enumerate(more):
        got = dec.step([tok])
        assert rel_err(torch.from_numpy(got[0].copy()), ref[len(ids) + j]) < TOL, f"step {j}"
    assert dec.kv_length == len(ids) + len(more)
    snap = dec.snapshot(0)
    assert snap.tensors["past_key_values.0.key"].shape == (1, 2, len(ids) + len(more), 16)
    assert rel_err(snap.tensors["past_key_values.0.key"], out.states[0].key) < TOL
    assert rel_err(snap.tensors["past_key_values.0.value"], out.states[0].value) < TOL
    assert dec.state_bytes_per_token == dec.metadata.state_bytes_per_token > 0
    dec.reset()
    assert dec.kv_length == 0


@pytest.mark.parametrize("form", ["decomposed", "gqa"])
def test_full_attention_hybrid_padded_rows_subsets_and_restore(full, form):
    """Rows of different lengths in one padded prefill (short rows' caches zero-extended), a
    prefill of one row while the others wait, a snapshot restored into another row of a fresh
    decoder: every row's logits are those of PyTorch run on that row alone."""
    model, paths = full
    rng = np.random.default_rng(4)
    prompts = [[256, *rng.integers(0, 256, n).tolist()] for n in (3, 11, 6)]
    extra = rng.integers(0, 256, 5).tolist()
    dec = StatefulDecoder(paths[form], "ort-cpu", threads=1, batch_size=3)

    def ref(seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0, -1]

    got = dec.prefill(prompts)
    for r, p in enumerate(prompts):
        assert rel_err(torch.from_numpy(got[r]), ref(p)) < TOL, f"row {r}"
    assert dec.kv_length == 12
    seqs = [list(p) for p in prompts]
    for tok in (5, 77):
        got = dec.step([tok] * 3)
        for r in range(3):
            seqs[r].append(tok)
            assert rel_err(torch.from_numpy(got[r].copy()), ref(seqs[r])) < TOL, f"row {r} after {tok}"
    # row 0 alone reads more (the others' caches grow with zeros on the left, masked)
    got = dec.prefill([extra], rows=[0])
    seqs[0] += extra
    assert rel_err(torch.from_numpy(got[0]), ref(seqs[0])) < TOL and dec.kv_length == 14 + len(extra)
    got = dec.step([9, 9, 9])
    for r in range(3):
        seqs[r].append(9)
        assert rel_err(torch.from_numpy(got[r].copy()), ref(seqs[r])) < TOL, f"row {r} after the subset prefill"
    snap = dec.snapshot(2)
    assert snap.tensors["past_key_values.0.key"].shape[2] == len(seqs[2])
    # a shorter conversation restored next to a longer one, in a fresh decoder
    again = StatefulDecoder(paths[form], "ort-cpu", threads=1, batch_size=2)
    again.prefill([prompts[1] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], rows=[0])
    again.restore(1, snap)
    got = again.step([42, 42])
    assert rel_err(torch.from_numpy(got[1].copy()), ref(seqs[2] + [42])) < TOL
    assert rel_err(torch.from_numpy(got[0].copy()), ref(prompts[1] + list(range(1, 13)) + [42])) < TOL
    # resetting the longest row shortens the caches to the longest left
    again.reset([0])
    assert again.kv_length == len(seqs[2]) + 1


def test_full_attention_hybrid_generate_and_state_file(full, tmp_path):
    """Batched greedy generation equals each row alone; a state file with growing caches
    continues exactly in a fresh decoder."""
    from gla_export.runtime.state import load_state, save_state

    _, paths = full
    dec, batch = _batch_equals_each_row_alone(paths["decomposed"], 8)
    st = batch[1].state  # its size: the fixed part and bytes_per_token per token of its context
    seen = int(st.tensors["past_key_values.position"][0])
    assert st.nbytes == dec.state_nbytes + dec.state_bytes_per_token * seen and seen > 8
    path = save_state(tmp_path / "conv.glastate", st, dec.metadata)
    loaded = load_state(path, dec.identity)
    a = dec.generate(states=[batch[1].state], prompts=[" and"], max_new_tokens=5).run()[0]
    b = StatefulDecoder(paths["decomposed"], "ort-cpu", threads=1).generate(states=[loaded], prompts=[" and"],
                                                                            max_new_tokens=5).run()[0]
    assert a.tokens == b.tokens and len(a.tokens) == 5


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


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["decomposed", "custom", "gqa"])
def test_full_attention_hybrid_on_ort_cuda_matches_cpu(full, form):
    """ort-cuda: the growing caches stay on the device, stepped without CUDA graphs (and said so);
    logits and greedy tokens as on the CPU, with a padded batch and a row prefilled alone."""
    if form == "gqa" and ort_gqa_problem():
        pytest.skip(ort_gqa_problem())
    _, paths = full
    cpu = StatefulDecoder(paths[form], "ort-cpu", threads=1, batch_size=2)
    gpu = StatefulDecoder(paths[form], "ort-cuda", batch_size=2)
    assert not gpu.cuda_graph and "change shape every step" in gpu.cuda_graph_off
    prompts = [[256, 1, 2, 3, 4, 5, 6, 7], [256, 9]]
    a, b = cpu.prefill(prompts), gpu.prefill(prompts)
    assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < TOL
    for tok in range(12):
        a, b = cpu.step([tok, tok + 1]).copy(), gpu.step([tok, tok + 1]).copy()
        assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < TOL, f"step {tok}"
    assert all(t.device.type == "cuda" for t in gpu._kv.values()) and gpu.kv_length == cpu.kv_length == 20
    a, b = cpu.prefill([[3, 4, 5]], rows=[1]), gpu.prefill([[3, 4, 5]], rows=[1])
    assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < TOL
    cpu.reset(), gpu.reset()
    assert cpu.generate("Hi", max_new_tokens=16).run()[0].tokens == gpu.generate("Hi", max_new_tokens=16).run()[0].tokens


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["decomposed", "custom", "gqa"])
def test_windowed_hybrid_captured_steps_equal_uncaptured(windowed, form):
    """An all-windowed hybrid's states (KV caches of W slots, the position) have fixed sizes, so
    ort-cuda replays its step as CUDA graphs: the same logits and states as uncaptured steps,
    bitwise, past both windows, at two batch sizes (the second replays a padded graph), and the
    same tokens through device sampling."""
    if form == "gqa" and ort_gqa_problem():
        pytest.skip(ort_gqa_problem())
    _, paths = windowed
    cap = StatefulDecoder(paths[form], "ort-cuda", batch_size=3, cuda_graph=True)
    ref = StatefulDecoder(paths[form], "ort-cuda", batch_size=3, cuda_graph=False)
    assert cap.cuda_graph, cap.cuda_graph_off
    prompts = [[256, 1, 2, 3], [256, 4], [256, 5, 6, 7, 8, 9, 10, 11]]
    assert np.array_equal(cap.prefill(prompts), ref.prefill(prompts))
    rng = np.random.default_rng(0)
    for step in range(24):  # past the windows (5 and 2) many times over, both graphs of the pair
        toks = rng.integers(0, 258, 3).tolist()
        assert np.array_equal(cap.step(toks), ref.step(toks)), step
    for name, t in cap._states[cap._cur].items():
        assert torch.equal(t, ref._states[ref._cur][name]), name
    for dec in (cap, ref):
        dec.resize(2)  # a captured graph of 2 rows (CAPTURE_SIZES)
    a = cap.generate(["In the", "And"], max_new_tokens=20, ignore_eos=True).run()
    b = ref.generate(["In the", "And"], max_new_tokens=20, ignore_eos=True).run()
    assert [r.tokens for r in a] == [r.tokens for r in b]
    dev = StatefulDecoder(paths[form], "ort-cuda", batch_size=2, cuda_graph=True, sample_on_device=True)
    c = dev.generate(["In the", "And"], max_new_tokens=20, ignore_eos=True).run()
    assert [r.tokens for r in c] == [r.tokens for r in b]
