"""`gla-export build`: engines, the trtexec script, and one line of error with its exit code for
each way it can fail (no TensorRT, no plugin, not an export, existing engines, precision)."""

from __future__ import annotations

import os
import shutil

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


def test_trtexec_script_runs_the_same_builds(export_dir, trt_module, plugin_lib, capsys, tmp_path):
    import subprocess

    engines = tmp_path / "engines"
    code, _, err = run(["build", str(export_dir), "-o", str(engines), "--runtime", trt_module, "--plugin", plugin_lib,
                        "--max-batch", "2", "--max-seq", "8", "--no-progress"], capsys)
    assert code == 0, err
    # a stand-in trtexec that records its arguments, one call per line
    fake = tmp_path / "trtexec"
    log = tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    fake.chmod(0o755)
    # the script expects the engines folder inside the export (its default place)
    inside = export_dir / "tensorrt"
    shutil.copytree(engines, inside)
    try:
        env = {**os.environ, "TRTEXEC": str(fake), "GLA_TRT_PLUGIN": plugin_lib}
        subprocess.run(["sh", str(inside / "build_engines.sh")], env=env, check=True, capture_output=True)
        missing = subprocess.run(["sh", str(inside / "build_engines.sh")], env={**env, "GLA_TRT_PLUGIN": "/nope.so"},
                                 capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(inside)
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for call, graph in zip(calls, ("prefill", "step")):
        assert f"--onnx={export_dir / graph}.onnx" in call and f"--dynamicPlugins={plugin_lib}" in call
        assert f"--saveEngine={inside / graph}.engine" in call and "--stronglyTyped" in call
    assert "--maxShapes=input_ids:2x8," in calls[0] and "--maxShapes=input_ids:2x1," in calls[1]
    assert missing.returncode == 1 and "GLA_TRT_PLUGIN" in missing.stderr
