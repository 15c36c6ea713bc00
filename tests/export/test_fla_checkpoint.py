"""A flash-linear-attention checkpoint (fla's GLAForCausalLM, save_pretrained + safetensors) exports
in each form and matches our PyTorch model of the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import session

from gla_export.export import export_model
from gla_export.models import load_model
from gla_export.testing import rel_err, zero_state_feeds

FLA_CONFIGS = {
    "gqa-conv-tied": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                          use_short_conv=True, tie_word_embeddings=True),
    "unfused-clamp": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=2, fuse_norm=False, clamp_min=-3.0),
}


@pytest.fixture(scope="module", params=list(FLA_CONFIGS))
def fla_checkpoint(request, tmp_path_factory):
    pytest.importorskip("fla", reason="flash-linear-attention is not installed (pip install '.[test]')")
    import warnings

    warnings.filterwarnings("ignore", message=".*Triton is not supported.*")
    from fla.models import GLAConfig as FlaConfig
    from fla.models import GLAForCausalLM as FlaModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    fla_model = FlaModel(FlaConfig(**FLA_CONFIGS[request.param]))
    with torch.no_grad():  # fla's init leaves norms at 1 and biases at 0: move them so a mix-up shows
        for name, p in fla_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(f"fla-{request.param}")
    sd = {k: v.contiguous() for k, v in fla_model.state_dict().items()}
    if fla_model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    fla_model.config.save_pretrained(path)
    return path


@pytest.mark.parametrize("form", ["custom", "onnx", "decomposed"])
def test_fla_checkpoint_exports_and_matches_our_model(fla_checkpoint, tmp_path, form):
    res = export_model(fla_checkpoint, tmp_path / "out", gla_op=form, progress=False,
                       runtime="reference" if form == "custom" else "auto")
    assert res.validation.passed, res.validation.failures
    ours = load_model(fla_checkpoint).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 29))
    with torch.no_grad():
        ref = ours(ids)
    out = session(res.prefill_path, form)({"input_ids": ids.numpy(), "attention_mask": np.ones((2, 29), np.int64),
                                           **zero_state_feeds(res.metadata, 2)})
    assert rel_err(torch.from_numpy(out["logits"]), ref.logits) < 1e-5
    assert res.metadata["model"]["config"]["num_heads"] == ours.config.num_heads
