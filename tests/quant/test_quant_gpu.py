"""Quantized exports on ONNX Runtime CUDA (GPU machine): MatMulNBits int4/int8 in the stateful
decoder, against the PyTorch model with the same dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gla_export.export import export_model
from gla_export.export.quantize import QuantConfig, dequantized_reference
from gla_export.models.loader import load_model, sample_model_path
from gla_export.models.tokenizer import ByteTokenizer

CASES = [("int4-b32-fp16", "int4", 32, "fp16"), ("int8-b32-fp16", "int8", 32, "fp16"), ("int8-b128-fp16", "int8", 128, "fp16"),
         ("int4-b64-asym-fp32", "int4", 64, "fp32")]  # int4 b32 and int8 b128: the export defaults


@pytest.mark.gpu
@pytest.mark.parametrize("id_,weights,block,dtype", CASES, ids=[c[0] for c in CASES])
def test_quantized_export_decodes_on_ort_cuda(id_, weights, block, dtype, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from gla_export.runtime.decoder import StatefulDecoder

    cfg = QuantConfig(weights=weights, block_size=block, symmetric="asym" not in id_)
    res = export_model(None, tmp_path / id_, weights=cfg, dtype=dtype, progress=False)
    model = load_model(sample_model_path()).float().eval()
    ref = dequantized_reference(model, res.metadata).cuda()
    ids = ByteTokenizer().encode("In the beginning God created the heaven and the earth.")
    dec = StatefulDecoder(res.out_dir, "ort-cuda")
    got = [dec.prefill([ids])[0].copy()]
    toks = [int(np.argmax(got[0]))]
    for _ in range(15):
        got.append(dec.step([toks[-1]])[0].copy())
        toks.append(int(np.argmax(got[-1])))
    with torch.no_grad():
        full = ref(torch.tensor([ids + toks[:-1]], device="cuda")).logits[0, len(ids) - 1:].float().cpu().numpy()
    err = np.abs(np.stack(got) - full).max()
    # CUDA's MatMulNBits keeps the activations in float (fp16 here: its rounding, through 4 layers)
    assert err < (0.15 if dtype == "fp16" else 2e-3) * max(1.0, np.abs(full).max() / 10), err


@pytest.mark.gpu
def test_bench_reports_the_floor_of_a_quantized_export_on_ort_cuda(tmp_path):
    import json
    import sys
    from pathlib import Path

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
    from cli_helpers import run

    res = export_model(None, tmp_path / "int4", weights=QuantConfig(weights="int4"), dtype="fp16", progress=False)
    args = ["bench", str(res.out_dir), "--only", "ort-cuda", "--only", "eager", "--batch", "1,2", "--prefill-len", "16",
            "--decode-tokens", "8", "--contexts", "16", "--repeats", "1", "--device", "cuda", "-q", "-o", str(tmp_path / "b")]
    assert run(args) == 0
    rep = json.loads((tmp_path / "b" / "bench.json").read_text())
    results = {r["name"]: r for r in rep["results"]}
    ours = results["ours: ORT CUDA"]
    f = rep["floor"]
    assert f["weights_resident_bytes"] < (res.out_dir / "weights.onnx.data").stat().st_size + 65536
    for b in ("1", "2"):
        d = ours["decode"][b]
        assert d["floor_ms_per_token"] == pytest.approx(1e3 * f["step_bytes"][b] / rep["copy_bandwidth"]["bytes_per_s"])
        assert d["ratio_to_floor"] > 1  # nothing decodes faster than the copy of its bytes
    assert "floor_ms_per_token" not in results["PyTorch eager"]["decode"]["1"]  # the float model: not its floor
