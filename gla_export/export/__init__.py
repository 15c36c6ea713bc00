"""ONNX export of GLA causal LMs: prefill and step graphs, three forms of the GLA op (docs/export.md)."""

import sys
import types

from .api import DTYPES, ExportResult, ExportValidationError, export_model
from .gla_ops import FORMS
from .metadata import FORMAT_VERSION, METADATA_FILE, PREFILL_FILE, STEP_FILE, WEIGHTS_FILE, read_metadata
from .reference_op import GatedLinearAttention, reference_evaluator
from .validate import DEFAULT_TOLERANCES, ValidationReport

__all__ = [
    "DEFAULT_TOLERANCES",
    "DTYPES",
    "FORMAT_VERSION",
    "FORMS",
    "METADATA_FILE",
    "PREFILL_FILE",
    "STEP_FILE",
    "WEIGHTS_FILE",
    "ExportResult",
    "ExportValidationError",
    "GatedLinearAttention",
    "ValidationReport",
    "export_model",
    "read_metadata",
    "reference_evaluator",
]


class _CallableModule(types.ModuleType):
    """``gla_export.export(...)`` is documented as a function, but importing this subpackage
    rebinds that attribute to the module: make the module callable so both spellings work."""

    def __call__(self, model_or_path, out_dir, **kwargs):
        return export_model(model_or_path, out_dir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
