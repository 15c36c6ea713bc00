"""Hybrid GLA + softmax-attention exports (issue 13): an fla hybrid checkpoint exports in every
form and validates against PyTorch; the attention layers' KV caches are graph inputs/outputs
(a full-attention cache grows by one position per token, a windowed one keeps W positions, so an
all-windowed hybrid decodes in constant memory); TensorRT-RTX parses the graphs and builds plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import export_form, run_prefill, session

from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM, load_model
from gla_export.export.metadata import zero_state_feeds
from gla_export.testing import rel_err, save_fla_checkpoint

HYBRID = dict(vocab_size=61, hidden_size=32, num_hidden_layers=4, num_heads=2, num_kv_heads=1, use_short_conv=True,
              tie_word_embeddings=True,
              attn=[dict(layers=[1], num_heads=4, num_kv_heads=2, qkv_bias=True),
                    dict(layers=[3], num_heads=2, window_size=4, rope_theta=1000.0)])
WINDOWED = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_heads=2,
                attn=dict(layers=[0, 2], num_heads=2, num_kv_heads=1, window_size=3))


@pytest.fixture(scope="module")
def fla_hybrid(tmp_path_factory):
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install '.[test]')")
    path = tmp_path_factory.mktemp("fla-hybrid")
    save_fla_checkpoint(HYBRID, path)
    return path


@pytest.mark.parametrize("form", ["custom", "onnx", "decomposed"])
def test_fla_hybrid_checkpoint_exports_and_validates(fla_hybrid, tmp_path, form):
    res = export_form(fla_hybrid, tmp_path / "out", form)
    assert res.validation.passed, res.validation.failures
    checked = {ch.output for ch in res.validation.checks}
    assert {"present.1.key", "present.1.value", "present.3.key", "present.position"} <= checked
    meta = res.metadata
    assert meta["attention_layers"] == [1, 3]
    by_name = {s["input"]: s for s in meta["states"]}
    full, win = by_name["past_key_values.1.key"], by_name["past_key_values.3.key"]
    assert full["shape"] == ["batch", 2, "past_sequence", 8] and full["output_shape"] == ["batch", 2, "present_sequence", 8]
    assert full["memory"] == "grows" and full["bytes_per_token"] == 2 * 8 * 4
    assert win["shape"] == win["output_shape"] == ["batch", 2, 4, 16] and win["memory"] == "fixed"
    assert meta["state_bytes_per_token"] == 2 * (2 * 8 * 4)  # key + value of the full-attention layer
    assert by_name["past_key_values.position"]["dtype"] == "int64"

    ours = load_model(fla_hybrid).eval()
    ids = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        ref = ours(ids)
    out = run_prefill(res, form, ids)
    assert rel_err(torch.from_numpy(out["logits"]), ref.logits) < 1e-5
    assert out["present.1.key"].shape == (2, 2, 19, 8) and out["present.3.key"].shape == (2, 2, 4, 16)


def _graph_dims(path: Path, prefix: str) -> dict[str, list]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.output] if v.name.startswith(prefix)}


def test_windowed_hybrid_step_graph_decodes_in_constant_memory(tmp_path):
    torch.manual_seed(3)
    model = GLAForCausalLM(GLAConfig(**WINDOWED)).eval()
    res = export_model(model, tmp_path / "out", gla_op="decomposed", progress=False)
    assert res.validation.passed, res.validation.failures
    assert res.metadata["state_bytes_per_token"] == 0
    # every state of the step graph has a fixed size but the batch
    for name, dims in {**_graph_dims(res.step_path, "past_key_values"), **_graph_dims(res.step_path, "present")}.items():
        assert all(isinstance(d, int) for d in dims[1:]), (name, dims)
    step = session(res.step_path, "decomposed")
    ids = torch.randint(0, 61, (1, 40))
    feeds = zero_state_feeds(res.metadata, 1)
    sizes, logits = set(), []
    for t in range(ids.shape[1]):
        out = step({"input_ids": ids[:, t:t + 1].numpy(), **feeds})
        feeds = {s["input"]: out[s["output"]] for s in res.metadata["states"]}
        sizes.add(sum(v.nbytes for v in feeds.values()))
        logits.append(out["logits"])
    assert len(sizes) == 1  # the same bytes after 1 token and after 40
    assert feeds["past_key_values.0.key"].shape == (1, 1, 3, 16)
    assert int(feeds["past_key_values.position"][0]) == 40
    with torch.no_grad():
        ref = model(ids).logits
    assert rel_err(torch.from_numpy(np.concatenate(logits, 1)), ref) < 1e-5


def test_full_attention_cache_grows_by_one_position_per_step(tmp_path):
    torch.manual_seed(4)
    cfg = dict(WINDOWED, attn=dict(layers=[1], num_heads=2))
    model = GLAForCausalLM(GLAConfig(**cfg)).eval()
    res = export_model(model, tmp_path / "out", gla_op="decomposed", progress=False)
    assert res.validation.passed, res.validation.failures
    assert res.metadata["state_bytes_per_token"] == 2 * 2 * 16 * 4
    prefill, step = session(res.prefill_path, "decomposed"), session(res.step_path, "decomposed")
    ids = torch.randint(0, 61, (2, 12))
    out = prefill({"input_ids": ids[:, :5].numpy(), "attention_mask": np.ones((2, 5), np.int64),
                   **zero_state_feeds(res.metadata, 2)})
    logits = [out["logits"]]
    for t in range(5, 12):
        feeds = {s["input"]: out[s["output"]] for s in res.metadata["states"]}
        out = step({"input_ids": ids[:, t:t + 1].numpy(), **feeds})
        assert out["present.1.key"].shape == (2, 2, t + 1, 16)
        logits.append(out["logits"])
    with torch.no_grad():
        ref = model(ids).logits
    assert rel_err(torch.from_numpy(np.concatenate(logits, 1)), ref) < 1e-5


def test_fp16_hybrid_export_validates(tmp_path):
    torch.manual_seed(5)
    model = GLAForCausalLM(GLAConfig(**HYBRID)).eval()
    res = export_model(model, tmp_path / "out", gla_op="decomposed", dtype="fp16", progress=False)
    assert res.validation.passed, res.validation.failures
    kv = next(s for s in res.metadata["states"] if s["kind"] == "key")
    assert kv["dtype"] == "float16" and kv["bytes_per_token"] == 2 * 8 * 2


@pytest.mark.tensorrt
@pytest.mark.parametrize("form, dtype", [("decomposed", "fp32"), ("custom", "fp32"), ("custom", "fp16")])
def test_hybrid_graphs_build_in_tensorrt(tmp_path, form, dtype):
    """``gla-export build``'s path: the KV caches get a profile from an empty cache (0) to the
    longest sequence; TensorRT-RTX parses both graphs and builds both plans (the custom form with
    our plugin for its GLA layers)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install '.[test]')")
    from gla_export.runtime.tensorrt import build_engines

    torch.manual_seed(6)
    model = GLAForCausalLM(GLAConfig(**HYBRID)).eval()
    res = export_model(model, tmp_path / "out", gla_op=form, dtype=dtype, validate=False, progress=False)
    built = build_engines(tmp_path / "out", max_batch=2, max_seq=64)
    assert built.info["precision"] == dtype
    trt_type = {"fp32": "FLOAT", "fp16": "HALF"}[dtype]
    for graph in ("prefill", "step"):
        assert built.engines[graph].stat().st_size > 0
        info = built.info["engines"][graph]
        assert info["plugin_layers"] == (2 if form == "custom" else 0)
        assert {"name": "past_key_values.1.key", "shape": [-1, 2, -1, 8], "dtype": trt_type} in info["inputs"]
        assert {"name": "past_key_values.3.key", "shape": [-1, 2, 4, 16], "dtype": trt_type} in info["inputs"]
    assert built.info["profiles"]["step"]["past_key_values.1.key"][0] == [1, 2, 0, 8]
    assert res.metadata["attention_layers"] == [1, 3]


@pytest.mark.parametrize("form, opset, dtype", [("onnx", None, "fp32"), ("onnx", None, "fp16"), ("decomposed", 23, "fp32"),
                                                ("custom", 23, "fp32")])
def test_standard_attention_nodes_validate(tmp_path, form, opset, dtype):
    """``attention_op="onnx"``: the attention layers as ONNX ``RotaryEmbedding`` + ``Attention``
    (opset 23) nodes, validated against PyTorch like the plain-op form."""
    torch.manual_seed(7)
    model = GLAForCausalLM(GLAConfig(**HYBRID)).eval()
    res = export_form(model, tmp_path / "out", form, opset=opset, dtype=dtype, attention_op="onnx")
    assert res.validation.passed, res.validation.failures
    for path in (res.prefill_path, res.step_path):
        ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
        assert ops.count("Attention") == 2 and ops.count("RotaryEmbedding") == 4 and "Softmax" not in ops


def test_standard_attention_nodes_need_opset_23(tmp_path):
    from gla_export.errors import UsageError

    with pytest.raises(UsageError, match="opset >= 23"):
        export_model(GLAForCausalLM(GLAConfig(**HYBRID)), tmp_path / "out", gla_op="decomposed", attention_op="onnx",
                     progress=False)
    assert not (tmp_path / "out").exists()
