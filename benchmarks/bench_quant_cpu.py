"""Decode speed, export time and weights size of quantized exports on ONNX Runtime CPU
(docs/benchmarks.md, "Quantized weights"): a random-weight model of a published shape.

    PYTHONPATH=$PWD python benchmarks/bench_quant_cpu.py [--size 340M] [--tokens 32] [--threads 2] [--json OUT]

Decode: the stateful decoder (ort-cpu), batch 1, greedy, ``--tokens`` steps after a 16-token prompt,
median of the per-step times. Shares the machine with whatever else runs: report contention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gla_export.export import export_model
from gla_export.export.quantize import QuantConfig
from gla_export.models import GLAForCausalLM, recommended_config
from gla_export.runtime.decoder import StatefulDecoder

VARIANTS = {
    "fp32": "fp",
    "int8 b32": QuantConfig(weights="int8", block_size=32, accuracy_level=0),
    "int8 b32 acc4": QuantConfig(weights="int8", block_size=32, accuracy_level=4),
    "int8 b128 acc4": QuantConfig(weights="int8", block_size=128, accuracy_level=4),  # the int8 default
    "int4 b32": QuantConfig(weights="int4", block_size=32, accuracy_level=0),
    "int4 b32 acc4": QuantConfig(weights="int4", block_size=32, accuracy_level=4),
}


def decode_speed(export_dir: Path, tokens: int, threads: int) -> dict:
    dec = StatefulDecoder(export_dir, "ort-cpu", threads=threads)
    logits = dec.prefill([list(range(1, 17))])
    times = []
    for _ in range(tokens):
        tok = int(np.argmax(logits[0]))
        t = time.perf_counter()
        logits = dec.step([tok])
        times.append(time.perf_counter() - t)
    med = statistics.median(times[2:] if len(times) > 4 else times)
    return {"step_ms_median": 1e3 * med, "tokens_per_s": 1.0 / med, "step_ms_min": 1e3 * min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="340M")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GLAForCausalLM(recommended_config(args.size))
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            out = Path(tmp) / name.replace(" ", "_")
            t = time.perf_counter()
            export_model(model, out, weights=weights, validate=False, progress=False)
            export_s = time.perf_counter() - t
            size = (out / "weights.onnx.data").stat().st_size
            r = {"export_s": export_s, "weights_bytes": size, **decode_speed(out, args.tokens, args.threads)}
            rows[name] = r
            print(f"{args.size} {name:14s} weights {size / 2**20:8.1f} MiB  export {export_s:6.1f} s  "
                  f"decode {r['tokens_per_s']:7.2f} tok/s (median step {r['step_ms_median']:.1f} ms)", flush=True)
            import shutil

            shutil.rmtree(out)
    base = rows.get("fp32")
    if base:
        for name, r in rows.items():
            print(f"{name:14s} size {r['weights_bytes'] / base['weights_bytes']:.3f}x fp32, decode {r['tokens_per_s'] / base['tokens_per_s']:.2f}x fp32")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
