"""Where the native libraries built with the package live.

``library_path("ort")`` is the ONNX Runtime custom-op library, ``library_path("trt")`` the
TensorRT plugin, ``library_path("kernels")`` a thin C entry to the kernel core (tests and
benchmarks call it through ctypes).

Search order, first match wins:

1. ``GLA_EXPORT_LIB_DIR`` (directories separated by ``os.pathsep``);
2. the installed locations: ``gla_export/lib`` beside this file, then where the installed
   ``gla-export`` distribution put its ``gla_export/lib`` (a wheel or an editable install);
3. a developer's CMake build trees under the source checkout's ``build/``: ``build/*/lib``,
   ``build/*/plugins/{kernels,onnxruntime,tensorrt}``, ``build/*/runtimes``, ``build/lib`` and
   ``build``. Several trees may hold the same library (one per configuration): the most
   recently built one is taken, which is the one a developer has just rebuilt.
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

# where the package lives; its parent is the source checkout when running from one (tests point it elsewhere)
_PACKAGE_DIR = Path(__file__).resolve().parent

# output folders of the CMake targets inside one build tree (CMakeLists.txt, plugins/*, runtimes)
BUILD_TREE_SUBDIRS = ("lib", "plugins/kernels", "plugins/onnxruntime", "plugins/tensorrt", "runtimes")


class NativeLibraryError(RuntimeError):
    """A native library was asked for but is not built or not found."""


def _suffix() -> str:
    return {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")


def _env_dirs() -> list[Path]:
    env = os.environ.get("GLA_EXPORT_LIB_DIR")
    return [Path(p) for p in env.split(os.pathsep) if p] if env else []


def _distribution_lib_dir() -> Path | None:
    """``gla_export/lib`` of the installed distribution, which need not be the package imported
    (tests run the checkout's package while the wheel is installed in site-packages)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover
        return None
    try:
        files = distribution("gla-export").files or []
    except PackageNotFoundError:
        return None
    for f in files:
        if f.parent.name == "lib" and f.parent.parent.name == "gla_export":
            return Path(f.locate()).parent
    return None


def _installed_dirs(package_dir: Path) -> list[Path]:
    dirs = [package_dir / "lib"]
    dist = _distribution_lib_dir()
    if dist is not None:
        dirs.append(dist)
    return dirs


def _build_tree_dirs(root: Path) -> list[Path]:
    """Candidate output folders of the CMake build trees under ``root/build``."""
    build = root / "build"
    dirs = [d for tree in sorted(p for p in build.glob("*") if p.is_dir()) for d in (tree / s for s in BUILD_TREE_SUBDIRS)]
    return [*dirs, build / "lib", build]


# ELF e_machine of the architectures we build for, by platform.machine()
_ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}


def runs_here(path: Path) -> bool:
    """False for an ELF file built for another CPU (build/arm64 holds aarch64 cross builds beside the
    host's trees); True for this CPU's, for non-ELF files and where the machine is not known."""
    import platform

    want = _ELF_MACHINES.get(platform.machine().lower())
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    if want is None or len(head) < 20 or head[:4] != b"\x7fELF":
        return True
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big") == want


def _newest(paths: list[Path]) -> Path | None:
    """The most recently modified of ``paths`` (the first of equals), or None."""
    best, best_mtime = None, None
    for p in paths:
        mtime = p.stat().st_mtime
        if best_mtime is None or mtime > best_mtime:
            best, best_mtime = p, mtime
    return best


def find_library(kind: str) -> Path | None:
    """Path of a native library, or None when it is not built (search order: module docstring)."""
    if kind not in LIBRARIES:
        raise ValueError(f"kind must be one of {', '.join(LIBRARIES)}, got {kind!r}")
    name = LIBRARIES[kind] + _suffix()
    for d in [*_env_dirs(), *_installed_dirs(_PACKAGE_DIR)]:
        if (d / name).is_file():
            return d / name
    trees = _build_tree_dirs(_PACKAGE_DIR.parent)
    return _newest([d / name for d in trees if (d / name).is_file() and runs_here(d / name)])


def library_path(kind: str) -> str:
    """Path of a native library; raises :class:`NativeLibraryError` when it is not built."""
    path = find_library(kind)
    if path is None:
        raise NativeLibraryError(
            f"the {kind} library ({LIBRARIES[kind]}{_suffix()}) is not built: reinstall gla-export with a C++ "
            "compiler and CMake available (pip install .), or set GLA_EXPORT_LIB_DIR to where it is"
        )
    return str(path)
