"""gla_export.runtime.create_session: provider names, the library, and the errors when a piece is
missing (each a MissingRuntimeError or UsageError, with what to do)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from ort_helpers import feeds_for, make_model, run

from gla_export.errors import MissingRuntimeError, UsageError
from gla_export.runtime import PROVIDERS, available_providers, create_session
from gla_export.testing import GLACase, assert_close, reference


def _model():
    feeds, kw = feeds_for(GLACase(B=1, T=9, K=16, V=16))
    return make_model(feeds, q_num_heads=4, kv_num_heads=4), feeds, kw


def test_short_and_full_provider_names():
    model, feeds, kw = _model()
    o_ref, _ = reference(kw)
    for providers in (("cpu",), "cpu", ("CPUExecutionProvider",), [("cpu", {})]):
        sess = create_session(model, providers=providers, intra_op_num_threads=1)
        assert sess.get_providers() == ["CPUExecutionProvider"]
        o, _ = run(sess, feeds)
        assert_close("output", o.reshape(o_ref.shape), o_ref, 2e-6)
    assert "cpu" in available_providers()
    assert PROVIDERS["cuda"] == "CUDAExecutionProvider"


def test_model_from_a_path(tmp_path):
    model, feeds, _ = _model()
    path = tmp_path / "gla.onnx"
    path.write_bytes(model)
    sess = create_session(path)
    assert len(run(sess, feeds)) == 2


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown execution provider 'tpu'"):
        create_session(_model()[0], providers=("tpu",))
    with pytest.raises(UsageError, match="at least one"):
        create_session(_model()[0], providers=())


def test_missing_cuda_provider_says_what_to_install():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    with pytest.raises(MissingRuntimeError, match="onnxruntime-gpu"):
        create_session(_model()[0], providers=("cuda", "cpu"))


def test_missing_library_is_a_missing_runtime_error(tmp_path):
    with pytest.raises(MissingRuntimeError, match="does not exist"):
        create_session(_model()[0], library=tmp_path / "libnothing.so")


def test_the_library_is_what_makes_the_op_run():
    # without our library ONNX Runtime cannot load the graph at all: the test above is not vacuous
    model = _model()[0]
    with pytest.raises(Exception, match="GatedLinearAttention|gla"):
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert torch.isfinite(run(create_session(model), _model()[1])[0]).all()


def _opset27_model() -> bytes:
    """A one-node graph of opset 27, which ONNX Runtime 1.31+ loads only with
    ALLOW_RELEASED_ONNX_OPSET_ONLY=0."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])
    model.ir_version = 11
    return model.SerializeToString()


@pytest.mark.parametrize("before", [None, "1"], ids=["unset", "set"])
def test_the_opset_variable_is_set_only_while_the_session_loads(monkeypatch, before):
    import os

    from gla_export.runtime.session import OPSET_ENV

    if before is None:
        monkeypatch.delenv(OPSET_ENV, raising=False)
    else:
        monkeypatch.setenv(OPSET_ENV, before)
    sess = create_session(_opset27_model(), library=False, allow_unreleased_opsets=True)
    assert sess.run(None, {"x": __import__("numpy").array([-1.0, 2.0], "float32")})[0].tolist() == [0.0, 2.0]
    assert os.environ.get(OPSET_ENV) == before  # restored: not leaked process-wide
    if before is None:
        try:  # without the permission ONNX Runtime refuses the opset (older builds may accept it)
            create_session(_opset27_model(), library=False)
        except Exception as e:  # noqa: BLE001
            assert "opset" in str(e).lower() or "onnx" in str(e).lower()
        assert OPSET_ENV not in os.environ


def test_tf32_is_off_on_cuda_unless_asked():
    from gla_export.runtime.session import _resolve

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _resolve(["cuda", "cpu"], cuda) == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert _resolve([("cuda", {"device_id": 1})], cuda) == [("CUDAExecutionProvider", {"use_tf32": "0", "device_id": 1})]
    assert _resolve(["cuda"], cuda, tf32=True) == [("CUDAExecutionProvider", {"use_tf32": "1"})]


def test_no_library_for_standard_graphs(monkeypatch):
    from gla_export import _native

    monkeypatch.setattr(_native, "find_library", lambda kind: None)
    monkeypatch.setattr(_native, "library_path", lambda kind: (_ for _ in ()).throw(_native.NativeLibraryError("x")))
    sess = create_session(_opset27_model(), library=False, allow_unreleased_opsets=True)
    assert sess.get_providers() == ["CPUExecutionProvider"]
