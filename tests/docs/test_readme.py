"""The README's Python example runs as written (in a temporary directory)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "step.onnx").is_file()
    assert len(out.strip()) > 20 and re.search(r"[A-Za-z]{3}", out), out


def test_readme_commands_are_the_ones_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in text and "<!-- main-command -->" in text
    assert "test-command" in ci and "README.md" in ci
