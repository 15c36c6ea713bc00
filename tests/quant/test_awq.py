"""AWQ (gla_export/export/quantize.py: awq_scale, awq_fold): per input channel scales that lower a
layer's output error on inputs with large channels, folded into the op before each scaled matrix so
that the float model is unchanged (the export's validation against the dequantized model proves the
fold: MatMulNBits with float activations is checked within 2e-3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gla_export.export import export_model
from gla_export.export.quantize import QuantConfig, _fake_quant, awq_scale, quant_config, quantize_rtn
from gla_export.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import MODEL_KWARGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 64)])
def test_awq_lowers_the_output_error_on_inputs_with_large_channels(bits, block):
    g = np.random.default_rng(11)
    K, N = 256, 96
    x = g.normal(size=(1024, K)).astype(np.float32)
    big = g.choice(K, 8, replace=False)
    x[:, big] *= 25  # a few salient channels, as trained LLMs' activations have
    w = g.normal(0, 0.05, (N, K)).astype(np.float32)
    h = torch.from_numpy(x.T @ x / len(x))
    s, alpha = awq_scale(torch.from_numpy(w), h, bits, block, True, signed_scales=True)
    assert 0 < alpha <= 1 and s.shape == (K,) and bool((s > 0).all())
    assert float(s[big].min()) > float(s.median())  # the salient channels get the larger scales
    rtn = quantize_rtn(w, bits, block, True).dequantize()
    awq = quantize_rtn((w * s.numpy()[None, :]).astype(np.float32), bits, block, True).dequantize() / s.numpy()[None, :]
    err = {m: np.linalg.norm(x @ (q - w).T) for m, q in (("rtn", rtn), ("awq", awq))}
    assert err["awq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("bits", [4, 8])
def test_the_search_quantizes_on_onnx_runtimes_grid(bits):
    # the search's stand-in is the quantizer that runs afterwards, code for code, ties included
    # (about one 8-bit draw in thirty holds a value half-way between two codes: many draws)
    g = torch.Generator().manual_seed(bits)
    for i in range(200):
        w = torch.randn(40, 96, generator=g) * (1 + i % 7)
        ort = quantize_rtn(w.numpy(), bits, 32, True).dequantize()
        np.testing.assert_array_equal(_fake_quant(w, bits, 32, True, signed_scales=True).numpy(), ort, err_msg=f"draw {i}")


@pytest.fixture(scope="module")
def models():
    out = {}
    for tied in (True, False):
        torch.manual_seed(3)
        out[tied] = build_model(**{**MODEL_KWARGS, "tie_word_embeddings": tied}).eval()
    return out


def _initializer(d: Path, name: str) -> np.ndarray:
    m = onnx.load(str(d / "step.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == name)
    onnx.external_data_helper.load_external_data_for_tensor(t, str(d))
    return onnx.numpy_helper.to_array(t)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_awq_export_folds_the_scales_exactly(models, tied, tmp_path):
    model = models[tied]
    cfg = QuantConfig(weights="int4", method="awq", accuracy_level=0, calibration_tokens=1024)
    res = export_model(model, tmp_path / "awq", gla_op="decomposed", weights=cfg, progress=False)
    assert res.validation.passed  # the graphs against the float model with the folded scales, within 2e-3
    q = json.loads((res.out_dir / "metadata.json").read_text())["quantization"]
    assert q["method"] == "awq" and q["calibration"]["tokens"] > 0
    layers = MODEL_KWARGS["num_layers"]
    want = {f"model.layers.{i}.{n}" for i in range(layers) for n in ("attn.in_proj.weight", "mlp.gate_up_proj.weight",
                                                                     "mlp.down_proj.weight")}
    if not tied:
        want.add("lm_head.weight")  # a tied head would scale the embeddings too: left alone
    assert set(q["awq_scaled"]) == want
    # the fold happened: the norm weights in the file are the model's divided by the scales
    stored = _initializer(res.out_dir, "model.layers.0.attn_norm.weight")
    assert not np.allclose(stored, model.model.layers[0].attn_norm.weight.detach().numpy(), rtol=1e-3)
    if not tied:
        assert not np.allclose(_initializer(res.out_dir, "model.norm.weight"), model.model.norm.weight.detach().numpy(),
                               rtol=1e-3)


def test_awq_from_the_command_line_options(models, tmp_path):
    cfg = quant_config("int8", method="awq", calibration_tokens=512)
    assert (cfg.method, cfg.block_size) == ("awq", 128)
    res = export_model(models[False], tmp_path / "awq8", gla_op="decomposed", weights=cfg, progress=False, dtype="fp16")
    assert res.validation.passed


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_on_a_hybrid(tmp_path, method):
    # a softmax-attention layer among the GLA layers has no in_proj or gate: the calibration hooks
    # only what it has (this raised AttributeError: 'Attention' object has no attribute 'gk_proj')
    from gla_export.models.builder import attention_spec

    torch.manual_seed(4)
    model = build_model(**{**MODEL_KWARGS, "attn": attention_spec([1], num_heads=4, num_kv_heads=2)}).eval()
    cfg = quant_config("int4", method=method, accuracy_level=0, calibration_tokens=512)
    res = export_model(model, tmp_path / method, gla_op="decomposed", weights=cfg, progress=False)
    assert res.validation.passed
