"""One-node graphs of gla::GatedLinearAttention and a runner that feeds torch tensors to ONNX
Runtime through DLPack (so bfloat16 and CUDA tensors work), shared by the tests in this folder."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import helper

from gla_export.export.graph import TORCH_TO_ONNX
from gla_export.runtime import PROVIDERS, create_session
from gla_export.testing import GLACase, make_inputs

INPUTS = ("query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma")
OUTPUTS = ("output", "present_state")


def make_model(
    feeds: dict[str, torch.Tensor],
    *,
    static_shapes: bool = False,
    outputs: tuple[str, ...] = OUTPUTS,
    **attrs,
) -> bytes:
    """A one-node model; graph inputs are named like the op's inputs, absent ones left out."""
    names = [n if n in feeds else "" for n in INPUTS]
    while names and names[-1] == "":
        names.pop()
    graph_inputs = [
        helper.make_tensor_value_info(n, TORCH_TO_ONNX[feeds[n].dtype], list(feeds[n].shape) if static_shapes else None)
        for n in names
        if n
    ]
    node = helper.make_node("GatedLinearAttention", names, list(outputs), domain="gla", name="gla0", **attrs)
    # outputs without a declared type: ONNX Runtime must infer them from the op (types and shapes)
    graph_outputs = [helper.make_value_info(n, onnx.TypeProto()) for n in outputs]
    graph = helper.make_graph([node], "gla_one_node", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("gla", 1)])
    model.ir_version = 10  # onnxruntime 1.31 loads ir_version <= 10 only
    return model.SerializeToString()


def feeds_for(case: GLACase, device: str = "cpu", seed: int | None = None) -> tuple[dict, dict]:
    """(op feeds as packed [B, T, H*D] tensors, the kwargs of the reference) for `case`."""
    kw = make_inputs(case, device=device, seed=seed)
    B, T = kw["q"].shape[:2]
    feeds = {
        "query": kw["q"].reshape(B, T, -1),
        "key": kw["k"].reshape(B, T, -1),
        "value": kw["v"].reshape(B, T, -1),
        "gate": kw["g"].reshape(B, T, -1),
    }
    if "initial_state" in kw:
        feeds["past_state"] = kw["initial_state"]
    if "cu_seqlens" in kw:
        feeds["cu_seqlens"] = kw["cu_seqlens"]
    if "g_gamma" in kw:
        feeds["g_gamma"] = kw["g_gamma"]
    return feeds, kw


def session(model: bytes, provider: str, threads: int = 2):
    """A session through gla_export.runtime.create_session; on CUDA the op must run on the GPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if provider == "cuda":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return create_session(model, providers=(provider,), session_options=so, intra_op_num_threads=threads)


def run(sess, feeds: dict[str, torch.Tensor], provider: str = "cpu") -> list[torch.Tensor]:
    """Runs with IO binding: torch tensors in, torch tensors out (on the provider's device)."""
    import onnxruntime as ort

    io = sess.io_binding()
    keep = []
    for name, t in feeds.items():
        t = t.contiguous()
        keep.append(t)
        io.bind_ortvalue_input(name, ort.OrtValue.from_dlpack(t))
    for out in sess.get_outputs():
        io.bind_output(out.name, "cuda" if provider == "cuda" else "cpu")
    sess.run_with_iobinding(io)
    return [torch.from_dlpack(v) for v in io.get_outputs()]


def require_provider(provider: str) -> None:
    """Skip (with the reason) when the provider cannot run here; on a GPU machine a missing
    piece of our own build is a failure, not a skip."""
    if provider != "cuda":
        return
    import onnxruntime as ort

    if PROVIDERS["cuda"] not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    from gla_export.ops.native import cuda_compiled

    if not cuda_compiled():
        pytest.fail("a GPU is present but gla-export was built without CUDA kernels")
