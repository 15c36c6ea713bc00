"""Choosing the int8 default (docs/edge.md): for each int8 variant of the sample model, how many of
fp32's first 64 greedy tokens it keeps after the README prompt and after 24 held-out prompts (40
characters each from tests/data/kjv_heldout_excerpt.txt), its bits per byte, 512-token agreement
on the README prompt, and its file against the fp16 export's. Everything on ORT CPU, as exported.

    PYTHONPATH=$PWD python benchmarks/int8_defaults.py [VARIANT ...]   # writes $OUT/int8_defaults.json or ./
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gla_export.export import export_model
from gla_export.export.quality import compare, greedy_tokens, heldout_text
from gla_export.export.quantize import QuantConfig
from gla_export.models.tokenizer import ByteTokenizer

V = {
    "rtn b32 acc4": {"block_size": 32, "accuracy_level": 4},
    "rtn b64 acc4": {"block_size": 64, "accuracy_level": 4},
    "rtn b128 acc4": {"block_size": 128, "accuracy_level": 4},
    "rtn b32 acc0": {"block_size": 32, "accuracy_level": 0},
    "rtn b128 acc0": {"block_size": 128, "accuracy_level": 0},
    "rtn b32 asym acc4": {"block_size": 32, "symmetric": False, "accuracy_level": 4},
    "rtn b128 asym acc4": {"block_size": 128, "symmetric": False, "accuracy_level": 4},
    "gptq b32 acc4": {"block_size": 32, "method": "gptq", "accuracy_level": 4},
    "gptq b64 acc4": {"block_size": 64, "method": "gptq", "accuracy_level": 4},
    "gptq b128 acc4": {"block_size": 128, "method": "gptq", "accuracy_level": 4},
    "gptq b32 acc0": {"block_size": 32, "method": "gptq", "accuracy_level": 0},
    "gptq b32 asym acc4": {"block_size": 32, "method": "gptq", "symmetric": False, "accuracy_level": 4},
    "rtn per-channel qdq": {"block_size": None, "format": "qdq", "accuracy_level": 0},
    "gptq per-channel qdq": {"block_size": None, "format": "qdq", "method": "gptq", "accuracy_level": 0},
}
tok = ByteTokenizer()
text = heldout_text()
prompts = [tok.encode("In the beginning")]
for i in range(24):
    s = text[i * 170 : i * 170 + 40]
    prompts.append(tok.encode(s))
N = 64
with tempfile.TemporaryDirectory() as tmp:
    ref = Path(tmp) / "fp32"
    export_model(None, ref, progress=False, validate=False)
    rsize = (ref / "weights.onnx.data").stat().st_size
    ref_t = [greedy_tokens(ref, p, N) for p in prompts]
    fp16 = Path(tmp) / "fp16"
    export_model(None, fp16, dtype="fp16", progress=False, validate=False)
    f16size = (fp16 / "weights.onnx.data").stat().st_size
    rows = {}
    only = sys.argv[1:]
    for name, o in V.items():
        if only and name not in only:
            continue
        out = Path(tmp) / name.replace(" ", "_")
        t = time.perf_counter()
        export_model(None, out, weights=QuantConfig(weights="int8", **o), progress=False, validate=False)
        secs = time.perf_counter() - t
        leads = []
        for p, r in zip(prompts, ref_t):
            g = greedy_tokens(out, p, N)
            leads.append(next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), N))
        out16 = Path(tmp) / (name.replace(" ", "_") + "16")
        export_model(
            None, out16, dtype="fp16", weights=QuantConfig(weights="int8", **o), progress=False, validate=False
        )
        s16 = (out16 / "weights.onnx.data").stat().st_size / f16size
        q = compare(out, ref, text, greedy=512)
        rows[name] = {
            "readme": leads[0],
            "all64": sum(l == N for l in leads),
            "n": len(leads),
            "mean_lead": float(np.mean(leads)),
            "readme512": q.greedy_agree,
            "bpb": q.bits_per_byte,
            "bpb_inc": q.bpb_increase,
            "size_vs_fp16": s16,
            "export_s": secs,
        }
        print(
            f"{name:24s} README {leads[0]:3d}/64 (512: {q.greedy_agree:3d})  all-64 on {rows[name]['all64']:2d}/{len(leads)} prompts  "
            f"mean lead {np.mean(leads):5.1f}  bpb {q.bits_per_byte:.4f} ({100 * q.bpb_increase:+.2f} %)  fp16-file {s16:.3f}x  {secs:.1f}s",
            flush=True,
        )
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "int8_defaults.json").write_text(json.dumps(rows, indent=1) + "\n")
