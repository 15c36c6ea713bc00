"""``gla-export verify``: the report, the skipped backends, and the exit code of each failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run

from gla_export.errors import EXIT_CODES
from gla_export.models import load_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import tiny_checkpoint, tiny_export  # noqa: E402

TINY = ["--batch", "2", "--prompt-len", "9", "--steps", "3", "-q"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_verify_passes_and_reports_every_case(form, tmp_path, capsys):
    export = tiny_export(form)
    out = tmp_path / "report.json"
    assert run(["verify", str(export), *TINY, "--json", str(out)]) == 0
    rep = _report(out)
    assert rep["passed"] is True and rep["dtype"] == "float32"
    assert (rep["atol"], rep["rtol"], rep["check_error_stat"]) == (1e-4, 1e-4, "scaled")
    rows = {(r["case"], r["backend"], r["output"]): r for r in rep["rows"]}
    for case, iters in (("prefill", 2), ("step", 3), ("decode", 4)):
        for output in ("logits", "recurrent_state", "conv_state"):
            r = rows[(case, "ort-cpu", output)]
            assert r["passed"] and r["iterations"] == iters
            assert 0 <= r["max_abs"] < 1e-4 <= r["limit"] < 1e-3
    assert max(r["max_abs"] for r in rep["rows"]) > 0  # not equal by construction: PyTorch and ORT differ a little
    status = {b["name"]: b for b in rep["backends"]}
    assert status["ort-cpu"]["available"] and status["ort-cpu"]["error"] is None
    if not torch.cuda.is_available():
        assert not status["ort-cuda"]["available"] and not status["trt"]["available"]
    text = capsys.readouterr().out
    assert "skipped" in text and "verified" in text
    # redirected output (logs, CI) keeps every number whole: rich's default 80 columns cut them to "1.02e-…"
    assert "…" not in text and " ok " in text and "max|err|" in text
    for b in rep["backends"]:
        if not b["available"]:
            assert f"skipped {b['name']}: " in text.replace("\n", " ")


def test_fp16_export_within_the_fp16_tolerance(tmp_path):
    out = tmp_path / "report.json"
    assert run(["verify", str(tiny_export("decomposed", "fp16")), *TINY, "--json", str(out)]) == 0
    rep = _report(out)
    assert rep["dtype"] == "float16" and (rep["atol"], rep["rtol"]) == (1e-2, 1e-2)
    logits = [r for r in rep["rows"] if r["output"] == "logits"]
    assert len(logits) == 3 and all(r["passed"] and 1e-2 <= r["limit"] for r in logits)
    # float16 rounding shows (so the comparison is not vacuous) but stays well inside the limit
    assert all(1e-4 < r["max_abs"] < r["limit"] / 2 for r in logits)


def test_a_different_model_fails_with_exit_4(tmp_path, capsys):
    # the same architecture with perturbed weights: every comparison must fail
    model = load_model(tiny_checkpoint())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other = save_model(model, tmp_path / "other")
    out = tmp_path / "report.json"
    code = run(["verify", str(tiny_export("decomposed")), "--model", str(other), *TINY, "--json", str(out)])
    assert code == EXIT_CODES["ValidationError"] == 4
    rep = _report(out)
    assert rep["passed"] is False
    assert any(r["case"] == "decode" and r["output"] == "logits" and not r["passed"] for r in rep["rows"])
    assert "verify failed" in capsys.readouterr().err


def test_zero_tolerance_fails(tmp_path):
    out = tmp_path / "report.json"
    code = run(
        [
            "verify",
            str(tiny_export("decomposed")),
            *TINY,
            "--atol",
            "0",
            "--rtol",
            "0",
            "--check-error-stat",
            "max",
            "--json",
            str(out),
        ]
    )
    assert code == 4
    assert not _report(out)["passed"]


def test_requested_backend_that_cannot_run_exits_5(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may have TensorRT")
    assert run(["verify", str(tiny_export("decomposed")), "-b", "trt", *TINY]) == 5
    err = capsys.readouterr().err
    assert "backend trt is not available" in err


def test_export_without_its_checkpoint(tmp_path, capsys):
    src = tiny_export("decomposed")
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    meta["source"] = None
    (dst / "metadata.json").write_text(json.dumps(meta))
    assert run(["verify", str(dst), *TINY]) == 2
    assert "pass the model (--model DIR)" in capsys.readouterr().err
    assert run(["verify", str(dst), "--model", str(tmp_path / "nowhere"), *TINY]) == 3
    assert run(["verify", str(tmp_path / "nothing-here"), *TINY]) == 2


@pytest.mark.slow
def test_saved_inputs_replay_with_the_polygraphy_cli(tmp_path):
    export = tiny_export("decomposed")
    save = tmp_path / "poly"
    assert run(["verify", str(export), *TINY, "--save-dir", str(save)]) == 0
    script = (save / "polygraphy_run.sh").read_text()
    step_cmd = next(line for line in script.splitlines() if line.startswith("polygraphy run") and "step.onnx" in line)
    assert "--onnxrt" in step_cmd and "--load-outputs" in step_cmd
    polygraphy = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    r = subprocess.run(
        step_cmd.replace("polygraphy run", f"{polygraphy} run", 1), shell=True, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "gla_export", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("gla-export, version"), proc.stdout + proc.stderr


def test_sessions_load_once(monkeypatch):
    """One ORT session per graph serves all three cases (Polygraphy's runners load on every activation)."""
    from gla_export.runtime import verify as V

    loads = []
    ort_loader = V._ort_session_loader

    def counting_loader(meta, graph, *args):
        load = ort_loader(meta, graph, *args)
        return lambda: loads.append(meta.path(graph).name) or load()

    monkeypatch.setattr(V, "_ort_session_loader", counting_loader)
    rep = V.verify(tiny_export("decomposed"), backends=["ort-cpu"], batch=2, prompt_len=9, steps=3, device="cpu")
    assert rep.passed and {r.case for r in rep.rows} == {"prefill", "step", "decode"}
    assert sorted(loads) == ["prefill.onnx", "step.onnx"]  # not once per case


def test_verify_without_polygraphy_exits_5_with_the_install_hint(monkeypatch, capsys):
    """The README's quick start installs ``.[cpu]`` only: verify then says what to install."""
    for name in [m for m in sys.modules if m == "polygraphy" or m.startswith("polygraphy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "polygraphy", None)  # `import polygraphy` raises ImportError
    assert run(["verify", str(tiny_export("decomposed")), *TINY]) == EXIT_CODES["MissingRuntimeError"] == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gla-export[verify]'" in err and "internal error" not in err


def test_step_graph_replaced_by_the_prefill_graph_is_a_model_error(tmp_path, capsys):
    """A damaged export (step.onnx overwritten by prefill.onnx): one line naming the file, exit 3,
    from verify and from generate, instead of a failed comparison or an ONNX Runtime error."""
    dst = tmp_path / "export"
    shutil.copytree(tiny_export("decomposed"), dst)
    shutil.copy(dst / "prefill.onnx", dst / "step.onnx")
    assert run(["verify", str(dst), "--model", str(tiny_checkpoint()), *TINY]) == EXIT_CODES["ModelError"] == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step.onnx is not this export's step graph" in err and "attention_mask" in err
    assert run(["generate", str(dst), "--prompt", "hi", "--max-new-tokens", "2"]) == 3
    assert "step.onnx is not this export's step graph" in capsys.readouterr().err
