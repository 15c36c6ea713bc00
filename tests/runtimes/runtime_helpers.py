"""Tiny exports shared by the runner, verify and bench tests, and a greedy reference decoder that
drives the exported graphs with plain onnxruntime.

Each export is built once per test process (the export itself is tested elsewhere, so it is
written without its own validation) and removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from gla_export.models import build_model, save_model
from gla_export.export.metadata import zero_state_feeds

_ROOT: Path | None = None
_EXPORTS: dict[tuple, Path] = {}
_CHECKPOINT: Path | None = None

# byte vocabulary (so the export gets the byte tokenizer), GQA and short convolutions (two kinds
# of state), weights large enough that greedy decoding has clear winners
MODEL_KWARGS = dict(
    vocab_size=258,
    embed_dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    use_short_conv=True,
    conv_size=4,
    bos_token_id=256,
    eos_token_id=257,
    tie_word_embeddings=True,
    initializer_range=0.15,
)


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="gla-runtime-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def tiny_model():
    torch.manual_seed(1234)  # the model is fixed; the tests draw fresh prompts
    model = build_model(**MODEL_KWARGS).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("norm_swish_gate.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_checkpoint() -> Path:
    global _CHECKPOINT
    if _CHECKPOINT is None:
        save_model(tiny_model(), _root() / "checkpoint")
        _CHECKPOINT = _root() / "checkpoint"
    return _CHECKPOINT


def tiny_export(form: str = "decomposed", dtype: str = "fp32") -> Path:
    """An export of :func:`tiny_checkpoint` (``form``: custom, onnx or decomposed)."""
    key = (form, dtype)
    if key not in _EXPORTS:
        from gla_export.export.api import export_model

        out = _root() / f"export-{form}-{dtype}"
        export_model(str(tiny_checkpoint()), out, gla_op=form, dtype=dtype, validate=False, progress=False)
        _EXPORTS[key] = out
    return _EXPORTS[key]


def ort_sessions(export_dir: Path, meta: dict):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if meta["gla_op"]["form"] == "custom":
        from gla_export._native import library_path

        so.register_custom_ops_library(library_path("ort"))  # raises when it is not built: a test failure
    if meta["gla_op"]["form"] == "onnx":
        os.environ["ALLOW_RELEASED_ONNX_OPSET_ONLY"] = "0"
    return {
        g: ort.InferenceSession(str(export_dir / f"{g}.onnx"), so, providers=["CPUExecutionProvider"])
        for g in ("prefill", "step")
    }


def greedy_onnxruntime(
    export_dir: Path, prompt: list[int], max_new_tokens: int, prefill: bool = True, stop_at_eos: bool = True
) -> list[int]:
    """Greedy decoding with the exported graphs in plain onnxruntime (the reference for gla-run)."""
    from gla_export.export.metadata import read_metadata

    meta = read_metadata(export_dir)
    sess = ort_sessions(export_dir, meta)
    states = zero_state_feeds(meta, 1)

    def run(graph, ids):
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), **states}
        if graph == "prefill" and any(i["name"] == "attention_mask" for i in meta["graphs"]["prefill"]["inputs"]):
            feeds["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
        names = [o.name for o in sess[graph].get_outputs()]
        out = dict(zip(names, sess[graph].run(None, feeds), strict=True))
        for st in meta["states"]:
            states[st["input"]] = out[st["output"]]
        return out["logits"][0, -1]

    if prefill:
        logits = run("prefill", prompt)
    else:
        for t in prompt:
            logits = run("step", [t])
    eos = meta["model"]["eos_token_id"]
    out = []
    for i in range(max_new_tokens):
        tok = int(np.argmax(logits))
        out.append(tok)
        if stop_at_eos and tok == eos:
            break
        if i + 1 < max_new_tokens:
            logits = run("step", [tok])
    return out


@torch.no_grad()
def greedy_pytorch(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the PyTorch model (with states) and the top-1 minus top-2 logit margin of each."""
    out = model(torch.tensor([prompt]), states=model.init_states(1))
    tokens, margins = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].double()
        top = torch.topk(logits, 2).values
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        margins.append(float(top[0] - top[1]))
        out = model(torch.tensor([[tok]]), states=out.states)
    return tokens, margins
