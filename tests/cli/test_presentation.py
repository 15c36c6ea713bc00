"""Library modules return data; only gla_export/cli draws (rich tables, progress displays)."""

from __future__ import annotations

import ast
from pathlib import Path

import gla_export

PACKAGE = Path(gla_export.__file__).parent


def test_only_the_cli_imports_rich():
    drawing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "rich" or n.startswith("rich.") for n in names):
                drawing.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert drawing == [], f"these library modules draw: {drawing}"


def test_export_reports_progress_as_events(tmp_path):
    from gla_export.export.api import ProgressEvent, export_model
    from gla_export.models import GLAConfig, GLAForCausalLM

    model = GLAForCausalLM(GLAConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_heads=1)).eval()
    events: list[ProgressEvent] = []
    export_model(model, tmp_path / "out", gla_op="decomposed", validate=False, progress=events.append)
    steps = [e.step for e in events if e.done]
    assert steps[:3] == ["load model", "build graphs", "write"], steps
    write = [e for e in events if e.step == "write"]
    assert write[-1].done and write[-1].completed == write[-1].total > 0  # bytes written, advancing to the total
    assert all(isinstance(e, ProgressEvent) for e in events)


def test_the_cli_offers_the_runtimes_the_library_runs():
    """gla_export.cli keeps its own copy of the runtime names (importing the runtime would slow
    --help); it must stay the library's."""
    from gla_export.cli import RUNTIMES as cli_runtimes
    from gla_export.runtime import RUNTIMES

    assert cli_runtimes == RUNTIMES
