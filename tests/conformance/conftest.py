"""The TensorRT fixtures (trt_module, plugin_lib, harness) of tests/tensorrt_plugin, shared."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_gla_trt_fixtures", Path(__file__).resolve().parents[1] / "tensorrt_plugin" / "conftest.py")
_trt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_trt)

trt_module = _trt.trt_module
plugin_lib = _trt.plugin_lib
harness = _trt.harness
