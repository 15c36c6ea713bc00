"""gla-export: Gated Linear Attention language models to ONNX, ONNX Runtime and TensorRT."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from ._native import NativeLibraryError, library_path  # noqa: E402

_FROM_MODELS = ("load_model", "sample_model_path")


def __getattr__(name: str) -> Any:
    # torch is loaded on first use, not by `import gla_export`: the CLI imports the package for
    # its version, and `gla-export --help` should not wait seconds for torch
    if name in _FROM_MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export(model_or_path: Any, out_dir: Any, **kwargs: Any) -> Any:
    """Export a GLA model to ONNX (see :func:`gla_export.export.export_model`)."""
    from .export import export_model

    return export_model(model_or_path, out_dir, **kwargs)


__all__ = ["NativeLibraryError", "__version__", "export", "library_path", "load_model", "sample_model_path"]
