"""The GLA op alone in each ONNX form, against the float64 reference (gla_export.testing.reference).

One-node graphs (several nodes for ``decomposed``) built with the exporter's own emitter: odd
sizes, chunk boundaries (T = 63, 64, 65, 130), GQA/MQA, d_k != d_v, an initial state, fp32/fp16/
bf16 activations with a float32 state, and the T = 1 step form.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from gla_export.export.gla_ops import GLAShape, emit_gla
from gla_export.export.graph import TORCH_TO_ONNX, GraphBuilder, min_ir_version
from gla_export.export.reference_op import GatedLinearAttention, gla_packed, reference_evaluator
from gla_export.ops import GLAShapeError
from gla_export.testing import TOLERANCE, GLACase, make_inputs, reference, rel_err

CASES = [
    GLACase(B=2, T=63, Hq=2, Hkv=2, K=16, V=16, initial_state=True),
    GLACase(B=1, T=65, Hq=4, Hkv=2, K=60, V=100, initial_state=True),
    GLACase(B=2, T=130, Hq=3, Hkv=1, K=100, V=60),
    GLACase(B=2, T=64, Hq=2, Hkv=2, K=16, V=32, initial_state=True),
    GLACase(B=3, T=1, Hq=4, Hkv=4, K=16, V=16, initial_state=True),
    GLACase(B=2, T=17, Hq=4, Hkv=2, K=60, V=100, dtype=torch.float16, initial_state=True),
    GLACase(B=1, T=70, Hq=2, Hkv=1, K=16, V=16, dtype=torch.float16),
    GLACase(B=2, T=33, Hq=2, Hkv=2, K=16, V=16, dtype=torch.bfloat16, initial_state=True),
]
STEP_CASES = [
    GLACase(B=2, T=1, Hq=2, Hkv=2, K=16, V=16, initial_state=True),
    GLACase(B=3, T=1, Hq=4, Hkv=2, K=60, V=100, initial_state=True),
    GLACase(B=1, T=1, Hq=3, Hkv=1, K=100, V=60, dtype=torch.float16, initial_state=True),
    GLACase(B=2, T=1, Hq=2, Hkv=2, K=16, V=16, dtype=torch.bfloat16, initial_state=True),
]


def one_op_model(form: str, case: GLACase, single_step: bool) -> onnx.ModelProto:
    act, F = TORCH_TO_ONNX[case.dtype], TensorProto.FLOAT
    T = 1 if single_step else "T"
    b = GraphBuilder("gla_one_op")
    q = b.input("query", act, ["B", T, case.Hq * case.K])
    k = b.input("key", act, ["B", T, case.Hkv * case.K])
    v = b.input("value", act, ["B", T, case.Hkv * case.V])
    g = b.input("gate", F, ["B", T, case.Hkv * case.K])
    s = b.input("past_state", F, ["B", case.Hkv, case.K, case.V])
    shape = GLAShape(case.Hq, case.Hkv, case.K, case.V, case.K ** -0.5)
    o, st = emit_gla(b, form, q, k, v, g, s, shape, act, F, single_step=single_step)
    b.output(o, "output", act, ["B", T, case.Hq * case.V])
    b.output(st, "present_state", F, ["B", case.Hkv, case.K, case.V])
    opset = 27 if form == "onnx" else 21
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("gla", 1)] if form == "custom" else [])
    model = helper.make_model(b.graph(), opset_imports=imports)
    model.ir_version = min_ir_version(opset)
    onnx.checker.check_model(model, full_check=True)
    return model


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def run_one_op(form: str, case: GLACase, single_step: bool = False):
    kw = make_inputs(case)
    B, T = kw["q"].shape[:2]
    if "initial_state" not in kw:
        kw["initial_state"] = torch.zeros(B, case.Hkv, case.K, case.V)
    # the gate is float32 in the graph; custom/onnx cast it to the activation type, so the
    # reference gets exactly those values
    kw["g"] = kw["g"].to(case.dtype).float()
    feeds = {
        "query": _np(kw["q"].reshape(B, T, -1)),
        "key": _np(kw["k"].reshape(B, T, -1)),
        "value": _np(kw["v"].reshape(B, T, -1)),
        "gate": kw["g"].reshape(B, T, -1).numpy(),
        "past_state": kw["initial_state"].numpy(),
    }
    model = one_op_model(form, case, single_step)
    if form == "custom" or case.dtype == torch.bfloat16:  # ONNX Runtime has no bfloat16 CPU kernels
        out, state = reference_evaluator(model).run(None, feeds)
    else:
        import onnxruntime as ort

        if form == "onnx":
            os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        out, state = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    ref_o, ref_s = reference(kw)
    got_o = torch.from_numpy(np.asarray(out).astype(np.float32)).reshape(ref_o.shape)
    return got_o, torch.from_numpy(np.asarray(state)), ref_o, ref_s


@pytest.mark.parametrize("form", ["decomposed", "custom", "onnx"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_prefill_form_matches_reference(form, case):
    got_o, got_s, ref_o, ref_s = run_one_op(form, case)
    tol = TOLERANCE[case.dtype]
    assert rel_err(got_o, ref_o) <= tol, f"output {rel_err(got_o, ref_o):.2e}"
    assert rel_err(got_s, ref_s) <= max(tol, TOLERANCE[torch.float32]), f"state {rel_err(got_s, ref_s):.2e}"


@pytest.mark.parametrize("form", ["decomposed", "custom", "onnx"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c.id)
def test_step_form_matches_reference(form, case):
    got_o, got_s, ref_o, ref_s = run_one_op(form, case, single_step=True)
    tol = TOLERANCE[case.dtype]
    assert rel_err(got_o, ref_o) <= tol
    assert rel_err(got_s, ref_s) <= max(tol, TOLERANCE[torch.float32])


def _decomposed_prefill_and_reference(case: GLACase, kw: dict):
    """The decomposed one-op graph of ``case`` on ONNX Runtime CPU with the inputs ``kw`` (fp32,
    initial state), and the reference: ``(out, state, ref_out, ref_state)``."""
    import onnxruntime as ort

    B, T = case.B, case.T
    feeds = {"query": kw["q"].reshape(B, T, -1).numpy(), "key": kw["k"].reshape(B, T, -1).numpy(),
             "value": kw["v"].reshape(B, T, -1).numpy(), "gate": kw["g"].reshape(B, T, -1).numpy(),
             "past_state": kw["initial_state"].numpy()}
    sess = ort.InferenceSession(one_op_model("decomposed", case, False).SerializeToString(), providers=["CPUExecutionProvider"])
    out, state = sess.run(None, feeds)
    ref_o, ref_s = reference(kw)
    return out, state, ref_o, ref_s


def test_decomposed_prefill_survives_strong_decay():
    """A log decay of -30 per step would overflow exp(-Γ) in a naive factorisation; the chunked
    form keeps every exponential <= 1."""
    case = GLACase(B=1, T=65, Hq=2, Hkv=2, K=16, V=16, initial_state=True)
    kw = make_inputs(case)
    kw["g"] = torch.full_like(kw["g"], -30.0)
    kw["g"][:, ::7] = -0.01
    out, state, ref_o, ref_s = _decomposed_prefill_and_reference(case, kw)
    assert np.isfinite(out).all() and np.isfinite(state).all()
    assert rel_err(torch.from_numpy(out).reshape(ref_o.shape), ref_o) <= TOLERANCE[torch.float32]
    assert rel_err(torch.from_numpy(state), ref_s) <= TOLERANCE[torch.float32]


# ---- the reference op on its own: every input of DESIGN.md §1 ----


@pytest.mark.parametrize(
    "case",
    [
        GLACase(B=1, T=40, Hq=4, Hkv=2, K=16, V=24, cu_seqlens=(0, 7, 7, 40), initial_state=True),
        GLACase(B=2, T=20, Hq=2, Hkv=2, K=16, V=16, g_gamma=True, reverse=True),
        GLACase(B=2, T=19, Hq=2, Hkv=1, K=16, V=16, gate_per_head=True, initial_state=True),
        GLACase(B=2, T=21, Hq=2, Hkv=2, K=16, V=16, dtype=torch.float16, initial_state=True),
    ],
    ids=lambda c: c.id,
)
def test_reference_op_every_input(case):
    kw = make_inputs(case)
    B, T = kw["q"].shape[:2]
    inputs = [kw["q"].reshape(B, T, -1).numpy(), kw["k"].reshape(B, T, -1).numpy(), kw["v"].reshape(B, T, -1).numpy(),
              kw["g"].reshape(B, T, -1).numpy(), kw["initial_state"].numpy() if "initial_state" in kw else None,
              kw["cu_seqlens"].numpy() if "cu_seqlens" in kw else None, kw["g_gamma"].numpy() if "g_gamma" in kw else None]
    o, s = gla_packed(*inputs, q_num_heads=case.Hq, kv_num_heads=case.Hkv, reverse=int(case.reverse))
    ref_o, ref_s = reference(kw)
    assert o.dtype == inputs[0].dtype and s.dtype == np.float32
    tol = TOLERANCE[case.dtype]
    assert rel_err(torch.from_numpy(o.astype(np.float32)).reshape(ref_o.shape), ref_o) <= tol
    assert rel_err(torch.from_numpy(s), ref_s) <= max(tol, TOLERANCE[torch.float32])


def test_reference_op_omitted_optional_inputs_mean_zero_state():
    """A node with only the four required inputs starts from zeros (trailing optionals omitted)."""
    case = GLACase(B=2, T=9, Hq=2, Hkv=2, K=16, V=16)
    kw = make_inputs(case)
    node = helper.make_node("GatedLinearAttention", ["q", "k", "v", "g"], ["o", "s"], domain="gla", q_num_heads=2, kv_num_heads=2)
    F = TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, F, None) for n in "qkvg"],
                              [helper.make_tensor_value_info("o", F, None), helper.make_tensor_value_info("s", F, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("gla", 1)])
    o, s = reference_evaluator(model).run(None, {n: kw[n].reshape(2, 9, -1).numpy() for n in "qkvg"})
    ref_o, ref_s = reference(kw)
    assert rel_err(torch.from_numpy(o).reshape(ref_o.shape), ref_o) <= TOLERANCE[torch.float32]
    assert rel_err(torch.from_numpy(s), ref_s) <= TOLERANCE[torch.float32]
    assert GatedLinearAttention.op_domain == "gla"


def test_reference_op_names_bad_input():
    q = np.zeros((2, 5, 32), np.float32)
    # the op contract's messages (gla_export/ops/contract.py), the same as the engines'
    with pytest.raises(GLAShapeError, match=r"input 'gate' has shape \[2,5,7\], expected \[B=2, T=5, kv_num_heads\*d_k=32\]"):
        gla_packed(q, q, q, np.zeros((2, 5, 7), np.float32), q_num_heads=2, kv_num_heads=2)
    with pytest.raises(GLAShapeError, match=r"input 'query' has shape \[5,32\], expected rank 3"):
        gla_packed(q[0], q, q, q, q_num_heads=2, kv_num_heads=2)
    with pytest.raises(GLAShapeError, match=r"input 'past_state' has shape \[2,2,16,15\], expected"):
        gla_packed(q, q, q, q, np.zeros((2, 2, 16, 15), np.float32), q_num_heads=2, kv_num_heads=2)


def test_decomposed_prefill_computes_positive_gates_as_the_formula():
    """Small positive log-gates are computed exactly, as in every engine (docs/op-contract.md);
    the decomposed form masked its exponents with Min(x, 0), which changed them."""
    case = GLACase(B=1, T=70, Hq=2, Hkv=2, K=16, V=16, initial_state=True)
    kw = make_inputs(case)
    kw["g"] = kw["g"].abs() * 0.02 + 1e-3
    out, state, ref_o, ref_s = _decomposed_prefill_and_reference(case, kw)
    assert rel_err(torch.from_numpy(out).reshape(ref_o.shape), ref_o) <= TOLERANCE[torch.float32]
    assert rel_err(torch.from_numpy(state), ref_s) <= TOLERANCE[torch.float32]
