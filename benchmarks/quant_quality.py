"""Quality of quantized exports of the sample model (docs/benchmarks.md, "Quantized weights").

    PYTHONPATH=$PWD python benchmarks/quant_quality.py [--text FILE] [--greedy 512] [--json OUT]
    PYTHONPATH=$PWD python benchmarks/quant_quality.py --size 340M --max-bytes 1024 --greedy 32 --only ...

Exports the sample model in float32 and in each quantized variant below (ORT CPU), then reports
bits per byte on held-out text (default: tests/data/kjv_heldout_excerpt.txt), the logits error and
the greedy agreement with the float export over ``--greedy`` tokens of the README prompt.
``--size 340M``: a random-weight model of that shape instead (normal(0, 0.02) weights; its bits per
byte are near the uniform distribution's, so the logits error and top-1 agreement say more).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gla_export.export import export_model
from gla_export.export.quality import compare, heldout_text
from gla_export.export.quantize import QuantConfig

VARIANTS = {
    "int8 rtn b32": dict(weights="int8", block_size=32, accuracy_level=0),
    "int8 rtn b32 acc4": dict(weights="int8", block_size=32, accuracy_level=4),
    "int8 rtn b128": dict(weights="int8", block_size=128, accuracy_level=0),
    "int8 rtn per-channel qdq": dict(weights="int8", block_size=None, format="qdq", accuracy_level=0),
    "int8 gptq b32": dict(weights="int8", block_size=32, method="gptq", accuracy_level=0),
    # the int8 default (issue 11's greedy target is measured as exported: accuracy_level 4)
    "int8 rtn b64 acc4": dict(weights="int8", block_size=64, accuracy_level=4),
    "int8 rtn b128 acc4": dict(weights="int8", block_size=128, accuracy_level=4),
    "int8 rtn b256 acc4": dict(weights="int8", block_size=256, accuracy_level=4),
    "int8 rtn b32 asym acc4": dict(weights="int8", block_size=32, symmetric=False, accuracy_level=4),
    "int8 rtn b128 asym acc4": dict(weights="int8", block_size=128, symmetric=False, accuracy_level=4),
    "int8 gptq b32 acc4": dict(weights="int8", block_size=32, method="gptq", accuracy_level=4),
    "int8 gptq b128 acc4": dict(weights="int8", block_size=128, method="gptq", accuracy_level=4),
    "int8 rtn b128 qdq": dict(weights="int8", block_size=128, format="qdq", accuracy_level=0),
    "int4 rtn b32": dict(weights="int4", block_size=32, accuracy_level=0),
    "int4 rtn b32 acc4": dict(weights="int4", block_size=32, accuracy_level=4),
    "int4 rtn b32 asym": dict(weights="int4", block_size=32, symmetric=False, accuracy_level=0),
    "int4 rtn b32 +gate": dict(weights="int4", block_size=32, quantize_gate=True, accuracy_level=0),
    "int4 rtn b32 float head": dict(weights="int4", block_size=32, quantize_lm_head=False, quantize_embedding=False, accuracy_level=0),
    "int4 rtn b64": dict(weights="int4", block_size=64, accuracy_level=0),
    "int4 rtn b128": dict(weights="int4", block_size=128, accuracy_level=0),
    "int4 hqq b32": dict(weights="int4", block_size=32, method="hqq", symmetric=False, accuracy_level=0),
    "int4 hqq b64": dict(weights="int4", block_size=64, method="hqq", symmetric=False, accuracy_level=0),
    "int4 gptq b32": dict(weights="int4", block_size=32, method="gptq", accuracy_level=0),
    "int4 gptq b32 asym": dict(weights="int4", block_size=32, method="gptq", symmetric=False, accuracy_level=0),
    "int4 gptq b32 +gate": dict(weights="int4", block_size=32, method="gptq", quantize_gate=True, accuracy_level=0),
    "int4 gptq b64": dict(weights="int4", block_size=64, method="gptq", accuracy_level=0),
    "int4 awq b32": dict(weights="int4", block_size=32, method="awq", accuracy_level=0),
    "int4 awq b64": dict(weights="int4", block_size=64, method="awq", accuracy_level=0),
    "int4 awq b128": dict(weights="int4", block_size=128, method="awq", accuracy_level=0),
    "int4 awq b32 asym": dict(weights="int4", block_size=32, method="awq", symmetric=False, accuracy_level=0),
    "int8 awq b128 acc4": dict(weights="int8", block_size=128, method="awq", accuracy_level=4),
    "int4 gptq b128": dict(weights="int4", block_size=128, method="gptq", accuracy_level=0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, help="held-out text (default: tests/data/kjv_heldout_excerpt.txt)")
    ap.add_argument("--greedy", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--size", help="a random-weight model of this shape (gla_export.models.recommended_config)")
    ap.add_argument("--max-bytes", type=int)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    args = ap.parse_args()
    text = args.text.read_text() if args.text else heldout_text()
    model = None
    if args.size:
        import torch

        from gla_export.models import GLAForCausalLM, recommended_config

        torch.manual_seed(0)
        with torch.device("meta"):
            model = GLAForCausalLM(recommended_config(args.size))
        model = model.to_empty(device="cpu").eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("swish_gate.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0, 0.02)
    rows = {}
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "fp32"
        export_model(model, ref, progress=False, validate=False)
        ref_size = (ref / "weights.onnx.data").stat().st_size
        for name, opts in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            out = Path(tmp) / name.replace(" ", "_")
            t = time.perf_counter()
            export_model(model, out, weights=QuantConfig(**{"calibration_tokens": args.calibration_tokens, **opts}),
                         progress=False, validate=False)
            secs = time.perf_counter() - t
            r = compare(out, ref, text, greedy=args.greedy, max_bytes=args.max_bytes, cache=cache)
            size = (out / "weights.onnx.data").stat().st_size
            rows[name] = {**r.as_dict(), "weights_bytes": size, "size_vs_fp32": size / ref_size, "export_s": secs}
            print(f"{name:28s} bpb {r.bits_per_byte:.4f} ({100 * r.bpb_increase:+.2f} %)  ref {r.reference_bits_per_byte:.4f}  "
                  f"max|dlogit| {r.logits_max_abs:.3f}  top1 {100 * r.top1_agreement:.1f} %  greedy {r.greedy_agree}/{r.greedy_tokens} "
                  f"({100 * r.greedy_match_fraction:.0f} %)  rel {r.logits_rel:.4f}  size {size / ref_size:.3f}x fp32  {secs:.1f} s", flush=True)
            import shutil

            shutil.rmtree(out)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
