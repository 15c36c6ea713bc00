"""Helpers shared by the export tests: tiny model configs and graph runners that do not go
through the exporter's own validation code."""

from __future__ import annotations

import os

import numpy as np
import torch

from gla_export.models import GLAConfig, GLAForCausalLM

# tiny configs covering the features the graphs must handle
CONFIGS = {
    "mha": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=2),
    "gqa": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "conv": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=2, use_short_conv=True, conv_size=4),
    "gqa-conv": dict(vocab_size=77, hidden_size=48, num_hidden_layers=2, num_heads=3, num_kv_heads=1, use_short_conv=True,
                     conv_size=3, conv_bias=True, clamp_min=-2.0, tie_word_embeddings=True),
}
# fla options the model supports, exercised once each
EXTRA_CONFIGS = {
    "unfused-wide": dict(vocab_size=101, hidden_size=96, num_hidden_layers=1, num_heads=3, fuse_norm=False, expand_k=1.0,
                         expand_v=2.0, intermediate_size=200),
    "no-output-gate": dict(vocab_size=101, hidden_size=64, num_hidden_layers=1, num_heads=2, use_output_gate=False),
    "no-affine": dict(vocab_size=101, hidden_size=64, num_hidden_layers=1, num_heads=2, elementwise_affine=False),
}


def make_model(name: str, seed: int = 0) -> GLAForCausalLM:
    torch.manual_seed(seed)
    kwargs = {**CONFIGS, **EXTRA_CONFIGS}[name]
    model = GLAForCausalLM(GLAConfig(**kwargs)).eval()
    # fla's init leaves norms at 1 and biases at 0; perturb them so a swapped weight would show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("norm_swish_gate.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def session(path, form: str):
    """A ``run(feeds) -> dict`` for a graph: stock ONNX Runtime, or the reference evaluator for
    ``custom`` graphs (the native library is tested by its own suite)."""
    if form == "custom":
        from gla_export.export import reference_evaluator

        ev = reference_evaluator(str(path))
        return lambda feeds: dict(zip(ev.output_names, ev.run(None, feeds)))
    import onnxruntime as ort

    if form == "onnx":
        os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return lambda feeds: dict(zip(names, s.run(None, feeds)))


def export_form(model, out_dir, form: str, **kwargs):
    """``export_model`` in ``form`` without progress, validated by the reference evaluator for
    ``custom`` graphs (the native library is tested by its own suite)."""
    from gla_export.export import export_model

    return export_model(model, out_dir, gla_op=form, progress=False,
                        runtime="reference" if form == "custom" else "auto", **kwargs)


def run_prefill(res, form: str, ids: torch.Tensor) -> dict:
    """The outputs of an export's prefill graph on ``ids`` from an empty context (no padding)."""
    from gla_export.export.metadata import zero_state_feeds

    return session(res.prefill_path, form)({"input_ids": ids.numpy(), "attention_mask": np.ones(tuple(ids.shape), np.int64),
                                            **zero_state_feeds(res.metadata, ids.shape[0])})
