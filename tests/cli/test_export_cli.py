"""``gla-export export``: outputs and the exit code of each kind of failure."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
import torch
from cli_helpers import run

from gla_export.errors import EXIT_CODES
from gla_export.models import GLAConfig, GLAForCausalLM, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    config = GLAConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_heads=2, num_kv_heads=1,
                       use_short_conv=True, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True)
    return save_model(GLAForCausalLM(config), tmp_path / "ckpt")


def test_export_writes_the_artifacts(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "--max-batch", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "prefill.onnx", "step.onnx", "validation.json", "weights.onnx.data"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["gla_op"]["form"] == "decomposed" and meta["shape_hints"]["batch"]["max"] == 2
    assert json.loads((out / "validation.json").read_text())["passed"] is True
    text = capsys.readouterr().out
    assert "exported" in text and "step" in text and " ok" in text  # the validation table, then the final line


def test_quiet_prints_only_the_final_line(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "-q"]) == 0
    assert json.loads((out / "validation.json").read_text())["passed"] is True  # validated all the same
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("exported"), captured.out
    assert captured.err.strip() == "", captured.err


def test_custom_is_the_default_form(ckpt, tmp_path):
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--runtime", "reference", "-q"]) == 0
    graph = onnx.load(out / "step.onnx", load_external_data=False).graph
    assert any(n.domain == "gla" and n.op_type == "GatedLinearAttention" for n in graph.node)


def test_usage_errors_exit_2(ckpt, tmp_path, capsys):
    assert run(["export", str(ckpt), "-o", str(tmp_path / "a"), "--gla-op", "fast"]) == 2
    assert run(["export", str(ckpt), "-o", str(tmp_path / "a"), "--gla-op", "onnx", "--opset", "21", "-q"]) == EXIT_CODES["UsageError"] == 2
    assert "--opset 21 is not valid for --gla-op onnx" in capsys.readouterr().err
    assert run(["export", str(ckpt)]) == 2  # -o is required
    assert not (tmp_path / "a").exists()


def test_model_error_exits_3(tmp_path, capsys):
    assert run(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "a"), "-q"]) == EXIT_CODES["ModelError"] == 3
    err = capsys.readouterr().err
    assert err.startswith("gla-export: error: checkpoint not found") and "Traceback" not in err


def test_validation_failure_exits_4_with_a_table_and_writes_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from gla_export.export import model_graph

    real = model_graph._log_sigmoid
    monkeypatch.setattr(model_graph, "_log_sigmoid", lambda b, x: b.op("Mul", [real(b, x), b.scalar(1.01, onnx.TensorProto.FLOAT)]))
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "-q"]) == EXIT_CODES["ValidationError"] == 4
    err = capsys.readouterr().err
    assert "FAIL" in err and "validation failed" in err
    assert not out.exists()


def test_no_validate_skips_it(ckpt, tmp_path):
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "--no-validate", "-q"]) == 0
    assert not (out / "validation.json").exists()


def test_existing_output_exits_6_and_force_replaces(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "--no-validate", "-q"]) == 0
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "--no-validate", "-q"]) == EXIT_CODES["OutputExistsError"] == 6
    assert "--force" in capsys.readouterr().err
    assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "onnx", "--no-validate", "-q", "--force"]) == 0
    assert json.loads((out / "metadata.json").read_text())["gla_op"]["form"] == "onnx"


def test_help_is_fast_and_lists_the_options():
    # a fresh interpreter: --help must not import torch or onnx
    code = "import sys; from gla_export.cli import main; main(['export', '--help'])"
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for opt in ("--gla-op", "--dtype", "--state-dtype", "--opset", "--max-batch", "--force", "--no-validate", "--atol", "--rtol"):
        assert opt in res.stdout
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert "onnx" not in imported and "gla_export.export" not in imported
    assert "torch" not in imported and "gla_export.models" not in imported


def test_missing_runtime_exits_5(ckpt, tmp_path, capsys, monkeypatch):
    """--runtime onnxruntime for a custom graph without our ORT library fails rather than fall back."""
    import gla_export._native

    monkeypatch.setattr(gla_export._native, "find_library", lambda kind: None)
    out = tmp_path / "out"
    assert run(["export", str(ckpt), "-o", str(out), "--runtime", "onnxruntime", "-q"]) == EXIT_CODES["MissingRuntimeError"] == 5
    assert "library is not built" in capsys.readouterr().err
    assert not out.exists()
