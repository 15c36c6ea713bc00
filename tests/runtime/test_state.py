"""Conversation state: state files (round trip, refusals), model identity, exact resumption,
the LRU state cache and restoring into any batch slot."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from gla_export.errors import UsageError
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime import state as state_mod
from gla_export.runtime.decoder import StatefulDecoder
from gla_export.runtime.sampling import SamplingParams
from gla_export.runtime.state import (
    ConversationState,
    StateCache,
    StateFileError,
    load_state,
    model_identity,
    read_state_header,
    save_state,
    weights_fingerprint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int, **kw) -> GLAForCausalLM:
    torch.manual_seed(seed)
    config = GLAConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_heads=2, bos_token_id=256, eos_token_id=257,
                       tie_word_embeddings=True, initializer_range=0.3, **kw)
    return GLAForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("state-exports")
    a = make_model(0, use_short_conv=True)
    return {
        "a": export_model(a, root / "a", gla_op="decomposed", validate=False, progress=False).out_dir,
        "a-onnx": export_model(a, root / "a-onnx", gla_op="onnx", validate=False, progress=False).out_dir,
        "b": export_model(make_model(1, use_short_conv=True), root / "b", gla_op="decomposed", validate=False, progress=False).out_dir,
    }


def decoder(path, **kw) -> StatefulDecoder:
    return StatefulDecoder(path, "ort-cpu", threads=1, **kw)


def fake_state(identity="x" * 64) -> ConversationState:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "past_key_values.0.recurrent_state": torch.randn(1, 2, 8, 16, generator=g),
        "past_key_values.0.conv_state": torch.randn(1, 48, 3, generator=g).half(),
        "past_key_values.1.recurrent_state": torch.randn(1, 2, 8, 16, generator=g).bfloat16(),
    }
    return ConversationState(identity, tensors, pending_token=42, consumed=17, generated=5,
                             sampler={"seed": 2**63 + 5, "bit_generator": {"state": {"state": 2**127 + 1}}},
                             finish_reason="length", info={"note": "ü"})


# ---- the file format ----------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path):
    st = fake_state()
    path = save_state(tmp_path / "c.state", st)
    back = load_state(path, identity=st.identity)
    assert back.tensors.keys() == st.tensors.keys()
    for name, t in st.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name].view(torch.uint8), t.view(torch.uint8))
    assert (back.pending_token, back.consumed, back.generated, back.finish_reason) == (42, 17, 5, "length")
    assert back.sampler == st.sampler and back.info == {"note": "ü"}
    header = read_state_header(path)
    assert header["format_version"] == state_mod.STATE_FORMAT_VERSION
    assert all(t["offset"] % 64 == 0 for t in header["tensors"])
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed into place


def _rewrite(path, mutate):
    blob = bytearray(path.read_bytes())
    mutate(blob)
    path.write_bytes(bytes(blob))


def test_corrupt_files_are_refused(tmp_path):
    path = save_state(tmp_path / "c.state", fake_state())
    good = path.read_bytes()

    _rewrite(path, lambda b: b.__setitem__(len(b) - 100, b[len(b) - 100] ^ 0x01))  # one bit of tensor data
    with pytest.raises(StateFileError, match="corrupt .*checksum"):
        load_state(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(StateFileError, match="corrupt or truncated"):
        load_state(path)
    path.write_bytes(good[:20])
    with pytest.raises(StateFileError, match="truncated"):
        load_state(path)
    path.write_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(StateFileError, match="not a gla-export state file"):
        load_state(path)
    path.write_bytes(b"")
    with pytest.raises(StateFileError, match="not a gla-export state file"):
        load_state(path)
    with pytest.raises(StateFileError, match="does not exist"):
        load_state(tmp_path / "missing.state")


def test_newer_format_is_refused(tmp_path):
    import hashlib

    path = save_state(tmp_path / "c.state", fake_state())
    blob = bytearray(path.read_bytes()[:-32])
    struct.pack_into("<I", blob, 8, state_mod.STATE_FORMAT_VERSION + 1)
    path.write_bytes(bytes(blob) + hashlib.sha256(blob).digest())
    with pytest.raises(StateFileError, match="newer than this gla-export reads"):
        load_state(path)


def test_inconsistent_header_is_refused_even_with_a_valid_checksum(tmp_path):
    import hashlib

    path = save_state(tmp_path / "c.state", fake_state())
    blob = path.read_bytes()[:-32]
    head_len = struct.unpack_from("<Q", blob, 16)[0]
    header = json.loads(blob[24:24 + head_len])
    header["tensors"][0]["nbytes"] *= 64
    head = json.dumps(header, separators=(",", ":")).encode()
    body = blob[:16] + struct.pack("<Q", len(head)) + head + blob[24 + head_len:]
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(StateFileError, match="does not fit the file"):
        load_state(path)


# ---- identity ----------------------------------------------------------------------------------------


def test_identity_follows_the_weights_not_the_op_form(exports):
    meta = {k: json.loads((exports[k] / "metadata.json").read_text()) for k in exports}
    ids = {k: model_identity(exports[k], meta[k]) for k in exports}
    assert ids["a"] == ids["a-onnx"]  # same weights, another GLA op form: states carry over
    assert ids["a"] != ids["b"]


def test_sampled_fingerprint_of_large_weights_sees_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(state_mod, "FULL_HASH_LIMIT", 1024)
    path = tmp_path / "w.bin"
    data = bytearray(np.random.default_rng(0).bytes(5 * 2**20))
    path.write_bytes(data)
    fp = weights_fingerprint(path)
    assert fp["sampled"] and fp["size"] == len(data)
    data[0] ^= 1
    path.write_bytes(data)
    assert weights_fingerprint(path)["sha256"] != fp["sha256"]


def test_a_state_from_another_model_is_refused(exports, tmp_path):
    a, b = decoder(exports["a"]), decoder(exports["b"])
    st = a.generate("Hello", max_new_tokens=3).run()[0].state
    path = save_state(tmp_path / "a.state", st, a.metadata)
    with pytest.raises(StateFileError, match="belongs to another model .*GLAForCausalLM with 2 layers"):
        load_state(path, identity=b.identity)
    with pytest.raises(StateFileError, match="another model"):
        b.restore(0, st)
    broken = ConversationState(b.identity, dict(st.tensors), 1, 5)
    broken.tensors.pop("past_key_values.1.conv_state")
    with pytest.raises(StateFileError, match="no tensor past_key_values.1.conv_state"):
        b.restore(0, broken)


# ---- exact resumption --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [None, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3)], ids=["greedy", "sampled"])
def test_interrupted_and_resumed_equals_uninterrupted(exports, tmp_path, sampling):
    path = exports["a"]
    whole = decoder(path).generate("In the beginning", max_new_tokens=40, sampling=sampling, ignore_eos=True).run()[0]
    first = decoder(path).generate("In the beginning", max_new_tokens=15, sampling=sampling, ignore_eos=True).run()[0]
    save_state(tmp_path / "c.state", first.state)
    fresh = decoder(path)  # another process, as far as the decoder can tell
    loaded = load_state(tmp_path / "c.state", identity=fresh.identity)
    second = fresh.generate(states=loaded, max_new_tokens=25, ignore_eos=True).run()[0]
    assert first.tokens + second.tokens == whole.tokens
    assert second.state.generated == 40 and second.state.consumed == whole.state.consumed


def test_resuming_in_another_op_form_continues_the_same_conversation(exports):
    """A state is the model's, not the graph's: the onnx-form export continues a decomposed one."""
    a, a2 = decoder(exports["a"]), decoder(exports["a-onnx"])
    whole = a.generate("Hello", max_new_tokens=20).run()[0].tokens
    first = a.generate("Hello", max_new_tokens=8).run()[0]
    second = a2.generate(states=first.state, max_new_tokens=12).run()[0]
    assert first.tokens + second.tokens == whole  # greedy; the two forms agree to ~1e-6


def test_resume_with_a_new_prompt_feeds_pending_token_then_prompt(exports):
    path = exports["a"]
    dec = decoder(path)
    first = dec.generate("Hello", max_new_tokens=6).run()[0]
    second = dec.generate(" world", states=first.state, max_new_tokens=8).run()[0]
    ids = dec.encode("Hello") + first.tokens + list(b" world")
    ref = decoder(path).generate(prompt_ids=ids, max_new_tokens=8).run()[0]
    assert second.tokens == ref.tokens
    assert second.prompt_tokens == 1 + len(" world")


def test_a_state_without_pending_token_needs_a_prompt(exports):
    dec = decoder(exports["a"])
    st = dec.generate("Hi", max_new_tokens=2).run()[0].state
    st.pending_token = None
    with pytest.raises(UsageError, match="no pending token"):
        dec.generate(states=st, max_new_tokens=2).run()


def test_explicit_seed_restarts_the_stream_same_seed_keeps_position(exports):
    dec = decoder(exports["a"])
    p = SamplingParams(temperature=1.0, seed=9)
    whole = dec.generate("x", max_new_tokens=20, sampling=p).run()[0].tokens
    first = dec.generate("x", max_new_tokens=10, sampling=p).run()[0]
    same = dec.generate(states=first.state, max_new_tokens=10, sampling=p).run()[0]
    assert first.tokens + same.tokens == whole
    other = dec.generate(states=first.state, max_new_tokens=10, sampling=SamplingParams(temperature=1.0, seed=10)).run()[0]
    assert other.state.sampler["seed"] == 10


# ---- the cache ----------------------------------------------------------------------------------------------


def _sized(nbytes: int, tag: float = 0.0) -> ConversationState:
    return ConversationState("id", {"s": torch.full((1, nbytes // 4), tag)}, pending_token=1, consumed=1)


def test_cache_evicts_least_recently_used_within_budget():
    cache = StateCache(1000)
    assert cache.put("a", _sized(400)) == []
    assert cache.put("b", _sized(400)) == []
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("c", _sized(400)) == ["b"]
    assert cache.keys() == ["a", "c"] and cache.nbytes == 800
    assert cache.get("b") is None
    assert cache.put("a", _sized(200)) == []  # replacing frees the old entry first
    assert cache.nbytes == 600 and cache.keys() == ["c", "a"]
    assert cache.put("d", _sized(800)) == ["c"]  # 200 + 800 fit exactly
    assert cache.put("e", _sized(800)) == ["a", "d"]
    assert len(cache) == 1 and "e" in cache
    assert cache.stats() == {"conversations": 1, "bytes": 800, "max_bytes": 1000, "hits": 1, "misses": 1, "evictions": 4}
    with pytest.raises(UsageError, match="does not fit a state cache of 1000 bytes"):
        cache.put("f", _sized(1200))
    assert cache.pop("e") is not None and cache.nbytes == 0
    with pytest.raises(UsageError, match="max_bytes"):
        StateCache(0)


def test_cache_restores_into_any_slot(exports):
    """A conversation decoded in slot 0 of one batch continues in slot 2 of another."""
    path = exports["a"]
    dec = decoder(path, batch_size=3)
    prompts = [[256, 1, 2, 3], [256, 7], [256, 9, 9]]
    dec.prefill(prompts)
    dec.step([5, 6, 7])
    cache = StateCache(10 * dec.state_nbytes)
    cache.put("conv-0", dec.snapshot(0, pending_token=11))
    expected = dec.step([11, 0, 0])[0].copy()

    other = decoder(path, batch_size=3)
    other.prefill([[256, 4], [256, 5], [256, 6]])  # other conversations in every slot
    st = cache.get("conv-0")
    other.restore(2, st)
    got = other.step([0, 0, st.pending_token])[2]
    np.testing.assert_array_equal(got, expected)
    assert other.consumed(2) == 4 + 1 + 1
    assert st.nbytes == dec.state_nbytes


def test_cache_is_safe_across_threads():
    import threading

    cache = StateCache(50 * 400)

    def worker(k: int) -> None:
        for i in range(200):
            cache.put(f"{k}-{i % 30}", _sized(400, k))
            cache.get(f"{(k + 1) % 4}-{i % 30}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes == sum(cache.get(k).nbytes for k in cache.keys()) <= cache.max_bytes


def test_save_state_leaves_no_file_when_writing_fails(tmp_path, monkeypatch):
    st = fake_state()
    st.tensors["bad"] = torch.zeros(1, 2, dtype=torch.int8)
    with pytest.raises(UsageError, match="dtype torch.int8"):
        save_state(tmp_path / "c.state", st)
    assert list(tmp_path.iterdir()) == []
    # a failure after the temporary file exists (the final rename): it is removed, and an older
    # file at the destination is left as it was
    (tmp_path / "c.state").write_bytes(b"older")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(state_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path / "c.state", fake_state())
    assert [p.name for p in tmp_path.iterdir()] == ["c.state"] and (tmp_path / "c.state").read_bytes() == b"older"


def test_copy_of_export_keeps_identity(exports, tmp_path):
    path = shutil.copytree(exports["a"], tmp_path / "moved")
    assert decoder(path).identity == decoder(exports["a"]).identity
