"""Helpers shared by the CLI tests in this folder (imported as a sibling module: pytest puts the
test file's folder on sys.path, since tests/cli is not a package)."""

from __future__ import annotations

from gla_export.cli import main


def run(args: list[str]) -> int:
    """``gla-export ARGS`` in this process; its exit code (0 when main returns)."""
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
