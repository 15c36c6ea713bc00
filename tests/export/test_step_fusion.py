"""Fewer kernels per decoded token (issue 12 item 3): ONNX Runtime's optimizer fuses every RMS
norm of the step graph into one SimplifiedLayerNormalization (the exporter writes the pattern its
fusion matches: Pow, ReduceMean, Add, Sqrt, Div, Mul)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM


@pytest.mark.parametrize("form", ["custom", "decomposed"])
def test_ort_fuses_every_rms_norm_of_the_step_graph(tmp_path, form):
    spec = importlib.util.spec_from_file_location(
        "step_graph_nodes", Path(__file__).resolve().parents[2] / "benchmarks" / "step_graph_nodes.py")
    nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nodes)
    torch.manual_seed(0)
    layers = 3
    model = GLAForCausalLM(GLAConfig(vocab_size=64, hidden_size=64, num_hidden_layers=layers, num_heads=2)).eval()
    out = export_model(model, tmp_path / "e", gla_op=form, validate=False, progress=False).out_dir
    step = out / "step.onnx"
    before, ops_before = nodes.count(step)
    assert ops_before["ReduceMean"] == 3 * layers + 1  # attn_norm, g_norm, mlp_norm a layer; the final norm
    after, ops = nodes.count(nodes.optimized(step, "cpu", "extended", tmp_path / "opt.onnx", form))
    assert ops.get("SimplifiedLayerNormalization") == 3 * layers + 1, ops
    assert "ReduceMean" not in ops and "Sqrt" not in ops
    assert after <= before - 5 * (3 * layers + 1), (before, after)
