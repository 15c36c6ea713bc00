"""Blocks wider than a matrix's input (the int8 default block 128 on a model of hidden size 64, or
any block that does not divide it): MatMulNBits pads each row to whole blocks, GatherBlockQuantized
must not (its output is as wide as its data). Before the fix the embedding's gather read the padded
rows and the export failed to load ("Incompatible dimensions" at the first norm)."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch

from gla_export.export import export_model
from gla_export.export.quantize import quant_config
from gla_export.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import MODEL_KWARGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("weights,block", [("int8", None), ("int4", 128), ("int8", 64)], ids=["int8-default", "int4-b128", "int8-b64"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_blocks_wider_than_the_hidden_size(tmp_path, weights, block, tied):
    torch.manual_seed(5)
    model = build_model(**{**MODEL_KWARGS, "embed_dim": 48, "num_heads": 2, "num_kv_heads": 1, "tie_word_embeddings": tied}).eval()
    cfg = quant_config(weights, block_size=block, accuracy_level=0)
    res = export_model(model, tmp_path / "q", gla_op="decomposed", weights=cfg, progress=False)
    assert res.validation.passed  # against the dequantized model, within 2e-3
    g = onnx.load(str(res.out_dir / "step.onnx"), load_external_data=False).graph
    (gather,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    data = next(t for t in g.initializer if t.name == gather.input[0])
    assert list(data.dims) == [MODEL_KWARGS["vocab_size"], 48 * cfg.bits // 8]  # rows of exactly H codes
