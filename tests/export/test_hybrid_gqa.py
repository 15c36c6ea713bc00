"""``--attention-op gqa``: hybrids' attention layers as ONNX Runtime's
``com.microsoft::GroupQueryAttention`` (issue 13), with the cache contract of the plain-op form.

Checked on the real ONNX Runtime CPU: the exporter's validation against PyTorch, and the graphs run
side by side with the ``decomposed`` attention on the same inputs (padded rows, continued
contexts, GQA, windows shorter than the sequence, odd sizes, fp32 and fp16), including the
fused rotary path (head sizes a multiple of 16) and the rotation outside the op (a multiple of 8).
A last test pins what ORT's ``local_window_size`` means, since the graphs rely on it only as a hint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import session

from gla_export.errors import UsageError
from gla_export.export import export_model
from gla_export.export.metadata import zero_state_feeds
from gla_export.models import GLAConfig, GLAForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# layer 1: full attention, GQA 4/2, head 8 (rotation outside the op), qkv bias; layer 3: window 4,
# head 16 (fused rotation), another theta; odd vocabulary
HYBRID = dict(vocab_size=61, hidden_size=32, num_hidden_layers=4, num_heads=2, num_kv_heads=1, use_short_conv=True,
              tie_word_embeddings=True,
              attn=[dict(layers=[1], num_heads=4, num_kv_heads=2, qkv_bias=True),
                    dict(layers=[3], num_heads=2, window_size=4, rope_theta=1000.0)])
# all attention windowed, head 16 and 32, GQA 6/2 (3 groups), a window of 1 (only its own key)
WIDE = dict(vocab_size=77, hidden_size=96, num_hidden_layers=3, num_heads=3, use_short_conv=False,
            attn=[dict(layers=[0], num_heads=6, num_kv_heads=2, window_size=5),
                  dict(layers=[2], num_heads=3, num_kv_heads=3, window_size=1, qkv_bias=True)])


def _model(cfg: dict, seed: int) -> GLAForCausalLM:
    torch.manual_seed(seed)
    model = GLAForCausalLM(GLAConfig(**cfg)).eval()
    with torch.no_grad():  # non-zero biases, so a swapped bias would show
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _gqa_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"]


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


@pytest.mark.parametrize("cfg, dtype", [(HYBRID, "fp32"), (HYBRID, "fp16"), (WIDE, "fp32")],
                         ids=["hybrid-fp32", "hybrid-fp16", "wide-fp32"])
def test_gqa_export_validates_and_matches_the_decomposed_attention(tmp_path, cfg, dtype):
    model = _model(cfg, 1)
    gqa = export_model(model, tmp_path / "gqa", gla_op="decomposed", attention_op="gqa", dtype=dtype, progress=False)
    assert gqa.validation.passed, gqa.validation.failures
    assert gqa.metadata["attention_op"] == "gqa"
    ref = export_model(model, tmp_path / "ref", gla_op="decomposed", dtype=dtype, validate=False, progress=False)
    assert ref.metadata["attention_op"] == "decomposed"
    c = model.config
    layers = c.attention_layers
    for path, kind in ((gqa.prefill_path, "prefill"), (gqa.step_path, "step")):
        nodes = _gqa_nodes(path)
        assert len(nodes) == len(layers)
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        assert "Softmax" not in ops
        for i, node in zip(layers, nodes):
            a = c.attention_spec(i)
            d = c.hidden_size // a["num_heads"]
            assert _attr(node, "do_rotary") == int(d % 16 == 0)
            want = a["window_size"] if a["window_size"] and kind == "step" else -1  # prefill has the mask input
            assert _attr(node, "local_window_size") == want

    # both forms on the same feeds: a padded batch from zero states, then a padded batch continuing
    # those contexts (caches right-aligned, front slots empty), then steps past every window
    tol = 2e-5 if dtype == "fp32" else 2e-2
    runs = {f: (session(r.prefill_path, "decomposed"), session(r.step_path, "decomposed"))
            for f, r in (("gqa", gqa), ("ref", ref))}
    states = ref.metadata["states"]
    rng = np.random.default_rng(0)
    B, T = 3, 9
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0
    mask[2, :8] = 0
    mask2 = np.ones((B, T), np.int64)  # the continuing prefill: other rows padded
    mask2[0, :2] = 0
    mask2[2, :T - 1] = 0
    ids = rng.integers(0, c.vocab_size, (B, T))
    feeds = {f: {"input_ids": ids, "attention_mask": mask, **zero_state_feeds(gqa.metadata, B)} for f in runs}
    for call in range(2 + 7):
        outs = {}
        for f, (prefill, step) in runs.items():
            outs[f] = prefill(feeds[f]) if call < 2 else step(feeds[f])
        real = ([mask, mask2][call] == 1)[:, :, None] if call < 2 else np.ones((B, 1, 1), bool)
        a, b = outs["gqa"]["logits"], outs["ref"]["logits"]
        scale = np.abs(b).max()
        assert np.abs(np.where(real, a - b, 0)).max() <= tol * scale, f"call {call}: logits"
        for st in states:
            x, y = outs["gqa"][st["output"]].astype(np.float64), outs["ref"][st["output"]].astype(np.float64)
            assert x.shape == y.shape, st["output"]
            assert np.abs(x - y).max() <= tol * max(np.abs(y).max(), 1.0), f"call {call}: {st['output']}"
        nxt = rng.integers(0, c.vocab_size, (B, T if call == 0 else 1))
        for f in runs:  # each form continues from its own states
            past = {st["input"]: outs[f][st["output"]] for st in states}
            feeds[f] = {"input_ids": nxt, **past}
            if call == 0:
                feeds[f]["attention_mask"] = mask2
    assert int(outs["gqa"]["present.position"].max()) > 2 * T  # past every window


def test_gqa_export_of_the_custom_form_runs_in_our_ort_library(tmp_path):
    """The custom GLA op (our library) beside ORT's GroupQueryAttention in one session."""
    from gla_export._native import find_library

    if find_library("ort") is None:
        pytest.skip("the gla ONNX Runtime library is not built")
    res = export_model(_model(HYBRID, 2), tmp_path / "out", gla_op="custom", attention_op="gqa", runtime="onnxruntime",
                       progress=False)
    assert res.validation.passed, res.validation.failures
    assert "libgla_onnxruntime" in " ".join(res.validation.runtimes.values())
    assert len(_gqa_nodes(res.step_path)) == 2


def test_gqa_refuses_a_head_size_ort_cannot_take(tmp_path):
    odd = dict(HYBRID, attn=dict(layers=[1], num_heads=8))  # head size 4
    with pytest.raises(UsageError, match="layer 1's head size 4 is not a multiple of 8"):
        export_model(GLAForCausalLM(GLAConfig(**odd)), tmp_path / "a", attention_op="gqa", progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("form, dtype", [("custom", "fp32"), ("decomposed", "bf16")])
def test_gqa_export_validates_in_the_reference_evaluator(tmp_path, form, dtype):
    """No native library, no bfloat16 CPU kernels: the reference evaluator runs both ops (its
    GroupQueryAttention is checked against ONNX Runtime's below)."""
    res = export_model(_model(HYBRID, 6), tmp_path / "out", gla_op=form, attention_op="gqa", dtype=dtype,
                       runtime="reference", progress=False)
    assert res.validation.passed, res.validation.failures
    assert "onnx.reference" in " ".join(res.validation.runtimes.values())


@pytest.mark.parametrize("W", [1, 3])
def test_ort_local_window_size_counts_the_query_itself(W):
    """What ORT 1.32's CPU GroupQueryAttention does with ``local_window_size = W``: the query
    at position p sees keys p−W+1 .. p (W keys, its own included), fla's window of W. The graphs
    give the exact window in ``attention_bias`` anyway; this records the hint's meaning."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as oh

    H, d, P = 1, 8, 6
    names = ["q", "k", "v", "pk", "pv", "seqlens_k", "total"]
    ins = [oh.make_tensor_value_info(n, TP.FLOAT, None) for n in names[:5]]
    ins += [oh.make_tensor_value_info(n, TP.INT32, None) for n in names[5:]]
    node = oh.make_node("GroupQueryAttention", names, ["o", "k_out", "v_out"], domain="com.microsoft", num_heads=H,
                        kv_num_heads=H, local_window_size=W)
    outs = [oh.make_tensor_value_info(n, TP.FLOAT, None) for n in ("o", "k_out", "v_out")]
    graph = oh.make_graph([node], "g", ins, outs)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # equal scores (zero keys), values = their position: the output is the mean of the positions seen
    values = np.broadcast_to(np.arange(P + 1, dtype=np.float32)[:, None], (P + 1, d))
    out = s.run(None, dict(q=np.ones((1, 1, d), np.float32), k=np.zeros((1, 1, d), np.float32),
                           v=values[None, P:].copy(), pk=np.zeros((1, 1, P, d), np.float32),
                           pv=values[None, None, :P].copy(), seqlens_k=np.array([P], np.int32),
                           total=np.array(P + 1, np.int32)))[0]
    assert np.allclose(out, np.mean(np.arange(P - W + 1, P + 1)))


def test_tensorrt_build_refuses_a_gqa_export(tmp_path):
    """TensorRT has no GroupQueryAttention: ``build`` says so in one line before any parsing."""
    from gla_export.runtime.tensorrt import build_engines

    res = export_model(_model(HYBRID, 3), tmp_path / "out", gla_op="decomposed", attention_op="gqa", validate=False,
                       progress=False)
    with pytest.raises(UsageError, match="--attention-op decomposed"):
        build_engines(res.out_dir, runtime="tensorrt_rtx")
    assert not (res.out_dir / "tensorrt").exists()


def test_cli_attention_op_gqa(tmp_path, capsys):
    """``gla-export export --attention-op gqa``: the nodes and the metadata field; a head size ORT
    cannot take exits 2 with one line and writes nothing."""
    from gla_export.errors import EXIT_CODES
    from gla_export.models import save_model

    ckpt = save_model(_model(HYBRID, 4), tmp_path / "ckpt")
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "--attention-op", "gqa", "-q"]) == 0
    assert len(_gqa_nodes(out / "step.onnx")) == 2
    import json

    assert json.loads((out / "metadata.json").read_text())["attention_op"] == "gqa"
    capsys.readouterr()
    odd = save_model(GLAForCausalLM(GLAConfig(**dict(HYBRID, attn=dict(layers=[1], num_heads=8)))), tmp_path / "odd")
    code = run(["export", str(odd), "-o", str(tmp_path / "bad"), "--attention-op", "gqa", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_CODES["UsageError"] == 2 and len(err.splitlines()) == 1 and "multiple of 8" in err
    assert not (tmp_path / "bad").exists()


def test_gqa_prefill_without_the_mask_input_uses_the_window_hint(tmp_path):
    """``--no-attention-mask``: buffer order is real-token order in the prefill too, so its nodes
    carry ``local_window_size = W``; validated against PyTorch (prompts longer than the window)."""
    res = export_model(_model(WIDE, 5), tmp_path / "out", gla_op="decomposed", attention_op="gqa",
                       attention_mask=False, progress=False)
    assert res.validation.passed, res.validation.failures
    assert [_attr(n, "local_window_size") for n in _gqa_nodes(res.prefill_path)] == [5, 1]


def _gqa_node_model(dtype, H, Hkv, W, rotary):
    from onnx import TensorProto as TP
    from onnx import helper as oh

    et = TP.FLOAT if dtype == np.float32 else TP.FLOAT16
    names = ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "cos" if rotary else "", "sin" if rotary else "",
             "pos" if rotary else "", "bias", "", "", "", "", "", "qs"]
    ins = [oh.make_tensor_value_info(n, et, None) for n in ("q", "k", "v", "pk", "pv", "bias")]
    ins += [oh.make_tensor_value_info(n, TP.INT32, None) for n in ("seqlens_k", "total", "qs")]
    if rotary:
        ins += [oh.make_tensor_value_info(n, et, None) for n in ("cos", "sin")]
        ins.append(oh.make_tensor_value_info("pos", TP.INT64, None))
    node = oh.make_node("GroupQueryAttention", names, ["o", "k_out", "v_out"], domain="com.microsoft", num_heads=H,
                        kv_num_heads=Hkv, local_window_size=W, do_rotary=int(rotary), scale=0.3)
    outs = [oh.make_tensor_value_info(n, et, None) for n in ("o", "k_out", "v_out")]
    return oh.make_model(oh.make_graph([node], "g", ins, outs),
                         opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("B, S, P, H, Hkv, d, W, rotary, dtype", [
    (2, 5, 0, 4, 2, 16, -1, True, np.float32), (3, 4, 7, 6, 2, 32, 3, True, np.float32),
    (2, 1, 9, 4, 4, 8, 4, False, np.float32), (2, 3, 5, 4, 2, 16, 2, True, np.float16),
], ids=["B2-S5-P0-rot", "B3-S4-P7-W3-rot", "B2-S1-P9-d8-W4", "B2-S3-P5-W2-rot-fp16"])
def test_reference_group_query_attention_matches_onnxruntime(B, S, P, H, Hkv, d, W, rotary, dtype):
    """The reference evaluator's GroupQueryAttention (what ``runtime="reference"`` validates a gqa
    export with) against ONNX Runtime's CPU kernel on the same random node inputs: per-token
    rotary tables and positions, a bias that masks some slots, a window, GQA, scale."""
    import onnxruntime as ort

    from gla_export.export import reference_evaluator

    rng = np.random.default_rng(B * 100 + P)
    model = _gqa_node_model(dtype, H, Hkv, W, rotary)
    feeds = dict(q=rng.standard_normal((B, S, H * d)), k=rng.standard_normal((B, S, Hkv * d)),
                 v=rng.standard_normal((B, S, Hkv * d)), pk=rng.standard_normal((B, Hkv, P, d)),
                 pv=rng.standard_normal((B, Hkv, P, d)))
    bias = np.where(rng.random((B, 1, S, P + S)) < 0.2, -1e4, 0.0)
    bias[..., np.arange(S), P + np.arange(S)] = 0.0  # each query's own slot stays visible
    feeds["bias"] = bias
    feeds = {n: x.astype(dtype) for n, x in feeds.items()}
    feeds.update(seqlens_k=np.full(B, P + S - 1, np.int32), total=np.array(P + S, np.int32), qs=np.full(B, S, np.int32))
    if rotary:
        f = rng.random((B * S + P + S, d // 2)) * 6
        feeds.update(cos=np.cos(f).astype(dtype), sin=np.sin(f).astype(dtype),
                     pos=rng.permutation(B * S).reshape(B, S).astype(np.int64))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    want = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = reference_evaluator(model).run(None, feeds)
    tol = 1e-5 if dtype == np.float32 else 3e-3
    for name, a, b in zip(("output", "present_key", "present_value"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= tol * max(1.0, np.abs(b).max()), name
