"""Weight-only quantization (gla_export/export/quantize.py): the encodings against one-node ONNX
Runtime graphs, GPTQ against round-to-nearest, and quantized exports of the sample model: shared
weights file, validation, the stateful decoder, quality, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from gla_export.errors import UsageError
from gla_export.export import export_model
from gla_export.export.graph import BIG_ALIGN
from gla_export.export.quantize import (
    QuantConfig,
    gather_arrays,
    matmulnbits_arrays,
    qdq_arrays,
    quant_config,
    quantize_gptq,
    quantize_hqq,
    quantize_rtn,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(nodes, inputs, outputs, inits, feeds, opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no DQ→MatMulNBits fusion
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _weights(n, k, seed):
    g = np.random.default_rng(seed)
    w = g.normal(0, 0.05, (n, k)).astype(np.float32)
    w[:, 3] *= 8  # an outlier column, as trained weights have
    return w


CASES = [  # (id, bits, block, symmetric, method, K)
    ("int4-b32-sym-rtn", 4, 32, True, "rtn", 96),
    ("int4-b32-asym-rtn-K100", 4, 32, False, "rtn", 100),
    ("int4-b64-asym-hqq", 4, 64, False, "hqq", 128),
    ("int4-b16-sym-gptq-K72", 4, 16, True, "gptq", 72),
    ("int8-b32-sym-rtn", 8, 32, True, "rtn", 96),
    ("int8-b128-asym-gptq-K200", 8, 128, False, "gptq", 200),
]


def _quantize(w, bits, block, symmetric, method):
    if method == "rtn":
        return quantize_rtn(w, bits, block, symmetric)
    if method == "hqq":
        return quantize_hqq(w, bits, block)
    x = np.random.default_rng(1).normal(size=(256, w.shape[1])).astype(np.float32)
    return quantize_gptq(w, torch.from_numpy(x.T @ x / 256), bits, block, symmetric)


@pytest.mark.parametrize("id_,bits,block,symmetric,method,K", CASES, ids=[c[0] for c in CASES])
def test_matmulnbits_computes_the_dequantized_product(id_, bits, block, symmetric, method, K):
    N = 40
    w = _weights(N, K, 0)
    qt = _quantize(w, bits, block, symmetric, method)
    deq = qt.dequantize()
    # the quantization is close (within a block's step, up to GPTQ's error feedback) ...
    step = np.repeat(qt.scales, qt.block_size, axis=1)[:, :K]
    assert np.abs(deq - w).max() <= (0.51 if method == "rtn" else 8) * np.abs(step).max()
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < (0.25 if bits == 4 else 0.02)
    # ... and MatMulNBits computes x @ dequantized(w).T from our encoding
    arrs = matmulnbits_arrays(qt, np.float32)
    inits = [onnx.numpy_helper.from_array(arrs["B"], "B"), onnx.numpy_helper.from_array(arrs["scales"], "scales")]
    ins = ["x", "B", "scales"]
    if "zero_points" in arrs:
        inits.append(onnx.numpy_helper.from_array(arrs["zero_points"], "zp"))
        ins.append("zp")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=qt.block_size)
    x = np.random.default_rng(2).normal(size=(3, 5, K)).astype(np.float32)
    y = _run([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, K])],
             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, {"x": x})
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-4)


QDQ_CASES = [("int4-b32-sym", 4, 32, True, 96), ("int4-b32-asym-K100", 4, 32, False, 100), ("int8-b64-sym", 8, 64, True, 128),
             ("int8-per-channel-sym", 8, None, True, 100), ("int8-per-channel-asym", 8, None, False, 64)]


@pytest.mark.parametrize("id_,bits,block,symmetric,K", QDQ_CASES, ids=[c[0] for c in QDQ_CASES])
@pytest.mark.parametrize("transpose", [True, False], ids=["matmul", "gemm-transB"])
def test_blocked_dequantize_linear_equals_the_dequantized_weight(id_, bits, block, symmetric, K, transpose):
    N = 24
    w = _weights(N, K, 3)
    qt = quantize_rtn(w, bits, block, symmetric, positive_scales=True)
    assert (qt.scales > 0).all()  # TensorRT refuses non-positive scales
    a = qdq_arrays(qt, np.float32, transpose)
    raw, dims, elem = a["data"]
    inits = [helper.make_tensor("q", elem, dims, raw.tobytes(), raw=True), onnx.numpy_helper.from_array(a["scales"], "s")]
    ins = ["q", "s"]
    if a["zero_point"] is not None:
        zraw, zdims, zelem = a["zero_point"]
        inits.append(helper.make_tensor("z", zelem, zdims, zraw.tobytes(), raw=True))
        ins.append("z")
    attrs = {"axis": (0 if transpose else 1) if block else (1 if transpose else 0)}
    if block:
        attrs["block_size"] = block
    node = helper.make_node("DequantizeLinear", ins, ["y"], **attrs)
    y = _run([node], [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, {})
    np.testing.assert_allclose(y, qt.dequantize().T if transpose else qt.dequantize(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_reads_the_matmulnbits_bytes(bits, symmetric):
    V, H = 50, 64
    qt = quantize_rtn(_weights(V, H, 4), bits, 32, symmetric)
    g = gather_arrays(qt, np.float32)
    np.testing.assert_array_equal(g["data"].reshape(-1), matmulnbits_arrays(qt, np.float32)["B"].reshape(-1))
    inits = [onnx.numpy_helper.from_array(g["data"], "d"), onnx.numpy_helper.from_array(g["scales"], "s")]
    ins = ["d", "ids", "s"]
    if "zero_points" in g:
        inits.append(onnx.numpy_helper.from_array(g["zero_points"], "z"))
        ins.append("z")
    node = helper.make_node("GatherBlockQuantized", ins, ["y"], domain="com.microsoft", gather_axis=0, quantize_axis=1,
                            block_size=32, bits=bits)
    ids = np.array([[0, 7, 49], [3, 3, 12]], np.int64)
    y = _run([node], [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, {"ids": ids})
    np.testing.assert_allclose(y, qt.dequantize()[ids], rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits,block", [(4, 32), (8, 64)])
def test_gptq_has_less_output_error_than_rtn(bits, block):
    """On correlated inputs GPTQ's layer output error ‖X(W − Ŵ)ᵀ‖ is below round-to-nearest's."""
    g = np.random.default_rng(5)
    K, N = 128, 64
    mix = g.normal(size=(K, K)).astype(np.float32) * 0.3 + np.eye(K, dtype=np.float32)
    x = (g.normal(size=(512, K)).astype(np.float32) @ mix)
    w = _weights(N, K, 6)
    h = torch.from_numpy(x.T @ x / len(x))
    err = {m: np.linalg.norm(x @ (w - q.dequantize()).T) for m, q in
           (("rtn", quantize_rtn(w, bits, block, True, positive_scales=True)), ("gptq", quantize_gptq(w, h, bits, block, True)))}
    assert err["gptq"] < 0.85 * err["rtn"], err


def test_options_are_checked():
    assert quant_config("fp") is None
    assert quant_config("int4").block_size == 32
    # the int8 default (docs/edge.md, "Choosing the int8 default"): block 128, symmetric, round to
    # nearest, MatMulNBits with accuracy level 4
    c = quant_config("int8")
    assert (c.block_size, c.symmetric, c.method, c.format, c.accuracy_level) == (128, True, "rtn", "matmulnbits", 4)
    assert quant_config("int8", block_size=32).block_size == 32
    with pytest.raises(UsageError, match="per-channel"):
        quant_config("int4", block_size=0)
    with pytest.raises(UsageError, match="qdq"):
        quant_config("int8", block_size=0, format="matmulnbits")
    with pytest.raises(UsageError, match="asymmetric"):
        quant_config("int4", method="hqq")
    with pytest.raises(UsageError, match="int4"):
        quant_config("int8", method="hqq", symmetric=False)
    with pytest.raises(UsageError, match="block size"):
        quant_config("int4", block_size=48)
    with pytest.raises(UsageError, match="only apply"):
        quant_config("fp", method="gptq")
    with pytest.raises(UsageError, match="calibration"):
        quant_config("int4", method="gptq", calibration="/nonexistent.txt")


# ---------------------------------------------------------------------------------------------
# exports of the sample model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {"fp32": export_model(None, root / "fp32", progress=False, validate=False).out_dir}
    for name, cfg in {
        "int4": QuantConfig(weights="int4"),
        "int8": quant_config("int8"),  # the default, as `gla-export export --weights int8` writes it
        "int4-qdq-gptq": QuantConfig(weights="int4", format="qdq", method="gptq", calibration_tokens=2048),
    }.items():
        res = export_model(None, root / name, weights=cfg, progress=False)  # validated against the dequantized model
        assert res.validation.passed
        out[name] = res.out_dir
    return out


def _external(path: Path) -> dict[str, tuple[str, int, int]]:
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            out[t.name] = (d["location"], int(d["offset"]), int(d["length"]))
    return out


@pytest.mark.parametrize("name", ["int4", "int8", "int4-qdq-gptq"])
def test_prefill_and_step_share_one_weights_file(exports, name):
    d = exports[name]
    assert sorted(p.name for p in d.iterdir() if p.suffix in (".onnx", ".data")) == ["prefill.onnx", "step.onnx", "weights.onnx.data"]
    pre, step = _external(d / "prefill.onnx"), _external(d / "step.onnx")
    assert {loc for loc, _, _ in [*pre.values(), *step.values()]} == {"weights.onnx.data"}
    assert pre == step  # the same tensors at the same places: one quantization, stored once
    # nothing stored twice: distinct byte ranges never overlap, and together they are the file (+ alignment)
    ranges = sorted({(o, n) for _, o, n in pre.values()})
    for (o1, n1), (o2, _) in zip(ranges, ranges[1:]):
        assert o1 + n1 <= o2 < o1 + n1 + BIG_ALIGN  # no overlap; gaps are alignment only
    assert (d / "weights.onnx.data").stat().st_size == ranges[-1][0] + ranges[-1][1]
    meta = json.loads((d / "metadata.json").read_text())
    q = meta["quantization"]
    assert q["bits"] == (8 if name == "int8" else 4) and q["quantized"]["lm_head"] and not q["quantized"]["gate_projections"]
    assert set(q["tolerances"]) == {"matmulnbits", "matmulnbits-accuracy4", "qdq"}
    ops = {n.op_type for n in onnx.load(str(d / "step.onnx"), load_external_data=False).graph.node}
    if name.endswith("qdq-gptq"):
        assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    else:
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops


def test_weights_file_sizes(exports):
    fp32 = (exports["fp32"] / "weights.onnx.data").stat().st_size
    # fp32 scales, one per 32 (int4) or 128 (int8) weights; the sample model's norms stay float
    assert (exports["int4"] / "weights.onnx.data").stat().st_size < 0.19 * fp32
    assert (exports["int8"] / "weights.onnx.data").stat().st_size < 0.32 * fp32


def test_quantized_export_decodes_in_the_stateful_decoder(exports):
    from gla_export.export.quality import greedy_tokens
    from gla_export.models.tokenizer import ByteTokenizer

    ids = ByteTokenizer().encode("In the beginning")
    toks = greedy_tokens(exports["int4"], ids, 24)
    ref = greedy_tokens(exports["fp32"], ids, 24)
    assert len(toks) == 24 and all(0 <= t < 258 for t in toks)
    assert toks[:8] == ref[:8]  # int4 keeps the opening of the greedy continuation (measured: 21 tokens)


def test_int8_greedy_tokens_equal_fp32(exports):
    """Issue 11's target, with the int8 defaults (block 128, symmetric rtn, accuracy level 4): fp32's
    first 64 greedy tokens of the README prompt. Held with a thin margin: the float model's own
    top-2 logit margin is 0.023 at token 52, where an error of that size flips the token; int8
    block 32 and 64 do (docs/edge.md, "Choosing the int8 default"). The int8 export's own smallest
    top-2 margin over these 64 tokens is 0.045 (at 52), far above the rounding differences between
    CPUs' int8 kernels, so the check does not depend on the machine."""
    from gla_export.export.quality import greedy_tokens
    from gla_export.models.tokenizer import ByteTokenizer

    ids = ByteTokenizer().encode("In the beginning")
    toks = greedy_tokens(exports["int8"], ids, 64)
    ref = greedy_tokens(exports["fp32"], ids, 64)
    assert toks == ref


def test_quality_report(exports):
    from gla_export.export.quality import compare, heldout_text

    r = compare(exports["int4"], exports["fp32"], heldout_text(), greedy=32, max_bytes=1500)
    assert r.reference_bits_per_byte < 1.7
    assert 0 <= r.bpb_increase < 0.03  # measured +0.1 % on the whole excerpt
    assert r.top1_agreement > 0.9 and r.logits_max_abs > 0
    same = compare(exports["fp32"], exports["fp32"], heldout_text(), greedy=8, max_bytes=300)
    assert same.logits_max_abs == 0 and same.greedy_agree == 8


def test_cli_exports_int4(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gla_export", "export", *args], capture_output=True, text=True, env=env, timeout=300)

    out = tmp_path / "q"
    r = run("-o", str(out), "--weights", "int4", "--block-size", "64", "--asymmetric", "-q")
    assert r.returncode == 0, r.stderr
    q = json.loads((out / "metadata.json").read_text())["quantization"]
    assert (q["bits"], q["block_size"], q["symmetric"], q["format"], q["method"]) == (4, 64, False, "matmulnbits", "rtn")
    bad = run("-o", str(tmp_path / "bad"), "--weights", "int4", "--block-size", "per-channel")
    assert bad.returncode == 2 and "int8" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
