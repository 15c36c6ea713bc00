"""gla::GatedLinearAttention in ONNX Runtime through libgla_onnxruntime, against the float64
reference: one-node graphs, every option, and every kind of bad input (a clear error naming the
input, and a session that survives it). The same tests run on the CUDA execution provider on a
GPU machine (marked gpu, skipped here)."""

from __future__ import annotations

import pytest
import torch

# onnxruntime comes with the [cpu]/[gpu] extra, which CI installs: without it these tests fail
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException
from ort_helpers import INPUTS, feeds_for, make_model, require_provider, run, session

from gla_export.testing import GLACase, assert_close, reference

# run_with_iobinding raises RuntimeError; session creation ORT's own exception types
ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, RuntimeException, RuntimeError)

TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# the CUDA kernels compute float32 products as two bf16 planes (~6e-6 measured on an H200): the shared tolerance
TOL_CUDA = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _tol(provider: str) -> dict:
    return TOL_CUDA if provider == "cuda" else TOL

PROVIDER_PARAMS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=PROVIDER_PARAMS)
def provider(request):
    require_provider(request.param)
    return request.param


def _device(provider: str) -> str:
    return "cuda" if provider == "cuda" else "cpu"


def check_case(case: GLACase, provider: str, state_dtype=None, int64_cu=False, **attrs):
    feeds, kw = feeds_for(case, device=_device(provider))
    if state_dtype is not None:
        feeds["past_state"] = kw["initial_state"] = kw["initial_state"].to(state_dtype)
    if int64_cu:
        feeds["cu_seqlens"] = kw["cu_seqlens"] = kw["cu_seqlens"].long()
    if "scale" in attrs:
        kw["scale"] = attrs["scale"]
    o_ref, s_ref = reference(kw)
    attrs = dict(q_num_heads=case.Hq, kv_num_heads=case.Hkv, reverse=int(case.reverse), **attrs)
    sess = session(make_model(feeds, **attrs), provider)
    o, s = run(sess, feeds, provider)
    assert o.dtype == case.dtype and tuple(o.shape) == (*o_ref.shape[:2], case.Hq * case.V)
    want_state = feeds["past_state"].dtype if "past_state" in feeds else torch.float32
    assert s.dtype == want_state and s.shape == s_ref.shape
    tol = _tol(provider)
    assert_close("output", o.reshape(o_ref.shape), o_ref, tol[case.dtype])
    assert_close("present_state", s, s_ref, max(tol[case.dtype], tol[want_state]))
    return sess, feeds


CASES = [
    GLACase(B=2, T=1, K=16, V=16),
    GLACase(B=2, T=63, K=16, V=60),
    GLACase(B=1, T=65, K=60, V=100),
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=100, V=16, initial_state=True),
    GLACase(B=1, T=63, Hq=6, Hkv=1, K=16, V=60, initial_state=True),
    GLACase(B=3, T=1, Hq=4, Hkv=2, K=64, V=128, initial_state=True),  # a decode step with state
    GLACase(B=2, T=65, K=16, V=16, reverse=True, initial_state=True),
    GLACase(B=2, T=63, K=60, V=16, g_gamma=True),
    GLACase(B=2, T=40, K=16, V=16, gate_per_head=True),
    GLACase(Hq=4, Hkv=2, K=16, V=60, cu_seqlens=(0, 30, 30, 95, 96), initial_state=True),  # an empty sequence
    GLACase(K=16, V=16, cu_seqlens=(0, 0, 63, 128), reverse=True, g_gamma=True),  # no past_state, with cu_seqlens
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=torch.float16, initial_state=True, g_gamma=True),
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=torch.bfloat16, initial_state=True, g_gamma=True),
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=32, V=48, dtype=torch.float16, initial_state=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, provider):
    check_case(case, provider)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["state-fp16", "state-bf16"])
def test_state_type_follows_past_state(provider, state_dtype):
    check_case(GLACase(B=2, T=70, Hq=4, Hkv=2, K=32, V=48, dtype=torch.float16, initial_state=True), provider, state_dtype)


def test_int64_cu_seqlens_and_scale(provider):
    check_case(GLACase(K=16, V=32, cu_seqlens=(0, 5, 5, 80), initial_state=True), provider, int64_cu=True, scale=0.37)


def test_large_heads(provider):
    check_case(GLACase(B=1, T=40, Hq=4, Hkv=4, K=256, V=512, initial_state=True), provider)


def test_chunk_size_is_only_a_hint(provider):
    check_case(GLACase(B=1, T=70, K=16, V=16), provider, chunk_size=16)


def test_node_without_present_state(provider):
    case = GLACase(B=2, T=33, K=16, V=24, initial_state=True)
    feeds, kw = feeds_for(case, device=_device(provider))
    o_ref, _ = reference(kw)
    sess = session(make_model(feeds, outputs=("output",), q_num_heads=4, kv_num_heads=4), provider)
    (o,) = run(sess, feeds, provider)
    assert_close("output", o.reshape(o_ref.shape), o_ref, _tol(provider)[torch.float32])


def test_empty_sequence_passes_the_state_through(provider):
    case = GLACase(B=2, T=1, K=16, V=16, initial_state=True)
    feeds, _ = feeds_for(case, device=_device(provider))
    feeds = {n: (t[:, :0] if n in ("query", "key", "value", "gate") else t) for n, t in feeds.items()}
    sess = session(make_model(feeds, q_num_heads=4, kv_num_heads=4), provider)
    o, s = run(sess, feeds, provider)
    assert tuple(o.shape) == (2, 0, 64)
    assert torch.equal(s.cpu(), feeds["past_state"].cpu())


def test_output_types_and_shapes_are_inferred(provider):
    """With static input shapes ORT knows the outputs before running: the op's shape inference."""
    for dtype, state in ((torch.float16, None), (torch.float16, torch.bfloat16), (torch.float32, torch.float32)):
        case = GLACase(B=2, T=5, Hq=4, Hkv=2, K=16, V=24, dtype=dtype, initial_state=state is not None)
        feeds, _ = feeds_for(case, device=_device(provider))
        if state is not None:
            feeds["past_state"] = feeds["past_state"].to(state)
        sess = session(make_model(feeds, static_shapes=True, q_num_heads=4, kv_num_heads=2), provider)
        out, present = sess.get_outputs()
        act_name = {torch.float16: "tensor(float16)", torch.float32: "tensor(float)"}[dtype]
        state_name = {None: "tensor(float)", torch.bfloat16: "tensor(bfloat16)", torch.float32: "tensor(float)"}[state]
        assert (out.type, present.type) == (act_name, state_name)
        assert out.shape == [2, 5, 4 * 24] and present.shape == [2, 2, 16, 24]


# ---- bad input: a clear error naming the input, and the session survives -------------------------

GOOD = GLACase(B=2, T=5, Hq=4, Hkv=2, K=16, V=24, initial_state=True, g_gamma=True)
GOOD_CU = GLACase(Hq=4, Hkv=2, K=16, V=24, cu_seqlens=(0, 2, 5), initial_state=True, g_gamma=True)


def _good_feeds(provider, case=GOOD):
    feeds, _ = feeds_for(case, device=_device(provider))
    return feeds


def _replace(feeds, name, tensor):
    out = dict(feeds)
    out[name] = tensor
    return out


def _i32(values, like):
    return torch.tensor(values, dtype=torch.int32, device=like.device)


# (what is wrong, the good case, how to break its feeds, the message expected)
RUNTIME_ERRORS = [
    ("query rank", GOOD, lambda f: _replace(f, "query", f["query"][0]), "input 'query' has shape [5,64], expected rank 3"),
    ("query width", GOOD, lambda f: _replace(f, "query", f["query"][..., :62]),
     "input 'query' has shape [2,5,62]: its last dimension 62 is not a multiple of q_num_heads=4"),
    ("key width", GOOD, lambda f: _replace(f, "key", f["key"][..., :24]),
     "input 'key' has shape [2,5,24], expected [B=2, T=5, kv_num_heads*d_k=32]"),
    ("key time", GOOD, lambda f: _replace(f, "key", f["key"][:, :4]),
     "input 'key' has shape [2,4,32], expected [B=2, T=5, kv_num_heads*d_k=32]"),
    ("value width", GOOD, lambda f: _replace(f, "value", f["value"][..., :47]),
     "input 'value' has shape [2,5,47]: its last dimension must be a positive multiple of kv_num_heads=2"),
    ("value batch", GOOD, lambda f: _replace(f, "value", f["value"][:1]), "input 'value' has shape [1,5,48], expected [B=2, T=5"),
    ("gate width", GOOD, lambda f: _replace(f, "gate", f["gate"][..., :7]),
     "input 'gate' has shape [2,5,7], expected [B=2, T=5, kv_num_heads*d_k=32]"),
    ("gate rank", GOOD, lambda f: _replace(f, "gate", f["gate"][..., None]), "input 'gate' has shape [2,5,32,1], expected rank 3"),
    ("past_state shape", GOOD, lambda f: _replace(f, "past_state", f["past_state"][:, :, :8]),
     "input 'past_state' has shape [2,2,8,24], expected [N=2, kv_num_heads=2, d_k=16, d_v=24]"),
    ("past_state rank", GOOD, lambda f: _replace(f, "past_state", f["past_state"][0]),
     "input 'past_state' has shape [2,16,24], expected rank 4 [N, kv_num_heads, d_k, d_v]"),
    ("g_gamma shape", GOOD, lambda f: _replace(f, "g_gamma", f["g_gamma"].repeat(2)),
     "input 'g_gamma' has shape [4], expected [kv_num_heads=2]"),
    ("cu_seqlens with B=2", GOOD, lambda f: _replace(f, "cu_seqlens", _i32([0, 5], f["query"])),
     "with cu_seqlens the sequences are packed along T and B must be 1"),
    ("cu_seqlens rank", GOOD_CU, lambda f: _replace(f, "cu_seqlens", _i32([[0, 2, 5]], f["query"])),
     "input 'cu_seqlens' has shape [1,3], expected rank 1 [N+1]"),
    ("past_state rows", GOOD_CU, lambda f: _replace(f, "cu_seqlens", _i32([0, 1, 2, 5], f["query"])),
     "input 'past_state' has shape [2,2,16,24], expected [N=3"),
    ("key fp16", GOOD, lambda f: _replace(f, "key", f["key"].half()),
     "input 'key' has element type float16, expected float32 like 'query'"),
    ("gate fp64", GOOD, lambda f: _replace(f, "gate", f["gate"].double()),
     "input 'gate' has element type float64, expected float32 like 'query'"),
    ("cu_seqlens float", GOOD_CU, lambda f: _replace(f, "cu_seqlens", f["cu_seqlens"].float()),
     "input 'cu_seqlens' has element type float32, expected int32 or int64"),
    ("g_gamma int", GOOD, lambda f: _replace(f, "g_gamma", f["g_gamma"].int()),
     "input 'g_gamma' has element type int32, expected float32, float16 or bfloat16"),
]


def _ort_error(fn):
    with pytest.raises(ORT_ERRORS) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("what, case, breaker, message", RUNTIME_ERRORS, ids=[r[0] for r in RUNTIME_ERRORS])
def test_bad_input_is_a_clear_error_and_the_session_survives(provider, what, case, breaker, message):
    good = _good_feeds(provider, case)
    bad = breaker(good)
    # dynamic shapes: the error can only come from the kernel at run time
    sess = session(make_model(bad, q_num_heads=4, kv_num_heads=2), provider)
    text = _ort_error(lambda: run(sess, bad, provider))
    assert message in text, text
    assert "GatedLinearAttention 'gla0'" in text  # the node is named
    if set(bad) == set(good) and all(bad[n].dtype == good[n].dtype for n in good):
        o, s = run(sess, good, provider)  # the same session still works
        assert torch.isfinite(o).all() and torch.isfinite(s).all()


@pytest.mark.parametrize(
    "cu, message",
    [([0, 3, 2], "cu_seqlens must not decrease"), ([0, 2, 4], "cu_seqlens[-1] must equal T=5"), ([1, 2, 5], "cu_seqlens[0] must be 0")],
)
def test_bad_cu_seqlens_contents_cpu(cu, message):
    # the CPU kernel reads cu_seqlens on the host and checks it; the CUDA kernel reads it on the device
    feeds = _good_feeds("cpu", GOOD_CU)
    sess = session(make_model(feeds, q_num_heads=4, kv_num_heads=2), "cpu")
    text = _ort_error(lambda: run(sess, _replace(feeds, "cu_seqlens", torch.tensor(cu, dtype=torch.int32)), "cpu"))
    assert message in text, text
    run(sess, feeds, "cpu")


# Errors reported when the session is created: the attributes (checked when ORT creates the
# kernel) and a query type outside the op's schema (ORT's own type check, which names the input).
# Creating a session with good ones afterwards still works.
CREATION_ERRORS = [
    ("query fp64", dict(query=torch.float64), {}, "Type 'tensor(double)' of input parameter (query)"),
    ("no q_num_heads", {}, dict(q_num_heads=None), "the required int attribute 'q_num_heads' is missing"),
    ("no kv_num_heads", {}, dict(kv_num_heads=None), "the required int attribute 'kv_num_heads' is missing"),
    ("heads do not divide", {}, dict(q_num_heads=4, kv_num_heads=3), "q_num_heads=4 must be a multiple of kv_num_heads=3"),
    ("zero heads", {}, dict(q_num_heads=0), "attribute q_num_heads=0 must be in [1, 65536]"),
    ("reverse 2", {}, dict(reverse=2), "attribute reverse=2 must be 0 or 1"),
    ("chunk_size -1", {}, dict(chunk_size=-1), "attribute chunk_size=-1 must be >= 0"),
    ("scale as int", {}, dict(scale=2), "attribute 'scale' must be a float"),
    ("heads as float", {}, dict(q_num_heads=4.0), "attribute 'q_num_heads' must be an int"),
]


@pytest.mark.parametrize("what, dtypes, attrs, message", CREATION_ERRORS, ids=[r[0] for r in CREATION_ERRORS])
def test_bad_types_and_attributes_fail_session_creation_clearly(provider, what, dtypes, attrs, message):
    feeds = _good_feeds(provider)
    feeds = {n: (t.to(dtypes[n]) if n in dtypes else t) for n, t in feeds.items()}
    node_attrs = {k: v for k, v in {**dict(q_num_heads=4, kv_num_heads=2), **attrs}.items() if v is not None}
    text = _ort_error(lambda: session(make_model(feeds, **node_attrs), provider))
    assert message in text, text
    session(make_model(_good_feeds(provider), q_num_heads=4, kv_num_heads=2), provider)


def test_inputs_are_named_in_order():
    # a guard for the documentation and the exporter: the op's positional inputs
    assert INPUTS == ("query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma")
    # ... and the order the exporter's Python reference op takes them in
    import inspect

    from gla_export.export.reference_op import gla_packed

    assert tuple(inspect.signature(gla_packed).parameters)[: len(INPUTS)] == INPUTS
