"""Typed errors and the CLI exit code of each: one line of message, a distinct non-zero code."""

from __future__ import annotations


class GlaExportError(Exception):
    """Base of the errors the CLI reports in one line."""

    exit_code = 1


class UsageError(GlaExportError):
    """Bad arguments or options."""

    exit_code = 2


class ModelError(GlaExportError):
    """The model or checkpoint cannot be loaded or is not supported."""

    exit_code = 3


class ValidationError(GlaExportError):
    """A result differs from the reference by more than the tolerance."""

    exit_code = 4


class MissingRuntimeError(GlaExportError):
    """A runtime or native library that the command needs is not installed or not built."""

    exit_code = 5


class OutputExistsError(GlaExportError):
    """The output already exists and --force was not given."""

    exit_code = 6


class ExportFailedError(GlaExportError):
    """Writing an artifact failed (nothing partial is left behind)."""

    exit_code = 7


EXIT_CODES = {cls.__name__: cls.exit_code for cls in (UsageError, ModelError, ValidationError, MissingRuntimeError, OutputExistsError, ExportFailedError)}


def first_line(e: BaseException) -> str:
    """The first non-blank line of ``e``'s message, stripped, for a one-line error; the exception's
    type name when the message is empty (ONNX Runtime and protobuf raise some with none)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
