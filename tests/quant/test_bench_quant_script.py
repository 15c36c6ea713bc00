"""benchmarks/bench_quant_gpu.py's logic on the CPU (``--dry-run``: a tiny shape on ORT CPU): the
exports in worker processes, the floor from the files, the table, the targets, the JSON, and the
time budget's skipping. The real run (1.3B shape, ORT CUDA) is `benchmarks/gpu_run.sh quant`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_quant_gpu.py"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT, check=False)


@pytest.mark.slow
def test_dry_run_measures_every_variant(tmp_path):
    out = tmp_path / "r.json"
    r = _run("--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["dry_run"] and rep["backend"] == "ort-cpu" and rep["batches"] == [1, 4]
    rows = rep["rows"]
    assert list(rows) == ["fp32", "int4", "int8"]
    bw = rep["copy_bandwidth"]["bytes_per_s"]
    for row in rows.values():
        assert "error" not in row and "skipped" not in row, row
        assert row["ir_version"] <= 10
        assert row["weights_resident_bytes"] <= row["weights_file_bytes"] + 64 * 1024
        for b in ("1", "4"):
            assert row["decode_tok_s"][b] > 0
            # the floor of a step is its bytes over the copy bandwidth, and the ratio is step time over it
            assert row["floor_ms"][b] == pytest.approx(1e3 * row["step_bytes"][b] / bw)
            assert row["ratio_to_floor"][b] == pytest.approx((int(b) / row["decode_tok_s"][b]) / (row["floor_ms"][b] / 1e3))
        assert row["prefill_tok_s"] > 0 and row["export_s"] > 0
    # the quantized files are smaller as counted, int4 below int8
    assert rows["int4"]["weights_resident_bytes"] < rows["int8"]["weights_resident_bytes"] < rows["fp32"]["weights_resident_bytes"]
    assert set(rep["targets"]) == {"int4", "int8"} and all(t["ratio"] > 0 for t in rep["targets"].values())
    assert "| int4 |" in r.stdout and "target: int4 decode B1" in r.stdout


@pytest.mark.slow
def test_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "r.json"
    r = _run("--budget", "1", "--only", "fp", "int4", "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["fp32", "int4"]
    assert all("budget" in row["skipped"] for row in rows.values()), rows
    assert "not measured" in r.stdout
