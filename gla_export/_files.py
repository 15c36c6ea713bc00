"""Output directories (exports, engines): checked with :func:`check_output_dir`, written into a
:func:`staging_dir`, then put in place by :func:`swap_into_place` (or dropped by
:func:`discard_staging`).

A staging folder ``.OUT.tmp-XXXX`` beside ``OUT`` belongs to the process that holds an exclusive
``flock`` on its lock file ``.OUT.tmp-XXXX.lock``, taken before the folder exists and kept until
the folder is renamed into place or removed. When that process dies (killed, power loss), the
kernel drops the lock: the next :func:`staging_dir` for the same ``OUT`` finds the lock free and
removes the folder, or, when the process died between the two renames of :func:`swap_into_place`,
puts the previous ``OUT`` back. A concurrent run's folder is never touched: its lock is held.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ExportFailedError, OutputExistsError, UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no stale-folder cleaning either
    fcntl = None  # type: ignore[assignment]

_TAG = ".tmp-"
_LOCK = ".lock"
_OLD = ".old"
# staging folder -> (lock file, its descriptor holding the flock)
_HELD: dict[Path, tuple[Path, int]] = {}


def check_output_dir(
    final: Path,
    *,
    force: bool,
    ours: Callable[[Path], bool],
    what: str,
    inputs: Iterable[Path | None] = (),
) -> None:
    """Refuse an output directory that cannot or may not be written.

    ``final`` may be absent or an empty directory; a non-empty one only with ``force`` and only when
    ``ours(final)`` says this tool wrote it (``what`` describes such a directory for the message).
    It may never be, or hold, one of ``inputs``. Raises UsageError (a path under a regular file, an input
    in the way) or OutputExistsError.
    """
    final = Path(final)
    check_output_path(final)
    if final.exists() and not final.is_dir():
        raise OutputExistsError(f"{final} exists and is not a directory")
    here = final.resolve()
    for source in inputs:
        if source is None or not Path(source).exists():
            continue
        src = Path(source).resolve()
        if src == here or here in src.parents:
            raise UsageError(f"the output {final} is, or holds, the input {source}: choose another output directory")
    if final.is_dir() and any(final.iterdir()):
        if not force:
            raise OutputExistsError(f"{final} already exists and is not empty (use --force to replace it)")
        if not ours(final):
            raise OutputExistsError(f"{final} is not {what}: refusing to replace it even with --force")


def check_output_path(path: Path) -> None:
    """Raise UsageError when ``path`` (a file or directory to write) lies under a regular file, so
    that it could never be created; checked before any work is done."""
    path = Path(path)
    for ancestor in path.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(f"{path}: {ancestor} is a file, not a directory")
            return


def _lock_name(final: Path) -> re.Pattern[str]:
    # mkstemp's random part is [a-z0-9_]: nothing of another output's folders matches
    return re.compile(re.escape(f".{final.name}{_TAG}") + r"[a-z0-9_]+" + re.escape(_LOCK))


def _try_lock(path: Path) -> int | None:
    """A descriptor holding the exclusive lock of ``path``, or None when another process holds it
    (or the file is gone or cannot be locked)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the name must still be this file: a cleaner may have removed it before we locked it
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def clean_stale_staging(final: Path) -> list[Path]:
    """Remove the staging folders of ``final`` left by processes that are gone (see the module
    docstring); the paths removed. A previous ``final`` that a dead process had moved aside is put
    back when nothing took its place."""
    final = Path(final)
    if fcntl is None or not final.parent.is_dir():
        return []
    pattern = _lock_name(final)
    removed = []
    for name in sorted(os.listdir(final.parent)):
        if not pattern.fullmatch(name):
            continue
        lock = final.parent / name
        fd = _try_lock(lock)
        if fd is None:
            continue  # a live run's
        try:
            tmp = lock.with_name(name[: -len(_LOCK)])
            old = tmp.with_name(tmp.name + _OLD)
            if old.exists() and not os.path.lexists(final):
                os.rename(old, final)  # died between the two renames of swap_into_place
            for path in (tmp, old):
                if os.path.lexists(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            os.unlink(lock)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def staging_dir(final: Path) -> Path:
    """An empty hidden directory beside ``final`` (same file system, so the last step is a rename),
    with the permissions a plain ``mkdir`` would give: mkdtemp's 0700 would outlive the rename.
    Stale staging folders of ``final`` are removed first. Raises ExportFailedError when the folder
    cannot be made."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(final)
        umask = os.umask(0)
        os.umask(umask)
        for _ in range(100):
            fd, name = tempfile.mkstemp(prefix=f".{final.name}{_TAG}", suffix=_LOCK, dir=final.parent)
            lock = Path(name)
            tmp = lock.with_name(lock.name[: -len(_LOCK)])
            held = _hold(fd, lock)
            if held is False:
                continue  # a cleaner removed the fresh lock file before we locked it: another name
            try:
                os.mkdir(tmp)
            except OSError:
                _release(lock, fd if held else None)
                raise
            if held:
                _HELD[tmp] = (lock, fd)
            os.chmod(tmp, 0o777 & ~umask)
            return tmp
        raise OSError(errno.EAGAIN, "no staging folder name was free")
    except OSError as e:
        raise ExportFailedError(f"cannot make a folder beside {final}: {e}") from e


def _hold(fd: int, lock: Path) -> bool | None:
    """Lock the fresh lock file: True when held; False when it was removed under us (retry);
    None when this file system cannot lock (then no lock file is kept, and the folder is never
    taken for stale)."""
    if fcntl is None:
        os.close(fd)
        os.unlink(lock)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False  # a cleaner holds it and will remove it
        os.unlink(lock)
        return None
    try:
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            return True
    except FileNotFoundError:
        pass
    os.close(fd)
    return False


def _release(lock: Path, fd: int | None) -> None:
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    if fd is not None:
        os.close(fd)


def discard_staging(tmp: Path) -> None:
    """Remove a staging folder that will not be used, and its lock."""
    shutil.rmtree(tmp, ignore_errors=True)
    held = _HELD.pop(Path(tmp), None)
    if held is not None:
        _release(*held)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final`` (same file system). An existing ``final``
    is renamed aside first and removed only once the new one is in place; if the second rename
    fails, the old one is put back. The caller decides beforehand whether replacing is allowed."""
    tmp, final = Path(tmp), Path(final)
    held = _HELD.get(tmp)
    if final.exists():
        if held is not None:
            backup = tmp.with_name(tmp.name + _OLD)  # under tmp's lock: put back if we die in between
        else:
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
    if held is not None:
        del _HELD[tmp]
        _release(*held)
