"""The runtime adapters' check(metadata): one answer to "can this runtime run this export here",
given to the decoder (an error) and to verify (a skipped backend with the same reason)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gla_export import _native
from gla_export.errors import GlaExportError, MissingRuntimeError, UsageError
from gla_export.export.metadata import open_export
from gla_export.runtime import StatefulDecoder
from gla_export.runtime.engines import RUNTIMES, check_runtime
from gla_export.runtime.verify import _backend_status

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes"))
from runtime_helpers import tiny_export  # noqa: E402


def _decoder_error(path, runtime) -> str | None:
    try:
        StatefulDecoder(path, runtime)
    except (MissingRuntimeError, UsageError) as e:
        return str(e)
    return None


@pytest.mark.parametrize("form", ["decomposed", "custom"])
def test_verify_skips_a_runtime_for_the_reason_the_decoder_gives(form, monkeypatch):
    path = tiny_export(form)
    if form == "custom":  # the library missing: ort-cpu cannot run a custom export
        monkeypatch.setattr(_native, "find_library", lambda kind: None)
    meta = open_export(path)
    for runtime in RUNTIMES:
        status, _ = _backend_status(runtime, meta, None, None)
        if runtime == "trt":
            continue  # verify drives `tensorrt` itself (Polygraphy), the decoder the module that built the engines
        why = _decoder_error(path, runtime)
        assert status.available == (why is None), (runtime, status, why)
        if why is not None:
            assert status.detail == why


def test_check_loads_nothing_and_names_what_runs():
    meta = open_export(tiny_export("custom"))
    detail = check_runtime("ort-cpu", meta)
    assert detail.startswith("onnxruntime ") and "(CPU)" in detail and "libgla_onnxruntime" in detail
    with pytest.raises(UsageError, match="backend must be one of"):
        check_runtime("tpu", meta)


def test_a_bfloat16_export_cannot_run_on_the_cpu():
    meta = open_export(tiny_export("decomposed"))
    import dataclasses

    bf16 = dataclasses.replace(meta, dtype="bfloat16")
    with pytest.raises(GlaExportError, match="no bfloat16 CPU kernels"):
        check_runtime("ort-cpu", bf16)


def test_an_onnx_runtime_error_without_a_message_is_still_a_one_line_model_error(monkeypatch):
    """ONNX Runtime may raise with an empty message: the adapter said ``splitlines()[0]`` of it and
    crashed with IndexError instead of a ModelError."""
    from gla_export import errors
    from gla_export.runtime import session
    from gla_export.runtime.engines.ort import open_session

    assert errors.first_line(RuntimeError("\n  the cause \nmore")) == "the cause"
    assert errors.first_line(RuntimeError("")) == "RuntimeError"

    def fail(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(session, "create_session", fail)
    with pytest.raises(errors.ModelError, match=r"cannot load .*step.*: RuntimeError$"):
        open_session(open_export(tiny_export("decomposed")), "step", cuda=False)
