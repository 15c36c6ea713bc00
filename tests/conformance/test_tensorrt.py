"""The conformance table through the TensorRT plugin, twice: TensorRT-RTX parses each node and
builds a plan (no GPU needed; gla_export.runtime.tensorrt.run_jobs, one child process for all),
and the plugin harness (plugins/tensorrt/tests/plugin_harness.cc) walks the plugin's build
interface the way TensorRT does, and on a GPU (marked gpu) enqueues and compares with the
reference op. TensorRT runs the CUDA kernels, so the cases' CUDA expectations apply."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conformance_cases import CASES, GLA, LA, Case, make_data, matches
from onnx import TensorProto, helper
from test_contract_and_reference import reference_run

from gla_export.ops.contract import INPUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tensorrt_plugin"))
from trt_helpers import HarnessInput, run_harness, write_case  # noqa: E402

TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
         "int32": TensorProto.INT32, "int64": TensorProto.INT64}
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}
# TensorRT's parser cannot hand a plugin an empty input in the middle: those cases are the
# harness's only (it passes the inputs as they are)
TRT_CASES = [c for c in CASES if None not in c.inputs]


def _model(case: Case) -> onnx.ModelProto:
    names = INPUTS[case.op][: len(case.inputs)]
    node = helper.make_node(case.op, list(names), ["output", "present_state"], name=f"node_{case.id}",
                            domain="gla" if case.op == GLA else "", **case.attrs)
    inputs = [helper.make_tensor_value_info(n, TYPES[s[0]], s[1]) for n, s in zip(names, case.inputs)]
    # TensorRT's parser needs typed graph outputs: the query's type, and the state's
    act = case.inputs[0][0] if case.inputs[0][0] in TOL else "float32"
    past = case.inputs[3 if case.op == LA else 4] if len(case.inputs) > (3 if case.op == LA else 4) else None
    state_type = past[0] if past is not None and past[0] in TOL else "float32"
    outputs = [helper.make_tensor_value_info("output", TYPES[act], None),
               helper.make_tensor_value_info("present_state", TYPES[state_type], None)]
    opsets = [helper.make_opsetid("", 27 if case.op == LA else 21)] + ([helper.make_opsetid("gla", 1)] if case.op == GLA else [])
    model = helper.make_model(helper.make_graph([node], case.id, inputs, outputs), opset_imports=opsets)
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory, trt_module, plugin_lib):
    from gla_export.runtime.tensorrt import run_jobs

    root = tmp_path_factory.mktemp("conformance_trt")
    jobs = []
    for case in TRT_CASES:
        path = root / f"{case.id}.onnx"
        path.write_bytes(_model(case).SerializeToString())
        jobs.append({"name": case.id, "kind": "build", "onnx": str(path), "output": str(root / f"{case.id}.plan"),
                     "profiles": [], "strongly_typed": True})
    _, results = run_jobs(jobs, module=trt_module, plugins=[plugin_lib])
    return {r.name: r for r in results}


@pytest.mark.parametrize("case", TRT_CASES, ids=lambda c: c.id)
def test_tensorrt_plan_build(case, built):
    want = case.expected("trt", on_cuda=True)
    r = built[case.id]
    text = " | ".join([r.error or ""] + r.data.get("messages", []) + r.data.get("plugin_messages", []))
    if want is None:
        assert r.ok, f"refused: {text}"
        assert r.data["plugin_layers"] == 1
    else:
        assert not r.ok and matches(text, want), f"{'built' if r.ok else 'refused: ' + text}; expected {want!r}"


def _field(name, value):
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, float):
        return ("float32", value)
    return ("int32" if -(2**31) <= value < 2**31 else "int64", value)


def _tensor_bytes(x: np.ndarray) -> bytes:
    return x.view(np.int16).tobytes() if x.dtype.name == "bfloat16" else x.tobytes()


@pytest.mark.parametrize("device", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["build", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plugin_harness(case, device, harness, plugin_lib, tmp_path):
    if None in case.inputs:
        pytest.skip("TensorRT passes no empty input in the middle (the parser refuses it before the plugin)")
    want = case.expected("trt", on_cuda=True)
    if device and want is not None:
        pytest.skip("a refusal is the build run's to check")
    if device:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    data = make_data(case)
    inputs = [HarnessInput(s[0], list(s[1]), data=_tensor_bytes(x)) for s, x in zip(case.inputs, data)]
    write_case(tmp_path, case.op, {k: _field(k, v) for k, v in case.attrs.items()}, inputs)
    rc, r, log = run_harness(harness, plugin_lib, tmp_path, device=device)
    message = " | ".join([str(r.get("error", ""))] + r.get("messages", []))
    if want is not None:
        assert rc == 1 and matches(message, want), f"rc={rc} stage={r.get('stage')}: {message!r}; expected {want!r}\n{log}"
        return
    assert rc == 0 and r.get("ok"), f"refused at {r.get('stage')}: {message}\n{log}"
    if device and case.op == GLA:
        from trt_helpers import tensor_from

        ro, rs = reference_run(case, data)
        o = tensor_from(tmp_path / "output0.bin", case.inputs[0][0], list(np.shape(ro))).float().numpy()
        sdt = case.inputs[4][0] if len(case.inputs) > 4 else "float32"
        s = tensor_from(tmp_path / "output1.bin", sdt, list(np.shape(rs))).float().numpy()
        for got, ref in ((o, ro), (s, rs)):
            ref = np.asarray(ref, np.float64)
            err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-6)
            assert err <= max(TOL[case.inputs[0][0]], TOL[sdt]), f"relative error {err:.2e}"


def test_node_without_present_state_is_refused_clearly(tmp_path, trt_module, plugin_lib):
    """ONNX Runtime runs a node that omits present_state (tests/onnxruntime/test_gla_op.py); the
    TensorRT plugin's two outputs are fixed before its parser sees the node, so gla-export's
    builds refuse it up front, saying why, instead of the parser's output-count assertion."""
    from gla_export.runtime.tensorrt import run_jobs

    case = next(c for c in CASES if c.id == "gla-full-fp32")
    model = _model(Case("one-output", case.inputs[:5]))
    del model.graph.node[0].output[1]
    del model.graph.output[1]
    path = tmp_path / "one_output.onnx"
    path.write_bytes(model.SerializeToString())
    _, (r,) = run_jobs([{"name": "one", "kind": "parse", "onnx": str(path)}], module=trt_module, plugins=[plugin_lib])
    assert not r.ok and "has no present_state output, which the TensorRT plugin needs" in r.error, r.error
