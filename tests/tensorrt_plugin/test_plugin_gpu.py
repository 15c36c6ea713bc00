"""The plugin's arithmetic on a GPU, without TensorRT (no TensorRT runtime can run on the GPU test
machine: DESIGN.md §6): the harness creates the plugin through its creator, configures it for a
profile larger than the call (as an engine would be), serialises and re-creates it, then runs
enqueue on device buffers (outputs poisoned with NaN) for both creators and every dtype. Outputs
and final states are compared with the float64 reference; a few small cases also run under
compute-sanitizer (memcheck, racecheck, initcheck).

Run on the GPU machine with plugins/tensorrt/tests/gpu_harness.sh (see docs/tensorrt.md).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from trt_helpers import TORCH_NAMES, HarnessInput, packed, run_harness, tensor_bytes, tensor_from, write_case

from gla_export.testing import TOLERANCE, GLACase, assert_close, make_inputs, reference

pytestmark = pytest.mark.gpu

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass
class PluginCase:
    op: str  # "gla" or "la-gated" or "la-linear"
    case: GLACase
    state_dtype: torch.dtype = F32
    cu_int64: bool = False
    scale: float = 0.0

    @property
    def id(self) -> str:
        extra = [] if self.state_dtype == F32 else [f"state-{TORCH_NAMES[self.state_dtype]}"]
        extra += ["cu64"] if self.cu_int64 else []
        extra += [f"scale{self.scale}"] if self.scale else []
        return "-".join([self.op, self.case.id, *extra])


CASES = [
    PluginCase("gla", GLACase(B=2, T=63, Hq=4, Hkv=4, K=16, V=16, dtype=F32, initial_state=True)),
    PluginCase("gla", GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=F16, initial_state=True)),
    PluginCase("gla", GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=BF16, initial_state=True)),
    PluginCase("gla", GLACase(B=3, T=1, Hq=4, Hkv=2, K=128, V=128, dtype=F16, initial_state=True)),  # decode step
    PluginCase("gla", GLACase(B=16, T=1, Hq=4, Hkv=4, K=256, V=512, dtype=F16, initial_state=True)),  # 1.3B decode
    PluginCase("gla", GLACase(B=1, T=1000, Hq=4, Hkv=4, K=128, V=128, dtype=F16, initial_state=True)),
    PluginCase("gla", GLACase(B=1, T=130, Hq=4, Hkv=4, K=256, V=512, dtype=BF16)),  # no past state
    PluginCase("gla", GLACase(B=2, T=63, K=16, V=16, dtype=F32, reverse=True), scale=0.3),
    PluginCase("gla", GLACase(B=2, T=65, Hq=6, Hkv=1, K=100, V=60, dtype=F16, initial_state=True), state_dtype=F16),
    PluginCase("gla", GLACase(B=2, T=40, Hq=2, Hkv=2, K=64, V=64, dtype=BF16, initial_state=True), state_dtype=BF16),
    PluginCase("gla", GLACase(Hq=4, Hkv=2, K=16, V=60, cu_seqlens=(0, 30, 30, 95, 96), initial_state=True, g_gamma=True)),
    PluginCase("gla", GLACase(K=64, V=64, dtype=F16, cu_seqlens=(0, 1, 2, 2, 70), g_gamma=True), cu_int64=True),
    PluginCase("la-gated", GLACase(B=2, T=63, Hq=4, Hkv=4, K=16, V=16, dtype=F32, initial_state=True)),
    PluginCase("la-gated", GLACase(B=2, T=65, Hq=4, Hkv=2, K=60, V=100, dtype=F16, initial_state=True, gate_per_head=True)),
    PluginCase("la-gated", GLACase(B=4, T=1, Hq=4, Hkv=4, K=128, V=128, dtype=BF16, initial_state=True)),
    PluginCase("la-linear", GLACase(B=2, T=63, Hq=4, Hkv=2, K=16, V=60, dtype=F32)),  # 3 inputs, no state in
    PluginCase("la-linear", GLACase(B=2, T=65, Hq=2, Hkv=2, K=32, V=32, dtype=F16, initial_state=True)),
]

SANITIZED = [CASES[0], CASES[1], CASES[10], CASES[13]]


def prepare(pc: PluginCase, case_dir: Path) -> dict:
    """Writes the harness case; returns the reference's keyword arguments."""
    c = pc.case
    kw = make_inputs(c)
    N = len(c.cu_seqlens) - 1 if c.cu_seqlens is not None else c.B
    B, T = kw["q"].shape[:2]
    if "initial_state" in kw:
        kw["initial_state"] = kw["initial_state"].to(pc.state_dtype)
    grow = (1, 2) if c.cu_seqlens is not None else (2, 2)  # the engine's profile is larger than the call

    def act(t: torch.Tensor) -> HarnessInput:
        p = packed(t)
        return HarnessInput(TORCH_NAMES[p.dtype], list(p.shape), {1} if c.cu_seqlens is not None else {0, 1},
                            [p.shape[0] * grow[0], p.shape[1] * grow[1], p.shape[2]], tensor_bytes(p))

    inputs = [act(kw["q"]), act(kw["k"]), act(kw["v"])]
    past = kw.get("initial_state")
    needs_past = past is not None or c.cu_seqlens is not None or c.g_gamma
    if pc.op == "gla":
        fields = {"q_num_heads": ("int32", c.Hq), "kv_num_heads": ("int32", c.Hkv), "scale": ("float32", pc.scale),
                  "reverse": ("int32", int(c.reverse))}
        inputs.append(act(kw["g"]))
    else:
        rule = "gated" if pc.op == "la-gated" else "linear"
        fields = {"q_num_heads": ("int32", c.Hq), "kv_num_heads": ("int32", c.Hkv), "scale": ("float32", pc.scale),
                  "update_rule": ("string", rule)}
        needs_past = needs_past or rule == "gated"
        if rule == "linear":
            kw["g"] = None
    if needs_past:
        # positional inputs: a later optional input needs the state, zeros stand for "none"
        state = past if past is not None else torch.zeros(N, c.Hkv, c.K, c.V, dtype=pc.state_dtype)
        inputs.append(HarnessInput(TORCH_NAMES[state.dtype], list(state.shape), {0}, [N * 2, *state.shape[1:]],
                                   tensor_bytes(state)))
    if pc.op == "la-gated":
        inputs.append(act(kw["g"]))  # decay, after the state in LinearAttention
    if c.cu_seqlens is not None:
        cu = torch.tensor(c.cu_seqlens, dtype=torch.int64 if pc.cu_int64 else torch.int32)
        inputs.append(HarnessInput(TORCH_NAMES[cu.dtype], [N + 1], {0}, [N + 3], tensor_bytes(cu)))
        kw["cu_seqlens"] = cu
    if c.g_gamma:
        inputs.append(HarnessInput("float32", [c.Hkv], set(), None, tensor_bytes(kw["g_gamma"])))
    if pc.scale:
        kw["scale"] = pc.scale
    write_case(case_dir, "GatedLinearAttention" if pc.op == "gla" else "LinearAttention", fields, inputs)
    kw["_shapes"] = ([B, T, c.Hq * c.V], [N, c.Hkv, c.K, c.V])
    return kw


@pytest.mark.parametrize("pc", CASES, ids=[pc.id for pc in CASES])
def test_enqueue_matches_the_reference(pc, harness, plugin_lib, tmp_path):
    kw = prepare(pc, tmp_path)
    out_shape, state_shape = kw.pop("_shapes")
    rc, r, log = run_harness(harness, plugin_lib, tmp_path, device=True)
    assert rc == 0 and r.get("ok"), f"{r.get('stage')}: {r.get('error')}\n{log}"
    assert r["device"] is True and r["enqueue"] == "ok"
    assert r["output_shapes"] == [out_shape, state_shape]
    o_ref, s_ref = reference(kw)
    act_name, state_name = r["output_types"]
    assert act_name == TORCH_NAMES[pc.case.dtype] and state_name == TORCH_NAMES[pc.state_dtype]
    o = tensor_from(tmp_path / "output0.bin", act_name, out_shape)
    s = tensor_from(tmp_path / "output1.bin", state_name, state_shape)
    tol = TOLERANCE[pc.case.dtype]
    assert_close("output", o, packed(o_ref), tol)
    assert_close("final state", s, s_ref, max(tol, TOLERANCE[pc.state_dtype]))
    assert r["recorded_errors"] == 0


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (Path("/usr/local/cuda/bin"), *sorted(Path("/usr/local").glob("cuda-*/bin"))):
        if (root / "compute-sanitizer").is_file():
            return str(root / "compute-sanitizer")
    return None


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
@pytest.mark.parametrize("pc", SANITIZED, ids=[pc.id for pc in SANITIZED])
def test_compute_sanitizer_is_clean(pc, tool, harness, plugin_lib, tmp_path):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.fail("compute-sanitizer not found (it ships with the CUDA toolkit: put its bin/ on PATH)")
    prepare(pc, tmp_path)
    rc, r, log = run_harness(harness, plugin_lib, tmp_path, device=True,
                             wrapper=[sanitizer, "--tool", tool, "--error-exitcode", "99"], timeout=900)
    assert rc == 0 and r.get("ok"), f"{tool}: rc={rc}\n{log[-4000:]}"
    assert "ERROR SUMMARY: 0 errors" in log or "RACECHECK SUMMARY: 0 hazards" in log, log[-2000:]
