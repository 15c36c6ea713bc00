"""`gla-export build`: engines, the trtexec script, and one line of error with its exit code for
each way it can fail (no TensorRT, no plugin, not an export, existing engines, precision)."""

from __future__ import annotations

import pytest
import torch

from gla_export.cli import main
from gla_export.errors import MissingRuntimeError, OutputExistsError, UsageError
from gla_export.export import export_model
from gla_export.models import GLAForCausalLM, recommended_config


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cli") / "export"
    export_model(GLAForCausalLM(recommended_config("tiny")), out, dtype="fp16", max_batch=2, max_seq_len=16,
                 validate=False, progress=False)
    return out


def run(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_build_writes_engines_and_script(export_dir, trt_module, plugin_lib, capsys, tmp_path):
    engines = tmp_path / "engines"
    code, out, err = run(["build", str(export_dir), "-o", str(engines), "--runtime", trt_module, "--plugin", plugin_lib,
                          "--max-seq", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert {p.name for p in engines.iterdir()} == {"prefill.engine", "step.engine", "engines.json", "build_engines.sh"}
    assert "build_engines.sh" in out
    assert engines.joinpath("build_engines.sh").stat().st_mode & 0o111
    # a second build does not clobber the first without --force
    code, _, err = run(["build", str(export_dir), "-o", str(engines), "--runtime", trt_module, "--plugin", plugin_lib],
                       capsys)
    assert code == OutputExistsError.exit_code and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["build", str(export_dir), "-o", str(engines), "--runtime", trt_module, "--plugin", plugin_lib,
                        "--max-seq", "8", "--force", "--no-progress"], capsys)
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_without_tensorrt_one_line_says_what_to_install(export_dir, monkeypatch, capsys):
    import gla_export.runtime.tensorrt as rt

    monkeypatch.setattr(rt, "available_module", lambda prefer=None: None)
    code, _, err = run(["build", str(export_dir)], capsys)
    assert code == MissingRuntimeError.exit_code == 5
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorrt" in lines[0] and "tensorrt-rtx-cu13" in lines[0]


def test_missing_plugin_library(export_dir, trt_module, capsys, tmp_path):
    code, _, err = run(["build", str(export_dir), "--runtime", trt_module, "--plugin", str(tmp_path / "nope.so"),
                        "-o", str(tmp_path / "e")], capsys)
    assert code == 5 and "nope.so does not exist" in err


def test_not_an_export_directory(tmp_path, capsys):
    code, _, err = run(["build", str(tmp_path)], capsys)
    assert code == UsageError.exit_code and "gla-export export" in err


def test_precision_lower_than_the_export(export_dir, trt_module, plugin_lib, capsys, tmp_path):
    # the export is fp16: an fp32 engine of it cannot be had by flags
    code, _, err = run(["build", str(export_dir), "--precision", "fp32", "--runtime", trt_module, "--plugin", plugin_lib,
                        "-o", str(tmp_path / "e")], capsys)
    assert code == UsageError.exit_code and "re-export" in err


def test_bad_profile(export_dir, capsys, tmp_path):
    code, _, err = run(["build", str(export_dir), "--max-batch", "0", "-o", str(tmp_path / "e")], capsys)
    assert code == 2 and "positive" in err
    code, _, err = run(["build", str(export_dir), "--max-seq", "4", "--opt-seq", "8", "-o", str(tmp_path / "e")], capsys)
    assert code == 2 and "min <= opt <= max" in err
