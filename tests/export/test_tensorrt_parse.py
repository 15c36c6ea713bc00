"""``decomposed`` exports need no plugin anywhere: TensorRT's ONNX parser takes both graphs and
its builder makes plans (TensorRT-RTX builds without a GPU; DESIGN.md §6). Runs in a child
process: TensorRT's parser may abort its process on an unexpected node."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from export_helpers import make_model

from gla_export.export import export_model

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.ERROR)
    out = {}
    for path in sys.argv[1:]:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(path)
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        plan = None
        if ok:
            config = builder.create_builder_config()
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                t = network.get_input(i)
                shape = list(t.shape)
                lo = [1 if d == -1 else d for d in shape]
                opt, hi = list(lo), list(lo)
                if shape[0] == -1:
                    opt[0], hi[0] = 1, 4
                if len(shape) > 1 and shape[1] == -1:
                    opt[1], hi[1] = 16, 130
                profile.set_shape(t.name, lo, opt, hi)
            config.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, config)
            plan = None if serialized is None else serialized.nbytes
        out[path] = dict(parsed=bool(ok), errors=errors, plan=plan,
                         inputs=[network.get_input(i).name for i in range(network.num_inputs)])
    print(json.dumps(out))
    """
)


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_decomposed_graphs_build_in_tensorrt(tmp_path, dtype):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install '.[test]')")
    res = export_model(make_model("gqa-conv"), tmp_path / "out", gla_op="decomposed", dtype=dtype, validate=False, progress=False)
    paths = [str(res.prefill_path), str(res.step_path)]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *paths], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, kind in zip(paths, ("prefill", "step")):
        r = out[path]
        assert r["parsed"], r["errors"]
        assert r["plan"], f"{kind}: TensorRT built no plan"
        assert r["inputs"] == [i["name"] for i in res.metadata["graphs"][kind]["inputs"]]
