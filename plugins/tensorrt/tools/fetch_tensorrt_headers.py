#!/usr/bin/env python3
"""Fetch the TensorRT 10.14 C++ headers that the PyPI wheel kernel-lens==2.0.1 carries (Apache-2.0).

Used by cmake/FetchTensorRTHeaders.cmake when no TensorRT install provides the headers. Only the
standard library is used: the isolated build environment of `pip install .` may lack pip. The
wheel is located through PyPI's JSON API, checked against a pinned sha256, and only its
``kernel_lens/include/tensorrt/*.h`` members are written, flattened into ``DEST``. Nothing is
written unless every check passed, and DEST is replaced in one rename.

    fetch_tensorrt_headers.py DEST            # DEST/NvInferRuntime.h ... afterwards
    GLA_TENSORRT_HEADERS_WHEEL=/path/kernel_lens-2.0.1-py3-none-any.whl fetch_tensorrt_headers.py DEST
                                              # offline: use a wheel already on disk (still verified)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

PACKAGE = "kernel-lens"
VERSION = "2.0.1"
WHEEL = "kernel_lens-2.0.1-py3-none-any.whl"
SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
PREFIX = "kernel_lens/include/tensorrt/"
# the headers the plugin includes, directly or through NvInferRuntime.h
REQUIRED = ("NvInferRuntime.h", "NvInferRuntimeBase.h", "NvInferPluginBase.h", "NvInferRuntimePlugin.h", "NvInferVersion.h")
PYPI = os.environ.get("GLA_PYPI_URL", "https://pypi.org").rstrip("/")
VERSION_JSON_URL = f"{PYPI}/pypi/{PACKAGE}/{VERSION}/json"
PROJECT_JSON_URL = f"{PYPI}/pypi/{PACKAGE}/json"
STAMP = ".gla-tensorrt-headers"


def _get(url: str, timeout: float = 60.0, attempts: int = 3) -> bytes:
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "gla-export-build"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except OSError as e:  # URLError, timeouts, resets
            last = e
            time.sleep(1.0 + 2.0 * attempt)
    raise RuntimeError(f"cannot download {url}: {last}")


def _release_files() -> tuple[str, list[dict]]:
    """(URL of the JSON document, its file entries for VERSION)."""
    try:
        return VERSION_JSON_URL, json.loads(_get(VERSION_JSON_URL, attempts=1)).get("urls", [])
    except RuntimeError:
        # mirrors of PyPI may serve only the project document; its "releases" has every version
        meta = json.loads(_get(PROJECT_JSON_URL))
        return PROJECT_JSON_URL, meta.get("releases", {}).get(VERSION, [])


def _wheel_url() -> str:
    base, files = _release_files()
    for entry in files:
        if entry.get("filename") == WHEEL:
            published = entry.get("digests", {}).get("sha256")
            if published != SHA256:
                raise RuntimeError(f"PyPI lists {WHEEL} with sha256 {published}, expected the pinned {SHA256}")
            return urllib.parse.urljoin(base, entry["url"])
    raise RuntimeError(f"PyPI has no file {WHEEL} for {PACKAGE} {VERSION}")


def wheel_bytes() -> bytes:
    local = os.environ.get("GLA_TENSORRT_HEADERS_WHEEL")
    data = Path(local).read_bytes() if local else _get(_wheel_url(), timeout=120.0)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{local or WHEEL}: sha256 {digest} does not match the pinned {SHA256}")
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
                raise RuntimeError(f"{WHEEL} lacks {', '.join(missing)}")
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
