"""The plugin's build-time interface, driven by the harness without a GPU (--no-device): what the
creators register, output types and shape expressions, formats accepted and refused, configure,
workspace, and the serialize -> createPlugin(runtime) round trip of the fields. Also the errors a
bad attribute or a bad shape gives: refused with a message naming it, never a crash.

The same harness runs enqueue on a GPU in test_plugin_gpu.py.
"""

from __future__ import annotations

import math

import pytest
from trt_helpers import HarnessInput, run_harness, write_case

B, T, MAXB, MAXT = 2, 63, 4, 128


def act(dtype: str, width: int) -> HarnessInput:
    return HarnessInput(dtype, [B, T, width], {0, 1}, [MAXB, MAXT, width])


def state(dtype: str, Hkv: int, K: int, V: int, rows: int = B, symbolic: bool = True) -> HarnessInput:
    return HarnessInput(dtype, [rows, Hkv, K, V], {0} if symbolic else set(), [MAXB if symbolic else rows, Hkv, K, V])


def gla_fields(Hq, Hkv, scale=0.0, reverse=0, chunk=None) -> dict:
    f = {"q_num_heads": ("int32", Hq), "kv_num_heads": ("int32", Hkv), "scale": ("float32", scale), "reverse": ("int32", reverse)}
    if chunk is not None:
        f["chunk_size"] = ("int32", chunk)
    return f


def la_fields(Hq, Hkv, rule="gated", scale=0.0) -> dict:
    return {"q_num_heads": ("int32", Hq), "kv_num_heads": ("int32", Hkv), "scale": ("float32", scale), "update_rule": ("string", rule)}


# (id, op, fields, inputs, output types, output shapes, expected serialized fields)
GOOD = [
    ("gla-fp32", "GatedLinearAttention", gla_fields(4, 4),
     [act("float32", 64), act("float32", 64), act("float32", 64), act("float32", 64), state("float32", 4, 16, 16)],
     ["float32", "float32"], [[B, T, 64], [B, 4, 16, 16]],
     {"q_num_heads": 4, "kv_num_heads": 4, "scale": 0.0, "reverse": 0, "chunk_size": 64}),
    ("gla-fp16-gqa-K60-V100", "GatedLinearAttention", gla_fields(4, 2, scale=0.125, chunk=32),
     [act("float16", 240), act("float16", 120), act("float16", 200), act("float16", 120), state("float32", 2, 60, 100)],
     ["float16", "float32"], [[B, T, 400], [B, 2, 60, 100]],
     {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.125, "reverse": 0, "chunk_size": 32}),
    ("gla-bf16-nopast", "GatedLinearAttention", gla_fields(2, 2, reverse=1),
     [act("bfloat16", 32), act("bfloat16", 32), act("bfloat16", 48), act("bfloat16", 32)],
     ["bfloat16", "float32"], [[B, T, 48], [B, 2, 16, 24]],
     {"q_num_heads": 2, "kv_num_heads": 2, "scale": 0.0, "reverse": 1, "chunk_size": 64}),
    ("gla-fp16-state-fp16", "GatedLinearAttention", gla_fields(6, 1),
     [act("float16", 96), act("float16", 16), act("float16", 16), act("float16", 16), state("float16", 1, 16, 16)],
     ["float16", "float16"], [[B, T, 96], [B, 1, 16, 16]],
     {"q_num_heads": 6, "kv_num_heads": 1, "scale": 0.0, "reverse": 0, "chunk_size": 64}),
    ("gla-cu-int64-gamma", "GatedLinearAttention", gla_fields(4, 2),
     [HarnessInput("float32", [1, 96, 64], {1}, [1, 200, 64]), HarnessInput("float32", [1, 96, 32], {1}, [1, 200, 32]),
      HarnessInput("float32", [1, 96, 32], {1}, [1, 200, 32]), HarnessInput("float32", [1, 96, 32], {1}, [1, 200, 32]),
      HarnessInput("float32", [3, 2, 16, 16], {0}, [7, 2, 16, 16]), HarnessInput("int64", [4], {0}, [8]),
      HarnessInput("float32", [2])],
     ["float32", "float32"], [[1, 96, 64], [3, 2, 16, 16]],
     {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.0, "reverse": 0, "chunk_size": 64}),
    ("la-gated-fp16", "LinearAttention", la_fields(4, 2),
     [act("float16", 64), act("float16", 32), act("float16", 40), state("float32", 2, 16, 20), act("float16", 32)],
     ["float16", "float32"], [[B, T, 80], [B, 2, 16, 20]],
     {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.0, "update_rule": "gated", "chunk_size": 64}),
    ("gla-per-head-gate", "GatedLinearAttention", gla_fields(4, 4),
     [act("float32", 64), act("float32", 64), act("float32", 64), act("float32", 4), state("float32", 4, 16, 16)],
     ["float32", "float32"], [[B, T, 64], [B, 4, 16, 16]],
     {"q_num_heads": 4, "kv_num_heads": 4, "scale": 0.0, "reverse": 0, "chunk_size": 64}),
    ("la-gated-per-head-bf16", "LinearAttention", la_fields(2, 2, scale=0.5),
     [act("bfloat16", 32), act("bfloat16", 32), act("bfloat16", 32), state("bfloat16", 2, 16, 16), act("bfloat16", 2)],
     ["bfloat16", "bfloat16"], [[B, T, 32], [B, 2, 16, 16]],
     {"q_num_heads": 2, "kv_num_heads": 2, "scale": 0.5, "update_rule": "gated", "chunk_size": 64}),
    ("la-linear-nopast", "LinearAttention", la_fields(4, 4, rule="linear"),
     [act("float32", 64), act("float32", 64), act("float32", 64)],
     ["float32", "float32"], [[B, T, 64], [B, 4, 16, 16]],
     {"q_num_heads": 4, "kv_num_heads": 4, "scale": 0.0, "update_rule": "linear", "chunk_size": 64}),
    ("la-linear-past-beta", "LinearAttention", la_fields(4, 4, rule="linear"),
     [act("float32", 64), act("float32", 64), act("float32", 64), state("float32", 4, 16, 16), act("float32", 64),
      act("float32", 4)],
     ["float32", "float32"], [[B, T, 64], [B, 4, 16, 16]],
     {"q_num_heads": 4, "kv_num_heads": 4, "scale": 0.0, "update_rule": "linear", "chunk_size": 64}),
]


@pytest.mark.parametrize("case", GOOD, ids=[c[0] for c in GOOD])
def test_build_interface(case, harness, plugin_lib, tmp_path):
    _, op, fields, inputs, out_types, out_shapes, serialized = case
    write_case(tmp_path, op, fields, inputs)
    rc, r, log = run_harness(harness, plugin_lib, tmp_path, device=False)
    assert rc == 0 and r.get("ok"), f"harness failed: {r.get('stage')}: {r.get('error')}\n{log}"
    assert ["GatedLinearAttention", "1", ""] in r["creators"] and ["LinearAttention", "1", ""] in r["creators"]
    assert r["plugin"] == [op, "1", ""]
    assert r["nb_outputs"] == 2
    assert r["output_types"] == out_types
    assert r["output_shapes"] == out_shapes
    # B and T stay symbolic expressions (TensorRT builds one engine for the whole profile);
    # head sizes are constants
    sym_in = inputs[0].symbolic
    assert r["output_dynamic"][0] == [0 in sym_in, 1 in sym_in, False]
    assert r["output_dynamic"][1][1:] == [False, False, False]
    # the profile maximum flows through the same expressions
    assert r["output_max_shapes"][0][:2] == inputs[0].max_dims[:2]
    assert r["formats_accepted"] is True
    assert r["formats_refused"] == {k: True for k in r["formats_refused"]}, r["formats_refused"]
    assert isinstance(r["workspace_bytes"], int) and r["workspace_bytes"] >= 0
    got = {f["name"]: f["value"] for f in r["fields"]}
    # beside the attributes, the plan carries the workspace the build declared (enqueue tells the
    # kernel core the real size, so its too-small guard can fire)
    assert got.pop("workspace_bytes") == r["workspace_bytes"]
    assert got.keys() == serialized.keys()
    for k, v in serialized.items():
        assert (math.isclose(got[k], v) if isinstance(v, float) else got[k] == v), (k, got[k], v)
    # deserialisation goes back through createPlugin: the runtime plugin serialises the same fields
    assert r["fields_roundtrip"] == r["fields"]
    assert r["timing_cache_id"].startswith(op)
    assert r["device"] is False
    assert r["messages"] == []


BAD = [
    # (id, op, fields, inputs, stage, words in the message)
    ("la-delta", "LinearAttention", la_fields(4, 4, rule="delta"),
     [act("float32", 64)] * 3, "createPlugin", ["attribute update_rule='delta' is not supported", "'gated', 'linear'"]),
    ("la-no-rule", "LinearAttention", {"q_num_heads": ("int32", 4), "kv_num_heads": ("int32", 4)},
     [act("float32", 64)] * 3, "createPlugin", ["update_rule is missing", "'gated_delta'", "set the attribute"]),
    ("gla-no-heads", "GatedLinearAttention", {"scale": ("float32", 0.0)},
     [act("float32", 64)] * 4, "createPlugin", ["q_num_heads", "missing"]),
    ("gla-heads-not-multiple", "GatedLinearAttention", gla_fields(6, 4),
     [act("float32", 96)] * 4, "createPlugin", ["attribute q_num_heads=6 must be a multiple of kv_num_heads=4"]),
    ("gla-reverse-2", "GatedLinearAttention", gla_fields(4, 4, reverse=2),
     [act("float32", 64)] * 4, "createPlugin", ["attribute reverse=2 must be 0 or 1"]),
    ("gla-unknown-attr", "GatedLinearAttention", {**gla_fields(4, 4), "update_rule": ("string", "gated")},
     [act("float32", 64)] * 4, "createPlugin", ["unknown attribute 'update_rule'"]),
    ("gla-head-size-mismatch", "GatedLinearAttention", gla_fields(4, 2),
     [act("float32", 64), act("float32", 64), act("float32", 32), act("float32", 64)], "getOutputShapes",
     ["input 'key' has shape [?,?,64], expected [B=?, T=?, kv_num_heads*d_k=32]"]),
    ("gla-value-not-multiple", "GatedLinearAttention", gla_fields(4, 4),
     [act("float32", 64), act("float32", 64), act("float32", 30), act("float32", 64)], "getOutputShapes",
     ["input 'value' has shape [?,?,30]: its last dimension must be a positive multiple of kv_num_heads=4"]),
    ("gla-query-rank4", "GatedLinearAttention", gla_fields(4, 4),
     [HarnessInput("float32", [B, T, 4, 16])] + [act("float32", 64)] * 3, "getOutputShapes",
     ["input 'query' has shape [2,63,4,16], expected rank 3"]),
    ("gla-too-many-inputs", "GatedLinearAttention", gla_fields(4, 4),
     [act("float32", 64)] * 8, "getOutputDataTypes", ["takes 4 to 7 inputs", "got 8"]),
    ("gla-past-state-shape", "GatedLinearAttention", gla_fields(4, 4),
     [act("float32", 64)] * 4 + [state("float32", 4, 17, 16)], "getOutputShapes",
     ["input 'past_state' has shape [?,4,17,16], expected [N=?, kv_num_heads=4, d_k=16, d_v=16]"]),
    ("gla-gate-shape", "GatedLinearAttention", gla_fields(4, 4),
     [act("float32", 64)] * 3 + [act("float32", 7)], "getOutputShapes",
     ["input 'gate' has shape [?,?,7], expected [B=?, T=?, kv_num_heads*d_k=64]", "[B, T, kv_num_heads=4]"]),
    ("gla-cu-with-batch", "GatedLinearAttention", gla_fields(4, 4),
     [HarnessInput("float32", [2, 9, 64])] * 4 + [HarnessInput("float32", [3, 4, 16, 16]), HarnessInput("int32", [4])],
     "getOutputShapes", ["input 'query' has shape [2,9,64]: with cu_seqlens the sequences are packed along T and B must be 1"]),
    ("la-gated-no-decay", "LinearAttention", la_fields(4, 4),
     [act("float32", 64)] * 3 + [state("float32", 4, 16, 16)], "getOutputDataTypes", ["input 'decay' is absent: update_rule 'gated' needs it"]),
    ("la-int-query", "LinearAttention", la_fields(4, 4, rule="linear"),
     [act("int32", 64)] + [act("float32", 64)] * 2, "getOutputDataTypes", ["input 'query' has element type int32, expected float32, float16 or bfloat16"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_with_a_clear_error(case, harness, plugin_lib, tmp_path):
    _, op, fields, inputs, stage, words = case
    write_case(tmp_path, op, fields, inputs)
    rc, r, log = run_harness(harness, plugin_lib, tmp_path, device=False)
    assert rc == 1, f"expected a refusal, got rc={rc}\n{log}"
    assert r.get("ok") is False and r["stage"] == stage, r
    message = " | ".join(r["messages"])
    assert f"{op} plugin 'harness_node'" in message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_library_exports_only_the_entry_points(plugin_lib):
    import subprocess

    out = subprocess.run(["nm", "-D", "--defined-only", plugin_lib], capture_output=True, text=True, check=True).stdout
    symbols = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert symbols == ["getCreators", "setLoggerFinder"], symbols
    dynamic = subprocess.run(["readelf", "-d", plugin_lib], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "nvinfer" in n or "tensorrt" in n or "cudart" in n], needed


def test_harness_refuses_a_library_without_the_entry_points(harness, tmp_path):
    from gla_export import library_path

    write_case(tmp_path, "GatedLinearAttention", gla_fields(4, 4), [act("float32", 64)] * 4)
    rc, r, _ = run_harness(harness, library_path("kernels"), tmp_path, device=False)
    assert rc == 1 and r["stage"] == "dlsym" and "getCreators" in r["error"]


# The workspace an engine gets is declared once for its whole profile; the kernel core's need is
# not monotonic in the sizes (fewer sequences can mean more parallel segments of T), so check the
# declared size against the kernel's need for every problem the profile allows.
WORKSPACE_PROFILES = [
    # (id, fields, inputs at their maximum, cu_seqlens)
    ("gla-fp16-K128", gla_fields(4, 4), ["float16", 512, 512, 512, 512, ("float32", 4, 128, 128)], 8, 600, False),
    ("gla-bf16-K256-V512", gla_fields(4, 4), ["bfloat16", 1024, 1024, 2048, 1024, None], 2, 3000, False),
    ("gla-cu-K64", gla_fields(2, 1), ["float32", 128, 64, 64, 64, ("float32", 1, 64, 64)], 6, 700, True),
    # here B = 63 needs more than B = 64 (the profile's maximum) does
    ("gla-fp16-B64-H2-K64", gla_fields(2, 2), ["float16", 128, 128, 128, 128, ("float32", 2, 64, 64)], 64, 2000, False),
]


@pytest.mark.parametrize("profile", WORKSPACE_PROFILES, ids=[p[0] for p in WORKSPACE_PROFILES])
def test_declared_workspace_covers_every_problem_of_the_profile(profile, harness, plugin_lib, tmp_path):
    from gla_export.ops.native import Problem, cuda_compiled, load_library

    _, fields, spec, max_n, max_t, cu = profile
    assert cuda_compiled(), "the kernel core was built without its CUDA kernels (CI has nvcc: it must have them)"
    dtype, qw, kw_, vw, gw, state = spec
    inputs = [HarnessInput(dtype, [1, 1, w], {1} if cu else {0, 1}, [1 if cu else max_n, max_t, w]) for w in (qw, kw_, vw, gw)]
    if state is not None:
        sdt, hkv, k, v = state
        inputs.append(HarnessInput(sdt, [1, hkv, k, v], {0}, [max_n, hkv, k, v]))
    if cu:
        inputs.append(HarnessInput("int32", [2], {0}, [max_n + 1]))
    write_case(tmp_path, "GatedLinearAttention", fields, inputs)
    rc, r, log = run_harness(harness, plugin_lib, tmp_path, device=False)
    assert rc == 0 and r["ok"], log
    declared = r["workspace_bytes"]

    lib = load_library()
    hq, hkv = fields["q_num_heads"][1], fields["kv_num_heads"][1]
    codes = {"float32": 0, "float16": 1, "bfloat16": 2}
    worst = (0, None)
    for n in range(1, max_n + 1):
        for t in range(1, max_t + 1):
            p = Problem(batch=1 if cu else n, seq_len=t, num_seqs=n, q_heads=hq, kv_heads=hkv, head_dim_k=qw // hq,
                        head_dim_v=vw // hkv, act_dtype=codes[dtype], state_dtype=codes[state[0]] if state else 0,
                        g_gamma_dtype=0, has_gate=1, gate_per_head=0, has_past_state=int(state is not None),
                        has_cu_seqlens=int(cu), cu_seqlens_int64=0, has_g_gamma=0, reverse=0, scale=0.0)
            need = lib.gla_cuda_workspace_bytes(p)
            if need > worst[0]:
                worst = (need, (n, t))
    assert worst[0] > 0, "no problem of this profile needs a workspace: the profile tests nothing"
    assert declared >= worst[0], f"declared {declared} bytes, but N, T = {worst[1]} needs {worst[0]}"
