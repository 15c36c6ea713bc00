"""Constant memory for a hybrid whose attention layers are all windowed (issue 13): decoding
16 384 tokens needs no more memory than decoding 64, measured as for the pure GLA sample
(tests/runtime/test_memory.py: the same child process, controls and margins)."""

from __future__ import annotations

import pytest
import torch
from test_memory import check_flat, measure

from gla_export.export import export_model
from gla_export.models import GLAForCausalLM, recommended_config


@pytest.fixture(scope="module")
def windowed_hybrid_export(tmp_path_factory):
    """The sample's architecture with two of its four layers softmax attention over a window of 64."""
    torch.manual_seed(0)
    attn = dict(layers=[1, 3], num_heads=4, num_kv_heads=2, window_size=64)
    model = GLAForCausalLM(recommended_config("sample", initializer_range=0.3, attn=attn))
    out = tmp_path_factory.mktemp("memory") / "hybrid"
    res = export_model(model, out, gla_op="custom", validate=False, progress=False)
    assert res.metadata["state_bytes_per_token"] == 0
    return res.out_dir


@pytest.mark.slow
def test_windowed_hybrid_cpu_memory_is_flat_from_64_to_16384_tokens(windowed_hybrid_export):
    check_flat(measure(windowed_hybrid_export, "ort-cpu"), peak_control=True)


@pytest.mark.gpu
def test_windowed_hybrid_gpu_memory_is_flat_from_64_to_16384_tokens(windowed_hybrid_export):
    check_flat(measure(windowed_hybrid_export, "ort-cuda"), peak_control=False)
