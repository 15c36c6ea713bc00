"""fp16 vs int8 vs int4 weights of one GLA shape on ONNX Runtime CUDA, in one run (issue 11).

    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_quant_gpu.py [--size 1.3B] [--budget 270]

For each of fp16 (the float export), int8 (MatMulNBits, block 32) and int4 (MatMulNBits, block 32),
all with random weights: the weights file's size, decode tokens/s at batch 1 and 16 (the stateful
decoder, ort-cuda, greedy steps after a prefill) and prefill tokens/s (batch 1, ``--prefill-len``
tokens), beside the bandwidth floor of a decode step (the weights read per token ÷ the GPU's copy
bandwidth measured here). Prints a table; writes bench_quant_gpu.json to $OUT when set.

The whole run must fit a few minutes of GPU time, exports included: exports are timed, and a
variant is skipped (said so in the table and the JSON) when the time already spent plus the
projection of its export and benchmark passes ``--budget`` seconds. ``--cache DIR`` keeps the
exports for a second run. ``--size 340M`` (or ``tiny`` with ``--backend ort-cpu``) tries it smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

T0 = time.perf_counter()

VARIANTS = [  # (name, export weights) in order of importance: int4 is the point, int8 next
    ("fp16", "fp"),
    ("int4", dict(weights="int4", block_size=32)),
    ("int8", dict(weights="int8", block_size=32)),
]


def elapsed() -> float:
    return time.perf_counter() - T0


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device bytes/s (read + write counted): the library's floor measurement
    (gla_export.runtime.floor.copy_bandwidth, the faster of memcpy and an SM copy, events timed)."""
    if device.type != "cuda":
        return None
    from gla_export.runtime.floor import copy_bandwidth as measure

    bw = measure(device)["bytes_per_s"]
    torch.cuda.empty_cache()
    return bw


def make_model(size: str, dtype: torch.dtype):
    from gla_export.models import GLAForCausalLM, recommended_config

    with torch.device("meta"):
        model = GLAForCausalLM(recommended_config(size))
    model = model.to_empty(device="cpu").to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("g_norm_swish_gate.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    return model


def bench_decode(dec, batch: int, steps: int, prompt: int) -> float:
    dec.resize(batch)
    g = np.random.default_rng(batch)
    logits = dec.prefill([list(g.integers(3, 250, prompt)) for _ in range(batch)])
    times = []
    for i in range(steps + 3):
        toks = np.argmax(logits, -1).tolist()
        t = time.perf_counter()
        logits = dec.step(toks)  # returns the logits on the host: the step has finished
        if i >= 3:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def bench_prefill(dec, length: int, reps: int) -> float:
    dec.resize(1)
    ids = list(np.random.default_rng(1).integers(3, 250, length))
    dec.prefill([ids])
    times = []
    for _ in range(reps):
        dec.reset()
        t = time.perf_counter()
        dec.prefill([ids])
        times.append(time.perf_counter() - t)
    return length / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.3B")
    ap.add_argument("--backend", default="ort-cuda", choices=["ort-cuda", "ort-cpu"])
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run (exports included)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--cache", type=Path, help="keep the exports here (reused when present)")
    ap.add_argument("--only", nargs="*", help="variants to run (fp16 int4 int8)")
    args = ap.parse_args()

    from gla_export.export import export_model
    from gla_export.export.quantize import QuantConfig

    cuda = args.backend == "ort-cuda"
    device = torch.device("cuda") if cuda and torch.cuda.is_available() else torch.device("cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    bw = copy_bandwidth(device)
    dtype = torch.float16 if cuda else torch.float32
    t = time.perf_counter()
    model = make_model(args.size, dtype)
    make_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.size}: {n_params / 1e9:.2f} B parameters, random, {str(dtype)[6:]}; {gpu}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB copy, events)" if bw else f"{args.size} on {gpu}", flush=True)

    root = args.cache or Path(tempfile.mkdtemp(prefix="bench_quant_"))
    rows: dict[str, dict] = {}
    per_bench = None  # seconds the benchmark of one variant took (measured on the first)
    export_rate = None  # export seconds per byte of the float model (measured on the first export)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, weights in VARIANTS:
        if args.only and name not in args.only:
            continue
        out = root / f"{args.size}-{name}"
        row: dict = {}
        have = (out / "metadata.json").is_file()
        projected = (0 if have else (export_rate or 0) * model_bytes * (1.5 if name != "fp16" else 1.0)) + (per_bench or 0)
        if elapsed() + projected > args.budget:
            rows[name] = {"skipped": f"projected {projected:.0f} s past the {args.budget:.0f} s budget (spent {elapsed():.0f} s)"}
            print(f"{name}: skipped ({rows[name]['skipped']})", flush=True)
            continue
        try:
            if not have:
                t = time.perf_counter()
                w = "fp" if weights == "fp" else QuantConfig(**weights)
                export_model(model, out, weights=w, dtype="fp16" if cuda else "fp32", validate=False, progress=False,
                             force=True, max_batch=max(args.batches), max_seq_len=max(args.prefill_len, args.prompt))
                row["export_s"] = time.perf_counter() - t
                if export_rate is None:
                    export_rate = row["export_s"] / model_bytes
            row["weights_bytes"] = (out / "weights.onnx.data").stat().st_size
            meta = json.loads((out / "metadata.json").read_text())
            emb = meta["model"]["vocab_size"] * meta["model"]["hidden_size"]
            # a decode step reads every weight once except the embedding table (one row per token)
            read = row["weights_bytes"] - (emb * (2 if cuda else 4) if weights == "fp" else emb // (2 if name == "int4" else 1))
            row["bytes_per_token"] = read
            if bw:
                row["floor_ms"] = 1e3 * read / bw
            t = time.perf_counter()
            from gla_export.runtime.decoder import StatefulDecoder

            dec = StatefulDecoder(out, args.backend)  # one session pair per variant; resize() per batch
            row["load_s"] = time.perf_counter() - t
            for b in args.batches:
                row[f"decode_b{b}_tok_s"] = bench_decode(dec, b, args.steps, args.prompt)
            row["prefill_tok_s"] = bench_prefill(dec, args.prefill_len, 3)
            del dec
            per_bench = per_bench or (time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the others still run
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        rows[name] = row
        print(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}", flush=True)
        if not args.cache:
            shutil.rmtree(out, ignore_errors=True)

    base = rows.get("fp16", {})
    cols = ["weights", "x fp16", *[f"decode B{b} tok/s" for b in args.batches], "x fp16 (B1)", "prefill tok/s", "floor B1 tok/s", "export s"]
    print("\n| variant | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for name, r in rows.items():
        if "weights_bytes" not in r:
            print(f"| {name} | {r.get('skipped') or r.get('error')} |")
            continue
        b1 = r.get(f"decode_b{args.batches[0]}_tok_s")
        cells = [f"{r['weights_bytes'] / 2**30:.2f} GiB",
                 f"{r['weights_bytes'] / base['weights_bytes']:.2f}" if base.get("weights_bytes") else "",
                 *[f"{r.get(f'decode_b{b}_tok_s', float('nan')):.1f}" for b in args.batches],
                 f"{b1 / base[f'decode_b{args.batches[0]}_tok_s']:.2f}" if b1 and base.get(f"decode_b{args.batches[0]}_tok_s") else "",
                 f"{r.get('prefill_tok_s', float('nan')):.0f}",
                 f"{1e3 / r['floor_ms']:.0f}" if r.get("floor_ms") else "",
                 f"{r.get('export_s', float('nan')):.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\ntotal {elapsed():.0f} s (model build {make_s:.0f} s)")
    result = {"size": args.size, "backend": args.backend, "device": gpu, "copy_bandwidth_Bps": bw, "parameters": n_params,
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "total_s": elapsed()}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_quant_gpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
