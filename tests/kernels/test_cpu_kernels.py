"""The CPU kernels of the kernel core (plugins/kernels/src/cpu), through the C entry point and
gla_export.ops.native, against the float64 naive reference.

The library is built in CI (pip install .): a missing library fails these tests, it does not skip
them. Each build of the hot loops (generic, AVX2, AVX-512) is checked in a subprocess, since the
choice is made once per process (GLA_CPU_ISA).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gla_export.ops import GLAShapeError, gated_linear_attention
from gla_export.ops.native import NativeKernelError, Problem, Tensors, cpu_isa, load_library, native_gla
from gla_export.testing import TOLERANCE, GLACase, assert_close, make_inputs, reference, rel_err

# Measured errors are ~3e-7 (fp32), ~2e-4 (fp16), ~2e-3 (bf16): these bounds are tighter than
# gla_export.testing.TOLERANCE and still leave room for different ISAs and thread counts.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
assert all(TOL[dt] <= TOLERANCE[dt] for dt in TOL)

CASES = [
    GLACase(B=2, T=1, K=16, V=16),
    GLACase(B=3, T=1, Hq=4, Hkv=2, K=64, V=64, initial_state=True),  # the direct decode path
    GLACase(B=2, T=1, K=60, V=100, initial_state=True, g_gamma=True),
    GLACase(B=2, T=5, K=16, V=60, initial_state=True),
    GLACase(B=1, T=23, K=16, V=16, initial_state=True),  # just below the chunked form
    GLACase(B=1, T=24, K=16, V=16, initial_state=True),  # the first chunked length
    GLACase(B=2, T=63, K=16, V=60),
    GLACase(B=1, T=65, K=60, V=100),
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=100, V=16),
    GLACase(B=1, T=63, Hq=6, Hkv=1, K=16, V=60, initial_state=True),  # 6 query heads on one state
    GLACase(B=1, T=150, Hq=2, Hkv=2, K=16, V=200, initial_state=True),  # several value blocks
    GLACase(B=2, T=65, K=16, V=16, reverse=True, initial_state=True),
    GLACase(B=2, T=63, K=60, V=16, g_gamma=True),
    GLACase(B=2, T=40, K=16, V=16, gate_per_head=True),
    GLACase(B=1, T=7, K=16, V=16, gate_per_head=True, initial_state=True, reverse=True),
    GLACase(Hq=4, Hkv=2, K=16, V=60, cu_seqlens=(0, 30, 30, 95, 96), initial_state=True),
    GLACase(K=16, V=16, cu_seqlens=(0, 0, 63, 128), reverse=True, g_gamma=True),
    GLACase(K=16, V=48, cu_seqlens=(0, 1, 2, 2, 40), initial_state=True),  # decode-like and prefill mixed
]
DTYPE_CASES = [
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=dt, initial_state=True, g_gamma=True)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
] + [
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=60, V=100, dtype=dt, initial_state=True)
    for dt in (torch.float16, torch.bfloat16)
]


def _cpu_flags() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def check(case: GLACase, state_dtype: torch.dtype | None = None, kw: dict | None = None, **extra):
    kw = make_inputs(case) if kw is None else kw
    if state_dtype is not None and "initial_state" in kw:
        kw["initial_state"] = kw["initial_state"].to(state_dtype)
    kw.update(extra)
    o_ref, s_ref = reference(kw)
    o, s = native_gla(**kw, output_final_state=True)
    assert o.dtype == case.dtype and o.shape == o_ref.shape
    want_state = kw["initial_state"].dtype if "initial_state" in kw else torch.float32
    assert s.dtype == want_state and s.shape == s_ref.shape
    assert_close("output", o, o_ref, TOL[case.dtype])
    assert_close("final state", s, s_ref, max(TOL[case.dtype], TOL[want_state]))
    return o, s


def test_library_is_built_and_picks_the_best_isa():
    lib = load_library()  # raises, failing the test, when the library is missing
    assert lib.gla_capi_version() == 1
    assert cpu_isa() in ("avx512", "avx2", "neon", "generic")
    flags = _cpu_flags()
    if "GLA_CPU_ISA" not in os.environ and " avx512f " in flags and " avx512vl " in flags:
        assert cpu_isa() == "avx512"


@pytest.mark.parametrize("case", CASES + DTYPE_CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    check(case)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["state-fp16", "state-bf16"])
@pytest.mark.parametrize(
    "case",
    [
        GLACase(B=2, T=1, K=32, V=48, dtype=torch.float16, initial_state=True),
        GLACase(B=2, T=70, Hq=4, Hkv=2, K=32, V=48, dtype=torch.float16, initial_state=True),
        GLACase(B=1, T=70, K=16, V=16, dtype=torch.float32, initial_state=True),
    ],
    ids=lambda c: c.id,
)
def test_low_precision_state(case, state_dtype):
    check(case, state_dtype=state_dtype)


@pytest.mark.parametrize("T", [1, 9, 65])
def test_no_gate(T):
    case = GLACase(B=2, T=T, Hq=4, Hkv=2, K=16, V=24, initial_state=True)
    kw = make_inputs(case)
    kw["g"] = None
    check(case, kw=kw)
    kw = make_inputs(case)
    kw["g"] = None
    kw["g_gamma"] = -torch.rand(case.Hkv) * 0.3
    check(case, kw=kw)


@pytest.mark.parametrize("scale", [0.3, 1.7])
def test_explicit_scale(scale):
    case = GLACase(B=1, T=70, K=16, V=16)
    check(case, scale=scale)


def test_cu_seqlens_int64_and_all_empty():
    case = GLACase(K=16, V=32, cu_seqlens=(0, 5, 5, 80), initial_state=True)
    kw = make_inputs(case)
    kw["cu_seqlens"] = kw["cu_seqlens"].long()
    check(case, kw=kw)
    # T = 0: every sequence is empty, the state passes through unchanged
    kw = make_inputs(GLACase(K=16, V=32, cu_seqlens=(0, 0, 0), initial_state=True))
    o, s = native_gla(**kw, output_final_state=True)
    assert o.shape == (1, 0, 4, 32)
    assert torch.equal(s, kw["initial_state"])


def test_empty_batch_and_empty_time():
    for B, T in ((0, 5), (2, 0)):
        kw = make_inputs(GLACase(B=max(B, 1), T=max(T, 1), K=16, V=16, initial_state=True))
        kw = {n: (t[:B, :T] if n in ("q", "k", "v", "g") else t) for n, t in kw.items()}
        if "initial_state" in kw:
            kw["initial_state"] = kw["initial_state"][:B]
        o, s = native_gla(**kw, output_final_state=True)
        assert o.shape == (B, T, 4, 16)
        assert torch.equal(s, kw["initial_state"].float())


def test_large_heads_1p3b_shape():
    # the 1.3B GLA's heads: 4 x (256 x 512), with GQA and a state
    check(GLACase(B=1, T=70, Hq=4, Hkv=2, K=256, V=512, initial_state=True))
    check(GLACase(B=2, T=1, Hq=4, Hkv=4, K=256, V=512, initial_state=True))


def test_extreme_decay_stays_exact():
    case = GLACase(B=1, T=160, K=32, V=32, initial_state=True)
    for spread in (30.0, 300.0):
        kw = make_inputs(case)
        kw["g"] = F.logsigmoid(torch.randn_like(kw["g"]) * spread)  # steps down to about -1000
        o_ref, s_ref = reference(kw)
        o, s = native_gla(**kw, output_final_state=True)
        assert_close("output", o, o_ref, 5e-5)
        assert_close("final state", s, s_ref, 5e-5)
    # g = -inf forgets everything before it, exactly
    kw = make_inputs(case)
    kw["g"][:, 70:72] = -float("inf")
    o_ref, s_ref = reference(kw)
    o, s = native_gla(**kw, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close("output", o, o_ref, 5e-5)
    assert_close("final state", s, s_ref, 5e-5)


def test_deterministic_across_thread_counts():
    kw = make_inputs(GLACase(B=1, T=130, Hq=4, Hkv=2, K=64, V=256, initial_state=True))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o1, s1 = native_gla(**kw, output_final_state=True)
        torch.set_num_threads(4)
        o4, s4 = native_gla(**kw, output_final_state=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(o1, o4) and torch.equal(s1, s4)


def test_stepping_reproduces_prefill():
    case = GLACase(B=2, T=40, Hq=4, Hkv=2, K=16, V=24, initial_state=True)
    kw = make_inputs(case)
    o_full, s_full = native_gla(**kw, output_final_state=True)
    s = kw["initial_state"]
    outs = []
    for t in range(case.T):
        sl = {n: kw[n][:, t : t + 1] for n in ("q", "k", "v", "g")}
        o, s = native_gla(**sl, initial_state=s, output_final_state=True)
        outs.append(o)
    assert_close("stepped output", torch.cat(outs, 1), o_full, 2e-6)
    assert_close("stepped state", s, s_full, 2e-6)


def test_backend_registered_and_not_auto():
    kw = make_inputs(GLACase(B=1, T=9, K=16, V=16))
    o, _ = gated_linear_attention(**kw, backend="native")
    o_ref, _ = reference(kw)
    assert_close("output", o, o_ref, TOL[torch.float32])
    from gla_export.ops import _pick_backend

    assert _pick_backend("auto", kw["q"]) != "native"


def test_no_final_state_unless_asked():
    kw = make_inputs(GLACase(B=1, T=8))
    assert native_gla(**kw)[1] is None


def test_non_contiguous_inputs():
    case = GLACase(B=2, T=33, K=16, V=16, initial_state=True)
    kw = make_inputs(case)
    kw = {n: (t.transpose(0, 1).contiguous().transpose(0, 1) if n in ("q", "k", "v", "g") else t) for n, t in kw.items()}
    assert not kw["q"].is_contiguous()
    check(case, kw=kw)


def test_gate_dtype_follows_activations():
    # a float32 gate with float16 activations is cast to float16, the kernels' one activation type
    case = GLACase(B=1, T=40, K=16, V=16, dtype=torch.float16)
    kw = make_inputs(case)
    kw_f32_gate = dict(kw, g=kw["g"].float())
    o_ref, _ = reference(kw)
    o, _ = native_gla(**kw_f32_gate)
    assert_close("output", o, o_ref, TOL[torch.float16])


# ---- bad input --------------------------------------------------------------------------------


def test_float64_is_refused_with_a_clear_error():
    kw = make_inputs(GLACase(B=1, T=4, dtype=torch.float64))
    with pytest.raises(GLAShapeError, match="float64"):
        native_gla(**kw)
    kw = make_inputs(GLACase(B=1, T=4, initial_state=True))
    kw["initial_state"] = kw["initial_state"].double()
    with pytest.raises(GLAShapeError, match="initial_state"):
        native_gla(**kw)


def test_shape_errors_name_the_input():
    kw = make_inputs(GLACase(B=2, T=5, K=16, V=16))
    with pytest.raises(GLAShapeError, match=r"k must have head size d_k=16.*\[2, 5, 4, 8\]"):
        native_gla(**dict(kw, k=kw["k"][..., :8]))


def _problem(**over) -> Problem:
    p = Problem(batch=1, seq_len=4, num_seqs=1, q_heads=2, kv_heads=2, head_dim_k=8, head_dim_v=8, has_gate=1, scale=0.0)
    for name, value in over.items():
        setattr(p, name, value)
    return p


def _call(problem: Problem, tensors: Tensors | None = None, workspace_bytes: int | None = None):
    lib = load_library()
    need = lib.gla_cpu_workspace_bytes(ctypes.byref(problem))
    ws = torch.empty(max(need, 1), dtype=torch.uint8)
    status = lib.gla_cpu_forward(
        ctypes.byref(problem),
        ctypes.byref(tensors if tensors is not None else Tensors()),
        ws.data_ptr(),
        need if workspace_bytes is None else workspace_bytes,
        1,
    )
    return status, lib.gla_last_error_message().decode()


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(q_heads=3), "q_heads must be a positive multiple of kv_heads=2, got 3"),
        (dict(kv_heads=0), "kv_heads must be in"),
        (dict(head_dim_k=0), "head_dim_k must be in"),
        (dict(head_dim_v=-3), "head_dim_v must be in"),
        (dict(batch=-1), "batch must be >= 0"),
        (dict(num_seqs=2), "without cu_seqlens num_seqs must equal batch=1, got 2"),
        (dict(act_dtype=7), "act_dtype 7 is not a known dtype"),
        (dict(reverse=2), "reverse must be 0 or 1, got 2"),
        (dict(has_cu_seqlens=1, batch=2, num_seqs=2), "with cu_seqlens the batch must be 1"),
        (dict(gate_per_head=1, has_gate=0), "gate_per_head=1 needs has_gate=1"),
        (dict(scale=float("nan")), "scale must be finite"),
    ],
)
def test_c_api_rejects_bad_problems(over, message):
    problem = _problem(**over)
    lib = load_library()
    assert lib.gla_validate(ctypes.byref(problem)) == 1
    assert message in lib.gla_last_error_message().decode()
    assert lib.gla_cpu_workspace_bytes(ctypes.byref(problem)) == 0
    status, text = _call(problem)
    assert status == 1 and message in text


def _tensors_for(problem: Problem, cu: torch.Tensor | None = None):
    B, T = problem.batch, problem.seq_len
    q = torch.randn(B, T, problem.q_heads * problem.head_dim_k)
    k = torch.randn(B, T, problem.kv_heads * problem.head_dim_k)
    v = torch.randn(B, T, problem.kv_heads * problem.head_dim_v)
    g = -torch.rand(B, T, problem.kv_heads * problem.head_dim_k)
    o = torch.empty(B, T, problem.q_heads * problem.head_dim_v)
    s = torch.empty(problem.num_seqs, problem.kv_heads, problem.head_dim_k, problem.head_dim_v)
    keep = [q, k, v, g, o, s, cu]
    t = Tensors(query=q.data_ptr(), key=k.data_ptr(), value=v.data_ptr(), gate=g.data_ptr(), output=o.data_ptr(),
                present_state=s.data_ptr(), cu_seqlens=None if cu is None else cu.data_ptr())
    return t, keep


def test_c_api_rejects_null_pointers_and_small_workspace():
    problem = _problem()
    tensors, keep = _tensors_for(problem)
    assert _call(problem, tensors)[0] == 0
    for field, message in (("key", "query, key, value and output must not be null"), ("gate", "gate is null")):
        bad = Tensors.from_buffer_copy(tensors)
        setattr(bad, field, None)
        status, text = _call(problem, bad)
        assert status == 1 and message in text
    status, text = _call(_problem(has_past_state=1), tensors)
    assert status == 1 and "past_state is null" in text
    problem = _problem(seq_len=100)
    tensors, keep = _tensors_for(problem)
    status, text = _call(problem, tensors, workspace_bytes=16)
    assert status == 4 and "the CPU workspace has 16 bytes" in text
    del keep


@pytest.mark.parametrize(
    "cu, message",
    [
        ([1, 2, 4], "cu_seqlens[0] must be 0, got 1"),
        ([0, 3, 2], "cu_seqlens must not decrease"),
        ([0, 2, 3], "cu_seqlens[-1] must equal T=4, got 3"),
    ],
)
def test_c_api_checks_cu_seqlens_contents(cu, message):
    problem = _problem(has_cu_seqlens=1, num_seqs=2)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    tensors, keep = _tensors_for(problem, cu_t)
    status, text = _call(problem, tensors)
    assert status == 1 and message in text
    # the same checks reach Python as NativeKernelError through native_gla when check_inputs is bypassed
    del keep


@pytest.mark.parametrize("T", [1, 5, 70])
def test_present_state_may_be_the_past_state_buffer(T):
    # capi.h promises in-place state updates on the CPU (a decoder can keep one state buffer)
    from gla_export.ops.native import make_problem

    kw = make_inputs(GLACase(B=2, T=T, Hq=4, Hkv=2, K=32, V=64, initial_state=True))
    _, s_ref = native_gla(**kw, output_final_state=True)
    problem = make_problem(kw["q"], kw["k"], kw["v"], kw["g"], initial_state=kw["initial_state"])
    B = kw["q"].shape[0]
    q, k, v, g = (kw[n].reshape(B, T, -1).contiguous() for n in ("q", "k", "v", "g"))
    state = kw["initial_state"].clone()
    o = torch.empty(B, T, 4 * 64)
    t = Tensors(query=q.data_ptr(), key=k.data_ptr(), value=v.data_ptr(), gate=g.data_ptr(), past_state=state.data_ptr(),
                output=o.data_ptr(), present_state=state.data_ptr())
    lib = load_library()
    need = lib.gla_cpu_workspace_bytes(ctypes.byref(problem))
    ws = torch.empty(max(need, 1), dtype=torch.uint8)
    assert lib.gla_cpu_forward(ctypes.byref(problem), ctypes.byref(t), ws.data_ptr(), need, 2) == 0
    assert torch.equal(state, s_ref)


def test_c_api_cuda_entry_points_answer_without_a_gpu():
    # Either build answers without touching a GPU: a CUDA build validates the problem first, a
    # CPU-only build says it has no CUDA kernels.
    lib = load_library()
    bad = _problem(q_heads=3)
    status = lib.gla_cuda_forward(ctypes.byref(bad), ctypes.byref(Tensors()), None, 0, None)
    text = lib.gla_last_error_message().decode()
    if lib.gla_cuda_compiled():
        assert status == 1 and "q_heads must be a positive multiple of kv_heads=2, got 3" in text
        assert lib.gla_cuda_workspace_bytes(ctypes.byref(bad)) == 0
    else:
        assert status == 2 and "no CUDA kernels" in text
        assert lib.gla_cuda_workspace_bytes(ctypes.byref(_problem())) == 0


def test_native_error_type():
    err = NativeKernelError(1, "head_dim_k must be in [1, 16384], got 0")
    assert "invalid argument" in str(err) and err.status == 1


# ---- every build of the hot loops ----------------------------------------------------------------

ISA_CASES = [
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=60, V=100, initial_state=True),
    GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=torch.float16, initial_state=True, g_gamma=True),
    GLACase(B=1, T=70, Hq=6, Hkv=1, K=16, V=48, reverse=True, gate_per_head=True),
    GLACase(Hq=2, Hkv=2, K=16, V=60, cu_seqlens=(0, 30, 30, 95, 96), initial_state=True),
    GLACase(B=1, T=100, K=100, V=16, dtype=torch.bfloat16),
]


def _isa_worker() -> None:
    """Run ISA_CASES in this process (GLA_CPU_ISA set by the parent) and print the errors as JSON."""
    torch.manual_seed(int(os.environ.get("GLA_TEST_SEED", "0")))
    result = {"isa": cpu_isa(), "errors": []}
    for case in ISA_CASES:
        kw = make_inputs(case)
        o_ref, s_ref = reference(kw)
        o, s = native_gla(**kw, output_final_state=True)
        result["errors"].append([case.id, rel_err(o, o_ref), rel_err(s, s_ref), TOL[case.dtype]])
    print(json.dumps(result))


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_each_isa_build_matches_reference(isa):
    if isa == "avx2":
        flags = _cpu_flags()
        if " avx2 " not in flags:
            pytest.skip("this processor has no AVX2")
    import gla_export

    # the worker must import the same gla_export (and so find the same libraries) as this process
    root = os.path.dirname(os.path.dirname(os.path.abspath(gla_export.__file__)))
    env = dict(os.environ, GLA_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, __file__, "--isa-worker"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["isa"] == isa
    for case_id, err_o, err_s, tol in result["errors"]:
        assert err_o <= tol, f"{isa} {case_id}: output error {err_o:.2e} > {tol:.0e}"
        assert err_s <= max(tol, TOL[torch.float32]), f"{isa} {case_id}: state error {err_s:.2e}"


if __name__ == "__main__":
    if "--isa-worker" in sys.argv:
        _isa_worker()


# Many query heads per key/value head: the chunked form takes them a group at a time, so the CPU
# workspace stays bounded (before, each of up to 64 slots held every head's chunk: 192 MiB for a
# 32 MiB input below, and 940 MiB seen from a 6 MB one).
def test_gqa_workspace_is_bounded():
    lib = load_library()
    for G, dk, dv, B, T in [(1024, 16, 16, 8, 64), (256, 64, 64, 16, 100), (4096, 16, 16, 64, 30)]:
        p = Problem(batch=B, seq_len=T, num_seqs=B, q_heads=G, kv_heads=1, head_dim_k=dk, head_dim_v=dv, has_gate=1)
        ws = lib.gla_cpu_workspace_bytes(ctypes.byref(p))
        # per slot: a group's chunk scratch (<= 1 MiB) and one token's query/output rows for every head
        per_slot = 2**20 + 4 * G * (dk + 16) + 4 * 64 * 4 * (dk + 16)
        assert 0 < ws <= 64 * per_slot + 64, f"G={G} dk={dk} B={B}: {ws / 2**20:.1f} MiB of workspace"


@pytest.mark.parametrize("case", [
    GLACase(B=1, T=70, Hq=24, Hkv=1, K=256, V=128, initial_state=True),  # 3 groups of heads (9, 9, 6)
    GLACase(Hq=40, Hkv=2, K=200, V=64, cu_seqlens=(0, 3, 3, 90), initial_state=True, g_gamma=True),  # a short one steps
], ids=lambda c: c.id)
def test_many_query_heads_in_groups_match_reference(case):
    check(case)
