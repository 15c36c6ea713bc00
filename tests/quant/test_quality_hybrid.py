"""verify's quality report reads an export's prefill graph chunk by chunk (quality._ExportLM): a
full-attention hybrid's KV cache starts empty (its sequence axis is symbolic), which the report built
with the axis name as a size."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gla_export.export import export_model
from gla_export.export.quality import _ExportLM, _TorchLM
from gla_export.models import build_model
from gla_export.models.builder import attention_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import MODEL_KWARGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("window", [None, 8])
def test_export_logits_of_a_hybrid_over_chunks(tmp_path, window):
    torch.manual_seed(5)
    model = build_model(**{**MODEL_KWARGS, "attn": attention_spec([1], num_heads=4, num_kv_heads=2,
                                                                  window_size=window)}).eval()
    export_model(model, tmp_path / "e", gla_op="decomposed", progress=False)
    ids = [256, *np.random.default_rng(0).integers(0, 256, 37).tolist()]
    got = _ExportLM(tmp_path / "e").logits(ids, chunk=16)  # three chunks: the cache carried across
    want = _TorchLM(model).logits(ids, chunk=16)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
