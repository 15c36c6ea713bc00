"""The CUDA kernels of the kernel core (plugins/kernels/src/cuda) against the float64 reference.

Two ways in, same code:

- on a GPU (``@pytest.mark.gpu``): libgla_kernels_capi's ``gla_cuda_forward`` on CUDA tensors,
  with every output poisoned with NaN beforehand so that an element the kernels forget to write
  fails the comparison;
- on the CPU, always: the same kernel source compiled with ``-DGLA_EMULATE`` into a small library
  that runs each CUDA thread as a fiber (plugins/kernels/src/cuda/emu). Slow, so it takes a
  curated set of small cases, but it runs the launchers, the tensor-core fragment layouts and the
  barriers of the real kernels, in CI, where there is no GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gla_export.testing import TOLERANCE, GLACase, assert_close, make_inputs, reference, rel_err

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "plugins" / "kernels" / "src"

STATUS_OK, STATUS_INVALID, STATUS_UNSUPPORTED, STATUS_WORKSPACE = 0, 1, 2, 4


def _tol(case_dtype: torch.dtype, state_dtype: torch.dtype = F32) -> tuple[float, float]:
    """(output, final state) tolerances: the activation dtype's, the state's own rounding at least."""
    tol = TOLERANCE[case_dtype]
    return tol, max(tol, TOLERANCE[state_dtype], 1e-5)


# ---- calling the kernels -------------------------------------------------------------------------


class _Runner:
    """Calls a forward(problem, tensors, workspace, bytes[, stream]) entry with poisoned outputs."""

    def __init__(self, forward, workspace_bytes, last_error, device: str, stream: bool):
        self.forward, self.workspace_bytes, self.last_error = forward, workspace_bytes, last_error
        self.device, self.stream = device, stream

    def __call__(self, kw: dict, workspace_bytes: int | None = None, expect: int = STATUS_OK):
        from gla_export.ops.native import Tensors, make_problem

        dev = self.device
        kw = {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        q, k, v, g = kw["q"], kw["k"], kw["v"], kw.get("g")
        h0, gamma, cu = kw.get("initial_state"), kw.get("g_gamma"), kw.get("cu_seqlens")
        problem = make_problem(q, k, v, g, kw.get("scale"), h0, gamma, kw.get("reverse", False), cu)
        B, T, Hq, _ = q.shape
        state_dtype = h0.dtype if h0 is not None else F32
        o = torch.full((B, T, Hq, v.shape[3]), float("nan"), dtype=q.dtype, device=dev)
        ht = torch.full((problem.num_seqs, problem.kv_heads, problem.head_dim_k, problem.head_dim_v), float("nan"),
                        dtype=state_dtype, device=dev)  # fmt: skip
        ins = [x if x is None else x.contiguous() for x in (q, k, v, None if g is None else g.to(q.dtype), h0, cu, gamma)]

        def ptr(t):
            return None if t is None or t.numel() == 0 else t.data_ptr()

        tensors = Tensors(*[ptr(t) for t in ins], ptr(o), ptr(ht))
        need = self.workspace_bytes(ctypes.byref(problem))
        nbytes = need if workspace_bytes is None else workspace_bytes
        ws = torch.full((nbytes + 256,), 0xFF, dtype=torch.uint8, device=dev)  # NaN bytes: no reliance on zeros
        addr = (ws.data_ptr() + 255) // 256 * 256 if nbytes else None
        args = [ctypes.byref(problem), ctypes.byref(tensors), addr, nbytes]
        if self.stream:
            args.append(ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        status = self.forward(*args)
        if expect != STATUS_OK:
            assert status == expect, f"status {status}, expected {expect}: {self.last_error().decode()}"
            return self.last_error().decode()
        assert status == STATUS_OK, f"status {status}: {self.last_error().decode()}"
        if dev == "cuda":
            torch.cuda.synchronize()
        return o, ht


@pytest.fixture(scope="module")
def gpu():
    from gla_export.ops.native import load_library

    lib = load_library()
    assert lib.gla_cuda_compiled(), "libgla_kernels_capi was built without its CUDA kernels"
    return _Runner(lib.gla_cuda_forward, lib.gla_cuda_workspace_bytes, lib.gla_last_error_message, "cuda", True)


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


def _emulation_build(out_dir: Path) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("the CUDA emulation needs g++ and the CUDA toolkit's headers (cuda_fp16.h)")
    lib = out_dir / "libgla_cuda_emu.so"
    cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-DGLA_EMULATE", "-w",
           f"-I{ROOT / 'plugins/kernels/include'}", f"-I{SRC}", f"-I{include}",
           str(SRC / "cuda/emu/emu_capi.cc"), str(SRC / "cuda/emu/emu.cc"), str(SRC / "common/status.cc"), "-o", str(lib)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = ctypes.CDLL(str(_emulation_build(tmp_path_factory.mktemp("cuda_emu"))))
    lib.gla_emu_forward.restype = ctypes.c_int
    lib.gla_emu_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.gla_emu_workspace_bytes.restype = ctypes.c_size_t
    lib.gla_emu_last_error.restype = ctypes.c_char_p
    runner = _Runner(lib.gla_emu_forward, lib.gla_emu_workspace_bytes, lib.gla_emu_last_error, "cpu", False)
    runner.lib = lib
    return runner


def _problem(kw):
    from gla_export.ops.native import make_problem

    return make_problem(kw["q"], kw["k"], kw["v"], kw.get("g"), None, kw.get("initial_state"), kw.get("g_gamma"),
                        kw.get("reverse", False), kw.get("cu_seqlens"))  # fmt: skip


def _plan(runner, kw) -> dict:
    p = _problem(kw)
    out = (ctypes.c_int64 * 11)()
    runner.lib.gla_emu_plan(ctypes.byref(p), out)
    return dict(zip(["chunk", "seg_len", "slots", "nkb", "nvb", "ct", "R", "threads", "gb", "v2", "v3"], list(out)))


def _check(run, kw, tol_o, tol_s, name=""):
    o_ref, s_ref = reference(kw)
    o, s = run(kw)
    assert o.dtype == kw["q"].dtype and o.shape == o_ref.shape
    assert_close(f"{name} output", o, o_ref, tol_o)
    assert_close(f"{name} final state", s, s_ref, tol_s)


# ---- the cases -------------------------------------------------------------------------------------

# tests/ops/test_ops.py's cases: odd head sizes, GQA, reverse, g_gamma, per-head gate, ragged
OPS_CASES = [
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
] + [GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=dt, initial_state=True, g_gamma=True) for dt in (F32, F16, BF16)]

# every sequence length class: decode, the step kernel's limit, chunk edges, long (segments)
T_CASES = [
    GLACase(B=2, T=t, Hq=4, Hkv=2, K=100, V=60, dtype=dt, initial_state=True, g_gamma=True)
    for t in (1, 2, 15, 63, 64, 65, 1000, 4097)
    for dt in (F32, F16, BF16)
]

# the model sizes: 1.3B GLA heads (256 x 512) and d128 heads; prefill and decode
BIG_CASES = [
    GLACase(B=1, T=t, Hq=4, Hkv=4, K=256, V=512, dtype=dt, initial_state=True)
    for t in (1, 65, 1000)
    for dt in (F32, F16, BF16)
] + [GLACase(B=2, T=t, Hq=8, Hkv=8, K=128, V=128, dtype=F16, initial_state=True, reverse=True) for t in (2, 700)] + [
    # odd d_v: no paired stores, no vector state accesses
    GLACase(B=2, T=t, Hq=2, Hkv=2, K=36, V=33, dtype=dt, initial_state=True) for t in (3, 130) for dt in (F32, F16)
]

RAGGED_CASES = [
    # long enough to be cut into segments, with empty sequences at both ends and inside
    GLACase(Hq=4, Hkv=2, K=64, V=96, cu_seqlens=(0, 0, 2500, 2500, 4100, 4101, 4101), initial_state=True,
            g_gamma=True),
    GLACase(Hq=2, Hkv=2, K=128, V=64, dtype=F16, cu_seqlens=(0, 1, 2, 3, 700, 701), reverse=True, initial_state=True),
    # decode through cu_seqlens: one step per sequence
    GLACase(Hq=4, Hkv=4, K=256, V=512, dtype=F16, cu_seqlens=tuple(range(9)), initial_state=True),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPS_CASES + T_CASES + BIG_CASES + RAGGED_CASES, ids=lambda c: c.id)
def test_gpu_matches_reference(gpu, case):
    kw = make_inputs(case)
    _check(gpu, kw, *_tol(case.dtype), case.id)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [F16, BF16], ids=["fp16state", "bf16state"])
@pytest.mark.parametrize("T", [1, 300])
def test_gpu_low_precision_state(gpu, state_dtype, T):
    case = GLACase(B=2, T=T, Hq=4, Hkv=2, K=64, V=128, dtype=F16, initial_state=True)
    kw = make_inputs(case)
    kw["initial_state"] = kw["initial_state"].to(state_dtype)
    o, s = gpu(kw)
    assert s.dtype == state_dtype
    o_ref, s_ref = reference(kw)
    tol_o, tol_s = _tol(F16, state_dtype)
    assert rel_err(o, o_ref) <= max(tol_o, TOLERANCE[state_dtype])
    assert rel_err(s, s_ref) <= tol_s


@pytest.mark.gpu
@pytest.mark.parametrize("T", [3, 500])
def test_gpu_no_gate_int64_seqlens_half_gamma(gpu, T):
    case = GLACase(Hq=4, Hkv=1, K=48, V=40, dtype=BF16, cu_seqlens=(0, T // 3, T // 3, T), g_gamma=True)
    kw = make_inputs(case)
    kw["g"] = None
    kw["cu_seqlens"] = kw["cu_seqlens"].long()
    kw["g_gamma"] = kw["g_gamma"].half()
    _check(gpu, kw, *_tol(BF16), "no gate")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("per_head", [False, True], ids=["keygate", "headgate"])
def test_gpu_extreme_decay_stays_finite(gpu, dtype, per_head):
    # decays down to about -100 per step, some columns fast, some slow: both the pivot split and
    # the exact per-pair path of the diagonal tiles
    case = GLACase(B=2, T=300, Hq=2, Hkv=2, K=64, V=64, dtype=dtype, gate_per_head=per_head, initial_state=True)
    kw = make_inputs(case)
    g = F.logsigmoid(torch.randn(kw["g"].shape) * 30)
    g[..., 1::2] = kw["g"][..., 1::2].float()
    kw["g"] = g.to(dtype)
    tol = max(TOLERANCE[dtype], 1e-4)
    _check(gpu, kw, tol, tol, "extreme decay")


# Every prefill path on the GPU, chosen here rather than by the environment of the whole run:
# where a head has 2+ value blocks GLA_CUDA_PREFILL picks v1, v2 or v3 (v1 elsewhere).
PREFILL_CASES = [
    GLACase(B=1, T=t, Hq=4, Hkv=4, K=256, V=512, dtype=dt, initial_state=True) for t in (65, 1000) for dt in (F32, F16, BF16)
] + [
    GLACase(B=2, T=700, Hq=8, Hkv=8, K=128, V=128, dtype=F16, initial_state=True, reverse=True),
    GLACase(B=1, T=4097, Hq=4, Hkv=2, K=100, V=130, dtype=BF16, initial_state=True, g_gamma=True),  # segments, GQA, odd
    GLACase(B=1, T=300, Hq=6, Hkv=1, K=64, V=200, dtype=F16, gate_per_head=True),
    GLACase(Hq=4, Hkv=2, K=64, V=96, cu_seqlens=(0, 0, 2500, 2500, 4100, 4101, 4101), initial_state=True, g_gamma=True),
    GLACase(Hq=2, Hkv=2, K=128, V=256, dtype=F16, cu_seqlens=(0, 1, 2, 3, 700, 701), reverse=True, initial_state=True),
]  # fmt: skip


@functools.cache
def _prefill_case(i: int):
    """Inputs and the float64 reference of PREFILL_CASES[i], once for the three versions."""
    kw = make_inputs(PREFILL_CASES[i], seed=1000 + i)
    return kw, reference(kw)


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("i", range(len(PREFILL_CASES)), ids=[c.id for c in PREFILL_CASES])
def test_gpu_prefill_versions_match_reference(gpu, i, version, monkeypatch):
    case = PREFILL_CASES[i]
    kw, (o_ref, s_ref) = _prefill_case(i)
    monkeypatch.setenv("GLA_CUDA_PREFILL", version)
    o, s = gpu(kw)
    tol_o, tol_s = _tol(case.dtype)
    assert_close(f"{case.id} {version} output", o, o_ref, tol_o)
    assert_close(f"{case.id} {version} final state", s, s_ref, tol_s)


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_gpu_prefill_versions_extreme_decay(gpu, version, dtype, monkeypatch):
    case = GLACase(B=2, T=300, Hq=2, Hkv=2, K=64, V=128, dtype=dtype, initial_state=True)
    kw = make_inputs(case)
    g = F.logsigmoid(torch.randn(kw["g"].shape) * 30)
    g[..., 1::2] = kw["g"][..., 1::2].float()
    kw["g"] = g.to(dtype)
    monkeypatch.setenv("GLA_CUDA_PREFILL", version)
    tol = max(TOLERANCE[dtype], 1e-4)
    _check(gpu, kw, tol, tol, f"extreme decay {version}")


def _assert_repeatable(gpu, case):
    # a race shows as a result that moves between runs on the same inputs
    kw = make_inputs(case)
    o1, s1 = gpu(kw)
    for _ in range(3):
        o2, s2 = gpu(kw)
        assert torch.equal(o1, o2) and torch.equal(s1, s2)


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_gpu_prefill_versions_repeatable(gpu, version, monkeypatch):
    monkeypatch.setenv("GLA_CUDA_PREFILL", version)
    _assert_repeatable(
        gpu, GLACase(B=1, T=2100, Hq=4, Hkv=2, K=256, V=256, dtype=F16, initial_state=True, g_gamma=True)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_gpu_prefill_versions_are_capture_safe(version, monkeypatch):
    # v2/v3 launch more kernels through the workspace: under stream capture in global mode (no host
    # synchronisation or allocation allowed) the replay must equal an eager call on new inputs, bitwise
    from gla_export.ops.native import native_gla

    monkeypatch.setenv("GLA_CUDA_PREFILL", version)
    case = GLACase(B=1, T=1100, Hq=4, Hkv=2, K=128, V=256, dtype=F16, initial_state=True, g_gamma=True)
    static = make_inputs(case, device="cuda", seed=0)
    native_gla(**static, output_final_state=True)  # warm-up: attributes set once
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        o, ht = native_gla(**static, output_final_state=True)
    for seed in range(2):
        new = make_inputs(case, device="cuda", seed=seed + 1)
        for name, t in new.items():
            if isinstance(t, torch.Tensor):
                static[name].copy_(t)
        graph.replay()
        want_o, want_ht = native_gla(**new, output_final_state=True)
        torch.cuda.synchronize()
        assert torch.equal(o, want_o) and torch.equal(ht, want_ht)


@pytest.mark.gpu
def test_gpu_big_gqa_group_and_large_head(gpu):
    # 24 query heads share one key/value head; d_k past the chunk kernel's 256 runs step by step
    _check(gpu, make_inputs(GLACase(B=1, T=70, Hq=24, Hkv=1, K=64, V=32, dtype=F16)), *_tol(F16), "G24")
    _check(gpu, make_inputs(GLACase(B=1, T=20, Hq=2, Hkv=2, K=384, V=40, initial_state=True)), *_tol(F32), "K384")


@pytest.mark.gpu
def test_gpu_repeatable_bit_for_bit(gpu):
    _assert_repeatable(
        gpu, GLACase(B=1, T=2100, Hq=4, Hkv=2, K=128, V=128, dtype=F16, initial_state=True, g_gamma=True)
    )


@pytest.mark.gpu
def test_gpu_errors_are_statuses(gpu):
    kw = make_inputs(GLACase(B=1, T=3000, Hq=2, Hkv=2, K=64, V=64, dtype=F16))
    msg = gpu(kw, workspace_bytes=64, expect=STATUS_WORKSPACE)
    assert "workspace" in msg
    msg = gpu(make_inputs(GLACase(B=1, T=5, Hq=1, Hkv=1, K=1100, V=8)), expect=STATUS_UNSUPPORTED)
    assert "head_dim_k" in msg


@pytest.mark.gpu
def test_gpu_through_the_op(gpu):
    from gla_export.ops.native import native_gla

    kw = make_inputs(GLACase(B=2, T=200, Hq=4, Hkv=2, K=64, V=64, dtype=F16, initial_state=True), device="cuda")
    o, s = native_gla(**kw, output_final_state=True)
    o_ref, s_ref = reference(kw)
    assert rel_err(o, o_ref) <= TOLERANCE[F16] and rel_err(s, s_ref) <= TOLERANCE[F16]


# ---- the same kernels in the CPU emulation (CI) ----------------------------------------------------

EMU_CASES = [
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=60, V=100, initial_state=True, g_gamma=True),  # step kernel, GQA
    GLACase(B=1, T=65, Hq=2, Hkv=1, K=100, V=60, dtype=F16, initial_state=True, reverse=True),  # chunk, 2 key blocks
    GLACase(B=2, T=63, K=16, V=16, dtype=BF16, gate_per_head=True, g_gamma=True),
    GLACase(B=1, T=70, Hq=1, Hkv=1, K=60, V=36),  # fp32: the two-plane bf16 split
    GLACase(B=1, T=70, Hq=2, Hkv=2, K=20, V=33, dtype=F16, initial_state=True),  # odd d_v: scalar stores
    GLACase(Hq=2, Hkv=1, K=16, V=16, cu_seqlens=(0, 1300, 1300), initial_state=True),  # segments, ragged
]


@pytest.mark.slow
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: c.id)
def test_emulated_kernels_match_reference(emu, case):
    kw = make_inputs(case)
    _check(emu, kw, *_tol(case.dtype), case.id)


def test_emulated_plan_covers_every_kernel(emu):
    # the cases above must reach the step kernel, the chunk kernel and the segment passes
    plans = [_plan(emu, make_inputs(c)) for c in EMU_CASES]
    assert any(not p["chunk"] for p in plans)
    assert any(p["chunk"] and p["seg_len"] == 0 for p in plans)
    assert any(p["chunk"] and p["seg_len"] > 0 for p in plans)


# Prefill v2 (shared scores: gla_scores_kernel, then the main kernel without Q̃K̃ᵀ) and v3 (the state
# at every chunk boundary, the scores, then every chunk's output in parallel) wherever a head has two
# or more value blocks of 64; GLA_CUDA_PREFILL picks v1, v2 or v3 (read at each call).
V2_CASES = [
    GLACase(B=1, T=130, Hq=4, Hkv=2, K=60, V=100, initial_state=True, g_gamma=True),  # fp32 planes, GQA, odd
    GLACase(B=2, T=70, Hq=2, Hkv=2, K=100, V=130, dtype=F16, initial_state=True, reverse=True),  # 2 key, 3 value blocks
    GLACase(B=1, T=65, Hq=2, Hkv=1, K=16, V=72, dtype=BF16, gate_per_head=True, g_gamma=True),
    # segments (the sequences are long enough: the plan asserts it below), empty sequences
    GLACase(Hq=2, Hkv=1, K=16, V=80, dtype=F16, cu_seqlens=(0, 0, 1500, 1500, 2900, 2901), initial_state=True),
    GLACase(Hq=2, Hkv=2, K=32, V=96, cu_seqlens=(0, 40, 40, 170), reverse=True, initial_state=True),  # ragged, no segments
    GLACase(B=1, T=70, Hq=2, Hkv=1, K=200, V=130, dtype=F16, initial_state=True),  # 4 key blocks
    GLACase(B=1, T=80, Hq=1, Hkv=1, K=256, V=72, initial_state=True, reverse=True),  # 4 key blocks, fp32 planes
]  # fmt: skip


# v3 only: odd sizes in every dtype, a chunk-multiple length, GQA with segments and ragged empty
# sequences, no gate with g_gamma, a per-head gate
V3_CASES = [
    GLACase(B=2, T=129, Hq=2, Hkv=2, K=36, V=70, dtype=dt, initial_state=True, g_gamma=True) for dt in (F32, F16, BF16)
] + [
    GLACase(B=1, T=128, Hq=4, Hkv=1, K=64, V=128, dtype=BF16, initial_state=True),
    GLACase(Hq=4, Hkv=2, K=20, V=66, dtype=BF16, cu_seqlens=(0, 1100, 1100, 1101, 1300), initial_state=True,
            g_gamma=True),  # segments, GQA, an empty and a one-step sequence
    GLACase(B=2, T=90, Hq=2, Hkv=2, K=70, V=65, dtype=F16, gate_per_head=True, reverse=True),
    # segments, dense (the last one partial) and ragged (reverse, an empty and a one-step sequence)
    GLACase(B=1, T=1100, Hq=2, Hkv=1, K=16, V=72, dtype=F16, initial_state=True, g_gamma=True),
    GLACase(Hq=2, Hkv=1, K=16, V=80, dtype=BF16, cu_seqlens=(0, 0, 1500, 1500, 2900, 2901), initial_state=True,
            reverse=True),
]  # fmt: skip


def test_emulated_v2_v3_cases_reach_segments(emu, monkeypatch):
    # the chunk-boundary states of v3 start from the segment pass's states: both kinds of cases
    monkeypatch.setenv("GLA_CUDA_PREFILL", "v3")
    for cases in (V2_CASES, V3_CASES):
        plans = [_plan(emu, make_inputs(c)) for c in cases]
        assert any(p["seg_len"] > 0 for p in plans) and any(p["seg_len"] == 0 for p in plans)


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("case", V2_CASES, ids=lambda c: c.id)
def test_emulated_v2_v3_match_reference(emu, case, version, monkeypatch):
    kw = make_inputs(case)
    monkeypatch.setenv("GLA_CUDA_PREFILL", version)
    plan = _plan(emu, kw)
    assert plan["chunk"] and plan[version] and plan["v2" if version == "v3" else "v3"] == 0, plan
    _check(emu, kw, *_tol(case.dtype), f"{case.id} {version}")


@pytest.mark.parametrize("case", V3_CASES, ids=lambda c: c.id)
def test_emulated_v3_matches_reference(emu, case, monkeypatch):
    kw = make_inputs(case)
    monkeypatch.setenv("GLA_CUDA_PREFILL", "v3")
    assert _plan(emu, kw)["v3"]
    _check(emu, kw, *_tol(case.dtype), case.id + " v3")


@pytest.mark.parametrize("case", [c for c in V3_CASES if c.T >= 1000 or (c.cu_seqlens and c.cu_seqlens[-1] >= 2000)],
                         ids=lambda c: c.id)  # fmt: skip
def test_emulated_v3_without_segments(emu, case, monkeypatch):
    # GLA_CUDA_V3_SEGMENTS=0 (a benchmark knob): whole-sequence walks, same workspace, same answer
    kw = make_inputs(case)
    monkeypatch.setenv("GLA_CUDA_PREFILL", "v3")
    with_segments = _plan(emu, kw)
    nbytes = emu.workspace_bytes(ctypes.byref(_problem(kw)))
    monkeypatch.setenv("GLA_CUDA_V3_SEGMENTS", "0")
    plan = _plan(emu, kw)
    assert with_segments["seg_len"] > 0 and plan["seg_len"] == 0 and plan["v3"]
    assert emu.workspace_bytes(ctypes.byref(_problem(kw))) == nbytes
    _check(emu, kw, *_tol(case.dtype), case.id + " v3 whole sequences")


@pytest.mark.parametrize("state_dtype", [F16, BF16], ids=["fp16state", "bf16state"])
def test_emulated_v3_low_precision_state(emu, state_dtype, monkeypatch):
    # the initial state read and the final state written in the state's own type
    kw = make_inputs(GLACase(B=2, T=100, Hq=2, Hkv=1, K=40, V=72, dtype=F16, initial_state=True))
    kw["initial_state"] = kw["initial_state"].to(state_dtype)
    monkeypatch.setenv("GLA_CUDA_PREFILL", "v3")
    assert _plan(emu, kw)["v3"]
    o, s = emu(kw)
    assert s.dtype == state_dtype
    o_ref, s_ref = reference(kw)
    assert rel_err(o, o_ref) <= max(TOLERANCE[F16], TOLERANCE[state_dtype])
    assert rel_err(s, s_ref) <= _tol(F16, state_dtype)[1]


def test_emulated_v3_no_gate_int64_seqlens(emu, monkeypatch):
    case = GLACase(Hq=2, Hkv=1, K=48, V=72, dtype=F16, cu_seqlens=(0, 100, 100, 230), g_gamma=True, initial_state=True)
    kw = make_inputs(case)
    kw["g"] = None
    kw["cu_seqlens"] = kw["cu_seqlens"].long()
    monkeypatch.setenv("GLA_CUDA_PREFILL", "v3")
    assert _plan(emu, kw)["v3"]
    _check(emu, kw, *_tol(F16), "no gate v3")


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_emulated_v2_v3_extreme_decay(emu, version, monkeypatch):
    # the exact per-pair diagonal path lives in the scores kernel
    kw = make_inputs(GLACase(B=1, T=100, Hq=1, Hkv=1, K=32, V=80, dtype=F16))
    g = F.logsigmoid(torch.randn(kw["g"].shape) * 30)
    g[..., ::3] = kw["g"][..., ::3].float()
    kw["g"] = g.half()
    monkeypatch.setenv("GLA_CUDA_PREFILL", version)
    assert _plan(emu, kw)[version]
    _check(emu, kw, 3e-3, 3e-3, f"extreme decay {version}")


def test_emulated_v1_v2_choice_keeps_the_workspace(emu, monkeypatch):
    # the choice never changes the workspace (a TensorRT plan declares it at build time); v1 by
    # default (v2 is opt-in until timed on a GPU); one value block: v1 only
    lib = emu.lib
    big = make_inputs(GLACase(B=1, T=300, Hq=4, Hkv=4, K=256, V=512, dtype=F16))
    d128 = make_inputs(GLACase(B=1, T=300, Hq=4, Hkv=4, K=128, V=128, dtype=F16))
    d64 = make_inputs(GLACase(B=1, T=300, Hq=4, Hkv=4, K=64, V=64, dtype=F16))
    monkeypatch.delenv("GLA_CUDA_PREFILL", raising=False)
    for kw in (big, d128, d64):
        assert not _plan(emu, kw)["v2"] and not _plan(emu, kw)["v3"]

    def ws(kw):
        from gla_export.ops.native import make_problem

        p = make_problem(kw["q"], kw["k"], kw["v"], kw.get("g"), None, None, None, False, None)
        return lib.gla_emu_workspace_bytes(ctypes.byref(p))

    sizes = {}
    for choice in ("v1", "v2", "v3"):
        monkeypatch.setenv("GLA_CUDA_PREFILL", choice)
        for version in ("v2", "v3"):
            assert _plan(emu, big)[version] == (choice == version) and _plan(emu, d128)[version] == (choice == version)
            assert not _plan(emu, d64)[version]
        sizes[choice] = [ws(kw) for kw in (big, d128, d64)]
    assert sizes["v1"] == sizes["v2"] == sizes["v3"]
    # the scores and (v3) the state at each of the 5 chunk boundaries
    assert sizes["v1"][0] >= 300 * 4 * 64 * 2 + 5 * 4 * 256 * 512 * 2


def test_emulated_v1_v2_v3_agree(emu, monkeypatch):
    kw = make_inputs(GLACase(B=1, T=150, Hq=2, Hkv=2, K=64, V=136, dtype=BF16, initial_state=True))
    outs = {}
    for choice in ("v1", "v2", "v3"):
        monkeypatch.setenv("GLA_CUDA_PREFILL", choice)
        outs[choice] = emu(kw)
    for choice in ("v2", "v3"):
        assert rel_err(outs["v1"][0], outs[choice][0]) <= TOLERANCE[BF16]
        assert rel_err(outs["v1"][1], outs[choice][1]) <= TOLERANCE[BF16]
        assert not torch.isnan(outs[choice][0]).any() and not torch.isnan(outs[choice][1]).any()


@pytest.mark.slow
def test_emulated_extreme_decay(emu):
    kw = make_inputs(GLACase(B=1, T=100, Hq=1, Hkv=1, K=32, V=16, dtype=F16))
    g = F.logsigmoid(torch.randn(kw["g"].shape) * 30)
    g[..., ::3] = kw["g"][..., ::3].float()
    kw["g"] = g.half()
    _check(emu, kw, 3e-3, 3e-3, "extreme decay")


def test_emulated_errors(emu):
    kw = make_inputs(GLACase(B=1, T=3000, Hq=2, Hkv=2, K=64, V=64, dtype=F16))
    assert "needs" in emu(kw, workspace_bytes=16, expect=STATUS_WORKSPACE)
    kw = make_inputs(GLACase(B=1, T=2, Hq=1, Hkv=1, K=1100, V=8))
    assert "head_dim_k" in emu(kw, expect=STATUS_UNSUPPORTED)


# Positive log-gates (a decay factor above 1) are outside what the docs recommend but are computed
# exactly as the formula says, on every path (docs/op-contract.md): no clamp, no check. Small ones
# keep the state finite; every kernel family (step, chunk, segments) must agree with the reference.
POSITIVE_GATE_CASES = [
    GLACase(B=2, T=1, Hq=4, Hkv=2, K=32, V=48, initial_state=True),
    GLACase(B=1, T=65, Hq=2, Hkv=2, K=64, V=64, initial_state=True),
    GLACase(B=1, T=1100, Hq=2, Hkv=1, K=32, V=32, dtype=F16),
    GLACase(B=2, T=70, Hq=2, Hkv=2, K=16, V=16, gate_per_head=True),
]


def _positive_gates(kw: dict) -> dict:
    kw["g"] = (kw["g"].float().abs() * 0.02 + 1e-3).to(kw["g"].dtype)
    return kw


@pytest.mark.parametrize("case", POSITIVE_GATE_CASES, ids=lambda c: c.id)
def test_emulated_positive_log_gates(emu, case):
    _check(emu, _positive_gates(make_inputs(case)), *_tol(case.dtype), "positive gates")


@pytest.mark.gpu
@pytest.mark.parametrize("case", POSITIVE_GATE_CASES, ids=lambda c: c.id)
def test_gpu_positive_log_gates(gpu, case):
    _check(gpu, _positive_gates(make_inputs(case, device="cuda")), *_tol(case.dtype), "positive gates")


@pytest.mark.parametrize("case", POSITIVE_GATE_CASES, ids=lambda c: c.id)
def test_cpu_and_chunk_positive_log_gates(case):
    from gla_export.ops import gated_linear_attention

    kw = _positive_gates(make_inputs(case))
    o_ref, s_ref = reference(kw)
    args = {k: v for k, v in kw.items() if k not in ("q", "k", "v", "g")}
    for backend in ("native", "chunk"):
        o, s = gated_linear_attention(kw["q"], kw["k"], kw["v"], kw["g"], output_final_state=True, backend=backend, **args)
        assert_close(f"{backend} output", o, o_ref, _tol(case.dtype)[0])
        assert_close(f"{backend} final state", s, s_ref, _tol(case.dtype)[1])


# The workspace a TensorRT plan declares for its profile is the planner's closed-form bound
# (forward.cuh, workspace_bound): it must cover every smaller problem, which the sampled search it
# replaced could not promise (the need is not monotonic: fewer sequences, more segments).
@pytest.mark.parametrize("heads, K, V, cu", [((2, 2), 64, 64, False), ((4, 2), 128, 128, False), ((1, 1), 256, 512, False),
                                             ((8, 8), 64, 64, False), ((2, 1), 64, 64, True), ((4, 4), 128, 96, True)],
                         ids=lambda x: str(x))
def test_emulated_workspace_bound_covers_the_profile(emu, heads, K, V, cu):
    from gla_export.ops.native import Problem

    lib = emu.lib
    lib.gla_emu_workspace_bound.restype = ctypes.c_size_t
    hq, hkv = heads
    max_n, max_t = 40, 2600

    def problem(n, t):
        return Problem(batch=1 if cu else n, seq_len=t, num_seqs=n, q_heads=hq, kv_heads=hkv, head_dim_k=K,
                       head_dim_v=V, act_dtype=1, has_gate=1, has_cu_seqlens=int(cu))

    bound = lib.gla_emu_workspace_bound(ctypes.byref(problem(max_n, max_t)))
    worst = max(lib.gla_emu_workspace_bytes(ctypes.byref(problem(n, t)))
                for n in range(1, max_n + 1) for t in list(range(1, 600, 7)) + list(range(600, max_t + 1, 61)) + [max_t])
    assert worst > 0, "no problem of this profile needs a workspace: it tests nothing"
    assert worst <= bound <= 4 * worst + (1 << 20), (worst, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("case", POSITIVE_GATE_CASES, ids=lambda c: c.id)
def test_gpu_triton_positive_log_gates(case):
    from gla_export.ops import gated_linear_attention, triton_available

    if not torch.cuda.is_available() or not triton_available():
        pytest.skip("needs a CUDA GPU and Triton")
    kw = _positive_gates(make_inputs(case, device="cuda"))
    o_ref, s_ref = reference(kw)
    args = {k: v for k, v in kw.items() if k not in ("q", "k", "v", "g")}
    with torch.no_grad():
        o, s = gated_linear_attention(kw["q"], kw["k"], kw["v"], kw["g"], output_final_state=True, backend="triton", **args)
    assert_close("triton output", o, o_ref, _tol(case.dtype)[0])
    assert_close("triton final state", s, s_ref, _tol(case.dtype)[1])
