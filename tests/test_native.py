"""gla_export._native: where the native libraries are found — GLA_EXPORT_LIB_DIR first, then the
installed locations, then a developer's CMake build trees (the newest build of several)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gla_export import _native
from gla_export._native import LIBRARIES, NativeLibraryError, find_library, library_path

SO = _native._suffix()


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A source checkout with no library anywhere: the package at ``tmp/gla_export``, no
    GLA_EXPORT_LIB_DIR, no installed distribution."""
    pkg = tmp_path / "gla_export"
    pkg.mkdir()
    monkeypatch.setattr(_native, "_PACKAGE_DIR", pkg)
    monkeypatch.setattr(_native, "_distribution_lib_dir", lambda: None)
    monkeypatch.delenv("GLA_EXPORT_LIB_DIR", raising=False)
    return tmp_path


def put(path: Path, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_nothing_built_is_none_and_library_path_says_what_is_missing(checkout):
    (checkout / "build" / "dev" / "plugins" / "onnxruntime").mkdir(parents=True)  # a tree with nothing built
    for kind, name in LIBRARIES.items():
        assert find_library(kind) is None
        with pytest.raises(NativeLibraryError, match=f"{name}{SO}.*GLA_EXPORT_LIB_DIR"):
            library_path(kind)
    with pytest.raises(ValueError, match="kind must be one of ort, trt, kernels, got 'cuda'"):
        find_library("cuda")


@pytest.mark.parametrize(
    "subdir,kind",
    [("plugins/kernels", "kernels"), ("plugins/onnxruntime", "ort"), ("plugins/tensorrt", "trt"), ("runtimes", "ort")],
)
def test_each_target_folder_of_a_cmake_build_tree(checkout, subdir, kind):
    lib = put(checkout / "build" / "my-config" / subdir / f"{LIBRARIES[kind]}{SO}")
    assert find_library(kind) == lib
    assert library_path(kind) == str(lib)
    assert all(find_library(k) is None for k in LIBRARIES if k != kind)


def test_the_newest_of_several_build_trees_wins(checkout):
    name = f"{LIBRARIES['ort']}{SO}"
    old = put(checkout / "build" / "a-release" / "plugins" / "onnxruntime" / name, mtime=1_000_000)
    new = put(checkout / "build" / "b-debug" / "plugins" / "onnxruntime" / name, mtime=2_000_000)
    assert find_library("ort") == new
    os.utime(old, (3_000_000, 3_000_000))  # rebuilt
    assert find_library("ort") == old


def test_installed_locations_come_before_build_trees_and_the_variable_before_all(checkout, monkeypatch):
    name = f"{LIBRARIES['trt']}{SO}"
    tree = put(checkout / "build" / "dev" / "plugins" / "tensorrt" / name, mtime=3_000_000)  # the newest file
    dist = put(checkout / "site-packages" / "gla_export" / "lib" / name, mtime=2_000_000)
    monkeypatch.setattr(_native, "_distribution_lib_dir", lambda: dist.parent)
    assert find_library("trt") == dist
    beside = put(checkout / "gla_export" / "lib" / name, mtime=1_000_000)
    assert find_library("trt") == beside
    env = put(checkout / "mine" / name, mtime=0)
    monkeypatch.setenv("GLA_EXPORT_LIB_DIR", os.pathsep.join([str(checkout / "empty"), str(env.parent)]))
    assert find_library("trt") == env
    monkeypatch.setenv("GLA_EXPORT_LIB_DIR", str(checkout / "empty"))  # set but empty: the search goes on
    assert find_library("trt") == beside
    beside.unlink()
    dist.unlink()
    assert find_library("trt") == tree



def _elf(path: Path, machine: int, mtime: float) -> Path:
    """A 64-bit little-endian ELF header for ``machine`` (62 x86-64, 183 aarch64)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little") + bytes(44))
    os.utime(path, (mtime, mtime))
    return path


def test_a_newer_cross_build_for_another_cpu_is_passed_over(checkout, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    name = f"{LIBRARIES['ort']}{SO}"
    host = _elf(checkout / "build" / "dev" / "plugins" / "onnxruntime" / name, 62, 1_000_000)
    _elf(checkout / "build" / "arm64" / "plugins" / "onnxruntime" / name, 183, 2_000_000)  # newer, aarch64
    assert find_library("ort") == host
    assert _native.runs_here(host) and not _native.runs_here(checkout / "build" / "arm64" / "plugins" / "onnxruntime" / name)
