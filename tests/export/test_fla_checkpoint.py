"""A flash-linear-attention checkpoint (fla's GLAForCausalLM, save_pretrained + safetensors) exports
in each form and matches our PyTorch model of the same weights."""

from __future__ import annotations

import pytest
import torch
from export_helpers import export_form, run_prefill

from gla_export.models import load_model
from gla_export.testing import rel_err, save_fla_checkpoint

FLA_CONFIGS = {
    "gqa-conv-tied": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                          use_short_conv=True, tie_word_embeddings=True),
    "unfused-clamp": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=2, fuse_norm=False, clamp_min=-3.0),
}


@pytest.fixture(scope="module", params=list(FLA_CONFIGS))
def fla_checkpoint(request, tmp_path_factory):
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install '.[test]')")
    path = tmp_path_factory.mktemp(f"fla-{request.param}")
    save_fla_checkpoint(FLA_CONFIGS[request.param], path)
    return path


@pytest.mark.parametrize("form", ["custom", "onnx", "decomposed"])
def test_fla_checkpoint_exports_and_matches_our_model(fla_checkpoint, tmp_path, form):
    res = export_form(fla_checkpoint, tmp_path / "out", form)
    assert res.validation.passed, res.validation.failures
    ours = load_model(fla_checkpoint).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 29))
    with torch.no_grad():
        ref = ours(ids)
    out = run_prefill(res, form, ids)
    assert rel_err(torch.from_numpy(out["logits"]), ref.logits) < 1e-5
    assert res.metadata["model"]["config"]["num_heads"] == ours.config.num_heads
