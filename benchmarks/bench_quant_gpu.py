"""fp16 vs int8 vs int4 weights of one GLA shape on ONNX Runtime CUDA, in one run (issue 11).

    PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_quant_gpu.py [--size 1.3B] [--budget 270]
    PYTHONPATH=$PWD python benchmarks/bench_quant_gpu.py --dry-run     # the same logic on the CPU, in seconds

For the float export (fp16 on CUDA, fp32 on the CPU) and the export defaults of ``--weights int4``
(MatMulNBits, block 32) and ``--weights int8`` (block 128), all of one random-weight model: the
weights' resident size and the bytes a decode step reads (gla_export.runtime.floor, from the files),
decode tokens/s at each batch (the stateful decoder, greedy steps after a prefill) beside the floor
of that step (its bytes ÷ the copy bandwidth measured here), and prefill tokens/s (batch 1,
``--prefill-len`` tokens). Prints a table and the issue's targets (decode at batch 1: int4 ≥ 2.0×,
int8 ≥ 1.5× the float export); writes bench_quant_gpu.json to ``--json`` or to $OUT when set.

Time: the whole run must fit a few minutes of GPU time, exports included. The three exports run
at once, in worker processes (each builds the same random model, on the GPU when there is one:
seconds, where filling 1.4 B parameters from one CPU generator takes over a minute), while the
main process measures the copy bandwidth; once all are written (so that no export competes with a
measurement for the CPU), the variants are measured one after the other. An export not done when
only ``--measure-s`` per variant is left of ``--budget``, or a measurement projected past it, is
skipped and said so in the table and the JSON. ``--cache DIR`` keeps the exports for a second run.

onnxruntime-gpu 1.31 finds the CUDA libraries only after ``import torch`` (done first here) or
``onnxruntime.preload_dlls()`` (called too); it loads models of ``ir_version`` ≤ 10, which the
exporter writes for the opsets it uses (checked before measuring).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import torch  # before onnxruntime: onnxruntime-gpu finds the CUDA libraries torch loaded

from gla_export.errors import first_line

T0 = time.perf_counter()
WEIGHTS = ("fp", "int4", "int8")  # in order of importance: the baseline, int4 (the point), int8
TARGETS = {"int4": 2.0, "int8": 1.5}  # decode tokens/s at batch 1 against the float export (issue 11)


def elapsed() -> float:
    return time.perf_counter() - T0


def make_model(size: str, dtype: torch.dtype, device: str = "cpu"):
    """The random-weight model of ``size`` (normal(0, 0.02) weights, unit norms, zero biases), the
    same for the same arguments; filled on ``device`` (a GPU fills 1.4 B values in milliseconds)
    and returned on the CPU."""
    from gla_export.models import GLAForCausalLM, recommended_config

    with torch.device("meta"):
        model = GLAForCausalLM(recommended_config(size))
    model = model.to_empty(device="cpu").to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "g_norm_swish_gate.weight")):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype).cpu())
    return model


def _export_worker(size: str, dtype: str, weights: str, out: str, gla_op: str, max_batch: int, max_seq_len: int,
                   fill_device: str) -> dict:
    """One export, in a worker process: build the model, export, time both."""
    from gla_export.export import export_model
    from gla_export.export.quantize import quant_config

    torch.set_num_threads(max(1, (os.cpu_count() or 3) // 3))
    t = time.perf_counter()
    model = make_model(size, torch.float16 if dtype == "fp16" else torch.float32, fill_device)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    export_model(model, out, weights=quant_config(weights) or "fp", dtype=dtype, gla_op=gla_op, validate=False,
                 progress=False, force=True, max_batch=max_batch, max_seq_len=max_seq_len)
    return {"model_build_s": build_s, "export_s": time.perf_counter() - t}


def bench_decode(dec, batch: int, steps: int, prompt: int) -> float:
    """Tokens/s of greedy decode steps at ``batch`` (median step after 3 untimed ones)."""
    dec.resize(batch)
    dec.reset()
    g = np.random.default_rng(batch)
    logits = dec.prefill([list(g.integers(3, 250, prompt)) for _ in range(batch)])
    times = []
    for i in range(steps + 3):
        toks = np.argmax(logits, -1).tolist()
        t = time.perf_counter()
        logits = dec.step(toks)  # the logits on the host: the step has finished
        if i >= 3:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def bench_prefill(dec, length: int, reps: int) -> float:
    dec.resize(1)
    ids = list(np.random.default_rng(1).integers(3, 250, length))
    dec.reset()
    dec.prefill([ids])
    times = []
    for _ in range(reps):
        dec.reset()
        t = time.perf_counter()
        dec.prefill([ids])
        times.append(time.perf_counter() - t)
    return length / statistics.median(times)


def check_runtime(backend: str) -> str | None:
    """Why ``backend`` cannot run here (None when it can): onnxruntime-gpu's CUDA provider."""
    import onnxruntime as ort

    if backend != "ort-cuda":
        return None
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - torch has loaded them already in the usual case
            pass
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu (shared/gpu/README.md)")
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    return None


def measure(out: Path, name: str, args, bw: float | None, row: dict) -> None:
    """Sizes, floor and speeds of one export into ``row``."""
    import onnx

    from gla_export.runtime.decoder import StatefulDecoder
    from gla_export.runtime.floor import model_floor

    ir = onnx.load(str(out / "step.onnx"), load_external_data=False).ir_version
    row["ir_version"] = ir
    if args.backend == "ort-cuda" and ir > 10:
        raise RuntimeError(f"step.onnx has ir_version {ir}: onnxruntime 1.31 loads <= 10")
    floor = model_floor(out, args.batches, bw or 1.0)
    row["weights_resident_bytes"] = floor["weights_resident_bytes"]
    row["weights_file_bytes"] = (out / "weights.onnx.data").stat().st_size
    row["step_bytes"] = {str(b): floor["step_bytes"][b] for b in args.batches}
    if bw:
        row["floor_ms"] = {str(b): floor["ms_per_token"][b] for b in args.batches}
    t = time.perf_counter()
    dec = StatefulDecoder(out, args.backend, threads=args.threads)  # one session pair; resize() per batch
    row["load_s"] = time.perf_counter() - t
    row["decode_tok_s"] = {}
    for b in args.batches:
        row["decode_tok_s"][str(b)] = bench_decode(dec, b, args.steps, args.prompt)
        if bw:
            row.setdefault("ratio_to_floor", {})[str(b)] = (b / row["decode_tok_s"][str(b)]) / (floor["ms_per_token"][b] / 1e3)
    row["prefill_tok_s"] = bench_prefill(dec, args.prefill_len, args.prefill_reps)
    row["bench_s"] = time.perf_counter() - t
    del dec


def table(rows: dict, args, base: str) -> list[str]:
    b0 = str(args.batches[0])
    cols = ["weights", "x " + base, *[f"decode B{b} tok/s (÷ floor)" for b in args.batches], f"x {base} B{b0}",
            "prefill tok/s", "export s"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    ref = rows.get(base, {})
    for name, r in rows.items():
        if "decode_tok_s" not in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} |" + " |" * (len(cols) - 1))
            continue
        dec = r["decode_tok_s"]
        cells = [f"{r['weights_resident_bytes'] / 2**20:,.1f} MiB",
                 f"{r['weights_resident_bytes'] / ref['weights_resident_bytes']:.3f}" if ref.get("weights_resident_bytes") else ""]
        for b in args.batches:
            ratio = r.get("ratio_to_floor", {}).get(str(b))
            cells.append(f"{dec[str(b)]:,.1f}" + (f" ({ratio:.2f}×)" if ratio else ""))
        cells.append(f"{dec[b0] / ref['decode_tok_s'][b0]:.2f}" if ref.get("decode_tok_s") else "")
        cells.append(f"{r['prefill_tok_s']:,.0f}")
        cells.append(f"{r['export_s']:.1f}" if "export_s" in r else "cached")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.3B")
    ap.add_argument("--backend", default="ort-cuda", choices=["ort-cuda", "ort-cpu"])
    ap.add_argument("--gla-op", default="custom", choices=["custom", "decomposed"],
                    help="custom: our GLA kernels (the library from GLA_EXPORT_LIB_DIR); decomposed: standard ops")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run (exports included)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (ort-cpu)")
    ap.add_argument("--measure-s", type=float, default=30.0,
                    help="seconds kept per variant for its measurement when waiting for the exports")
    ap.add_argument("--cache", type=Path, help="keep the exports here (reused when present)")
    ap.add_argument("--only", nargs="*", choices=list(WEIGHTS), help="variants to run (by --weights value)")
    ap.add_argument("--json", type=Path, help="where the JSON goes (default: $OUT/bench_quant_gpu.json when OUT is set)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the whole logic on the CPU in seconds: tiny shape, ort-cpu, few steps (what CI runs)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.size, args.backend, args.steps, args.prompt = "tiny", "ort-cpu", 4, 8
        args.prefill_len, args.prefill_reps, args.batches = 32, 1, [1, 4]
        args.threads = args.threads or 1

    why = check_runtime(args.backend)
    if why:
        print(f"bench_quant_gpu: {why}", file=sys.stderr)
        return 1
    cuda = args.backend == "ort-cuda"
    dtype = "fp16" if cuda else "fp32"
    base = dtype  # the float export's row
    names = {"fp": base, "int4": "int4", "int8": "int8"}
    wanted = [w for w in WEIGHTS if not args.only or w in args.only]
    root = args.cache or Path(tempfile.mkdtemp(prefix="bench_quant_"))
    root.mkdir(parents=True, exist_ok=True)
    outs = {w: root / f"{args.size}-{args.gla_op}-{w}" for w in wanted}

    # the exports, all at once in worker processes (spawned: no inherited CUDA state)
    todo = [w for w in wanted if not (outs[w] / "metadata.json").is_file()]
    pool = ProcessPoolExecutor(max_workers=max(1, len(todo)), mp_context=mp.get_context("spawn")) if todo else None
    futures = {w: pool.submit(_export_worker, args.size, dtype, w, str(outs[w]), args.gla_op, max(args.batches),
                              max(args.prefill_len, args.prompt + args.steps + 8), "cuda" if cuda else "cpu")
               for w in todo}
    device = torch.device("cuda") if cuda else torch.device("cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    # measured while the workers export (on a GPU their use of it is the model fill, seconds at the
    # start; on the CPU, a dry run, the figure is only a stand-in)
    from gla_export.runtime.floor import copy_bandwidth

    bw_info = copy_bandwidth(device, nbytes=None if cuda else 64 << 20)
    if cuda:
        torch.cuda.empty_cache()
    bw = bw_info.get("bytes_per_s")
    from gla_export.models import recommended_config

    c = recommended_config(args.size)
    print(f"{args.size}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, random weights, "
          f"{dtype} activations, GLA op {args.gla_op}; {args.backend} on {gpu}"
          + (f"; copy bandwidth {bw / 1e9:,.0f} GB/s ({bw_info['way']})" if bw else ""), flush=True)

    rows: dict[str, dict] = {names[w]: {} for w in wanted}
    reserve = 20.0  # seconds kept for the table and the JSON
    # every export finishes before any variant is measured: a worker still quantizing on the CPU
    # would slow the host side of the other variants' steps (and flatter the quantized ones)
    deadline = args.budget - reserve - args.measure_s * len(wanted)
    for w, fut in futures.items():
        try:
            rows[names[w]].update(fut.result(timeout=max(deadline - elapsed(), 0.1)))
        except FutureTimeout:
            rows[names[w]]["skipped"] = f"export not done {elapsed():.0f} s into the {args.budget:.0f} s budget"
        except Exception as e:  # noqa: BLE001 - an export that fails is reported, the others still run
            rows[names[w]]["error"] = f"export: {type(e).__name__}: {first_line(e)[:300]}"
    if pool is not None:
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in workers:  # a worker still exporting past the budget
            if p.is_alive():
                p.terminate()
        for p in workers:
            p.join(10)
    print(f"exports done at {elapsed():.0f} s", flush=True)

    per_bench: float | None = None
    for w in wanted:
        name = names[w]
        row = rows[name]
        if "skipped" not in row and "error" not in row:
            if elapsed() + (per_bench or 0) > args.budget - reserve:
                row["skipped"] = f"measuring projected to pass the {args.budget:.0f} s budget (spent {elapsed():.0f} s)"
            else:
                try:
                    measure(outs[w], name, args, bw, row)
                    per_bench = max(per_bench or 0, row["bench_s"])
                except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the others still run
                    row["error"] = f"{type(e).__name__}: {first_line(e)[:300]}"
        print(f"{name}: {json.dumps(row, default=lambda v: round(v, 3))}", flush=True)

    print()
    print("\n".join(table(rows, args, base)))
    ref = rows.get(base, {}).get("decode_tok_s", {}).get(str(args.batches[0]))
    targets = {}
    if 1 in args.batches:
        for w, want in TARGETS.items():
            got = rows.get(w, {}).get("decode_tok_s", {}).get("1")
            if got and rows.get(base, {}).get("decode_tok_s", {}).get("1"):
                ratio = got / rows[base]["decode_tok_s"]["1"]
                targets[w] = {"ratio": ratio, "target": want, "met": ratio >= want}
                print(f"target: {w} decode B1 {ratio:.2f}× {base} (≥ {want}×): {'met' if ratio >= want else 'NOT met'}"
                      + (" (dry run: a tiny shape on the CPU, not the target's measurement)" if args.dry_run else ""))
            else:
                targets[w] = {"ratio": None, "target": want, "met": None}
                print(f"target: {w} decode B1 ≥ {want}× {base}: not measured")
    print(f"total {elapsed():.0f} s (budget {args.budget:.0f} s)")
    result = {"size": args.size, "backend": args.backend, "gla_op": args.gla_op, "device": gpu, "dtype": dtype,
              "copy_bandwidth": bw_info, "date": time.strftime("%Y-%m-%d"), "batches": args.batches,
              "rows": rows, "targets": targets, "reference_decode_tok_s": ref, "total_s": elapsed(), "dry_run": args.dry_run}
    path = args.json or (Path(os.environ["OUT"]) / "bench_quant_gpu.json" if os.environ.get("OUT") else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    if not args.cache:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
