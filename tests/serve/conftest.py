"""Fixtures of the serving tests: a small model exported once per session (decomposed GLA op:
no native library needed), and helpers that run the scheduler in-process."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A byte-level model (vocab 258) with short convolutions, so that padded prefill over a past
    and the conv states are exercised too."""
    from gla_export.export import export_model
    from gla_export.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(0)
    config = GLAConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                       use_short_conv=True, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True,
                       initializer_range=0.3)
    model = GLAForCausalLM(config).eval()
    return export_model(model, tmp_path_factory.mktemp("serve") / "tiny", gla_op="decomposed", validate=False,
                        progress=False).out_dir
