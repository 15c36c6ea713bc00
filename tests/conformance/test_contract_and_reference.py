"""The conformance table through the op contract's two implementations (the kernel core's C API,
gla_infer_problem, and gla_export.ops.contract) and through the ONNX reference op, which runs the
nodes the contract accepts and compares nothing: the ORT and TensorRT drivers compare with it."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from conformance_cases import CASES, GLA, Case, make_data, matches
from onnx import helper

from gla_export.ops.contract import INPUTS, ContractError, check_node, infer_problem

ELEM = {"float32": 0, "float16": 1, "bfloat16": 2, "int32": 3, "int64": 4, "float64": 5}
RULES = {"gated": 0, "linear": 1}


class TensorDesc(ctypes.Structure):
    _fields_ = [("present", ctypes.c_int32), ("elem_type", ctypes.c_int32), ("rank", ctypes.c_int32),
                ("reserved", ctypes.c_int32), ("dims", ctypes.c_int64 * 8)]


class OpAttributes(ctypes.Structure):
    _fields_ = [("q_num_heads", ctypes.c_int64), ("kv_num_heads", ctypes.c_int64), ("reverse", ctypes.c_int64),
                ("chunk_size", ctypes.c_int64), ("scale", ctypes.c_float), ("update_rule", ctypes.c_int32)]


MISSING = -(2**63)


def capi_infer(case: Case, cuda: bool):
    """(status, message, problem) from gla_infer_problem."""
    from gla_export.ops.native import Problem, load_library

    lib = load_library()
    fn = lib.gla_infer_problem
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_int32, ctypes.POINTER(OpAttributes), ctypes.POINTER(TensorDesc), ctypes.c_int32,
                   ctypes.c_int32, ctypes.POINTER(Problem)]
    a = case.attrs
    rule = a.get("update_rule")
    attrs = OpAttributes(q_num_heads=a.get("q_num_heads", MISSING), kv_num_heads=a.get("kv_num_heads", MISSING),
                         reverse=a.get("reverse", 0), chunk_size=a.get("chunk_size", 64), scale=a.get("scale", 0.0),
                         update_rule=3 if rule is None else RULES.get(rule, 2))
    descs = (TensorDesc * len(case.inputs))()
    for i, spec in enumerate(case.inputs):
        if spec is not None:
            descs[i].present, descs[i].elem_type, descs[i].rank = 1, ELEM[spec[0]], len(spec[1])
            for j, d in enumerate(spec[1]):
                descs[i].dims[j] = d
    problem = Problem()
    status = fn(0 if case.op == GLA else 1, ctypes.byref(attrs), descs, len(case.inputs), 2 if cuda else 0,
                ctypes.byref(problem))
    return status, lib.gla_last_error_message().decode(), problem


def _unknown_attr(case: Case) -> bool:
    allowed = {"q_num_heads", "kv_num_heads", "scale", "chunk_size"} | ({"reverse"} if case.op == GLA else {"update_rule"})
    return bool(set(case.attrs) - allowed)


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_c_api(case, cuda):
    if not case.typed_attrs or _unknown_attr(case):
        pytest.skip("the C struct carries only typed, known attributes (the engines read them; their drivers test this)")
    want = case.expected("capi", on_cuda=cuda)
    status, message, problem = capi_infer(case, cuda)
    if want is None:
        assert status == 0, message
        # the problem the engines will run: every size known, as the shapes say
        assert problem.q_heads == case.attrs["q_num_heads"] and problem.batch >= 1 and problem.head_dim_k >= 1
    else:
        assert status != 0 and matches(message, want), f"status {status}: {message!r}, expected {want!r}"


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_python_contract(case, cuda):
    want = case.expected("contract", on_cuda=cuda)
    try:
        p = infer_problem(case.op, case.attrs, case.inputs, cuda=cuda)
    except ContractError as e:
        assert want is not None and matches(str(e), want), f"refused: {e}; expected {want!r}"
        if case.typed_attrs and not _unknown_attr(case) and "capi" not in case.exceptions:
            status, message, _ = capi_infer(case, cuda)
            assert status != 0 and message == str(e), "the C and Python contracts word it differently"
        return
    assert want is None, f"accepted; expected a refusal with {want!r}"
    # the same problem as the C API's
    if case.typed_attrs:
        status, message, cp = capi_infer(case, cuda)
        assert status == 0, message
        got = (p.batch, p.seq_len, p.num_seqs, p.q_heads, p.kv_heads, p.head_dim_k, p.head_dim_v,
               int(p.gate_per_head), int(p.has_gate), int(p.has_past_state), int(p.has_cu_seqlens), int(p.reverse))
        assert got == (cp.batch, cp.seq_len, cp.num_seqs, cp.q_heads, cp.kv_heads, cp.head_dim_k, cp.head_dim_v,
                       cp.gate_per_head, cp.has_gate, cp.has_past_state, cp.has_cu_seqlens, cp.reverse)


def reference_run(case: Case, data: list):
    """The ONNX reference op on a one-node model of `case` (GLA only)."""
    from gla_export.export.reference_op import reference_evaluator
    from onnx import TensorProto

    types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
             "int32": TensorProto.INT32, "int64": TensorProto.INT64}
    names = [n if s is not None else "" for n, s in zip(INPUTS[case.op], case.inputs)]
    node = helper.make_node(case.op, names, ["output", "present_state"], domain="gla", name="n0", **case.attrs)
    inputs = [helper.make_tensor_value_info(n, types[s[0]], None) for n, s in zip(names, case.inputs) if s is not None]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("output", "present_state")]
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("gla", 1)])
    feeds = {n: x for n, x in zip(names, data) if x is not None}
    return reference_evaluator(model).run(None, feeds)


@pytest.mark.parametrize("case", [c for c in CASES if c.op == GLA], ids=lambda c: c.id)
def test_reference_op(case):
    want = case.expected("reference")
    data = make_data(case)
    try:
        o, s = reference_run(case, data)
    except ContractError as e:
        assert want is not None and matches(str(e), want), f"refused: {e}; expected {want!r}"
        return
    assert want is None, f"ran; expected a refusal with {want!r}"
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(s, np.float32)).all()


def test_check_node_refuses_unknown_attributes_and_names_the_node():
    node = helper.make_node("GatedLinearAttention", ["q", "k", "v", "g"], ["o"], domain="gla", name="layer3",
                            q_num_heads=4, kv_num_heads=2, window=8)
    with pytest.raises(ContractError, match=r"GatedLinearAttention 'layer3': unknown attribute 'window'"):
        check_node(node)


@pytest.mark.parametrize("case", [c for c in CASES if c.typed_attrs and not _unknown_attr(c)], ids=lambda c: c.id)
def test_c_api_attributes_agree_with_python(case):
    """gla_check_attributes (what the ONNX Runtime kernel and the TensorRT creator call before any
    shape is known) and the Python contract refuse the same attributes with the same words."""
    from gla_export.ops.contract import check_attributes
    from gla_export.ops.native import load_library

    lib = load_library()
    fn = lib.gla_check_attributes
    fn.restype, fn.argtypes = ctypes.c_int32, [ctypes.c_int32, ctypes.POINTER(OpAttributes)]
    a = case.attrs
    rule = a.get("update_rule")
    attrs = OpAttributes(q_num_heads=a.get("q_num_heads", MISSING), kv_num_heads=a.get("kv_num_heads", MISSING),
                         reverse=a.get("reverse", 0), chunk_size=a.get("chunk_size", 64), scale=a.get("scale", 0.0),
                         update_rule=3 if rule is None else RULES.get(rule, 2))
    status = fn(0 if case.op == GLA else 1, ctypes.byref(attrs))
    try:
        check_attributes(case.op, case.attrs)
        py = None
    except ContractError as e:
        py = str(e)
    c_msg = lib.gla_last_error_message().decode()
    assert (status == 0) == (py is None), (status, c_msg, py)
    if py is not None and rule in (None, "gated", "linear"):
        assert c_msg == py
