"""Decode on one GPU against the floor (issue 12): the captured ORT CUDA step beside the uncaptured
one, PyTorch eager and fla's GLAForCausalLM, in one process (one call of a few minutes on an H100).

1. the bundled sample model (fp32), batch 1: also checks that captured and uncaptured greedy
   decoding give the same tokens, and counts the step graph's nodes after ONNX Runtime's
   optimizer on the CUDA execution provider;
2. the 1.3B shape (random weights, fp16, built on the GPU), batches 1 and 16.

Every decode figure comes with the floor ``gla-export bench`` computes (weight + state bytes per
step over the copy bandwidth measured in this run) and the ratio to it. Prints a table last;
writes OUT/bench_decode_gpu.json (OUT: --out, default $OUT or .).

    python benchmarks/bench_decode_gpu.py [--out DIR] [--skip-1b3] [--tokens N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gla_export.runtime import bench as B

CONTENDERS = [B.OURS_ORT_CUDA, B.OURS_ORT_CUDA_NOGRAPH, B.EAGER, B.FLA]


def run_bench(export_dir: Path, model, batches, tokens: int, say) -> dict:
    settings = B.BenchSettings(batches=tuple(batches), prefill_len=32, decode_tokens=tokens, contexts=(64,),
                               warmup=5, repeats=1)
    rep = B.bench(export_dir, model=model, settings=settings, device="cuda", contenders=CONTENDERS, progress=say)
    return rep.as_dict()


def same_tokens(export_dir: Path) -> dict:
    from gla_export.runtime.decoder import StatefulDecoder

    out = {}
    cap = StatefulDecoder(export_dir, "ort-cuda", cuda_graph=True, sample_on_device=True)
    ref = StatefulDecoder(export_dir, "ort-cuda", cuda_graph=False, sample_on_device=False)
    out["captured"] = cap.cuda_graph
    out["why_not"] = cap.cuda_graph_off
    a = cap.generate(["In the beginning", "And God said"], max_new_tokens=64).run()
    b = ref.generate(["In the beginning", "And God said"], max_new_tokens=64).run()
    out["greedy_tokens_equal"] = [r.tokens for r in a] == [r.tokens for r in b]
    cap.resize(1), ref.resize(1)
    cap.prefill([[1, 2, 3]]), ref.prefill([[1, 2, 3]])
    for t in range(100):
        cap.step([t % 200]), ref.step([t % 200])
    out["states_bitwise_after_100_steps"] = all(
        torch.equal(cap._states[cap._cur][n], ref._states[ref._cur][n]) for n in cap._states[cap._cur])
    return out


def node_counts(export_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_graph_nodes as N

    from gla_export.export.metadata import open_export

    meta = open_export(export_dir)
    step = meta.path("step")
    tmp = Path(tempfile.mkdtemp(prefix="nodes-"))
    out = {"exported": N.count(step)[0]}
    for level in ("basic", "all"):
        out[f"cuda_{level}"] = N.count(N.optimized(step, "cuda", level, tmp / f"{level}.onnx", meta.form))[0]
    out["layers"] = meta.model.num_layers
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-1b3", action="store_true")
    ap.add_argument("--tokens", type=int, default=64, help="timed decode steps for the 1.3B shape (the sample: 256)")
    ap.add_argument("--nodes-1b3", action="store_true", help="also count the 1.3B step graph's nodes (slow: "
                    "ONNX Runtime writes the optimized model with its weights; the count per layer is the sample's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_gpu: no CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    say = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)
    from gla_export.export import export_model
    from gla_export.models import GLAForCausalLM, load_model, sample_model_path
    from gla_export.models.builder import recommended_config

    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "gpu": torch.cuda.get_device_name(0), "runs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))

    say("sample model: export")
    sample = load_model(sample_model_path())
    sdir = export_model(sample_model_path(), tmp / "sample", validate=False, progress=False).out_dir
    info["sample_checks"] = same_tokens(sdir)
    say(f"sample model: checks {info['sample_checks']}")
    try:
        info["sample_nodes"] = node_counts(sdir)
    except Exception as e:  # noqa: BLE001 - a count that fails is reported, not fatal
        info["sample_nodes"] = {"error": str(e)[:200]}
    info["runs"]["sample fp32"] = run_bench(sdir, sample, [1], 256, say)
    report(info, Path(args.out))

    if not args.skip_1b3:
        say("1.3B shape: build on the GPU (fp16, random weights)")
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.device("cuda"):
            big = GLAForCausalLM(recommended_config("1.3B")).half().eval()
        info["build_1b3_s"] = time.perf_counter() - t
        t = time.perf_counter()
        big = big.cpu()  # the exporter reads the weights on the host
        bdir = export_model(big, tmp / "1b3", dtype="fp16", validate=False, progress=False).out_dir
        big = big.cuda()
        info["export_1b3_s"] = time.perf_counter() - t
        say(f"1.3B: exported in {info['export_1b3_s']:.1f} s")
        if args.nodes_1b3:
            try:
                info["1b3_nodes"] = node_counts(bdir)
            except Exception as e:  # noqa: BLE001
                info["1b3_nodes"] = {"error": str(e)[:200]}
        info["runs"]["1.3B fp16"] = run_bench(bdir, big, [1, 16], args.tokens, say)
    report(info, Path(args.out))
    say("done")
    return 0


def report(info: dict, out: Path) -> None:
    """Writes the JSON and prints the table (after each model, so a run cut short keeps the first)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode_gpu.json").write_text(json.dumps(info, indent=1))
    print(f"\n{info['date']}  {info['gpu']}")
    for name, rep in info["runs"].items():
        bw = rep["copy_bandwidth"]
        print(f"{name}: copy {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw['way']}; "
              + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bw["ways"].items()) + ")")
        print(f"  {'contender':28s} {'B':>3s} {'ms/tok':>9s} {'floor ms':>9s} {'÷floor':>7s} {'tok/s':>9s}")
        for r in rep["results"]:
            for b, d in r["decode"].items():
                print(f"  {r['name']:28s} {b:>3s} {d['ms_per_token']:9.3f} {d['floor_ms_per_token']:9.3f} "
                      f"{d['ratio_to_floor']:6.1f}× {d['tokens_per_s']:9,.0f}")
        for k, why in rep["skipped"].items():
            if why != "not requested":
                print(f"  skipped {k}: {why[:100]}")
    for k in ("sample_checks", "sample_nodes", "1b3_nodes", "build_1b3_s", "export_1b3_s"):
        if k in info:
            print(f"{k}: {info[k]}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
