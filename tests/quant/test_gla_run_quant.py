"""gla-run (the C++ runner, runtimes/) decodes quantized exports: int8 and int4 weights in both
graph formats (com.microsoft MatMulNBits + GatherBlockQuantized, and blocked DequantizeLinear →
MatMul), its greedy tokens equal to the Python StatefulDecoder's on ORT CPU for the same export."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch

from gla_export._runner import find_gla_run, run_gla_run
from gla_export.export import export_model
from gla_export.export.quantize import QuantConfig
from gla_export.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import MODEL_KWARGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = {  # name: (gla op form, tied embeddings, quantization)
    "int8-b32-matmulnbits": ("decomposed", True, QuantConfig(weights="int8", block_size=32)),
    "int8-b32-asym-matmulnbits-acc0-untied": ("decomposed", False,
                                              QuantConfig(weights="int8", block_size=32, symmetric=False, accuracy_level=0)),
    "int4-b32-matmulnbits-custom": ("custom", True, QuantConfig(weights="int4", block_size=32)),
    "int4-b16-hqq-untied": ("decomposed", False, QuantConfig(weights="int4", block_size=16, method="hqq", symmetric=False)),
    "int4-b32-qdq": ("decomposed", True, QuantConfig(weights="int4", block_size=32, format="qdq")),
    "int8-per-channel-qdq-untied": ("decomposed", False, QuantConfig(weights="int8", block_size=None, format="qdq")),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    # CI builds gla-run with the package: a missing binary is a failure, not a skip
    assert find_gla_run() is not None, "gla-run is not built (pip install . or cmake -S runtimes -B build/runner)"
    root = tmp_path_factory.mktemp("gla-run-quant")
    models = {}
    for tied in (True, False):
        torch.manual_seed(1234)
        models[tied] = build_model(**{**MODEL_KWARGS, "tie_word_embeddings": tied, "initializer_range": 0.15}).eval()
    out = {}
    for name, (form, tied, cfg) in VARIANTS.items():
        out[name] = export_model(models[tied], root / name, gla_op=form, weights=cfg, validate=False, progress=False).out_dir
    return out


def _decoder_tokens(export, prompt: list[int], n: int) -> list[int]:
    from gla_export.runtime.decoder import StatefulDecoder

    dec = StatefulDecoder(export, "ort-cpu")
    return dec.generate(prompt_ids=[prompt], max_new_tokens=n, ignore_eos=True).run()[0].tokens


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gla_run_matches_the_python_decoder(exports, name):
    export = exports[name]
    ops = {n.op_type for n in onnx.load(str(export / "step.onnx"), load_external_data=False).graph.node}
    want_ops = {"DequantizeLinear"} if "qdq" in name else {"MatMulNBits", "GatherBlockQuantized"}
    assert want_ops <= ops, ops  # the export is the format the test is named after
    g = torch.Generator().manual_seed(len(name))
    for n in (1, 11):
        prompt = [256] + torch.randint(0, 256, (n - 1,), generator=g).tolist()
        got = run_gla_run(export, ids=prompt, max_new_tokens=24, ignore_eos=True)
        assert got.prompt_ids == prompt
        assert got.ids == _decoder_tokens(export, prompt, 24), f"prompt {prompt}"
        assert got.stop == "max_new_tokens"
        assert len(set(got.ids)) > 2, got.ids  # a continuation, not one token repeated (which any bug could match)


def test_gla_run_stepped_prompt_matches_too(exports):
    # the prompt through the step graph token by token: the same quantized weights, the other graph
    export = exports["int4-b32-matmulnbits-custom"]
    prompt = [256, 10, 20, 30, 40]
    a = run_gla_run(export, ids=prompt, max_new_tokens=16, ignore_eos=True, prefill=False)
    assert a.prefill is False and len(a.ids) == 16
    assert a.ids == _decoder_tokens(export, prompt, 16)


SAMPLE = {  # the sample model (tied embeddings, byte tokenizer) with the export defaults and the QDQ forms
    "int8": QuantConfig(weights="int8", block_size=128),
    "int4": QuantConfig(weights="int4"),
    "int4-qdq": QuantConfig(weights="int4", format="qdq"),
    "int8-qdq-per-channel": QuantConfig(weights="int8", block_size=None, format="qdq"),
}


@pytest.fixture(scope="module")
def sample_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("gla-run-sample")
    return {name: export_model(None, root / name, weights=cfg, validate=False, progress=False).out_dir
            for name, cfg in SAMPLE.items()}


@pytest.mark.parametrize("name", list(SAMPLE))
def test_gla_run_decodes_the_quantized_sample_model(sample_exports, name):
    export = sample_exports[name]
    got = run_gla_run(export, prompt="In the beginning", max_new_tokens=48, ignore_eos=True)
    assert got.ids == _decoder_tokens(export, got.prompt_ids, 48)
    assert len(set(got.ids)) > 5  # text, not one byte repeated

