"""StatefulDecoder: logits and states against the PyTorch model, left-padded batches, generation,
sampling, tokenizers, backend selection and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gla_export.errors import MissingRuntimeError, UsageError
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import FINISH_EOS, FINISH_INTERRUPTED, FINISH_LENGTH, FINISH_STOP, StatefulDecoder
from gla_export.runtime.sampling import Sampler, SamplingParams
from gla_export.runtime.tokenizers import ByteLevelTokenizer, TextDecoder, load_tokenizer
from gla_export.testing import rel_err

# initializer_range 0.3: a random model whose greedy output wanders over the vocabulary instead
# of repeating one byte, so that token comparisons mean something
MODELS = {
    "plain": dict(hidden_size=64, num_hidden_layers=2, num_heads=2),
    "conv-gqa": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, use_short_conv=True),
}
FORMS = ("decomposed", "onnx", "custom")
TOL = 1e-5  # fp32 export vs the fp32 PyTorch model, relative norm (measured 5e-7 to 1.6e-6 on every form)


def make_model(kind: str, seed: int = 0) -> GLAForCausalLM:
    torch.manual_seed(seed)
    config = GLAConfig(vocab_size=258, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True,
                       initializer_range=0.3, **MODELS[kind])
    return GLAForCausalLM(config).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(model, export dir) per model kind and GLA op form, exported once for the module."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind in MODELS:
        model = make_model(kind)
        for form in FORMS:
            path = export_model(model, root / f"{kind}-{form}", gla_op=form, validate=False, progress=False)
            out[kind, form] = (model, path.out_dir)
    return out


def decoder(path, **kw) -> StatefulDecoder:
    return StatefulDecoder(path, "ort-cpu", threads=1, **kw)


def torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def torch_states(model, ids: list[int]) -> list:
    with torch.no_grad():
        return model(torch.tensor([ids])).states


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_prefill_and_steps_match_pytorch(exports, kind, form):
    model, path = exports[kind, form]
    dec = decoder(path)
    rng = np.random.default_rng(1)
    ids = [256, *rng.integers(0, 256, 12).tolist()]
    more = rng.integers(0, 258, 9).tolist()
    ref = torch_logits(model, ids + more)
    got = dec.prefill([ids])
    assert rel_err(torch.from_numpy(got[0]), ref[len(ids) - 1]) < TOL
    for j, tok in enumerate(more):  # the host copy and the device view (odd steps) in turn
        got = dec.step_on_device([tok])[0].clone() if j % 2 else torch.from_numpy(dec.step([tok])[0].copy())
        assert got.shape == ref[0].shape and rel_err(got.float(), ref[len(ids) + j]) < TOL, f"step {j}"
    snap = dec.snapshot(0)
    for layer, st in enumerate(torch_states(model, ids + more)):
        assert rel_err(snap.tensors[f"past_key_values.{layer}.recurrent_state"], st.recurrent) < TOL
        if st.conv is not None:
            assert rel_err(snap.tensors[f"past_key_values.{layer}.conv_state"], st.conv) < TOL
    assert snap.consumed == len(ids) + len(more)


# Whole-model relative errors over a prefill and 20 steps. Reduced-precision states against the
# PyTorch model carrying its states in that dtype (measured 1.2e-4 for fp16, 2.4e-6 for bf16; against
# the fp32-state model the bf16 rounding alone accumulates to 3e-2); fp16 activations against the fp32
# model (measured 4.5e-3; 1e-2 is the export's own fp16 validation tolerance).
REDUCED = {("fp32", "fp16"): 1e-3, ("fp32", "bf16"): 1e-3, ("fp16", "fp32"): 1e-2}
STATE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def torch_stepped_logits(model, ids: list[int], more: list[int], state_dtype: torch.dtype) -> list[torch.Tensor]:
    """Prefill ``ids`` then step through ``more`` in PyTorch, the states kept in ``state_dtype``."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), states=model.init_states(1, state_dtype=state_dtype))
        logits = [out.logits[0, -1]]
        for t in more:
            out = model(torch.tensor([[t]]), states=out.states)
            logits.append(out.logits[0, -1])
    return logits


@pytest.mark.parametrize("form", ["decomposed", "custom"])
@pytest.mark.parametrize("dtype,state_dtype", list(REDUCED), ids=[f"{a}-state{b}" for a, b in REDUCED])
def test_reduced_precision_exports(exports, tmp_path, form, dtype, state_dtype):
    """fp16 activations, fp16 and bf16 states: bound with their own element types (bfloat16 by its
    ONNX type code) and kept in their own dtype."""
    model, _ = exports["conv-gqa", form]
    path = export_model(model, tmp_path / "e", gla_op=form, dtype=dtype, state_dtype=state_dtype, validate=False,
                        progress=False).out_dir
    dec = decoder(path)
    rng = np.random.default_rng(3)
    ids, more = [256, *rng.integers(0, 256, 12).tolist()], rng.integers(0, 258, 20).tolist()
    ref = torch_stepped_logits(model, ids, more, STATE_DTYPES[state_dtype])
    errs = [rel_err(torch.from_numpy(dec.prefill([ids])[0]), ref[0])]
    errs += [rel_err(torch.from_numpy(dec.step([t])[0].copy()), ref[j + 1]) for j, t in enumerate(more)]
    assert max(errs) < REDUCED[dtype, state_dtype], errs
    assert dec.snapshot(0).tensors["past_key_values.0.recurrent_state"].dtype == STATE_DTYPES[state_dtype]


@pytest.mark.parametrize("kind", list(MODELS))
def test_chunked_prefill_equals_one_piece(exports, kind):
    model, path = exports[kind, "decomposed"]
    ids = [256, *np.random.default_rng(2).integers(0, 256, 40).tolist()]
    ref = torch_logits(model, ids)[-1]
    for chunk in (None, 7, 1):
        got = decoder(path, prefill_chunk=chunk).prefill([ids])[0]
        assert rel_err(torch.from_numpy(got), ref) < TOL, f"prefill_chunk={chunk}"


@pytest.mark.parametrize("kind", list(MODELS))
def test_left_padded_batch_equals_rows_alone(exports, kind):
    model, path = exports[kind, "decomposed"]
    prompts = ["A", "In the beginning", "Hello, world"]  # 2, 17 and 13 tokens with BOS
    dec = decoder(path)
    batch = dec.generate(prompts, max_new_tokens=12).run()
    assert dec.batch_size == 3
    for i, p in enumerate(prompts):
        alone = decoder(path).generate(p, max_new_tokens=12).run()[0]
        assert batch[i].tokens == alone.tokens, f"row {i} ({p!r})"
        assert batch[i].finish_reason == FINISH_LENGTH and len(batch[i].tokens) == 12
        ids = dec.encode(p)
        dec.reset([i])
        assert rel_err(torch.from_numpy(dec.prefill([ids], rows=[i])[0]), torch_logits(model, ids)[-1]) < TOL


def record_graph_calls(dec: StatefulDecoder) -> list[tuple[str, tuple[int, ...]]]:
    """(graph, input_ids shape) of every graph call the decoder makes from now on."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    run = dec._runtime.run

    def recording(graph, feeds, outputs):
        calls.append((graph, tuple(feeds["input_ids"].shape)))
        return run(graph, feeds, outputs)

    dec._runtime.run = recording
    return calls


FIRST = [[256, 10, 20, 30], [256, 40], [256, 50, 60, 70, 80, 90], [256, 7, 8]]
SECOND = [[1, 2, 3, 4, 5], [6], [7, 8], [9, 11, 12, 13, 14, 15, 16]]


def check_rows_continued(dec: StatefulDecoder, model, got: np.ndarray) -> None:
    """Each row's logits and states (recurrent and conv) are those of its whole text run alone."""
    for i, (a, b) in enumerate(zip(FIRST, SECOND)):
        assert rel_err(torch.from_numpy(got[i]), torch_logits(model, a + b)[-1]) < TOL, f"row {i}"
        snap = dec.snapshot(i, device="cpu")
        for layer, st in enumerate(torch_states(model, a + b)):
            assert rel_err(snap.tensors[f"past_key_values.{layer}.recurrent_state"], st.recurrent) < TOL, f"row {i}"
            if st.conv is not None:
                assert rel_err(snap.tensors[f"past_key_values.{layer}.conv_state"], st.conv) < TOL, f"row {i} conv"
        assert snap.consumed == len(a) + len(b)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_continuing_conversations_in_a_padded_batch(exports, kind, form, chunk):
    """Rows holding contexts of different lengths get continuations of different lengths in one
    left-padded prefill (the single token goes through the step graph, as in uninterrupted
    decoding). With chunks of 3, the shorter rows are all padding in the first chunks."""
    model, path = exports[kind, form]
    dec = decoder(path, batch_size=4, prefill_chunk=chunk)
    dec.prefill(FIRST)
    calls = record_graph_calls(dec)
    got = dec.prefill(SECOND)
    padded = [c for c in calls if c[0] == "prefill"]
    assert ("step", (1, 1)) in calls
    assert {shape[0] for _, shape in padded} == {3}, calls  # rows 0, 2 and 3 together
    assert sum(shape[1] for _, shape in padded) == 7, calls
    check_rows_continued(dec, model, got)


def test_exports_older_than_padding_with_past_prefill_continuing_rows_in_groups(exports, tmp_path, monkeypatch):
    """An export written before the metadata had padding_with_past (its graphs let padding take
    slots of the convolution windows) still gives every continued row its own result: rows
    holding a context are prefilled in groups of equal length."""
    from gla_export.export import api, model_graph

    short_conv, build_metadata = model_graph._short_conv, api.build_metadata

    def old_short_conv(b, x, cache, p, c, act, close_pad=None):
        return short_conv(b, x, cache, p, c, act)  # the graphs as they were: no cut

    def old_metadata(*args, **kw):
        meta = build_metadata(*args, **kw)
        del meta["padding_with_past"]
        return meta

    monkeypatch.setattr(model_graph, "_short_conv", old_short_conv)
    monkeypatch.setattr(api, "build_metadata", old_metadata)
    model, _ = exports["conv-gqa", "decomposed"]
    path = export_model(model, tmp_path / "old", gla_op="decomposed", validate=False, progress=False).out_dir
    assert "padding_with_past" not in json.loads((path / "metadata.json").read_text())
    dec = decoder(path, batch_size=4)
    dec.prefill(FIRST)  # zero states: one padded prefill is exact in any export
    calls = record_graph_calls(dec)
    got = dec.prefill(SECOND)
    assert sorted(shape for g, shape in calls if g == "prefill") == [(1, 2), (1, 5), (1, 7)], calls
    check_rows_continued(dec, model, got)


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_generation_follows_pytorch(exports, kind):
    model, path = exports[kind, "custom" if kind == "plain" else "onnx"]
    res = decoder(path).generate("The", max_new_tokens=24).run()[0]
    seq = ByteLevelTokenizer().encode("The")
    for j, tok in enumerate(res.tokens):
        logits = torch_logits(model, seq)[-1]
        top2 = logits.topk(2).values
        if (top2[0] - top2[1]).item() < 1e-4:
            break  # a near tie: either choice is right, and the sequences may part here
        assert tok == int(logits.argmax()), f"token {j}"
        seq.append(tok)
    else:
        assert len(res.tokens) == 24
    assert res.text_bytes == bytes(t for t in res.tokens if t < 256)


def test_stop_tokens_eos_and_interrupt(exports):
    _, path = exports["plain", "decomposed"]
    dec = decoder(path)
    base = dec.generate("x", max_new_tokens=16).run()[0].tokens
    j = next(j for j in range(3, 16) if base[j] not in base[:j])  # a token's first appearance
    res = dec.generate("x", max_new_tokens=16, stop_token_ids=[base[j]]).run()[0]
    assert res.tokens == base[: j + 1] and res.finish_reason == FINISH_STOP
    dec.eos_token_id = base[j]
    res = dec.generate("x", max_new_tokens=16).run()[0]
    assert res.finish_reason == FINISH_EOS and res.tokens[-1] == base[j]
    res = dec.generate("x", max_new_tokens=16, ignore_eos=True).run()[0]
    assert res.tokens == base and res.finish_reason == FINISH_LENGTH
    calls = []
    res = dec.generate("x", max_new_tokens=16, ignore_eos=True, should_stop=lambda: calls.append(1) or len(calls) >= 4).run()[0]
    assert res.tokens == base[:4] and res.finish_reason == FINISH_INTERRUPTED and res.state.pending_token == base[3]


def test_zero_new_tokens_keeps_the_last_prompt_token_pending(exports):
    _, path = exports["conv-gqa", "decomposed"]
    dec = decoder(path)
    full = dec.generate("Hello there", max_new_tokens=10).run()[0].tokens
    primed = dec.generate("Hello there", max_new_tokens=0).run()[0]
    assert primed.tokens == [] and primed.state.pending_token == ord("e") and primed.state.consumed == len("Hello ther") + 1
    resumed = dec.generate(states=primed.state, max_new_tokens=10).run()[0].tokens
    assert resumed == full


def test_events_stream_pieces_in_order(exports):
    _, path = exports["plain", "decomposed"]
    gen = decoder(path).generate(["ab", "cde"], max_new_tokens=5)
    events = list(gen)
    assert [e.row for e in events] == [0, 1] * 5
    for i, r in enumerate(gen.results):
        assert b"".join(e.piece for e in events if e.row == i) == r.text_bytes
        assert [e.token for e in events if e.row == i] == r.tokens


def test_a_paused_generation_blocks_no_other_thread(exports):
    """The decoder's lock is not held across a ``yield``: a Generation abandoned (or paused) by its
    consumer must not block other threads' calls until it is garbage-collected. Once another call
    has changed the buffers, resuming the paused generation is an error, not a decode from
    someone else's states."""
    import threading

    _, path = exports["plain", "decomposed"]
    dec = decoder(path)
    base = dec.generate("x", max_new_tokens=6).run()[0].tokens
    paused = iter(dec.generate("x", max_new_tokens=6))
    assert next(paused).token == base[0]
    got = {}

    def other():
        got["step"] = dec.step([5]).copy()
        got["generate"] = dec.generate("x", max_new_tokens=6).run()[0].tokens

    t = threading.Thread(target=other, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "another thread's step/generate waited for the paused generation"
    assert got["generate"] == base
    with pytest.raises(UsageError, match="interrupted by another call"):
        next(paused)
    # a paused generation that nobody interrupts continues as if it had not paused
    paused = iter(dec.generate("x", max_new_tokens=6))
    first = next(paused)
    assert [first.token] + [e.token for e in paused] == base


# ---- sampling ---------------------------------------------------------------------------------------


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    s = Sampler(SamplingParams())
    assert s.sample(np.array([0.0, 3.0, 1.0, 3.0], np.float32)) == 1
    assert s.sampled == 1


def test_temperature_sampling_follows_softmax():
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5], np.float32)
    for temperature in (0.5, 2.0):
        s = Sampler(SamplingParams(temperature=temperature, seed=7))
        counts = np.bincount([s.sample(logits) for _ in range(8000)], minlength=5) / 8000
        p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        assert np.abs(counts - p).max() < 0.02, (temperature, counts, p)  # ~4 standard errors


def test_top_k_and_top_p_filter():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=1))
    draws = [s.sample(logits) for _ in range(3000)]
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / 3000 - 0.4 / 0.7) < 0.03
    # top_p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.1 and 0.05 never appear
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=2))
    assert set(s.sample(logits) for _ in range(3000)) == {1, 3, 4}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=2))
    assert set(s.sample(logits) for _ in range(3000)) == {1, 3}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=3))
    assert set(s.sample(logits) for _ in range(200)) == {1}


def test_sampler_state_continues_the_same_stream():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    a = Sampler(SamplingParams(temperature=0.9, top_p=0.95, seed=11))
    first = [a.sample(logits) for _ in range(10)]
    state = json.loads(json.dumps(a.state_dict()))  # what a state file stores
    rest = [a.sample(logits) for _ in range(20)]
    b = Sampler.from_state_dict(state)
    assert [b.sample(logits) for _ in range(20)] == rest
    c = Sampler(SamplingParams(temperature=0.9, top_p=0.95, seed=11))
    assert [c.sample(logits) for _ in range(30)] == first + rest
    assert b.sampled == 30


def test_unseeded_samplers_record_their_seed():
    a = Sampler(SamplingParams(temperature=1.0))
    b = Sampler(SamplingParams(temperature=1.0, seed=a.seed))
    logits = np.zeros(100, np.float32)
    assert [a.sample(logits) for _ in range(10)] == [b.sample(logits) for _ in range(10)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2), dict(top_k=1.5),
                                 dict(top_p=0), dict(top_p=1.5), dict(seed=-1)])
def test_bad_sampling_parameters_are_refused(bad):
    with pytest.raises(UsageError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_seeded_generation_is_reproducible(exports):
    _, path = exports["plain", "decomposed"]
    dec = decoder(path)
    params = SamplingParams(temperature=1.0, top_k=40, seed=5)
    a = dec.generate(["x", "y"], max_new_tokens=20, sampling=params).run()
    b = dec.generate(["x", "y"], max_new_tokens=20, sampling=params).run()
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert len(set(a[0].tokens)) > 3  # it did sample


# ---- tokenizers -----------------------------------------------------------------------------------


def test_byte_stream_is_the_bytes_and_utf8_survives_splits():
    tok = ByteLevelTokenizer()
    text = "naïve — ünïcödé ✓"
    ids = tok.encode(text, add_bos=False)
    stream, dec = tok.stream(), TextDecoder()
    pieces = [stream.bytes_for(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert "".join(dec.feed(p) for p in pieces) + dec.flush() == text
    assert tok.stream().bytes_for(256) == b""  # BOS and EOS are not text


def test_tokenizer_json_in_the_export_is_used(exports, tmp_path):
    import tokenizers  # the [serve] extra, also in [test]
    from tokenizers import models, pre_tokenizers

    words = ["<bos>", "<eos>", "hello", "world", "again", "the", "and", "[UNK]"] + [f"w{i}" for i in range(250)]
    hf = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders

    hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    _, src = exports["plain", "decomposed"]
    meta = json.loads((src / "metadata.json").read_text())
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, meta)
    assert tok.kind == "huggingface"
    ids = tok.encode("hello world again", add_bos=False)
    assert ids == [2, 3, 4]
    assert tok.encode("hello", add_bos=True)[0] == meta["model"]["bos_token_id"]
    stream = tok.stream()
    text = b"".join(stream.bytes_for(i) for i in ids) + stream.flush()
    assert text.decode() == tok.decode(ids) == "hello world again"


# ---- selection and errors ---------------------------------------------------------------------------


def test_bad_inputs_name_the_input_and_shape(exports, tmp_path):
    _, path = exports["plain", "decomposed"]
    dec = decoder(path, batch_size=2)
    with pytest.raises(UsageError, match=r"prompt 1 \(row 1\) \(shape \[3\]\) holds token ids \[300\]"):
        dec.prefill([[1, 2], [1, 300, 2]])
    with pytest.raises(UsageError, match="prompt 0 .* is empty"):
        dec.prefill([[], [1]])
    with pytest.raises(UsageError, match="one token per row: got 1 tokens for a batch of 2"):
        dec.step([1])
    with pytest.raises(UsageError, match=r"tokens \(shape \[2\]\) holds token ids \[-1\]"):
        dec.step([1, -1])
    with pytest.raises(UsageError, match=r"rows \[5\] are outside the batch"):
        dec.prefill([[1]], rows=[5])
    with pytest.raises(UsageError, match="max_new_tokens"):
        dec.generate("x", max_new_tokens=-1)
    with pytest.raises(UsageError, match="one entry per row"):
        dec.generate(["a", "b"], prompt_ids=[[1]])
    with pytest.raises(UsageError, match="backend must be one of ort-cpu, ort-cuda, trt"):
        StatefulDecoder(path, "tensorflow")
    with pytest.raises(UsageError, match="not an export directory"):
        StatefulDecoder(tmp_path, "ort-cpu")


def test_ort_cuda_without_a_gpu_is_a_missing_runtime(exports):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("this machine can run ort-cuda (tests/runtime/test_decoder.py::test_ort_cuda_* cover it)")
    _, path = exports["plain", "decomposed"]
    with pytest.raises(MissingRuntimeError, match="ort-cuda"):
        StatefulDecoder(path, "ort-cuda")


def test_trt_backend_explains_what_is_missing(exports, tmp_path):
    import shutil

    _, src = exports["plain", "custom"]
    path = shutil.copytree(src, tmp_path / "export")
    with pytest.raises(UsageError, match="gla-export build"):
        StatefulDecoder(path, "trt")
    (path / "tensorrt").mkdir()
    (path / "tensorrt" / "engines.json").write_text(json.dumps({"runtime": {"module": "tensorrt"}}))
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(MissingRuntimeError, match="`tensorrt`, which is not installed"):
            StatefulDecoder(path, "trt")
    if not torch.cuda.is_available():
        (path / "tensorrt" / "engines.json").write_text(json.dumps({"runtime": {"module": "json"}}))  # an importable stand-in
        from gla_export.runtime import tensorrt as trt_build

        orig = trt_build.available_module
        trt_build.available_module = lambda prefer=None: prefer
        try:
            with pytest.raises(MissingRuntimeError, match="needs a CUDA GPU"):
                StatefulDecoder(path, "trt")
        finally:
            trt_build.available_module = orig


def test_the_onnx_form_leaves_the_process_environment_alone(exports, monkeypatch):
    """ALLOW_RELEASED_ONNX_OPSET_ONLY=0 (opset 27's LinearAttention) is set only while the sessions
    load; the decoder used to leave it set for the whole process."""
    import os

    from gla_export.runtime.session import OPSET_ENV

    monkeypatch.delenv(OPSET_ENV, raising=False)
    _, path = exports["plain", "onnx"]
    assert len(decoder(path).generate("x", max_new_tokens=2).run()[0].tokens) == 2
    assert OPSET_ENV not in os.environ


def test_custom_form_needs_the_library(exports, monkeypatch, tmp_path):
    from gla_export import _native

    _, path = exports["plain", "custom"]
    monkeypatch.setattr(_native, "find_library", lambda kind: None)
    with pytest.raises(MissingRuntimeError, match="decomposed"):
        StatefulDecoder(path, "ort-cpu")


# ---- the trt backend's wiring, on a stand-in for TensorRT -------------------------------------------------


class _FakeTensorRT:
    """Just enough of TensorRT's Python API for TrtRuntime, executing the ONNX graphs with ONNX
    Runtime on CPU buffers read and written through the raw addresses the decoder binds: the
    decoder's shapes, addresses, buffer swaps and prefill chunking are exercised as TensorRT
    would see them (TensorRT itself cannot run on any machine we have)."""

    __version__ = "fake"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class _DType:
        def __init__(self, name):
            self.name = name

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return _FakeTensorRT.Engine(json.loads(blob))

    class Engine:
        def __init__(self, spec):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self.session = ort.InferenceSession(spec["onnx"], so, providers=["CPUExecutionProvider"])
            self.profile = spec["profile"]
            io = [(i, True) for i in self.session.get_inputs()] + [(o, False) for o in self.session.get_outputs()]
            self.io = {t.name: (is_in, t.type) for t, is_in in io}
            self.names = list(self.io)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return _FakeTensorRT.TensorIOMode.INPUT if self.io[name][0] else _FakeTensorRT.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return _FakeTensorRT._DType({"tensor(int64)": "INT64", "tensor(float)": "FLOAT"}[self.io[name][1]])

        def get_tensor_profile_shape(self, name, index):
            return self.profile

        def create_execution_context(self):
            return _FakeTensorRT.Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            (lo_b, lo_t), _, (hi_b, hi_t) = self.engine.profile
            if not (lo_b <= shape[0] <= hi_b) or (len(shape) == 2 and not lo_t <= shape[1] <= hi_t):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def _view(self, ptr, shape, onnx_type):
            import ctypes

            dtype = {"tensor(int64)": np.int64, "tensor(float)": np.float32}[onnx_type]
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)

        def execute_async_v3(self, stream):
            inputs = {n: self._view(self.addresses[n], self.shapes[n], t) for n, (is_in, t) in self.engine.io.items() if is_in}
            outputs = self.engine.session.run(None, {n: v.copy() for n, v in inputs.items()})
            out_names = [(n, t) for n, (is_in, t) in self.engine.io.items() if not is_in]
            for (name, t), value in zip(out_names, outputs, strict=True):
                self._view(self.addresses[name], value.shape, t)[...] = value
            return True


def install_fake_engines(src, dst, monkeypatch, max_batch: int):
    """A copy of the export ``src`` at ``dst`` with 'engines' (JSON pointing at the ONNX graphs; profile:
    batch 1..max_batch, prefill up to 4 tokens) and the stand-in installed as the module that built them.
    Shared with tests/serve/test_trt_serve.py."""
    import shutil
    import sys
    import types

    from gla_export.runtime import tensorrt as trt_build
    from gla_export.runtime.engines import trt as trt_runtime

    path = shutil.copytree(src, dst)
    engines = path / trt_build.ENGINES_DIR
    engines.mkdir()
    (engines / trt_build.INFO_FILE).write_text(json.dumps({"runtime": {"module": "fake_tensorrt"}}))
    for graph, file in trt_build.ENGINE_FILES.items():
        t = 1 if graph == "step" else 4
        (engines / file).write_text(json.dumps({"onnx": str(path / f"{graph}.onnx"), "profile": [[1, 1], [1, t], [max_batch, t]]}))
    module = types.ModuleType("fake_tensorrt")
    for name in ("__version__", "Logger", "TensorIOMode", "Runtime"):
        setattr(module, name, getattr(_FakeTensorRT, name))
    module.get_plugin_registry = lambda: pytest.fail("a decomposed export needs no plugin")
    monkeypatch.setitem(sys.modules, "fake_tensorrt", module)
    monkeypatch.setattr(trt_build, "available_module", lambda prefer=None: prefer)
    monkeypatch.setattr(trt_runtime, "_trt_device", lambda device_id: torch.device("cpu"))
    return path


@pytest.fixture
def fake_trt(exports, tmp_path, monkeypatch):
    """An export with 'engines' (JSON pointing at the ONNX graphs) and the stand-in installed;
    profile: batch 1..2, prefill up to 4 tokens."""
    _, src = exports["conv-gqa", "decomposed"]
    return install_fake_engines(src, tmp_path / "export", monkeypatch, max_batch=2)


def test_trt_backend_wiring_matches_ort(fake_trt):
    trt = StatefulDecoder(fake_trt, "trt", batch_size=2)
    ref = decoder(fake_trt, batch_size=2)
    assert trt.runtime_name == "fake_tensorrt fake" and trt.prefill_chunk == 4  # the profile's longest prefill
    prompts = [[256, *range(1, 11)], [256, 5, 6]]  # 11 tokens: three pieces of at most 4
    assert rel_err(torch.from_numpy(trt.prefill(prompts)), torch.from_numpy(ref.prefill(prompts))) < TOL
    for tok in range(12):  # the step handles alternate between the two state buffers
        a, b = trt.step([tok, 200 - tok]).copy(), ref.step([tok, 200 - tok]).copy()
        assert rel_err(torch.from_numpy(a), torch.from_numpy(b)) < TOL, f"step {tok}"
    a = trt.generate(["In the beginning", "Hi"], max_new_tokens=10).run()
    b = decoder(fake_trt, prefill_chunk=4).generate(["In the beginning", "Hi"], max_new_tokens=10).run()
    assert [r.tokens for r in a] == [r.tokens for r in b]
    with pytest.raises(UsageError, match="exceeds the engines' maximum batch 2"):
        trt.resize(3)


# ---- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_ort_cuda_matches_cpu_and_keeps_states_on_the_device(exports, form):
    model, path = exports["conv-gqa", form]
    cpu, gpu = decoder(path, batch_size=2), StatefulDecoder(path, "ort-cuda", batch_size=2)
    assert all(t.device.type == "cuda" for bufs in gpu._states for t in bufs.values())
    prompts = [[256, 1, 2, 3, 4, 5], [256, 9]]
    a, b = cpu.prefill(prompts), gpu.prefill(prompts)
    assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < TOL
    ptrs = {t.data_ptr() for bufs in gpu._states for t in bufs.values()}
    for tok in range(20):
        a, b = cpu.step([tok, tok + 1]).copy(), gpu.step([tok, tok + 1]).copy()
        assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < TOL, f"step {tok}"
    assert {t.data_ptr() for bufs in gpu._states for t in bufs.values()} == ptrs  # the same two buffers throughout
    assert cpu.generate("Hi", max_new_tokens=16).run()[0].tokens == gpu.generate("Hi", max_new_tokens=16).run()[0].tokens


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_ort_cuda_continues_conversations_in_a_padded_batch(exports, form):
    """The padding cut of the convolution windows (Gather with indices computed from the mask) on
    the CUDA execution provider: the continued rows against PyTorch, as on the CPU."""
    model, path = exports["conv-gqa", form]
    dec = StatefulDecoder(path, "ort-cuda", batch_size=4, prefill_chunk=3)
    dec.prefill(FIRST)
    calls = record_graph_calls(dec)
    got = dec.prefill(SECOND)
    assert {shape[0] for g, shape in calls if g == "prefill"} == {3}, calls
    check_rows_continued(dec, model, got)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["decomposed", "custom"])
# fp16: 1.006e-2 measured on an H200 (cuBLAS fp16 products, a 3-layer GQA+conv model), so 2e-2
@pytest.mark.parametrize("dtype,tol", [("fp16", 2e-2), ("bf16", 5e-2)])
def test_ort_cuda_reduced_precision(exports, tmp_path, form, dtype, tol):
    """fp16 and bf16 activations (bfloat16 runs only on the GPU in ONNX Runtime), fp32 states."""
    model, _ = exports["conv-gqa", form]
    path = export_model(model, tmp_path / "e", gla_op=form, dtype=dtype, validate=False, progress=False).out_dir
    dec = StatefulDecoder(path, "ort-cuda")
    rng = np.random.default_rng(4)
    ids, more = [256, *rng.integers(0, 256, 12).tolist()], rng.integers(0, 258, 20).tolist()
    ref = torch_stepped_logits(model, ids, more, torch.float32)
    errs = [rel_err(torch.from_numpy(dec.prefill([ids])[0]), ref[0])]
    errs += [rel_err(torch.from_numpy(dec.step([t])[0].copy()), ref[j + 1]) for j, t in enumerate(more)]
    assert max(errs) < tol, errs
