"""What ``gla-export bench`` counts for the floor of quantized exports (gla_export/runtime/floor.py):
the weights' resident size and the bytes a decode step reads, checked against what the files hold.

The expected numbers are computed here from the initializers' real bytes (the graphs loaded with
their external data), not from types and dims as floor.py does: MatMulNBits weights count their
packed bytes plus scales and zero points; a GatherBlockQuantized embedding only the rows a step
gathers (its data, scales and zero points); a tied table, stored once and named twice, once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from gla_export.export import export_model
from gla_export.export.quantize import QuantConfig
from gla_export.models import build_model
from gla_export.runtime.floor import model_floor, resident_weight_bytes, step_weight_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import run  # noqa: E402
from runtime_helpers import MODEL_KWARGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = {  # (tied embeddings, weights, activations dtype)
    "fp32-tied": (True, "fp", "fp32"),
    "fp32-untied": (False, "fp", "fp32"),
    "fp16-untied": (False, "fp", "fp16"),
    "int4-tied": (True, QuantConfig(weights="int4", block_size=32), "fp32"),
    "int4-fp16-untied": (False, QuantConfig(weights="int4", block_size=32), "fp16"),
    "int8-untied-asym": (False, QuantConfig(weights="int8", block_size=32, symmetric=False), "fp32"),
    "int8-default-fp16-tied": (True, QuantConfig(weights="int8", block_size=128), "fp16"),
    "int4-untied-asym": (False, QuantConfig(weights="int4", block_size=32, symmetric=False), "fp32"),
    "int4-qdq-tied": (True, QuantConfig(weights="int4", block_size=32, format="qdq"), "fp32"),
    "int8-qdq-per-channel-untied": (False, QuantConfig(weights="int8", block_size=None, format="qdq"), "fp32"),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("floor")
    out = {}
    models = {}
    for tied in (True, False):
        torch.manual_seed(7)
        models[tied] = build_model(**{**MODEL_KWARGS, "tie_word_embeddings": tied}).eval()
    for name, (tied, weights, dtype) in VARIANTS.items():
        out[name] = export_model(models[tied], root / name, gla_op="decomposed", weights=weights, dtype=dtype,
                                 validate=False, progress=False).out_dir
    return out


def _raw(t: onnx.TensorProto) -> bytes:
    """The bytes an initializer holds (loaded from the weights file; 4-bit types stay packed)."""
    if t.raw_data:
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()


def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path), load_external_data=True).graph


def _expected_resident(d: Path) -> int:
    """Every weight of the shared weights file by name, its bytes once (both graphs name the same
    ones), and each graph's own small inline constants; the GatherBlockQuantized view of a tied
    table (``*.qweight.gather``) is the MatMulNBits weight's bytes (asserted), so not added (an
    untied table is read by the gather only, under that name alone)."""
    tensors: dict[str, bytes] = {}
    for g in ("prefill", "step"):
        for t in onnx.load(str(d / f"{g}.onnx"), load_external_data=False).graph.initializer:
            external = t.data_location == onnx.TensorProto.EXTERNAL
            onnx.external_data_helper.load_external_data_for_tensor(t, str(d)) if external else None
            tensors[t.name if external else f"{g}:{t.name}"] = _raw(t)
    total = 0
    for name, raw in tensors.items():
        base = name[: -len(".gather")]
        if name.endswith(".qweight.gather") and base in tensors and len(raw) == len(tensors[base]):
            assert raw == tensors[base], name  # the same bytes, named twice
            continue  # (when blocks do not divide the hidden size the gather has its own, unpadded rows)
        total += len(raw)
    return total


def _inline_bytes(d: Path) -> int:
    return sum(len(_raw(t)) for g in ("prefill", "step")
               for t in onnx.load(str(d / f"{g}.onnx"), load_external_data=False).graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL)


def _expected_step(d: Path, batch: int) -> int:
    """The step graph node by node: a Gather / GatherBlockQuantized over the embedding reads
    ``batch`` rows of its table, scales and zero points (nothing more when the same bytes are read
    whole by the logits' MatMulNBits); every other initializer is read whole, once."""
    g = _graph(d / "step.onnx")
    scale_bytes = 2 if json.loads((d / "metadata.json").read_text())["dtype"] == "float16" else 4
    raw = {t.name: _raw(t) for t in g.initializer}
    rows = {t.name: int(t.dims[0]) for t in g.initializer if t.dims}
    whole: set[str] = set()
    gathered: set[str] = set()
    for n in g.node:
        if n.op_type == "Gather":
            gathered.update(x for x in n.input[:1] if x in raw)  # a DequantizeLinear's output is no initializer
            whole.update(x for x in n.input[1:] if x in raw)
        elif n.op_type == "GatherBlockQuantized":
            gathered.update(x for i, x in enumerate(n.input) if i != 1 and x)
        else:
            whole.update(x for x in n.input if x in raw)
        if n.op_type == "MatMulNBits":  # packed bytes + scales (+ zero points), as the attributes say
            a = {x.name: x.i for x in n.attribute}
            kb = -(-a["K"] // a["block_size"])
            assert len(raw[n.input[1]]) == a["N"] * kb * a["block_size"] * a["bits"] // 8
            assert len(raw[n.input[2]]) == a["N"] * kb * scale_bytes  # scales in the activations' type
            if len(n.input) > 3 and n.input[3]:
                assert len(raw[n.input[3]]) == a["N"] * -(-kb * a["bits"] // 8)
    total = sum(len(raw[x]) for x in whole if not x.endswith(".qweight.gather"))
    for x in gathered - whole:
        base = x[: -len(".gather")]
        if x.endswith(".qweight.gather") and base in whole and len(raw[x]) == len(raw[base]):
            continue  # a tied table stored once: the logits read all of it already
        total += batch * len(raw[x]) // rows[x]
    return total


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resident_and_step_bytes_are_what_the_files_hold(exports, name):
    d = exports[name]
    meta = json.loads((d / "metadata.json").read_text())
    res = resident_weight_bytes([d / "prefill.onnx", d / "step.onnx"])
    assert res["bytes"] == _expected_resident(d)
    # the weights file is those tensors and alignment padding only
    size = (d / "weights.onnx.data").stat().st_size
    in_file = res["bytes"] - _inline_bytes(d)
    assert 0 < in_file <= size < in_file + 4096 * res["tensors"]
    for b in (1, 3):
        assert step_weight_bytes(d / "step.onnx", b) == _expected_step(d, b), b
    floor = model_floor(d, [1, 3], 1e9)
    state = floor["state_bytes_per_row"]
    # each state in its own type (fp16 exports keep the recurrent state fp32, the conv state fp16)
    assert state == sum(int(np.prod([x for x in s["shape"] if x != "batch"])) * np.dtype(s["dtype"]).itemsize
                        for s in meta["states"])
    for b in (1, 3):
        assert floor["step_bytes"][b] == floor["weight_bytes"][b] + 2 * b * state
        assert floor["ms_per_token"][b] == pytest.approx(1e3 * floor["step_bytes"][b] / 1e9)
        assert floor["bytes_per_token"][b] == pytest.approx(floor["step_bytes"][b] / b)


def test_the_embedding_counts_rows_only_when_only_gathered(exports):
    emb_row = MODEL_KWARGS["embed_dim"]
    # untied float: the table is read by the Gather only, so one more row per batch row
    d = exports["fp32-untied"]
    assert step_weight_bytes(d / "step.onnx", 2) - step_weight_bytes(d / "step.onnx", 1) == emb_row * 4
    # tied float: the logits read the whole table, the gather adds nothing
    d = exports["fp32-tied"]
    assert step_weight_bytes(d / "step.onnx", 2) == step_weight_bytes(d / "step.onnx", 1)
    # untied int8 asym, GatherBlockQuantized: a row of codes, its scales and zero points
    d = exports["int8-untied-asym"]
    kb = emb_row // 32
    assert step_weight_bytes(d / "step.onnx", 2) - step_weight_bytes(d / "step.onnx", 1) == emb_row + kb * 4 + kb
    # tied int4: GatherBlockQuantized reads the bytes the logits' MatMulNBits reads whole
    d = exports["int4-tied"]
    ops = {n.op_type for n in onnx.load(str(d / "step.onnx"), load_external_data=False).graph.node}
    assert {"GatherBlockQuantized", "MatMulNBits"} <= ops
    assert step_weight_bytes(d / "step.onnx", 2) == step_weight_bytes(d / "step.onnx", 1)


def test_quantized_exports_are_smaller_as_counted(exports):
    fp = resident_weight_bytes([exports["fp32-tied"] / "step.onnx"])["bytes"]
    int4 = resident_weight_bytes([exports["int4-tied"] / "step.onnx"])["bytes"]
    qdq = resident_weight_bytes([exports["int4-qdq-tied"] / "step.onnx"])["bytes"]
    # int4 codes are half a byte (packed INT4 initializers of the qdq form included), not 4 bytes
    assert int4 < 0.4 * fp and qdq < 0.4 * fp


def test_bench_reports_them(exports, tmp_path, capsys):
    d = exports["int4-tied"]
    args = ["bench", str(d), "--only", "ort-cpu", "--batch", "1,2", "--prefill-len", "8", "--decode-tokens", "4",
            "--contexts", "8", "--warmup", "1", "--repeats", "1", "--threads", "1", "--device", "cpu", "-q",
            "-o", str(tmp_path)]
    assert run(args) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["model"]["weights"] == "int4 b32 sym rtn (matmulnbits, accuracy 4)"
    f = rep["floor"]
    assert f["weights_resident_bytes"] == _expected_resident(d)
    bw = rep["copy_bandwidth"]["bytes_per_s"]
    (ours,) = rep["results"]
    for b in ("1", "2"):
        assert f["weight_bytes"][b] == _expected_step(d, int(b))
        assert f["step_bytes"][b] == f["weight_bytes"][b] + 2 * int(b) * f["state_bytes_per_row"]
        dec = ours["decode"][b]
        assert dec["floor_ms_per_token"] == pytest.approx(1e3 * f["step_bytes"][b] / bw)
        assert dec["ratio_to_floor"] == pytest.approx(dec["ms_per_token"] / dec["floor_ms_per_token"])
    out = capsys.readouterr().out
    assert "weights int4 b32" in out and "weights resident" in out and "read per decode step" in out

