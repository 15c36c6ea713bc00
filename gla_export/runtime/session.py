"""The one factory of ONNX Runtime sessions: the decoder, ``verify`` and the export's own
validation all create their sessions with :func:`create_session`, which owns

- the custom-op library (``library_path("ort")``) that runs ``gla::GatedLinearAttention``;
- short provider names (``cpu``, ``cuda``) and ``onnxruntime.preload_dlls()`` for the CUDA
  libraries that pip installed;
- the TF32 policy: **off** on the CUDA execution provider, for every export and every GLA op
  form (ONNX Runtime's default runs float32 MatMul/Gemm on TF32, which moves a float32 model's
  logits by ~1e-2: accuracy first). ``tf32=True`` opts in;
- ``ALLOW_RELEASED_ONNX_OPSET_ONLY=0`` for graphs of an opset ONNX Runtime still calls "under
  development" (the standard ``LinearAttention`` is opset 27), set only while the session loads
  and restored after, never left in the process's environment;
- the log level (errors only: the opset-27 notice is expected).

A missing piece (the library, onnxruntime itself, the CUDA execution provider) raises
:class:`~gla_export.errors.MissingRuntimeError` with what to install, instead of ONNX Runtime's
"could not find an implementation" at the first custom node.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import MissingRuntimeError, UsageError

# short name -> ONNX Runtime's execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

ProviderSpec = str | tuple[str, Mapping[str, Any]]


def _onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingRuntimeError(
            "onnxruntime is not installed: pip install 'gla-export[cpu]' (or '[gpu]' for CUDA)"
        ) from e
    return ort


def available_providers() -> list[str]:
    """Short names of the execution providers this onnxruntime build offers (``cpu``, ``cuda``, ...)."""
    ort = _onnxruntime()
    full = set(ort.get_available_providers())
    return [short for short, name in PROVIDERS.items() if name in full]


def _resolve(providers: Iterable[ProviderSpec], available: list[str], tf32: bool = False
             ) -> list[str | tuple[str, dict]]:
    if isinstance(providers, str):  # a single name
        providers = [providers]
    resolved: list[str | tuple[str, dict]] = []
    for spec in providers:
        name, options = (spec, None) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values() and not full.endswith("ExecutionProvider"):
            raise UsageError(f"unknown execution provider {name!r}: use one of {', '.join(PROVIDERS)}")
        if full not in available:
            hint = " (install onnxruntime-gpu: pip install 'gla-export[gpu]')" if full == PROVIDERS["cuda"] else ""
            raise MissingRuntimeError(
                f"the ONNX Runtime execution provider {full} is not available here{hint}; "
                f"available: {', '.join(available) or 'none'}"
            )
        if full == PROVIDERS["cuda"]:
            # ONNX Runtime's CUDA provider runs float32 MatMul/Gemm on TF32 by default, which moves a
            # float32 model's logits by ~1e-2 (measured on an H200): off unless asked (tf32=True, or the
            # provider option itself)
            options = {"use_tf32": "1" if tf32 else "0", **(options or {})}
        resolved.append(full if options is None else (full, options))
    if not resolved:
        raise UsageError("providers must name at least one execution provider")
    return resolved


def _gla_library(library: str | os.PathLike | None) -> str:
    if library is not None:
        path = os.fspath(library)
        if not os.path.isfile(path):
            raise MissingRuntimeError(f"the gla ONNX Runtime library {path} does not exist")
        return path
    from .._native import NativeLibraryError, library_path

    try:
        return library_path("ort")
    except NativeLibraryError as e:
        raise MissingRuntimeError(str(e)) from e


def _has_cuda_kernels() -> bool | None:
    """Whether our libraries were built with CUDA kernels (None when that cannot be told)."""
    try:
        from ..ops.native import cuda_compiled

        return cuda_compiled()
    except Exception:  # noqa: BLE001 - the C entry point is optional here
        return None


OPSET_ENV = "ALLOW_RELEASED_ONNX_OPSET_ONLY"
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def allow_unreleased_opsets_env(allow: bool = True):
    """``ALLOW_RELEASED_ONNX_OPSET_ONLY=0`` while the block runs (ONNX Runtime reads it when it
    loads a model), the previous value (or its absence) restored after. One thread at a time: the
    environment is the process's."""
    if not allow:
        yield
        return
    with _ENV_LOCK:
        before = os.environ.get(OPSET_ENV)
        os.environ[OPSET_ENV] = "0"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(OPSET_ENV, None)
            else:
                os.environ[OPSET_ENV] = before


def create_session(
    model_path_or_bytes: str | os.PathLike | bytes,
    providers: Iterable[ProviderSpec] = ("cpu",),
    session_options: Any | None = None,
    *,
    library: str | os.PathLike | bool | None = None,
    intra_op_num_threads: int | None = None,
    graph_optimization_level: Any | None = None,
    allow_unreleased_opsets: bool = False,
    tf32: bool = False,
    log_severity_level: int | None = 3,
):
    """An ``onnxruntime.InferenceSession`` with the gla custom-op library registered.

    Args:
        model_path_or_bytes: the ``.onnx`` file (its external weights beside it) or its bytes.
        providers: in order of preference; short names ``cpu``, ``cuda``, ``tensorrt`` or ONNX
            Runtime's full names, each optionally as ``(name, provider_options)``.
        session_options: an ``onnxruntime.SessionOptions`` to start from (it is modified: the
            library is registered on it).
        library: the custom-op library; default (None or True) ``gla_export.library_path("ort")``;
            False registers none (graphs in standard ops only: no library needed).
        intra_op_num_threads: CPU threads for the session (default: ONNX Runtime's choice).
        graph_optimization_level: an ``onnxruntime.GraphOptimizationLevel``.
        allow_unreleased_opsets: load a graph whose opset ONNX Runtime calls "under development"
            (``--gla-op onnx`` exports: ``LinearAttention`` is opset 27); the environment variable
            is set only while the session loads.
        tf32: let the CUDA execution provider use TF32 products (off by default: accuracy first).
        log_severity_level: ONNX Runtime's log level for the session (3: errors only); None
            leaves ``session_options``' own.

    Raises:
        MissingRuntimeError: onnxruntime, the library or a requested provider is missing.
        UsageError: an unknown provider name.
    """
    ort = _onnxruntime()
    resolved = _resolve(providers, ort.get_available_providers(), tf32=tf32)
    names = [p if isinstance(p, str) else p[0] for p in resolved]
    if PROVIDERS["cuda"] in names:
        # onnxruntime-gpu finds the CUDA libraries that pip installed only once they are loaded
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            with contextlib.suppress(Exception):  # the system's CUDA may be found without it
                preload()
        if library is not False and _has_cuda_kernels() is False:
            warnings.warn(
                "gla-export was built without CUDA kernels: GatedLinearAttention nodes will run on the CPU "
                "(rebuild with nvcc available for the CUDA kernels)",
                RuntimeWarning,
                stacklevel=2,
            )

    so = session_options if session_options is not None else ort.SessionOptions()
    if library is not False:
        so.register_custom_ops_library(_gla_library(None if library is True else library))
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    if graph_optimization_level is not None:
        so.graph_optimization_level = graph_optimization_level
    if log_severity_level is not None:
        so.log_severity_level = int(log_severity_level)
    model = model_path_or_bytes if isinstance(model_path_or_bytes, bytes) else os.fspath(model_path_or_bytes)
    with allow_unreleased_opsets_env(allow_unreleased_opsets):
        return ort.InferenceSession(model, sess_options=so, providers=resolved)
