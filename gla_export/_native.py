"""Where the native libraries built with the package live.

``library_path("ort")`` is the ONNX Runtime custom-op library, ``library_path("trt")`` the
TensorRT plugin, ``library_path("kernels")`` a thin C entry to the kernel core (tests and
benchmarks call it through ctypes). They are installed into ``gla_export/lib`` by the package
build; ``GLA_EXPORT_LIB_DIR`` overrides the search, and a CMake build tree under ``build/``
is looked at last (for developers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARIES = {
    "ort": "libgla_onnxruntime",
    "trt": "libgla_tensorrt",
    "kernels": "libgla_kernels_capi",
}


class NativeLibraryError(RuntimeError):
    """A native library was asked for but is not built or not found."""


def _suffix() -> str:
    return {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")


def _search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("GLA_EXPORT_LIB_DIR")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    pkg = Path(__file__).resolve().parent
    dirs.append(pkg / "lib")
    try:  # an installed wheel or an editable install records where its files went
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            for f in distribution("gla-export").files or []:
                if f.parent.name == "lib" and f.parent.parent.name == "gla_export":
                    dirs.append(Path(f.locate()).parent)
                    break
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    root = pkg.parent
    dirs += sorted(root.glob("build/*/lib")) + sorted(root.glob("build/lib")) + [root / "build"]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_library(kind: str) -> Path | None:
    """Path of a native library, or None when it is not built."""
    if kind not in LIBRARIES:
        raise ValueError(f"kind must be one of {', '.join(LIBRARIES)}, got {kind!r}")
    name = LIBRARIES[kind] + _suffix()
    for d in _search_dirs():
        if (d / name).is_file():
            return d / name
    return None


def library_path(kind: str) -> str:
    """Path of a native library; raises :class:`NativeLibraryError` when it is not built."""
    path = find_library(kind)
    if path is None:
        raise NativeLibraryError(
            f"the {kind} library ({LIBRARIES[kind]}{_suffix()}) is not built: reinstall gla-export with a C++ "
            "compiler and CMake available (pip install .), or set GLA_EXPORT_LIB_DIR to where it is"
        )
    return str(path)
