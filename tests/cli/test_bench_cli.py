"""``gla-export bench``: one run on the CPU with tiny settings, its JSON, its plot, its errors."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run

from gla_export.runtime import bench as bench_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import tiny_export  # noqa: E402

TINY = [
    "--batch",
    "1,2",
    "--prefill-len",
    "12",
    "--decode-tokens",
    "6",
    "--contexts",
    "8,200",
    "--warmup",
    "1",
    "--repeats",
    "1",
    "--threads",
    "1",
    "-q",
]
CPU = [*TINY, "--device", "cpu"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_runs_every_cpu_contender(tmp_path, capsys):
    export = tiny_export("decomposed")
    assert run(["bench", str(export), *CPU, "-o", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["device"]["kind"] == "cpu" and rep["model"]["dtype"] == "float32"
    results = {r["name"]: r for r in rep["results"]}
    assert set(results) == {bench_mod.OURS_ORT_CPU, bench_mod.EAGER, bench_mod.RECOMPUTE, bench_mod.OURS_CPP}
    for name in (bench_mod.OURS_ORT_CPU, bench_mod.EAGER):
        r = results[name]
        assert r["notes"] == [], r["notes"]
        for b in ("1", "2"):
            p, d = r["prefill"][b], r["decode"][b]
            assert _positive(p["tokens_per_s"]) and _positive(d["ms_per_token"])
            assert p["tokens_per_s"] == pytest.approx(int(b) * 12 / (p["ms"] / 1e3))
            assert d["tokens_per_s"] == pytest.approx(int(b) * 1e3 / d["ms_per_token"])
    for name in (bench_mod.OURS_ORT_CPU, bench_mod.EAGER, bench_mod.RECOMPUTE):
        ctx = results[name]["context"]
        assert set(ctx) == {"8", "200"}
        assert all(_positive(c["ms_per_token"]) and c["bytes"] >= 0 for c in ctx.values())
    # the stateful contenders keep at least their state between tokens
    state_bytes = sum(
        int(np.prod([d for d in st["shape"] if d != "batch"])) * np.dtype(st["dtype"]).itemsize
        for st in json.loads((export / "metadata.json").read_text())["states"]
    )
    assert all(results[bench_mod.OURS_ORT_CPU]["context"][L]["bytes"] >= state_bytes for L in ("8", "200"))
    assert results[bench_mod.RECOMPUTE]["prefill"] == {} and results[bench_mod.RECOMPUTE]["decode"] == {}
    # the floor beside every decode figure, from the copy bandwidth measured in this run
    bw = rep["copy_bandwidth"]
    assert _positive(bw["bytes_per_s"]) and set(bw["ways"]) == {"numpy-copyto", "torch-copy"}
    assert bw["bytes_per_s"] == max(bw["ways"].values())
    floor = rep["floor"]
    for r in results.values():
        for b, d in r["decode"].items():
            want = 1e3 * (floor["weight_bytes"][b] + 2 * int(b) * floor["state_bytes_per_row"]) / bw["bytes_per_s"]
            assert d["floor_ms_per_token"] == pytest.approx(want)
            assert d["ratio_to_floor"] == pytest.approx(d["ms_per_token"] / want)
    assert floor["state_bytes_per_row"] == state_bytes
    cpp = results[bench_mod.OURS_CPP]
    assert set(cpp["decode"]) == {"1"} and _positive(cpp["decode"]["1"]["tokens_per_s"])
    # skipped, with reasons
    for name in (bench_mod.OURS_ORT_CUDA, bench_mod.OURS_TRT, bench_mod.FLA):
        assert rep["skipped"][name]
    assert rep["target"]["met"] is None and "CUDA" in rep["target"]["why"]
    assert rep["target"]["ours"] in (bench_mod.OURS_ORT_CPU, bench_mod.OURS_CPP)
    # the plot is a real PNG of the size asked for
    from PIL import Image

    with Image.open(tmp_path / "bench.png") as im:
        assert im.format == "PNG" and im.size == (1430, 990)
    out = capsys.readouterr().out
    assert "throughput and latency" in out and "next token at context L" in out and "skipped" in out
    assert "floor (copy" in out and "÷ floor B1" in out


def test_only_some_contenders(tmp_path):
    assert run(["bench", str(tiny_export("decomposed")), *CPU, "--only", "ort-cpu", "-o", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in rep["results"]] == [bench_mod.OURS_ORT_CPU]
    assert rep["skipped"][bench_mod.EAGER] == "not requested"


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--batch", "0"], "expected positive integers"),
        (["--contexts", "8,x"], "expected comma-separated integers"),
        (["--prefill-len", "0"], "0 is not in the range"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, msg):
    assert run(["bench", str(tiny_export("decomposed")), *args, "-o", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def test_not_an_export(tmp_path, capsys):
    assert run(["bench", str(tmp_path), "-o", str(tmp_path)]) == 2
    assert "not an export directory" in capsys.readouterr().err


def test_step_weight_bytes_counts_the_embedding_rows_a_step_gathers(tmp_path):
    """All initializers once, the embedding table (read by a Gather only) for the rows gathered."""
    import onnx
    from onnx import TensorProto, helper

    from gla_export.runtime.floor import floor_ms, step_weight_bytes

    emb = helper.make_tensor("emb", TensorProto.FLOAT, [100, 8], np.zeros(800, np.float32))
    w = helper.make_tensor("w", TensorProto.FLOAT16, [8, 100], np.zeros(800, np.float16))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("Cast", ["x"], ["h"], to=10),
         helper.make_node("MatMul", ["h", "w"], ["logits"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, None)], [emb, w])
    onnx.save(helper.make_model(graph), tmp_path / "step.onnx")
    assert step_weight_bytes(tmp_path / "step.onnx", 1) == 1 * 8 * 4 + 800 * 2
    assert step_weight_bytes(tmp_path / "step.onnx", 3) == 3 * 8 * 4 + 800 * 2
    assert floor_ms(1000, 100, 4, 1e6) == pytest.approx(1e3 * 1800 / 1e6)


def test_cpu_memory_probe_sees_an_allocation():
    probe = bench_mod._Memory(torch.device("cpu"), torch_allocations=False)

    def allocate():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.01)
        return float(t[-1])

    extra, seconds, out = probe.measure(allocate)
    assert out == 1.0 and seconds > 0
    assert 48 * 2**20 < extra < 128 * 2**20


def test_fla_model_takes_our_weights():
    # fla only runs on a GPU (Triton), but its model is built and loaded with our weights anywhere:
    # a naming mismatch would otherwise surface only on the GPU machine
    from runtime_helpers import tiny_checkpoint

    from gla_export.models import load_model

    ours = load_model(tiny_checkpoint())
    fla = bench_mod.FlaContender(ours, torch.device("cpu"))
    theirs = fla.model.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs[name], value), name


@pytest.mark.gpu
def test_bench_on_the_gpu(tmp_path):
    # ours through ORT CUDA beside PyTorch eager and fla on the same GPU (TensorRT is skipped where it
    # cannot run); the custom form exercises our CUDA kernels
    export = tiny_export("custom")
    assert run(["bench", str(export), *TINY, "--device", "cuda", "-o", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    results = {r["name"]: r for r in rep["results"]}
    assert rep["device"]["kind"] == "cuda"
    for name in (bench_mod.OURS_ORT_CUDA, bench_mod.OURS_ORT_CUDA_NOGRAPH, bench_mod.EAGER, bench_mod.FLA):
        assert name in results, rep["skipped"]
        assert results[name]["notes"] == [], results[name]["notes"]
        assert all(_positive(results[name]["decode"][b]["tokens_per_s"]) for b in ("1", "2"))
        assert all(_positive(results[name]["decode"][b]["ratio_to_floor"]) for b in ("1", "2"))
    assert "CUDA graph" in results[bench_mod.OURS_ORT_CUDA]["detail"]
    assert "CUDA graph" not in results[bench_mod.OURS_ORT_CUDA_NOGRAPH]["detail"]
    assert set(rep["copy_bandwidth"]["ways"]) == {"memcpy", "kernel"}
    assert rep["target"]["ratio"] is not None and rep["target"]["met"] in (True, False)
