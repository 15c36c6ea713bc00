#!/usr/bin/env python3
"""Fetch the TensorRT 10.14 C++ headers that the PyPI wheel kernel-lens==2.0.1 carries (Apache-2.0).

Used by cmake/FetchTensorRTHeaders.cmake when no TensorRT install provides the headers. The wheel
comes through ``pip download`` and nothing else, so pip's own configuration decides where from:
its index (``PIP_INDEX_URL``, pip.conf), mirrors, find-links, proxies and certificates. No host
name is written here. pip checks the pinned sha256 (``--require-hashes``) and so does this script;
only the wheel's ``kernel_lens/include/tensorrt/*.h`` members are written, flattened into DEST.
Nothing is written unless every check passed, and DEST is replaced in one rename. Only the
standard library is imported: the isolated build environment of ``pip install .`` may lack pip,
so pip is run as ``python -m pip`` when importable, else the ``pip3``/``pip`` on PATH.

    fetch_tensorrt_headers.py DEST            # DEST/NvInferRuntime.h ... afterwards
    GLA_TENSORRT_HEADERS_WHEEL=/path/kernel_lens-2.0.1-py3-none-any.whl fetch_tensorrt_headers.py DEST
                                              # a wheel already on disk (still verified)

On failure, one line on stderr says why and to set TENSORRT_INCLUDE_DIR instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "kernel-lens"
VERSION = "2.0.1"
WHEEL = "kernel_lens-2.0.1-py3-none-any.whl"
SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
PREFIX = "kernel_lens/include/tensorrt/"
# the headers the plugin includes, directly or through NvInferRuntime.h
REQUIRED = ("NvInferRuntime.h", "NvInferRuntimeBase.h", "NvInferPluginBase.h", "NvInferRuntimePlugin.h", "NvInferVersion.h")
STAMP = ".gla-tensorrt-headers"
INSTEAD = "set TENSORRT_INCLUDE_DIR to a folder with the TensorRT 10 headers (NvInferRuntime.h) instead"
# variables of pip's isolated build environment that point another interpreter at its packages
_BUILD_ENV_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")


class FetchError(RuntimeError):
    pass


def _imports_pip(python: str, env: dict[str, str]) -> bool:
    try:
        return subprocess.run([python, "-c", "import pip"], env=env, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pip_command() -> tuple[list[str], dict[str, str]] | None:
    """How to run pip, with pip's own configuration untouched (every PIP_* variable and config file
    still applies): this interpreter's pip; else, inside pip's isolated build environment, the pip
    of this interpreter's own installation (the environment's paths taken out); else the pip on PATH."""
    env = dict(os.environ)
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"], env
    for var in _BUILD_ENV_VARS:
        env.pop(var, None)
    if _imports_pip(sys.executable, env):
        return [sys.executable, "-m", "pip"], env
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found], env
    return None


def pip_download_args(pip: list[str], requirements: Path, dest: Path) -> list[str]:
    """``pip download`` of the pinned wheel alone: binary only, no dependencies, hash-checked."""
    return [*pip, "download", "--no-deps", "--only-binary=:all:", "--require-hashes", "--no-input",
            "--disable-pip-version-check", "--quiet", "--requirement", str(requirements), "--dest", str(dest)]


def requirement_line() -> str:
    return f"{PACKAGE}=={VERSION} --hash=sha256:{SHA256}\n"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def download_wheel(work: Path) -> Path:
    found = pip_command()
    if found is None:
        raise FetchError(f"no pip to download {PACKAGE}=={VERSION} with: {INSTEAD}")
    pip, env = found
    req = work / "requirements.txt"
    req.write_text(requirement_line())
    out = work / "wheel"
    out.mkdir()
    try:
        run = subprocess.run(pip_download_args(pip, req, out), env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed ({e}): {INSTEAD}") from e
    if run.returncode != 0:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed ({_last_line(run.stderr or run.stdout)}): {INSTEAD}")
    wheel = out / WHEEL
    if not wheel.is_file():
        raise FetchError(f"pip download {PACKAGE}=={VERSION} left no {WHEEL}: {INSTEAD}")
    return wheel


def wheel_bytes() -> bytes:
    local = os.environ.get("GLA_TENSORRT_HEADERS_WHEEL")
    if local:
        data = Path(local).read_bytes()
    else:
        with tempfile.TemporaryDirectory(prefix="gla-tensorrt-wheel-") as work:
            data = download_wheel(Path(work)).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise FetchError(f"{local or WHEEL}: sha256 {digest} does not match the pinned {SHA256}")
    return data


def extract(data: bytes, dest: Path) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(PREFIX) and m.filename.endswith(".h")]
        names = []
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            for m in members:
                name = m.filename[len(PREFIX):]
                if "/" in name or name.startswith("."):  # flat header folder only
                    continue
                (tmp / name).write_bytes(zf.read(m))
                names.append(name)
            missing = [h for h in REQUIRED if h not in names]
            if missing:
                raise FetchError(f"{WHEEL} lacks {', '.join(missing)}")
            (tmp / STAMP).write_text(SHA256 + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return sorted(names)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[1]).resolve()
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == SHA256 and all((dest / h).is_file() for h in REQUIRED):
        print(f"TensorRT headers already in {dest}")
        return 0
    try:
        names = extract(wheel_bytes(), dest)
    except Exception as e:  # noqa: BLE001 - one line for CMake to show
        print(f"fetch_tensorrt_headers: {e}", file=sys.stderr)
        return 1
    print(f"TensorRT headers ({len(names)} files from {WHEEL}, sha256 verified) in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
