"""A whole exported model in the ``custom`` form (gla::GatedLinearAttention nodes) run by ONNX Runtime
with our library, against PyTorch in float64: prefill logits and states, and the step graph
reproducing the prefill token by token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ort_helpers import require_provider

from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime import create_session
from gla_export.export.metadata import zero_state_feeds
from gla_export.testing import rel_err

CONFIGS = {
    "gqa": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2),
    "conv": dict(vocab_size=77, hidden_size=48, num_hidden_layers=2, num_heads=3, num_kv_heads=1, use_short_conv=True,
                 conv_size=3),
}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def provider(request):
    require_provider(request.param)
    return request.param


def _runner(path, provider):
    sess = create_session(path, providers=(provider, "cpu") if provider == "cuda" else ("cpu",), intra_op_num_threads=2)
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds)))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_custom_export_runs_on_our_library(tmp_path, provider, config):
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**CONFIGS[config])).eval()
    res = export_model(model, tmp_path / "out", gla_op="custom", validate=False, progress=False)
    meta = res.metadata
    B, T = 2, 70  # T > 64: more than one chunk of the CPU kernel
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        ref = model.double()(ids, gla_backend="naive")

    prefill = _runner(res.prefill_path, provider)
    out = prefill({"input_ids": ids.numpy(), "attention_mask": np.ones((B, T), np.int64), **zero_state_feeds(meta, B)})
    assert rel_err(torch.from_numpy(out["logits"]), ref.logits) < 2e-5
    for st in meta["states"]:
        layer = ref.states[st["layer"]]
        want = layer.recurrent if st["kind"] == "recurrent_state" else layer.conv
        assert rel_err(torch.from_numpy(out[st["output"]]), want) < 2e-5, st["output"]

    step = _runner(res.step_path, provider)
    states = zero_state_feeds(meta, B)
    logits = []
    for t in range(T):
        r = step({"input_ids": ids[:, t : t + 1].numpy(), **states})
        logits.append(r["logits"])
        states = {st["input"]: r[st["output"]] for st in meta["states"]}
    assert rel_err(torch.from_numpy(np.concatenate(logits, 1)), torch.from_numpy(out["logits"])) < 2e-5
    for st in meta["states"]:
        assert rel_err(torch.from_numpy(states[st["input"]]), torch.from_numpy(out[st["output"]])) < 2e-5
