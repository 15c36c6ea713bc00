"""Nodes of an export's step graph before and after ONNX Runtime's graph optimizer (issue 12 item 3):
each node of the optimized graph is at least one kernel launch per decoded token without a CUDA graph.

    python benchmarks/step_graph_nodes.py EXPORT_DIR [--provider cpu|cuda] [--json out.json]
    python benchmarks/step_graph_nodes.py --shape 340M --layers 2 [--form custom] [--dtype fp32]

With --shape, a random-weight model of that shape (gla_export.models.RECOMMENDED) is exported
first (``--layers`` cuts the layer count: nodes scale linearly with layers, see ``per_layer``).
The optimized model is written by ``SessionOptions.optimized_model_filepath`` for each level.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path


def count(path: Path) -> tuple[int, dict[str, int]]:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    ops = collections.Counter((n.domain + "::" if n.domain else "") + n.op_type for n in g.node)
    return sum(ops.values()), dict(ops.most_common())


def optimized(step: Path, provider: str, level: str, out: Path, form: str) -> Path:
    import onnxruntime as ort

    from gla_export.runtime.session import create_session

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(out)
    lv = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.graph_optimization_level = lv
    # external weights beside the optimized file, not inlined past protobuf's 2 GB
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    create_session(step, [provider], so, library=form == "custom", allow_unreleased_opsets=form == "onnx")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", nargs="?")
    ap.add_argument("--shape", help="export a random-weight model of this RECOMMENDED shape first")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--form", default="custom")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="stepnodes-"))
    info: dict = {}
    if args.shape:
        import torch

        from gla_export.export import export_model
        from gla_export.models import GLAForCausalLM
        from gla_export.models.builder import recommended_config

        over = {"num_hidden_layers": args.layers} if args.layers else {}
        torch.manual_seed(0)
        t = time.perf_counter()
        model = GLAForCausalLM(recommended_config(args.shape, **over)).eval()
        info["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        export_dir = export_model(model, tmp / "export", gla_op=args.form, dtype=args.dtype, validate=False,
                                  progress=False).out_dir
        info["export_s"] = time.perf_counter() - t
        layers = model.config.num_hidden_layers
    elif args.export_dir:
        export_dir = Path(args.export_dir)
        layers = json.loads((export_dir / "metadata.json").read_text())["model"].get("num_layers")
    else:
        ap.error("give EXPORT_DIR or --shape")
    from gla_export.export.metadata import open_export

    meta = open_export(export_dir)
    layers = meta.model.num_layers
    step = meta.path("step")
    total, ops = count(step)
    info.update(export_dir=str(export_dir), form=meta.form, dtype=meta.dtype, layers=layers, provider=args.provider,
                exported={"nodes": total, "ops": ops})
    for level in ("basic", "extended", "all"):
        out = optimized(step, args.provider, level, tmp / f"step.{level}.onnx", meta.form)
        n, o = count(out)
        info[level] = {"nodes": n, "ops": o}
    print(f"{export_dir} ({meta.form}, {meta.dtype}, {layers} layers) on {args.provider}:")
    for k in ("exported", "basic", "extended", "all"):
        n = info[k]["nodes"]
        print(f"  {k:9s} {n:6d} nodes  ({n / layers:.1f} per layer)  top: "
              + ", ".join(f"{op} {c}" for op, c in list(info[k]["ops"].items())[:8]))
    if "export_s" in info:
        print(f"  model built in {info['build_s']:.1f} s, exported in {info['export_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
