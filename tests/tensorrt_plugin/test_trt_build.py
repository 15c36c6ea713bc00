"""One-node graphs of both ops through TensorRT's ONNX parser and builder, with our plugin loaded:
they must parse into one plugin layer with the right output shapes and types, and build into a
serialized plan that carries the plugin's fields. TensorRT-RTX builds plans on a machine without a
GPU (nothing runs: arithmetic is test_plugin_gpu.py's job). Errors: a bad attribute, a missing or
wrong plugin library, a plugin node without the library.

All builds of this file share one TensorRT child process (gla_export.runtime.tensorrt.run_jobs).
"""

from __future__ import annotations

import pytest
from trt_helpers import gla_node, la_node

from gla_export.errors import MissingRuntimeError
from gla_export.runtime.tensorrt import WorkerError, plugin_library, run_jobs

RANGES = {"B": (1, 2, 4), "T": (1, 16, 64), "N": (1, 2, 4), "N+1": (2, 3, 5)}
TRT_TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}

NODES = [
    gla_node("gla-fp32"),
    gla_node("gla-fp16-gqa-K60-V100", Hq=4, Hkv=2, K=60, V=100, act="float16"),
    gla_node("gla-bf16-nopast", Hq=2, Hkv=2, K=16, V=24, act="bfloat16", past=False, reverse=1),
    gla_node("gla-fp16-state-fp16-mqa", Hq=6, Hkv=1, act="float16", state="float16"),
    gla_node("gla-cu-int32-gamma", Hq=4, Hkv=2, cu="int32", gamma=True),
    gla_node("gla-cu-int64", cu="int64"),
    la_node("la-gated-fp32"),
    la_node("la-gated-fp16-gqa-per-head", Hq=4, Hkv=2, K=32, V=48, act="float16", per_head=True),
    la_node("la-gated-bf16", act="bfloat16", state="bfloat16"),
    la_node("la-linear-nopast", rule="linear", past=False),
]


def expected_dims(shape: list) -> list[int]:
    return [-1 if isinstance(d, str) else d for d in shape]


@pytest.fixture(scope="module")
def built(tmp_path_factory, trt_module, plugin_lib):
    root = tmp_path_factory.mktemp("nodes")
    jobs = []
    for case in NODES:
        path = root / f"{case.id}.onnx"
        path.write_bytes(case.onnx_model().SerializeToString())
        jobs.append({"name": case.id, "kind": "build", "onnx": str(path), "output": str(root / f"{case.id}.plan"),
                     "profiles": [case.profile(RANGES)], "strongly_typed": True})
    info, results = run_jobs(jobs, module=trt_module, plugins=[plugin_lib])
    return root, info, {r.name: r for r in results}


def test_library_registers_both_creators(built):
    _, info, _ = built
    assert sorted(map(tuple, info["creators"])) == [("GatedLinearAttention", "1", ""), ("LinearAttention", "1", "")]


@pytest.mark.parametrize("case", NODES, ids=[c.id for c in NODES])
def test_node_builds_into_a_plan(case, built):
    root, _, results = built
    r = results[case.id]
    assert r.ok, f"{case.id}: {r.error}\n" + "\n".join(r.data.get("messages", []) + r.data.get("plugin_messages", []))
    assert r.data["plugin_layers"] == 1 and r.data["layers"] == 1
    out, state = r.data["outputs"]
    assert out["shape"] == expected_dims(case.expect_shapes[0])
    assert state["shape"] == expected_dims(case.expect_shapes[1])
    assert (out["dtype"], state["dtype"]) == tuple(TRT_TYPES[t] for t in case.out_types)
    plan = (root / f"{case.id}.plan").read_bytes()
    assert len(plan) == r.data["bytes"] > 0
    # TensorRT stored what getFieldsToSerialize emitted, under the creator's name
    assert case.op.encode() in plan
    names = ["q_num_heads", "kv_num_heads", "scale", "chunk_size"]
    names += ["update_rule"] if case.op == "LinearAttention" else ["reverse"]
    for name in names:
        assert name.encode() in plan, f"field {name} is not in the plan"
    assert r.data["plugin_messages"] == []


def _one(tmp_path, trt_module, case, plugins):
    path = tmp_path / f"{case.id}.onnx"
    path.write_bytes(case.onnx_model().SerializeToString())
    job = {"name": case.id, "kind": "build", "onnx": str(path), "output": str(tmp_path / "x.plan"),
           "profiles": [case.profile(RANGES)], "strongly_typed": True}
    _, (r,) = run_jobs([job], module=trt_module, plugins=plugins)
    return r


def test_bad_attributes_fail_with_the_plugins_reason(tmp_path, trt_module, plugin_lib):
    delta = la_node("la-delta", rule="delta", beta=True)
    heads = gla_node("gla-6-of-4", Hq=6, Hkv=4)
    paths = []
    for case in (delta, heads):
        p = tmp_path / f"{case.id}.onnx"
        p.write_bytes(case.onnx_model().SerializeToString())
        paths.append(p)
    jobs = [{"name": c.id, "kind": "parse", "onnx": str(p)} for c, p in zip((delta, heads), paths)]
    _, results = run_jobs(jobs, module=trt_module, plugins=[plugin_lib])
    assert not results[0].ok and "attribute update_rule='delta' is not supported" in results[0].error
    assert not results[1].ok and "attribute q_num_heads=6 must be a multiple of kv_num_heads=4" in results[1].error
    assert not (tmp_path / "x.plan").exists()


def test_plugin_node_without_the_library_says_what_to_load(tmp_path, trt_module):
    r = _one(tmp_path, trt_module, gla_node("gla-no-lib"), plugins=[])
    assert not r.ok
    assert "GatedLinearAttention" in r.error and "libgla_tensorrt.so" in r.error


def test_missing_plugin_library_is_a_clear_error(tmp_path, trt_module):
    with pytest.raises(MissingRuntimeError, match="does not exist"):
        plugin_library(tmp_path / "libgla_tensorrt.so")
    with pytest.raises(WorkerError, match="registered no creator"):
        run_jobs([], module=trt_module, plugins=[str(tmp_path / "libgla_tensorrt.so")])


def test_a_library_that_is_no_plugin_is_refused(trt_module):
    from gla_export import library_path

    with pytest.raises(WorkerError, match="registered no creator"):
        run_jobs([], module=trt_module, plugins=[library_path("kernels")])
