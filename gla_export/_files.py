"""Atomic placement of a finished output directory (exports, engines): written into a\n:func:`staging_dir`, then :func:`swap_into_place`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def staging_dir(final: Path) -> Path:
    """An empty hidden directory beside ``final`` (same file system, so the last step is a rename),
    with the permissions a plain ``mkdir`` would give: mkdtemp's 0700 would outlive the rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final`` (same file system). An existing ``final``
    is renamed aside first and removed only once the new one is in place; if the second rename
    fails, the old one is put back. The caller decides beforehand whether replacing is allowed."""
    if final.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        backup.rmdir()
        os.rename(final, backup)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(backup, final)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, final)
