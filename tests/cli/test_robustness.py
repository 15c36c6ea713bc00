"""What a new user's bad inputs do to the CLI: one line, the right exit code, and nothing of
theirs lost (--force replaces only what gla-export wrote, never the input)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run

from gla_export.errors import EXIT_CODES
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]


def _config(**kw) -> GLAConfig:
    args = dict(vocab_size=258, hidden_size=32, num_hidden_layers=1, num_heads=2, num_kv_heads=1, use_short_conv=True,
                bos_token_id=256, eos_token_id=257, tie_word_embeddings=True)
    return GLAConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(GLAForCausalLM(_config()), tmp_path_factory.mktemp("robust") / "ckpt")


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    return export_model(ckpt, tmp_path_factory.mktemp("robust") / "export", gla_op="decomposed", validate=False,
                        progress=False).out_dir


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("gla-export: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- data loss: build --force ---------------------------------------------------------------------


def test_build_force_never_replaces_the_export_or_what_holds_it(export_dir, capsys):
    before = _tree(export_dir)
    for out in (export_dir, export_dir.parent):
        assert run(["build", str(export_dir), "-o", str(out), "--force", "--no-progress"]) == EXIT_CODES["UsageError"]
        assert "holds, the input" in _one_line_error(capsys)
    assert _tree(export_dir) == before


def test_build_force_never_replaces_a_folder_it_did_not_write(export_dir, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    other_export = export_model(GLAForCausalLM(_config()), tmp_path / "other", gla_op="decomposed", validate=False,
                                progress=False).out_dir
    for out in (mine, other_export):
        before = _tree(out)
        assert run(["build", str(export_dir), "-o", str(out), "--force", "--no-progress"]) == EXIT_CODES["OutputExistsError"]
        assert "refusing to replace it even with --force" in _one_line_error(capsys)
        assert _tree(out) == before


def test_build_force_may_replace_engines_it_wrote(export_dir, tmp_path):
    from gla_export.runtime.tensorrt import INFO_FILE, _check_engines_dir

    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / INFO_FILE).write_text(json.dumps({"producer": {"name": "gla-export", "version": "0"}}))
    _check_engines_dir(engines, True, export_dir)  # no error: ours


def test_build_output_under_a_regular_file_is_a_usage_error(export_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(["build", str(export_dir), "-o", str(tmp_path / "file" / "sub"), "--no-progress"]) == EXIT_CODES["UsageError"]
    assert "is a file, not a directory" in _one_line_error(capsys)


# ---- data loss: export --force --------------------------------------------------------------------


def test_export_force_never_replaces_an_export_holding_the_checkpoint(ckpt, tmp_path, capsys):
    out = export_model(ckpt, tmp_path / "out", gla_op="decomposed", validate=False, progress=False).out_dir
    inner = save_model(GLAForCausalLM(_config()), out / "ckpt")  # a checkpoint kept inside an export
    before = _tree(out)
    for model in (inner, out):
        assert run(["export", str(model), "-o", str(out), "--force", "--gla-op", "decomposed", "--no-validate", "-q"]) == 2
        assert "holds, the input" in _one_line_error(capsys)
    assert _tree(out) == before


def test_export_output_under_a_regular_file_is_a_usage_error(ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(["export", str(ckpt), "-o", str(tmp_path / "file" / "sub"), "--no-validate", "-q"]) == EXIT_CODES["UsageError"]
    assert "is a file, not a directory" in _one_line_error(capsys)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.slow
def test_a_killed_export_force_leaves_nothing_a_later_run_keeps(ckpt, tmp_path):
    out = tmp_path / "out"
    export_model(ckpt, out, gla_op="decomposed", validate=False, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # killed while validating, after the staging folder was written in full
    code = (f"import os, signal\nimport gla_export.export.api as api\n"
            f"api.run_cases = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"from gla_export.cli import main\n"
            f"main(['export', {str(ckpt)!r}, '-o', {str(out)!r}, '--force', '--gla-op', 'decomposed', '-q'])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-") and p.is_dir()]
    assert len(stale) == 1 and (stale[0] / "weights.onnx.data").is_file()
    assert run(["export", str(ckpt), "-o", str(out), "--force", "--gla-op", "decomposed", "--no-validate", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_leaves_no_hidden_entries(ckpt, tmp_path):
    out = tmp_path / "out"
    for force in (False, True):
        assert run(["export", str(ckpt), "-o", str(out), "--gla-op", "decomposed", "--no-validate", "-q",
                    *(["--force"] if force else [])]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- tolerances ----------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [["--atol", "nan"], ["--rtol", "nan"], ["--atol", "-1e-3"], ["--rtol", "-1"], ["--atol", "inf"]],
                         ids=lambda o: "".join(o))
def test_bad_tolerance_is_a_usage_error(opt, ckpt, export_dir, tmp_path, capsys):
    assert run(["export", str(ckpt), "-o", str(tmp_path / "o"), "-q", *opt]) == EXIT_CODES["UsageError"]
    assert "must be >= 0 and finite" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    assert run(["verify", str(export_dir), "--backend", "ort-cpu", *opt]) == EXIT_CODES["UsageError"]
    assert "must be >= 0 and finite" in capsys.readouterr().err


# ---- token ids outside the vocabulary -----------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("bos_token_id", 258), ("eos_token_id", -1), ("pad_token_id", 10**6), ("eos_token_id", [257, 300])])
def test_token_id_outside_the_vocabulary_is_a_model_error(field, value, ckpt, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for p in ckpt.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config[field] = value
    (bad / "config.json").write_text(json.dumps(config))
    assert run(["export", str(bad), "-o", str(tmp_path / "o"), "--no-validate", "-q"]) == EXIT_CODES["ModelError"]
    err = _one_line_error(capsys)
    assert f"'{field}'" in err and "vocabulary" in err
    assert not (tmp_path / "o").exists()


# ---- generate --interactive with bytes that are not UTF-8 -------------------------------------------


def test_interactive_stdin_with_invalid_utf8_is_replaced_not_a_crash(export_dir, monkeypatch, capsysbinary):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"In the \xff\xfe beginning\nand \xc3\n"), encoding="utf-8"))
    try:
        from gla_export.cli import main

        main(["generate", str(export_dir), "--threads", "1", "-i", "-n", "3", "--ignore-eos"])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsysbinary.readouterr()
    err = out.err.decode()
    assert code == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert err.count("replaced by U+FFFD") == 2 and err.count("stopped: length") == 2


def test_prompt_with_bytes_that_are_not_utf8_is_replaced_not_a_crash(export_dir, capsysbinary):
    from gla_export.cli import main

    try:  # what Python makes of the command-line bytes b"\xff\xfeIn the": lone surrogates
        main(["generate", str(export_dir), "--threads", "1", "-p", "\udcff\udcfeIn the", "-n", "2", "--ignore-eos"])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    err = capsysbinary.readouterr().err.decode()
    assert code == 0, err
    assert "replaced by U+FFFD" in err and "stopped: length" in err


# ---- other outputs under a regular file: checked before any work -----------------------------------


@pytest.mark.parametrize("args", [
    ["generate", "{export}", "-p", "hi", "-n", "1", "--save-state", "{file}/chat.state"],
    ["verify", "{export}", "--backend", "ort-cpu", "--save-dir", "{file}/sub"],
    ["bench", "{export}", "-o", "{file}/sub"],
], ids=lambda a: a[0])
def test_other_outputs_under_a_regular_file_are_usage_errors(args, export_dir, tmp_path, capsys, monkeypatch):
    import gla_export.runtime.bench as bench
    import gla_export.runtime.verify as verify

    def never(*a, **k):
        raise AssertionError("ran before checking its output path")

    monkeypatch.setattr(bench, "bench", never)
    monkeypatch.setattr(verify, "verify", never)
    (tmp_path / "file").write_text("x")
    argv = [a.format(export=export_dir, file=tmp_path / "file") for a in args]
    assert run(argv) == EXIT_CODES["UsageError"]
    assert "is a file, not a directory" in _one_line_error(capsys)


def test_token_id_changed_after_the_model_was_built_is_a_model_error(tmp_path):
    from gla_export.errors import ModelError

    model = GLAForCausalLM(_config())
    model.config.bos_token_id = 258
    with pytest.raises(ModelError, match="'bos_token_id' = 258: must be a token id in the vocabulary"):
        export_model(model, tmp_path / "o", gla_op="decomposed", validate=False, progress=False)
    assert not (tmp_path / "o").exists()
