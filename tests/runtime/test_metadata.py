"""ExportMetadata: the typed, checked view of metadata.json that open_export returns; exports
written before still open; a damaged metadata file is one line and exit code 3."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

from gla_export.errors import EXIT_CODES, ModelError
from gla_export.export.metadata import METADATA_FILE, ExportMetadata, StateInfo, open_export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import run  # noqa: E402
from runtime_helpers import tiny_export  # noqa: E402


@pytest.fixture
def export(tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(tiny_export("decomposed"), dst)
    return dst


def _edit(export: Path, change) -> None:
    meta = json.loads((export / METADATA_FILE).read_text())
    change(meta)
    (export / METADATA_FILE).write_text(json.dumps(meta))


def test_typed_fields_and_the_json_unchanged(export):
    meta = open_export(export)
    raw = json.loads((export / METADATA_FILE).read_text())
    assert isinstance(meta, ExportMetadata) and meta.form == "decomposed" and meta.dtype == "float32"
    assert meta.model.vocab_size == raw["model"]["vocab_size"] and meta.model.num_layers == 2
    assert meta.states[0] == StateInfo(**{**raw["states"][0], "shape": tuple(raw["states"][0]["shape"])})
    assert meta.graphs["step"].input_names == [i["name"] for i in raw["graphs"]["step"]["inputs"]]
    assert meta.path("step") == export / "step.onnx" and meta.has_attention_mask
    assert meta.to_dict() == raw and meta["model"] == raw["model"]  # the dict view of code written before
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.dtype = "float16"  # type: ignore[misc]


def test_exports_written_before_still_open(export):
    """Optional fields absent (as in older exports) take their defaults; unknown ones are kept."""
    def older(meta):
        for key in ("padding_with_past", "shape_hints", "producer", "logits_dtype", "tokenizer", "ir_version"):
            meta.pop(key, None)
        meta["model"].pop("num_kv_heads")
        meta["quantization"] = {"bits": 4}  # a field from a newer writer
    _edit(export, older)
    meta = open_export(export)
    assert meta.padding_with_past is None and meta.logits_dtype == "float32" and meta.tokenizer == {"kind": "none"}
    assert meta.extra == {"quantization": {"bits": 4}} and meta.to_dict()["quantization"] == {"bits": 4}


def test_an_optional_field_is_one_line():
    @dataclasses.dataclass(frozen=True)
    class WithQuantization(ExportMetadata):
        quantization: dict | None = None  # the one line a new optional field takes

    raw = json.loads((tiny_export("decomposed") / METADATA_FILE).read_text())
    assert WithQuantization.from_dict(raw).quantization is None
    assert WithQuantization.from_dict({**raw, "quantization": {"bits": 4}}).quantization == {"bits": 4}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m.pop("graphs"), "has no field 'graphs'"),
        (lambda m: m.__setitem__("graphs", {}), "lists no prefill or step graph"),
        (lambda m: m["graphs"].pop("step"), "lists no step graph"),
        (lambda m: m.__setitem__("states", m["states"][:1]), "the state list is truncated"),
        (lambda m: m.__setitem__("states", []), "the state list is truncated"),
        (lambda m: m.__setitem__("states", {"0": 1}), "states is malformed"),
        (lambda m: m["states"][0].pop("input"), "has no field 'input'"),
        (lambda m: m.__setitem__("dtype", "int8"), "dtype 'int8'"),
    ],
    ids=["no-graphs-key", "no-graphs", "no-step", "truncated-states", "no-states", "states-not-a-list",
         "state-without-input", "bad-dtype"],
)
def test_damaged_metadata_is_one_line_and_exit_3(export, capsys, damage, message):
    _edit(export, damage)
    with pytest.raises(ModelError, match=message):
        open_export(export)
    assert run(["generate", str(export), "--prompt", "hi", "--max-new-tokens", "1"]) == EXIT_CODES["ModelError"] == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.split("'")[0] in err and "internal error" not in err
    assert run(["verify", str(export), "--batch", "1", "--prompt-len", "3", "--steps", "1", "-q"]) == 3
    assert "internal error" not in capsys.readouterr().err


def test_the_dtype_table_matches_onnx_and_torch():
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    from gla_export._dtypes import DTYPES, numpy_dtype, to_numpy

    for name, d in DTYPES.items():
        assert d.torch == getattr(torch, name)
        assert helper.tensor_dtype_to_np_dtype(d.onnx) == np.dtype(numpy_dtype(name)), name
        onnx_name = {"FLOAT": "float32", "DOUBLE": "float64"}.get(TensorProto.DataType.Name(d.onnx))
        assert (onnx_name or TensorProto.DataType.Name(d.onnx).lower()) == name
    x = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    assert to_numpy(x).dtype == numpy_dtype("bfloat16") and to_numpy(x).astype(np.float32).tolist() == [1.5, -2.25]
