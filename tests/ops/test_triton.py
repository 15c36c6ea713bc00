"""The Triton backend (chunked prefill and fused recurrent kernels) against the float64 reference.

Two runs of one parametrised suite:

- CPU (CI): small shapes through the Triton interpreter. ``TRITON_INTERPRET=1`` has to be set
  before ``triton.jit`` decorates the kernels, and setting it in this process would switch the
  interpreter on for every other test (and for the GPU tests on a GPU machine), so the cases
  run in worker subprocesses (this file run as a script) that save inputs and outputs; the
  comparisons happen here.
- CUDA (``@pytest.mark.gpu``): full sizes, T up to 4097, d_k 256, d_v 512.

Every buffer a kernel writes is filled with NaN before the launch (``common.POISON``), so a
position a kernel never writes fails the comparison.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gla_export.testing import DTYPES, TOLERANCE, GLACase, assert_close, make_inputs, reference

ROOT = Path(__file__).resolve().parents[2]
FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# Our fp32 paths use exact float32 products; measured ~2e-7 on these shapes, so hold them to
# 10x tighter than the shared float32 tolerance. 16-bit inputs keep the shared tolerances: their
# error is dominated by rounding the output (and, in the chunk kernels, the operands) to 16 bits.
OWN_TOLERANCE = {**TOLERANCE, FP32: 2e-6}
# Decays down to -100 a step make |Γ| reach thousands inside a chunk; the factors that matter
# are differences of such sums, so Γ's float32 rounding (~1e-4 absolute) shows (chunk.py too).
EXTREME_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Variant:
    """A GLACase run through one kernel family, with the options GLACase does not carry."""

    case: GLACase
    kernel: str  # "chunk", "recurrent", "auto" (triton_gla) or "op" (gated_linear_attention(backend="triton"))
    gate: str = "key"  # "key" / "head" follow case.gate_per_head; "none" drops g
    state: torch.dtype | None = None  # dtype of the initial state (float32 when None)
    extreme: bool = False  # decays down to about -100 per step
    huge: bool = False  # q, k ×100 and the state ×1e5: scores and state past float16's 65504
    scale: float | None = None

    @property
    def id(self) -> str:
        name = {v: k for k, v in DTYPES.items()}
        parts = [self.kernel, self.case.id]
        parts += ["nogate"] if self.gate == "none" else []
        parts += [f"state{name[self.state]}"] if self.state is not None else []
        parts += ["extreme"] if self.extreme else []
        parts += ["huge"] if self.huge else []
        parts += [f"scale{self.scale}"] if self.scale is not None else []
        return "-".join(parts)


def C(**kw) -> GLACase:
    return GLACase(**kw)


# Interpreter cases: T <= 70, d <= 64 except one multi-block case; every option, dtype, both kernels.
INTERP = [
    Variant(C(B=2, T=65, Hq=4, Hkv=2, K=60, V=48, initial_state=True), "chunk"),
    Variant(C(B=2, T=63, Hq=2, Hkv=2, K=32, V=16, dtype=FP16, g_gamma=True, reverse=True), "chunk"),
    Variant(C(B=1, T=65, Hq=2, Hkv=2, K=16, V=60, dtype=BF16, initial_state=True, gate_per_head=True), "chunk"),
    Variant(C(Hq=4, Hkv=2, K=16, V=16, cu_seqlens=(0, 0, 17, 18, 70), initial_state=True, reverse=True), "chunk"),
    Variant(C(Hq=2, Hkv=2, K=32, V=32, dtype=FP16, cu_seqlens=(0, 40, 40, 69), g_gamma=True, gate_per_head=True), "chunk"),
    Variant(C(B=1, T=20, Hq=2, Hkv=1, K=100, V=100, g_gamma=True), "chunk", gate="none", scale=0.3),
    Variant(C(B=1, T=40, Hq=2, Hkv=2, K=16, V=16), "chunk", gate="none"),
    Variant(C(B=1, T=1, Hq=2, Hkv=2, K=16, V=16, initial_state=True), "chunk"),
    Variant(C(B=1, T=33, Hq=2, Hkv=2, K=16, V=16, dtype=FP16, initial_state=True), "chunk", state=FP16),
    Variant(C(B=1, T=64, Hq=2, Hkv=2, K=32, V=32, initial_state=True), "chunk", extreme=True),
    Variant(C(B=1, T=50, Hq=2, Hkv=2, K=16, V=16, dtype=FP16, initial_state=True), "chunk", huge=True, scale=1e-5),
    Variant(C(B=2, T=1, Hq=4, Hkv=2, K=60, V=48, initial_state=True), "recurrent"),
    Variant(C(B=2, T=1, Hq=2, Hkv=2, K=32, V=16, dtype=FP16, initial_state=True, g_gamma=True, gate_per_head=True), "recurrent"),
    Variant(C(B=1, T=1, Hq=2, Hkv=2, K=16, V=100, dtype=BF16, initial_state=True), "recurrent"),
    Variant(C(B=1, T=17, Hq=4, Hkv=1, K=16, V=16, g_gamma=True, reverse=True), "recurrent"),
    Variant(C(Hq=2, Hkv=2, K=16, V=32, dtype=BF16, cu_seqlens=(0, 0, 1, 9, 20), initial_state=True, reverse=True), "recurrent"),
    Variant(C(B=1, T=9, Hq=2, Hkv=2, K=16, V=16, dtype=FP64, initial_state=True, g_gamma=True), "auto"),
    Variant(C(B=1, T=5, Hq=2, Hkv=2, K=16, V=16, dtype=FP16, initial_state=True), "recurrent", state=BF16),
    Variant(C(B=1, T=8, Hq=2, Hkv=2, K=32, V=16), "recurrent", gate="none"),
    Variant(C(B=1, T=6, Hq=2, Hkv=2, K=16, V=16, initial_state=True), "auto", state=FP64),
    Variant(C(B=1, T=40, Hq=4, Hkv=2, K=16, V=24, dtype=BF16, g_gamma=True, initial_state=True), "op"),
]


def _gpu_variants() -> list[Variant]:
    """Full-size CUDA cases: T 1/63/65/1000/4097, d_k 128/256, d_v 128/512, every dtype and option."""
    out = []
    shapes = [(128, 128, 4, 4), (256, 512, 4, 2)]
    options = [
        dict(initial_state=True),
        dict(g_gamma=True, reverse=True),
        dict(initial_state=True, gate_per_head=True),
        dict(initial_state=True, g_gamma=True, reverse=True),
        dict(),
    ]
    i = 0
    for T in (1, 63, 65, 1000, 4097):
        for K, V, Hq, Hkv in shapes:
            for dtype in (FP32, FP16, BF16):
                opts = options[i % len(options)]
                i += 1
                B = 1 if T == 4097 else 2
                case = C(B=B, T=T, Hq=Hq, Hkv=Hkv, K=K, V=V, dtype=dtype, **opts)
                out.append(Variant(case, "chunk"))
                if T <= 65:
                    out.append(Variant(case, "recurrent"))
    out += [
        Variant(C(Hq=8, Hkv=4, K=128, V=128, dtype=FP16, cu_seqlens=(0, 0, 1, 64, 129, 1129, 1130), initial_state=True), "chunk"),
        Variant(C(Hq=4, Hkv=2, K=256, V=512, dtype=BF16, cu_seqlens=(0, 4097, 4097, 4160), g_gamma=True, reverse=True), "chunk"),
        Variant(C(Hq=8, Hkv=4, K=128, V=128, cu_seqlens=(0, 0, 1, 3, 35, 36), initial_state=True, reverse=True), "recurrent"),
        Variant(C(B=2, T=1000, Hq=4, Hkv=4, K=128, V=128, g_gamma=True), "chunk", gate="none"),
        Variant(C(B=2, T=1000, Hq=4, Hkv=4, K=128, V=128), "chunk", gate="none"),
        Variant(C(B=2, T=1000, Hq=4, Hkv=2, K=256, V=512, dtype=FP16, initial_state=True), "chunk", state=FP16),
        Variant(C(B=1, T=1000, Hq=4, Hkv=4, K=128, V=128, initial_state=True), "chunk", extreme=True),
        Variant(C(B=1, T=1000, Hq=4, Hkv=2, K=256, V=512, dtype=FP16, initial_state=True), "chunk", huge=True, scale=1e-6),
        Variant(C(B=16, T=1, Hq=4, Hkv=4, K=256, V=512, dtype=FP16, initial_state=True), "auto"),
        Variant(C(B=2, T=20, Hq=4, Hkv=4, K=100, V=60, dtype=FP64, initial_state=True, g_gamma=True), "auto"),
        Variant(C(B=2, T=65, Hq=6, Hkv=2, K=60, V=100, dtype=BF16, initial_state=True, g_gamma=True), "op"),
        Variant(C(B=2, T=63, Hq=4, Hkv=4, K=16, V=16, dtype=FP16), "chunk"),
        Variant(C(B=2, T=1000, Hq=4, Hkv=2, K=256, V=512, initial_state=True, g_gamma=True), "recurrent"),
    ]
    return out


GPU = _gpu_variants()


def _inputs(variant: Variant, device, seed: int) -> dict:
    kw = make_inputs(variant.case, device=device, seed=seed)
    if variant.gate == "none":
        kw["g"] = None
    elif variant.extreme:
        gen = torch.Generator().manual_seed(seed + 1)
        kw["g"] = F.logsigmoid(torch.randn(kw["g"].shape, generator=gen) * 30).to(kw["g"].dtype).to(device)
    if variant.huge:
        kw["q"], kw["k"] = kw["q"] * 100, kw["k"] * 100
        kw["initial_state"] = kw["initial_state"] * 1e5
    if variant.state is not None:
        kw["initial_state"] = kw["initial_state"].to(variant.state)
    if variant.scale is not None:
        kw["scale"] = variant.scale
    return kw


def _run(variant: Variant, kw: dict):
    from gla_export.ops import gated_linear_attention
    from gla_export.ops.triton_gla import triton_gla, triton_gla_chunk, triton_gla_recurrent

    fn = {
        "chunk": triton_gla_chunk,
        "recurrent": triton_gla_recurrent,
        "auto": triton_gla,
        "op": lambda **a: gated_linear_attention(**a, backend="triton"),
    }[variant.kernel]
    with torch.no_grad():
        return fn(**kw, output_final_state=True)


def _reference(kw: dict):
    """gla_export.testing.reference, but on the inputs' own device (a long float64 loop is fast on a GPU)."""
    if all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in kw.values()):
        return reference(kw)
    from gla_export.ops.naive import naive_gla

    args = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    return naive_gla(**args, output_final_state=True)


def _check(variant: Variant, kw: dict, o: torch.Tensor, s: torch.Tensor) -> None:
    o_ref, s_ref = _reference(kw)
    dtype = variant.case.dtype
    h0 = kw.get("initial_state")
    state_dtype = h0.dtype if h0 is not None else (FP64 if dtype == FP64 else FP32)
    assert o.dtype == dtype and tuple(o.shape) == tuple(o_ref.shape)
    assert s.dtype == state_dtype and tuple(s.shape) == tuple(s_ref.shape)
    tol = 1e-12 if dtype == FP64 else OWN_TOLERANCE[dtype]
    if variant.extreme:
        tol = max(tol, EXTREME_TOLERANCE)
    assert_close("output", o, o_ref, tol)
    # a float64 state means float64 accumulation (as in the reference); a narrower state is
    # rounded once more at the end
    s_tol = 1e-12 if state_dtype == FP64 else max(tol, OWN_TOLERANCE[state_dtype])
    assert_close("final state", s, s_ref, s_tol)


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter, in worker processes

def _worker(ids: list[str], seed: int, out_path: str) -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1: saves inputs and outputs of each case."""
    from gla_export.ops._triton import common

    common.POISON = True
    by_id = {v.id: v for v in INTERP}
    results = {}
    for n, vid in enumerate(ids):
        variant = by_id[vid]
        kw = _inputs(variant, "cpu", seed + n)
        try:
            o, s = _run(variant, kw)
            results[vid] = {"kw": kw, "o": o, "s": s}
        except Exception:  # reported by the test of this case
            results[vid] = {"error": traceback.format_exc()}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    """Run every interpreter case in two worker processes (CI has two cores); id -> result."""
    seed = int(os.environ.get("GLA_TEST_SEED", torch.seed() % (2**31)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ids = [v.id for v in INTERP]
    shards = [ids[0::2], ids[1::2]]
    procs = []
    for i, shard in enumerate(shards):
        out = tmp_path_factory.mktemp("interp") / f"shard{i}.pt"
        cmd = [sys.executable, __file__, "--worker", str(out), str(seed + 1000 * i), json.dumps(shard)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
    results = {}
    for proc, out in procs:
        log, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"interpreter worker failed (exit {proc.returncode}, seed {seed}):\n{log[-4000:]}")
        results.update(torch.load(out, weights_only=True))
    results["_seed"] = seed
    return results


@pytest.mark.parametrize("variant", INTERP, ids=lambda v: v.id)
def test_interpreter_matches_reference(interpreter_results, variant):
    result = interpreter_results[variant.id]
    if "error" in result:
        pytest.fail(f"kernel raised (seed {interpreter_results['_seed']}):\n{result['error']}")
    _check(variant, result["kw"], result["o"], result["s"])


def test_interpreter_cases_cover_every_option():
    """The CPU suite is the only one CI runs: keep it covering both kernels, every dtype and option."""
    seen = set()
    for v in INTERP:
        c = v.case
        fam = {"chunk": "chunk", "op": "chunk", "recurrent": "recurrent", "auto": "recurrent"}[v.kernel]
        seen |= {fam, f"{fam}-{c.dtype}", v.gate if not c.gate_per_head else "head"}
        seen |= {f"{fam}-{flag}" for flag in ("initial_state", "g_gamma", "reverse") if getattr(c, flag)}
        seen |= {f"{fam}-cu"} if c.cu_seqlens is not None and 0 in [b - a for a, b in zip(c.cu_seqlens, c.cu_seqlens[1:])] else set()
        seen |= {f"{fam}-gqa"} if c.Hq != c.Hkv else set()
        seen |= {f"{fam}-T1"} if c.T == 1 and c.cu_seqlens is None else set()
        seen |= {f"state-{v.state}"} if v.state else set()
    need = {"chunk", "recurrent", "key", "head", "none", "state-torch.float16", "state-torch.bfloat16", "state-torch.float64"}
    for fam in ("chunk", "recurrent"):
        need |= {f"{fam}-{d}" for d in (FP32, FP16, BF16)}
        need |= {f"{fam}-{f}" for f in ("initial_state", "g_gamma", "reverse", "cu", "gqa", "T1")}
    assert need <= seen, f"missing: {sorted(need - seen)}"


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects (tl.dot shapes, layouts, dtypes): build
    every kernel family for sm_90 through ptxas, no GPU needed (gla_export/ops/_triton/aot.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [sys.executable, "-m", "gla_export.ops._triton.aot", "--arch", "90", "--quick"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(proc.stdout)
    for kernel in ("_gate_cumsum_kernel", "_chunk_state_kernel", "_chunk_scores_kernel", "_chunk_output_kernel", "_recurrent_kernel"):
        assert kernel in proc.stdout


# ---------------------------------------------------------------------------------------------
# CPU: argument handling (no kernel launches)

@pytest.fixture
def interpreting(monkeypatch):
    """Lets CPU tensors past the device check; these tests fail before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _small(**kw):
    return make_inputs(C(B=1, T=4, Hq=2, Hkv=2, K=16, V=16, **kw))


def test_cpu_tensors_need_cuda_or_the_interpreter(monkeypatch):
    from gla_export.ops import GLAShapeError
    from gla_export.ops.triton_gla import triton_gla

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GLAShapeError, match="q is on cpu.*backend='chunk'"):
        triton_gla(**_small())


def test_gradients_are_refused(interpreting):
    from gla_export.ops.triton_gla import triton_gla

    kw = _small()
    kw["k"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward only.*k require grad"):
        triton_gla(**kw)


def test_inputs_on_two_devices_are_refused(interpreting):
    from gla_export.ops import GLAShapeError
    from gla_export.ops.triton_gla import triton_gla

    kw = _small()
    kw["g"] = kw["g"].to("meta")
    with pytest.raises(GLAShapeError, match="g is on meta but q is on cpu"):
        triton_gla(**kw)


def test_bad_shapes_name_the_input(interpreting):
    from gla_export.ops import GLAShapeError
    from gla_export.ops.triton_gla import triton_gla

    kw = _small(initial_state=True)
    kw["initial_state"] = kw["initial_state"][:, :, :8]
    with pytest.raises(GLAShapeError, match=r"initial_state must be .* got shape \[1, 2, 8, 16\]"):
        triton_gla(**kw)


def test_chunk_kernels_refuse_float64(interpreting):
    from gla_export.ops import GLAShapeError
    from gla_export.ops.triton_gla import triton_gla_chunk

    with pytest.raises(GLAShapeError, match="float64"):
        triton_gla_chunk(**_small(dtype=FP64))


@pytest.mark.parametrize("cu, h0", [(None, False), (None, True), ((0, 0, 0), True)])
def test_empty_time_axis_returns_the_initial_state(interpreting, cu, h0):
    from gla_export.ops.triton_gla import triton_gla

    T = 0
    N = 2 if cu else 3
    B = 1 if cu else 3
    q, k, v = torch.randn(B, T, 2, 16), torch.randn(B, T, 2, 16), torch.randn(B, T, 2, 8)
    s0 = torch.randn(N, 2, 16, 8) if h0 else None
    o, s = triton_gla(q, k, v, None, initial_state=s0, output_final_state=True, cu_seqlens=None if cu is None else torch.tensor(cu))
    assert o.shape == (B, 0, 2, 8)
    assert torch.equal(s, s0 if h0 else torch.zeros(N, 2, 16, 8))
    assert s0 is None or s.data_ptr() != s0.data_ptr()


def test_kernel_choice():
    from gla_export.ops.triton_gla import RECURRENT_MAX_T, pick_kernel

    assert pick_kernel(1, FP32) == "recurrent"
    assert pick_kernel(RECURRENT_MAX_T, FP16) == "recurrent"
    assert pick_kernel(RECURRENT_MAX_T + 1, BF16) == "chunk"
    assert pick_kernel(4097, FP64) == "recurrent"


# ---------------------------------------------------------------------------------------------
# CUDA: the same suite at full size

@pytest.fixture
def poisoned(monkeypatch):
    from gla_export.ops._triton import common

    monkeypatch.setattr(common, "POISON", True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GPU, ids=lambda v: v.id)
def test_cuda_matches_reference(poisoned, variant):
    seed = torch.initial_seed() % (2**31)  # the per-test seed tests/conftest.py set
    kw = _inputs(variant, "cuda", seed)
    o, s = _run(variant, kw)
    _check(variant, kw, o, s)


@pytest.mark.gpu
def test_cuda_auto_backend_picks_triton():
    from gla_export.ops import gated_linear_attention

    kw = make_inputs(C(B=1, T=100, Hq=2, Hkv=2, K=64, V=64, dtype=FP16), device="cuda")
    with torch.no_grad():
        o_auto, _ = gated_linear_attention(**kw, backend="auto")
        o_tri, _ = gated_linear_attention(**kw, backend="triton")
    assert torch.equal(o_auto, o_tri)


@pytest.mark.gpu
def test_cuda_stepping_reproduces_prefill():
    """Decode (the recurrent kernel, one token at a time) continues exactly where prefill stops."""
    from gla_export.ops.triton_gla import triton_gla

    case = C(B=2, T=300, Hq=4, Hkv=2, K=128, V=256, dtype=FP16, initial_state=True)
    kw = make_inputs(case, device="cuda")
    with torch.no_grad():
        o_full, s_full = triton_gla(**kw, output_final_state=True)
        s = kw["initial_state"]
        outs = []
        for t in range(0, case.T, 50):
            sl = {n: kw[n][:, t : t + 50] for n in ("q", "k", "v", "g")}
            o, s = triton_gla(**sl, initial_state=s, output_final_state=True)
            outs.append(o)
        for t in range(case.T, case.T + 3):  # then three single steps past the end
            sl = {n: kw[n][:, -1:] for n in ("q", "k", "v", "g")}
            _, s_full = triton_gla(**sl, initial_state=s_full, output_final_state=True)
            _, s = triton_gla(**sl, initial_state=s, output_final_state=True)
    assert_close("chunked prefill output", torch.cat(outs, 1), o_full, TOLERANCE[FP16])
    assert_close("state after steps", s, s_full, 1e-3)


# ---------------------------------------------------------------------------------------------
# the benchmark script's CPU-only paths

def _bench_module():
    if "bench_triton" not in sys.modules:  # benchmarks/ is not a package; dataclasses need the module registered
        spec = importlib.util.spec_from_file_location("bench_triton", ROOT / "benchmarks" / "bench_triton.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_triton"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_triton"]


def test_bench_parses_arguments_and_selects_cases():
    bench = _bench_module()
    args = bench.parse_args(["--cases", "decode-b1,prefill-d128", "--rep", "50", "--no-fla"])
    assert [c.name for c in bench.select_cases(args.cases)] == ["decode-b1", "prefill-d128"]
    assert args.rep == 50 and args.no_fla
    assert [c.name for c in bench.select_cases("all")] == [c.name for c in bench.CASES]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "prefill-nope"])


def test_bench_table_and_json(tmp_path, monkeypatch, capsys):
    bench = _bench_module()
    rows = [
        bench.Row("prefill-d128", "ours", 0.5, 1.2e-3, None),
        bench.Row("prefill-d128", "fla chunk_gla", 0.8, 3.0e-3, None),
        bench.Row("prefill-d128", "fla fused_recurrent_gla", None, None, "ImportError: no fla"),
    ]
    text = bench.format_table(rows)
    assert "1.60x" in text and "ImportError" in text
    monkeypatch.setenv("OUT", str(tmp_path))
    path = bench.write_json(rows, {"gpu": "none"})
    data = json.loads(Path(path).read_text())
    assert data["rows"][1]["ms"] == 0.8 and data["meta"]["gpu"] == "none"


BENCH_GLUE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_triton as b

def broken(q, k, v, g, h0):
    raise RuntimeError("kernel exploded")

ours = b.implementations(no_fla=True)
b.implementations = lambda no_fla: ours + [("broken", broken)]
case = b.Case("tiny", B=2, T=40, H=2, K=16, V=32, kind="decode")
rows = b.run_case(case, b.parse_args([]), device="cpu", bench=lambda fn, **kw: (fn(), 1.0)[1])
print(json.dumps([r.__dict__ for r in rows]))
"""


def test_bench_measures_on_the_same_inputs_and_survives_failures():
    """The benchmark's glue (inputs, float64 reference, errors, rows) through the interpreter on a
    tiny case. fla cannot run without a GPU; a failing implementation must leave a note, not a crash."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", BENCH_GLUE, str(ROOT / "benchmarks")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert set(rows) == {"ours", "broken"}
    assert rows["ours"]["ms"] == 1.0 and rows["ours"]["note"] is None and rows["ours"]["gbps"] > 0
    assert rows["ours"]["err"] < TOLERANCE[FP16] and rows["ours"]["state_err"] < TOLERANCE[FP16]
    assert rows["broken"]["ms"] is None and rows["broken"]["note"] == "RuntimeError: kernel exploded"


def test_bench_without_cuda_exits_with_a_clear_message(capsys):
    bench = _bench_module()
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the message is for machines without it")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cases", "decode-b1"])
    assert exc.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(json.loads(sys.argv[4]), int(sys.argv[3]), sys.argv[2])
