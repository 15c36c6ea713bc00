"""Fixtures of the TensorRT tests (of plugins/tensorrt and gla_export.runtime.tensorrt).

The folder is not called tests/tensorrt: pytest puts tests/ on sys.path, and a tests/tensorrt
folder would then import as an empty namespace package `tensorrt` wherever TensorRT itself is not
installed, fooling every `find_spec("tensorrt")`.

The plugin library and its harness are built with the package (pip install . builds them when
nvcc is present, as in CI) and TensorRT-RTX is a test dependency: when one is missing these
tests fail with what to do, they do not skip. TensorRT itself always runs in a child process
(gla_export.runtime.tensorrt.run_jobs), so its parser can never abort pytest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trt_module() -> str:
    from gla_export.runtime.tensorrt import available_module

    name = available_module(os.environ.get("GLA_TEST_TRT_MODULE") or None)
    if name is None:
        pytest.fail("TensorRT is not installed: pip install tensorrt-rtx-cu13 (a test dependency of gla-export)")
    return name


@pytest.fixture(scope="session")
def plugin_lib() -> str:
    from gla_export import NativeLibraryError, library_path

    try:
        return library_path("trt")
    except NativeLibraryError as e:
        pytest.fail(f"{e}\n(the TensorRT plugin is built by `pip install .` when nvcc is present; see docs/tensorrt.md)")


@pytest.fixture(scope="session")
def harness(plugin_lib: str, tmp_path_factory) -> str:
    path = Path(os.environ.get("GLA_TRT_HARNESS") or Path(plugin_lib).with_name("gla_trt_plugin_harness"))
    if not path.is_file():
        pytest.fail(f"the plugin harness {path} is not built (it is built and installed next to libgla_tensorrt.so)")
    if not os.access(path, os.X_OK):  # an install that dropped the executable bit
        copy = tmp_path_factory.mktemp("harness") / path.name
        shutil.copy2(path, copy)
        copy.chmod(0o755)
        path = copy
    return str(path)
