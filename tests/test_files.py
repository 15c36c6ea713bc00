"""gla_export._files: output directories are checked before anything is written, staging folders
of a run that died are cleaned by the next run (and a live run's never), and a swap cut short
puts the previous output back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gla_export import _files
from gla_export._files import check_output_dir, clean_stale_staging, discard_staging, staging_dir, swap_into_place
from gla_export.errors import OutputExistsError, UsageError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_files.fcntl is None, reason="staging locks need POSIX flock")


def _child(code: str) -> subprocess.Popen:
    """A Python process running ``code`` (with ``final`` and the _files functions in scope) that
    prints one line when ready and then waits for stdin to close or for a signal."""
    prelude = "import os, sys\nfrom pathlib import Path\nfrom gla_export._files import staging_dir, swap_into_place\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    final = tmp_path / "out"
    proc = _child(f"""
        tmp = staging_dir(Path({str(final)!r}))
        (tmp / "weights.onnx.data").write_bytes(b"x" * 2**20)
        print(tmp, flush=True)
        sys.stdin.read()
    """)
    stale = Path(proc.stdout.readline().strip())
    assert stale.is_dir() and stale.parent == tmp_path
    # while its owner lives, another run leaves it alone
    mine = staging_dir(final)
    assert stale.is_dir() and (stale / "weights.onnx.data").is_file()
    discard_staging(mine)
    assert not mine.exists() and not mine.with_name(mine.name + ".lock").exists()
    _kill(proc)  # as `kill -9` or an OOM kill would: no cleanup of its own
    assert stale.is_dir()
    mine = staging_dir(final)
    assert not stale.exists() and _hidden(tmp_path) == sorted([mine.name, mine.name + ".lock"])
    (mine / "metadata.json").write_text("{}")
    swap_into_place(mine, final)
    assert _hidden(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_the_same_outputs_folders_are_cleaned(tmp_path):
    (tmp_path / "out2").mkdir()
    proc = _child(f"""
        print(staging_dir(Path({str(tmp_path / "out2")!r})), flush=True)
        sys.stdin.read()
    """)
    other = Path(proc.stdout.readline().strip())
    _kill(proc)
    legacy = tmp_path / ".out.tmp-abc123"  # an older version's folder: no lock, owner unknown
    legacy.mkdir()
    assert clean_stale_staging(tmp_path / "out") == []
    assert other.is_dir() and legacy.is_dir()
    assert clean_stale_staging(tmp_path / "out2") == [other] and not other.exists()


def _die_mid_swap(tmp_path: Path, second_rename: bool) -> Path:
    """An output ``out`` ("old") that a child process swapped with a staged "new" one and was killed
    after the first rename of swap_into_place, or after both (before removing the old one)."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "metadata.json").write_text("old")
    proc = _child(f"""
        final = Path({str(final)!r})
        tmp = staging_dir(final)
        (tmp / "metadata.json").write_text("new")
        os.rename(final, tmp.with_name(tmp.name + ".old"))  # the first rename of swap_into_place
        if {second_rename!r}:
            os.rename(tmp, final)
        print(tmp, flush=True)
        sys.stdin.read()
    """)
    proc.stdout.readline()
    _kill(proc)
    return final


def test_a_swap_cut_short_puts_the_previous_output_back(tmp_path):
    final = _die_mid_swap(tmp_path, second_rename=False)
    assert not final.exists()
    clean_stale_staging(final)
    assert (final / "metadata.json").read_text() == "old" and _hidden(tmp_path) == []


def test_a_swap_that_finished_its_renames_keeps_the_new_output(tmp_path):
    final = _die_mid_swap(tmp_path, second_rename=True)
    assert len(_hidden(tmp_path)) == 2  # the old output and the lock
    clean_stale_staging(final)
    assert (final / "metadata.json").read_text() == "new" and _hidden(tmp_path) == []


def test_staging_keeps_plain_mkdir_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        tmp = staging_dir(tmp_path / "out")
    finally:
        os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o755
    discard_staging(tmp)
    assert _hidden(tmp_path) == []


def _never(path: Path) -> bool:
    return False


def _always(path: Path) -> bool:
    return True


def test_output_under_a_regular_file_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "sub", tmp_path / "file" / "a" / "b"):
        with pytest.raises(UsageError, match="is a file, not a directory"):
            check_output_dir(out, force=True, ours=_always, what="x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_output_dir(tmp_path / "file", force=True, ours=_always, what="x")
    assert (tmp_path / "file").read_text() == "x"


def test_force_replaces_only_what_the_tool_wrote_and_never_an_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(out, force=False, ours=_never, what="x")  # empty: free
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="use --force"):
        check_output_dir(out, force=False, ours=_always, what="x")
    with pytest.raises(OutputExistsError, match="is not an export of ours: refusing"):
        check_output_dir(out, force=True, ours=_never, what="an export of ours")
    check_output_dir(out, force=True, ours=_always, what="x")
    (out / "ckpt").mkdir()
    for given in (out, out / "ckpt", out / "ckpt" / ".." / "ckpt"):
        with pytest.raises(UsageError, match="is, or holds, the input"):
            check_output_dir(out, force=True, ours=_always, what="x", inputs=[given])
        with pytest.raises(UsageError, match="is, or holds, the input"):
            check_output_dir(tmp_path, force=True, ours=_always, what="x", inputs=[given])
    check_output_dir(out / "ckpt" / "new", force=True, ours=_always, what="x", inputs=[out / "ckpt", None])
