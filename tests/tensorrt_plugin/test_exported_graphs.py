"""The exported prefill.onnx and step.onnx (gla-export export), in the custom and the standard
LinearAttention forms, parse in TensorRT with one plugin layer per GLA layer and build into
engines through gla_export.runtime.tensorrt.build_engines (what `gla-export build` runs)."""

from __future__ import annotations

import json

import pytest
import torch

from gla_export.export import export_model
from gla_export.models import GLAForCausalLM, recommended_config
from gla_export.runtime.tensorrt import ENGINE_FILES, INFO_FILE, SCRIPT_FILE, build_engines

EXPORTS = [
    # (id, form, dtype, GQA)
    ("custom-fp32", "custom", "fp32", False),
    ("custom-fp16-gqa", "custom", "fp16", True),
    ("onnx-fp32-gqa", "onnx", "fp32", True),
    ("onnx-fp16", "onnx", "fp16", False),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for id_, form, dtype, gqa in EXPORTS:
        torch.manual_seed(0)
        config = recommended_config("tiny", num_kv_heads=1) if gqa else recommended_config("tiny")
        result = export_model(GLAForCausalLM(config), root / id_, gla_op=form, dtype=dtype, max_batch=4,
                              max_seq_len=64, validate=False, progress=False)
        out[id_] = result.out_dir
    return out


@pytest.mark.parametrize("id_", [e[0] for e in EXPORTS])
def test_export_builds_engines(id_, exports, trt_module, plugin_lib):
    export_dir = exports[id_]
    meta = json.loads((export_dir / "metadata.json").read_text())
    result = build_engines(export_dir, runtime=trt_module, plugin=plugin_lib, max_seq=32)
    info = json.loads((result.out_dir / INFO_FILE).read_text())
    assert info == result.info
    assert info["strongly_typed"] is True and info["precision"] == {"float32": "fp32", "float16": "fp16"}[meta["dtype"]]
    layers = meta["model"]["num_layers"]
    for graph in ("prefill", "step"):
        engine = result.out_dir / ENGINE_FILES[graph]
        assert engine.stat().st_size == info["engines"][graph]["bytes"] > 0
        e = info["engines"][graph]
        # every GLA layer went to our plugin: none was decomposed or dropped by the parser
        assert e["plugin_layers"] == layers
        io = meta["graphs"][graph]
        assert [t["name"] for t in e["inputs"]] == [t["name"] for t in io["inputs"]]
        assert [t["name"] for t in e["outputs"]] == [t["name"] for t in io["outputs"]]
        trt_types = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32"}
        assert [trt_types[t["dtype"]] for t in e["outputs"]] == [t["dtype"] for t in io["outputs"]]
        # the state keeps its own shape (and the step its T = 1)
        for t_trt, t_meta in zip(e["outputs"][1:], io["outputs"][1:]):
            assert t_trt["shape"][1:] == t_meta["shape"][1:]
    assert info["profiles"]["step"]["input_ids"] == [[1, 1], [1, 1], [4, 1]]
    assert info["profiles"]["prefill"]["input_ids"] == [[1, 1], [1, 32], [4, 32]]
    script = (result.out_dir / SCRIPT_FILE).read_text()
    assert script.count("--dynamicPlugins=") == 2 and "--stronglyTyped" in script
    assert "--maxShapes=input_ids:4x32," in script and "--maxShapes=input_ids:4x1," in script
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
