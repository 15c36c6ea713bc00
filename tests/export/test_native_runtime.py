"""``custom`` exports run on our ONNX Runtime library (the contract between exporter and library).

The library is built in CI: there a missing library is a failure. On a developer machine without
the native build the test is skipped.
"""

from __future__ import annotations

import os

import pytest
from export_helpers import make_model

from gla_export._native import find_library
from gla_export.export import export_model


@pytest.fixture
def ort_library():
    if find_library("ort") is None:
        if os.environ.get("CI"):
            pytest.fail("libgla_onnxruntime is not built, but CI builds it")
        pytest.skip("libgla_onnxruntime is not built here (pip install . builds it)")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("config", ["gqa", "gqa-conv"])
def test_custom_export_validates_on_the_native_library(tmp_path, ort_library, config, dtype):
    res = export_model(make_model(config), tmp_path / "out", gla_op="custom", dtype=dtype, progress=False, runtime="onnxruntime")
    assert all("libgla_onnxruntime" in name for name in res.validation.runtimes.values())
    assert res.validation.passed, res.validation.failures
