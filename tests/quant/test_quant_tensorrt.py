"""The QDQ form of quantized exports (int4/int8 weights through blocked DequantizeLinear) parses in
TensorRT and builds into engines (TensorRT-RTX on the CPU machine, as tests/tensorrt_plugin does):
the parser takes the weights as weight-only quantized GEMMs, the plugin takes every GLA layer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gla_export.export import export_model
from gla_export.export.quantize import QuantConfig
from gla_export.models import GLAForCausalLM, recommended_config
from gla_export.runtime.tensorrt import ENGINE_FILES, build_engines

CASES = [  # the tiny random model (untied head); "sample": the sample model, whose tied table feeds Gather and Gemm
    ("int4-b32-fp32", QuantConfig(weights="int4", format="qdq"), "fp32"),
    ("sample-int4-b32-fp16-tied", QuantConfig(weights="int4", format="qdq"), "fp16"),
    ("int8-b64-fp16", QuantConfig(weights="int8", block_size=64, format="qdq"), "fp16"),
    ("int8-b128-default-fp32", QuantConfig(weights="int8", block_size=128, format="qdq"), "fp32"),  # the int8 default block
    ("int8-per-channel-fp32", QuantConfig(weights="int8", block_size=None, format="qdq"), "fp32"),
]


@pytest.fixture(scope="module")
def trt():
    from gla_export import NativeLibraryError, library_path
    from gla_export.runtime.tensorrt import available_module

    name = available_module(os.environ.get("GLA_TEST_TRT_MODULE") or None)
    if name is None:
        pytest.fail("TensorRT is not installed: pip install tensorrt-rtx-cu13 (a test dependency of gla-export)")
    try:
        return name, library_path("trt")
    except NativeLibraryError as e:
        pytest.fail(str(e))


@pytest.mark.tensorrt
@pytest.mark.slow
@pytest.mark.parametrize("id_,cfg,dtype", CASES, ids=[c[0] for c in CASES])
def test_qdq_export_builds_tensorrt_engines(id_, cfg, dtype, trt, tmp_path):
    module, plugin = trt
    torch.manual_seed(0)
    model = None if id_.startswith("sample") else GLAForCausalLM(recommended_config("tiny"))
    res = export_model(model, tmp_path / id_, weights=cfg, dtype=dtype, max_batch=4, max_seq_len=64, progress=False)
    assert res.validation.passed
    built = build_engines(res.out_dir, runtime=module, plugin=plugin, max_seq=32)
    meta = json.loads((res.out_dir / "metadata.json").read_text())
    for graph in ("prefill", "step"):
        e = built.info["engines"][graph]
        assert (built.out_dir / ENGINE_FILES[graph]).stat().st_size == e["bytes"] > 0
        assert e["plugin_layers"] == meta["model"]["num_layers"]
