"""The conformance table through gla::GatedLinearAttention in ONNX Runtime (our custom-op library):
CPU here, CUDA on a GPU machine (marked gpu). Inputs have dynamic shapes, so a shape or type the op
refuses is refused by the kernel at run time (attributes when the session is created); a node it
runs must give the reference op's result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conformance_cases import CASES, GLA, make_data, matches
from onnx import TensorProto, helper
from test_contract_and_reference import reference_run

from gla_export.ops.contract import INPUTS

TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
         "int32": TensorProto.INT32, "int64": TensorProto.INT64}
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _model(case) -> bytes:
    names = [n if s is not None else "" for n, s in zip(INPUTS[case.op], case.inputs)]
    node = helper.make_node(GLA, names, ["output", "present_state"], domain="gla", name="n0", **case.attrs)
    inputs = [helper.make_tensor_value_info(n, TYPES[s[0]], None) for n, s in zip(names, case.inputs) if s is not None]
    import onnx

    outputs = [helper.make_value_info(n, onnx.TypeProto()) for n in ("output", "present_state")]
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gla", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def _torch(x: np.ndarray, device: str) -> torch.Tensor:
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(x.copy()).to(device)


def _run(case, provider: str, data):
    import onnxruntime as ort

    from gla_export.runtime import create_session

    so = ort.SessionOptions()
    so.log_severity_level = 4
    if provider == "cuda":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    sess = create_session(_model(case), providers=(provider,), session_options=so, intra_op_num_threads=1)
    device = "cuda" if provider == "cuda" else "cpu"
    io = sess.io_binding()
    keep = []
    for i, x in enumerate(data):
        if x is not None:
            t = _torch(x, device)
            keep.append(t)
            io.bind_ortvalue_input(INPUTS[GLA][i], ort.OrtValue.from_dlpack(t))
    for out in sess.get_outputs():
        io.bind_output(out.name, device)
    sess.run_with_iobinding(io)
    return [torch.from_dlpack(v).cpu().float().numpy() for v in io.get_outputs()]


def _rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-6))


@pytest.mark.parametrize("provider", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", [c for c in CASES if c.op == GLA], ids=lambda c: c.id)
def test_onnxruntime(case, provider):
    if provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    want = case.expected("ort", on_cuda=provider == "cuda")
    data = make_data(case)
    try:
        o, s = _run(case, provider, data)
    except Exception as e:  # ORT raises its own exception types
        assert want is not None and matches(str(e), want), f"refused: {e}; expected {want!r}"
        return
    assert want is None, f"ran; expected a refusal with {want!r}"
    if "unknown-attribute" in case.id:
        return  # the reference refuses it (see the case's exception)
    ro, rs = reference_run(case, data)
    tol = TOL[case.inputs[0][0]]
    assert _rel(o, np.asarray(ro, np.float32)) <= tol, "output differs from the reference op"
    assert _rel(s, np.asarray(rs, np.float32)) <= max(tol, TOL[case.inputs[4][0]] if len(case.inputs) > 4 else 1e-5)
