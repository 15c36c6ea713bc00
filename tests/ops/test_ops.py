"""Every PyTorch backend of the GLA op against the float64 naive reference."""

import pytest
import torch

from gla_export.ops import GLAShapeError, gated_linear_attention
from gla_export.testing import TOLERANCE, GLACase, assert_close, make_inputs, reference

CASES = [
    GLACase(B=2, T=1, K=16, V=16),
    GLACase(B=2, T=63, K=16, V=60),
    GLACase(B=1, T=65, K=60, V=100),
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=100, V=16),
    GLACase(B=1, T=63, Hq=6, Hkv=1, K=16, V=60, initial_state=True),
    GLACase(B=2, T=65, K=16, V=16, reverse=True, initial_state=True),
    GLACase(B=2, T=63, K=60, V=16, g_gamma=True),
    GLACase(B=2, T=40, K=16, V=16, gate_per_head=True),
    GLACase(Hq=4, Hkv=2, K=16, V=60, cu_seqlens=(0, 30, 30, 95, 96), initial_state=True),
    GLACase(K=16, V=16, cu_seqlens=(0, 0, 63, 128), reverse=True, g_gamma=True),
]
DTYPE_CASES = [
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=dt, initial_state=True, g_gamma=True)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("backend", ["naive", "chunk", "auto"])
@pytest.mark.parametrize("case", CASES + DTYPE_CASES, ids=lambda c: c.id)
def test_backend_matches_reference(backend, case):
    kw = make_inputs(case)
    o_ref, s_ref = reference(kw)
    o, s = gated_linear_attention(**kw, output_final_state=True, backend=backend)
    assert o.dtype == case.dtype and o.shape == o_ref.shape
    assert s.dtype == torch.float32
    tol = TOLERANCE[case.dtype]
    assert_close("output", o, o_ref, tol)
    assert_close("final state", s, s_ref, max(tol, 1e-5))


def test_chunk_is_differentiable():
    kw = make_inputs(GLACase(B=1, T=20, Hq=2, Hkv=2, K=8, V=4, dtype=torch.float64))
    for name in ("q", "k", "v", "g"):
        kw[name].requires_grad_(True)
    args = (kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"))
    torch.autograd.gradcheck(lambda q, k, v, g: gated_linear_attention(q, k, v, g, backend="chunk")[0], args, eps=1e-6, atol=1e-5, fast_mode=True)


def test_state_dtype_follows_initial_state():
    kw = make_inputs(GLACase(B=1, T=20, K=16, V=16, dtype=torch.float16, initial_state=True))
    kw["initial_state"] = kw["initial_state"].half()
    _, s = gated_linear_attention(**kw, output_final_state=True, backend="chunk")
    assert s.dtype == torch.float16


def test_no_final_state_unless_asked():
    kw = make_inputs(GLACase(B=1, T=8))
    assert gated_linear_attention(**kw, backend="chunk")[1] is None


def test_stepping_reproduces_prefill():
    case = GLACase(B=2, T=33, Hq=4, Hkv=2, K=16, V=24, initial_state=True)
    kw = make_inputs(case)
    o_full, s_full = gated_linear_attention(**kw, output_final_state=True, backend="chunk")
    s = kw["initial_state"]
    outs = []
    for t in range(case.T):
        sl = {n: kw[n][:, t : t + 1] for n in ("q", "k", "v", "g")}
        o, s = gated_linear_attention(**sl, initial_state=s, output_final_state=True)
        outs.append(o)
    assert_close("stepped output", torch.cat(outs, 1), o_full, 2e-5)
    assert_close("stepped state", s, s_full, 2e-5)


def test_extreme_decay_stays_finite():
    case = GLACase(B=1, T=128, K=32, V=32)
    kw = make_inputs(case)
    kw["g"] = torch.nn.functional.logsigmoid(torch.randn_like(kw["g"]) * 30)  # steps down to about -100
    o_ref, s_ref = reference(kw)
    o, s = gated_linear_attention(**kw, output_final_state=True, backend="chunk")
    assert_close("output", o, o_ref, 1e-4)
    assert_close("final state", s, s_ref, 1e-4)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda kw: kw.update(q=kw["q"][0]), "q must be"),
        (lambda kw: kw.update(k=kw["k"][:, :, :3], v=kw["v"][:, :, :3], g=kw["g"][:, :, :3]), "multiple"),
        (lambda kw: kw.update(v=kw["v"][:, :5]), "agree on"),
        (lambda kw: kw.update(g=kw["g"][..., :3]), "g must be"),
        (lambda kw: kw.update(initial_state=torch.zeros(3, 4, 16, 16)), "initial_state must be"),
        (lambda kw: kw.update(g_gamma=torch.zeros(5)), "g_gamma must be"),
        (lambda kw: kw.update(cu_seqlens=torch.tensor([0, 5, 3])), "batch size must be 1|cu_seqlens"),
        (lambda kw: kw.update(q=kw["q"].long()), "floating"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    kw = make_inputs(GLACase(B=2, T=10, Hq=4, Hkv=4, K=16, V=16))
    mutate(kw)
    with pytest.raises(GLAShapeError, match=match):
        gated_linear_attention(**kw, backend="chunk")


def test_unknown_backend():
    kw = make_inputs(GLACase(B=1, T=4))
    with pytest.raises(ValueError, match="backend"):
        gated_linear_attention(**kw, backend="cuda-magic")


@pytest.mark.parametrize("backend", ["naive", "chunk", "native"])
def test_public_function_validates_once(backend, monkeypatch):
    """gated_linear_attention checks its inputs once; the backend reuses the sizes (each check of
    cu_seqlens' contents is a host read, a sync for CUDA tensors)."""
    import gla_export.ops as ops
    from gla_export.ops import _common, chunk, naive, native

    calls = []
    real = _common.check_inputs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_contents", True))
        return real(*args, **kwargs)

    for module in (ops, chunk, naive, native):
        monkeypatch.setattr(module, "check_inputs", counting)
    kw = make_inputs(GLACase(K=16, V=16, cu_seqlens=(0, 3, 9), initial_state=True))
    ops.gated_linear_attention(kw["q"], kw["k"], kw["v"], kw["g"], initial_state=kw["initial_state"],
                               cu_seqlens=kw["cu_seqlens"], output_final_state=True, backend=backend)
    assert len(calls) == 1, calls


@pytest.mark.parametrize("cu_contents", [True, False])
def test_check_inputs_counts_sequences_from_cu_seqlens(cu_contents):
    """N is len(cu_seqlens) - 1 whether or not the offsets are read on the host (the device path
    skips that read; N came from an unbound name there and every native CUDA call with cu_seqlens
    failed, found on the GPU)."""
    from gla_export.ops._common import check_inputs

    x = make_inputs(GLACase(B=1, T=10, Hq=2, Hkv=2, K=8, V=8, cu_seqlens=(0, 3, 3, 10)))
    dims = check_inputs(x["q"], x["k"], x["v"], x["g"], cu_seqlens=x["cu_seqlens"], cu_contents=cu_contents)
    assert dims.N == 3
