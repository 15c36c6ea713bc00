"""The captured decode step (ONNX Runtime CUDA graphs) and sampling on the device.

CPU: the graph-size choice, padding-row views, option plumbing, and the device sampler's
algorithm against the host sampler (torch on the CPU runs the same code as on the GPU).
GPU: replayed steps against uncaptured ones (bitwise), batch changes without recapture,
save/resume mid-graph, device sampling against host sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gla_export.errors import UsageError
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import CAPTURE_SIZES, StatefulDecoder, capture_size
from gla_export.runtime.device_sampling import sample_on_device
from gla_export.runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("cg")
    torch.manual_seed(0)
    config = GLAConfig(vocab_size=258, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True,
                       initializer_range=0.3, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                       use_short_conv=True)
    model = GLAForCausalLM(config).eval()
    return {form: export_model(model, root / form, gla_op=form, validate=False, progress=False).out_dir
            for form in ("decomposed", "custom")}


# ---- CPU ------------------------------------------------------------------------------------------------


def test_capture_size_picks_the_smallest_graph_that_holds_the_batch():
    assert [capture_size(b) for b in (1, 2, 3, 4, 5, 9, 16, 17, 256)] == [1, 2, 4, 4, 8, 16, 16, 32, 256]
    assert capture_size(300) == 300  # past the last size: a graph of its own
    assert capture_size(3, (8, 2)) == 8
    assert CAPTURE_SIZES == tuple(sorted(CAPTURE_SIZES))


def test_cuda_graph_and_device_sampling_are_gpu_options(exports):
    with pytest.raises(UsageError, match="CUDA-graph capture is an ort-cuda option"):
        StatefulDecoder(exports["decomposed"], "ort-cpu", cuda_graph=True)
    with pytest.raises(UsageError, match="sampling on the device needs a GPU runtime"):
        StatefulDecoder(exports["decomposed"], "ort-cpu", sample_on_device=True)
    dec = StatefulDecoder(exports["decomposed"], "ort-cpu", threads=1, cuda_graph=False, sample_on_device=False)
    assert not dec.cuda_graph and not dec.sample_on_device and dec.cuda_graph_off
    assert "CUDA graph" not in dec.runtime_name


def test_uncaptured_resize_allocates_exactly_the_batch(exports):
    dec = StatefulDecoder(exports["decomposed"], "ort-cpu", threads=1, batch_size=3)
    assert all(t.shape[0] == 3 for st in dec._states for t in st.values())
    assert dec.step([1, 2, 3]).shape == (3, 258)
    assert dec._pools == {}  # nothing is kept without graphs


def test_padded_pool_views_keep_rows_apart(exports, monkeypatch):
    """The captured layout (a pool of capture_size rows, the batch its first rows) on the CPU:
    the batch's logits equal an unpadded decoder's, pools are reused across resizes."""
    path = exports["decomposed"]
    ref = StatefulDecoder(path, "ort-cpu", threads=1, batch_size=3)
    dec = StatefulDecoder(path, "ort-cpu", threads=1, batch_size=1)
    dec.cuda_graph = True  # the decoder's side of capture: pools by capture size (the runtime stays uncaptured)
    dec.resize(3)
    pool = dec._pools[4]
    assert all(t.shape[0] == 3 and t.data_ptr() == pool["states"][0][n].data_ptr()
               for n, t in dec._states[0].items())
    prompts = [[256, 5, 6], [256, 7, 8], [256, 9, 10]]
    np.testing.assert_allclose(dec.prefill(prompts), ref.prefill(prompts), rtol=1e-5, atol=1e-5)
    for tok in range(6):
        np.testing.assert_allclose(dec.step([tok, tok + 1, tok + 2]), ref.step([tok, tok + 1, tok + 2]),
                                   rtol=1e-5, atol=1e-5)
    dec.resize(1)
    dec.resize(4)
    assert dec._pools[4] is pool and set(dec._pools) == {1, 4}
    assert all(float(t.abs().max()) == 0 for st in pool["states"] for t in st.values())  # resize zeroes


def _logits(seed: int, n: int = 6, v: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    x[0, 17] = x[0, 3] = x[0].max() + 1  # a tie: the lower id wins
    return x


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.3, top_k=5, seed=2),
    SamplingParams(temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.5, seed=4),
    SamplingParams(temperature=2.0, top_k=1, seed=5),
]


def test_device_sampler_matches_the_host_sampler_and_its_stream_position():
    host = [Sampler(p) for p in PARAMS]
    dev = [Sampler(p) for p in PARAMS]
    for step in range(25):
        x = _logits(step)
        want = [s.sample(x[i].numpy()) for i, s in enumerate(host)]
        got = sample_on_device(x, dev)
        assert got.tolist() == want, step
    assert want[0] == int(np.argmax(_logits(24)[0].numpy()))
    # row 0 is greedy and unseeded (a fresh seed each): it draws nothing either way
    assert [s.state_dict()["bit_generator"] for s in dev[1:]] == [s.state_dict()["bit_generator"] for s in host[1:]]
    assert [s.sampled for s in dev] == [s.sampled for s in host]


def test_device_sampler_all_greedy_batch_is_the_host_argmax():
    """A batch of greedy rows only (the shortcut: one argmax): the host sampler's tokens, ties to
    the lower id, and each sampler's count advanced."""
    host = [Sampler(SamplingParams()) for _ in range(6)]
    dev = [Sampler(SamplingParams()) for _ in range(6)]
    for step in range(3):
        x = _logits(step)
        want = [s.sample(x[i].numpy()) for i, s in enumerate(host)]
        got = sample_on_device(x, dev)
        assert got.dtype == np.int64 and got.tolist() == want, step
    assert want[0] == 3 and [s.sampled for s in dev] == [s.sampled for s in host] == [3] * 6


def test_device_sampler_skips_inactive_rows_and_refuses_nan():
    s = [Sampler(SamplingParams(temperature=1.0, seed=0)), None]
    before = s[0].rng.bit_generator.state
    out = sample_on_device(_logits(0, n=2), s)
    assert out[1] == 0 and s[0].sampled == 1 and s[0].rng.bit_generator.state != before
    x = _logits(1, n=2)
    x[1] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        sample_on_device(x, [None, Sampler(SamplingParams(temperature=1.0, seed=0))])
    with pytest.raises(UsageError, match="2 rows"):
        sample_on_device(x, [None])


# ---- GPU ------------------------------------------------------------------------------------------------


def _states(dec: StatefulDecoder) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in dec._states[dec._cur].items()}


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_replayed_steps_equal_uncaptured_steps_bitwise(exports, form):
    path = exports[form]
    cap = StatefulDecoder(path, "ort-cuda", batch_size=4, cuda_graph=True)
    ref = StatefulDecoder(path, "ort-cuda", batch_size=4, cuda_graph=False)
    assert cap.cuda_graph, cap.cuda_graph_off
    assert "CUDA graph" in cap.runtime_name and not ref.cuda_graph
    prompts = [[256, 1, 2, 3], [256, 4], [256, 5, 6], [256, 7, 8, 9, 10]]
    assert np.array_equal(cap.prefill(prompts), ref.prefill(prompts))
    rng = np.random.default_rng(0)
    for step in range(64):  # many replays of both graphs of the pair
        toks = rng.integers(0, 258, 4).tolist()
        a, b = cap.step(toks).copy(), ref.step(toks).copy()
        assert np.array_equal(a, b), step
    for n, t in _states(cap).items():
        assert torch.equal(t, ref._states[ref._cur][n]), n


@pytest.mark.gpu
def test_batch_changes_replay_without_recapture(exports):
    path = exports["custom"]
    dec = StatefulDecoder(path, "ort-cuda", batch_size=3, cuda_graph=True)
    ref = StatefulDecoder(path, "ort-cuda", batch_size=3, cuda_graph=False)
    ids_before = dec._runtime._next_graph_id
    for b in (3, 1, 4, 2, 3, 1):
        dec.resize(b)
        ref.resize(b)
        prompts = [[256, 10 + r, 20 + r] for r in range(b)]
        dec.prefill(prompts), ref.prefill(prompts)
        for tok in range(5):
            a, r = dec.step([tok] * b).copy(), ref.step([tok] * b).copy()
            # a padded graph runs more rows than the unpadded reference: cuBLAS may pick another
            # algorithm for M=4 than for M=3, so equal within fp32 rounding, and greedy-equal
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
            assert (a.argmax(-1) == r.argmax(-1)).all()
    assert set(dec._pools) == {1, 2, 4}
    # graphs per pool: two (the swap's directions), bound once, never again
    assert dec._runtime._next_graph_id - ids_before == 2 * (len(dec._pools) - 1)


@pytest.mark.gpu
def test_save_and_resume_mid_graph(exports, tmp_path):
    path = exports["custom"]
    one = StatefulDecoder(path, "ort-cuda", cuda_graph=True, sample_on_device=True)
    full = one.generate("Hello", max_new_tokens=24, ignore_eos=True).run()[0].tokens
    two = StatefulDecoder(path, "ort-cuda", cuda_graph=True, sample_on_device=True)
    first = two.generate("Hello", max_new_tokens=11, ignore_eos=True, snapshot=True).run()[0]
    for _ in range(3):  # other traffic through the same graphs in between, at other batch sizes too
        two.generate(["xyz", "abc", "q"], max_new_tokens=5).run()
        two.generate("xyz", max_new_tokens=5).run()
    rest = two.generate(states=first.state, max_new_tokens=13, ignore_eos=True).run()[0].tokens
    assert len(full) == 24 and first.tokens + rest == full


@pytest.mark.gpu
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"t{p.temperature}k{p.top_k}p{p.top_p}")
def test_device_sampling_gives_the_host_samplers_tokens(exports, params):
    path = exports["custom"]
    dev = StatefulDecoder(path, "ort-cuda", cuda_graph=True, sample_on_device=True)
    host = StatefulDecoder(path, "ort-cuda", sample_on_device=False)
    assert dev.sample_on_device and not host.sample_on_device
    a = dev.generate("Once", max_new_tokens=40, sampling=params).run()[0].tokens
    b = host.generate("Once", max_new_tokens=40, sampling=params).run()[0].tokens
    assert a == b


@pytest.mark.gpu
def test_device_sampler_on_cuda_matches_the_host_sampler():
    host = [Sampler(p) for p in PARAMS]
    dev = [Sampler(p) for p in PARAMS]
    for step in range(50):
        x = _logits(step, v=32000)
        want = [s.sample(x[i].numpy()) for i, s in enumerate(host)]
        assert sample_on_device(x.cuda(), dev).tolist() == want, step


def test_generation_through_the_device_sampler_equals_the_host_path(exports):
    """The generation loop's device branch (only token ids come back), run on CPU tensors."""
    path = exports["custom"]
    host = StatefulDecoder(path, "ort-cpu", threads=1)
    dev = StatefulDecoder(path, "ort-cpu", threads=1)
    dev.sample_on_device = True
    for params in (SamplingParams(seed=3), SamplingParams(temperature=0.9, top_k=20, top_p=0.8, seed=7)):
        a = dev.generate(["Once", "Hi there"], max_new_tokens=12, sampling=params, snapshot=True).run()
        b = host.generate(["Once", "Hi there"], max_new_tokens=12, sampling=params, snapshot=True).run()
        assert [r.tokens for r in a] == [r.tokens for r in b]
        assert [r.state.sampler for r in a] == [r.state.sampler for r in b]


def test_graph_handles_carry_their_own_graph_ids(exports):
    """The runtime's captured-handle plumbing (graph ids, no rebinding), run on the CPU provider,
    which ignores the gpu_graph_id annotation: ids 1, 2 for the first pool, 3, 4 for the next (0 is
    ONNX Runtime's id for runs without the annotation; one-off step calls run as -1, no graph)."""
    path = exports["custom"]
    ref = StatefulDecoder(path, "ort-cpu", threads=1, batch_size=2)
    dec = StatefulDecoder(path, "ort-cpu", threads=1, batch_size=1)
    dec.cuda_graph = dec._runtime.cuda_graph = True
    dec.resize(2)
    h = dec._step_handles
    assert [x[2].get_run_config_entry("gpu_graph_id") for x in h] == ["1", "2"] and h[0][1] is None
    dec.resize(3)
    assert [x[2].get_run_config_entry("gpu_graph_id") for x in dec._step_handles] == ["3", "4"]
    dec.resize(2)
    assert dec._step_handles is h  # the pool's graphs again, not new ones
    seen = []
    run = dec._runtime.sessions["step"].run_with_iobinding
    dec._runtime.sessions["step"].run_with_iobinding = lambda b, o=None: (seen.append(o), run(b, o))[1]
    dec.prefill([[5], [6]])  # one token a row: the step graph on one-off buffers
    assert [o.get_run_config_entry("gpu_graph_id") for o in seen] == ["-1"]
    dec.reset()
    prompts = [[256, 1, 2], [256, 3]]
    np.testing.assert_array_equal(dec.prefill(prompts), ref.prefill(prompts))
    for tok in range(5):
        np.testing.assert_array_equal(dec.step([tok, tok + 3]), ref.step([tok, tok + 3]))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 300])  # the step kernel; the chunked prefill with its workspace
def test_the_gla_cuda_forward_is_capture_safe(T):
    """cuda_forward under stream capture in global mode (which refuses any host synchronisation or
    cudaMalloc while capturing): the replay equals an eager call on new inputs, bitwise."""
    from gla_export.ops.native import native_gla

    torch.manual_seed(0)
    dev = torch.device("cuda")
    B, H, K, V = 3, 4, 64, 128
    mk = lambda: [torch.randn(B, T, H, K, device=dev, dtype=torch.float16),
                  torch.randn(B, T, H, K, device=dev, dtype=torch.float16),
                  torch.randn(B, T, H, V, device=dev, dtype=torch.float16),
                  torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=dev)).half(),
                  torch.randn(B, H, K, V, device=dev)]
    static = mk()
    native_gla(*static[:4], initial_state=static[4], output_final_state=True)  # warm-up: attributes set once
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="global"):
        o, ht = native_gla(*static[:4], initial_state=static[4], output_final_state=True)
    for _ in range(3):
        new = mk()
        for s, n in zip(static, new):
            s.copy_(n)
        g.replay()
        want_o, want_ht = native_gla(*new[:4], initial_state=new[4], output_final_state=True)
        torch.cuda.synchronize()
        assert torch.equal(o, want_o) and torch.equal(ht, want_ht)
