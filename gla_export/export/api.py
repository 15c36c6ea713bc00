"""``export_model``: a GLA model to ``prefill.onnx`` + ``step.onnx`` + one weights file + metadata.

Atomic: everything is built (and validated) in a temporary directory beside ``out_dir`` and
renamed into place at the end. A failure leaves no partial files; an existing export is only
replaced with ``force=True``, and never a directory that is not an export.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper

from .._dtypes import BY_SHORT
from .._files import check_output_dir, discard_staging, staging_dir, swap_into_place
from ..errors import ExportFailedError, GlaExportError, ModelError, UsageError, ValidationError, first_line
from ..models.config import ConfigError
from ..models.loader import CheckpointError, cast_model, load_model, sample_model_path
from ..models.modeling import GLAForCausalLM
from .gla_ops import CUSTOM_DOMAIN, CUSTOM_VERSION, DECOMPOSED_MAX_OPSET, FORMS, ONNX_OP_OPSET
from .graph import GraphBuilder, WeightTable, min_ir_version
from .metadata import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    METADATA_KEY,
    PREFILL_FILE,
    STEP_FILE,
    WEIGHTS_FILE,
    build_metadata,
    copy_tokenizer,
    detect_tokenizer,
    dumps,
)
from .model_graph import GraphSpec, build_graph, register_weights
from .validate import DEFAULT_TOLERANCES, ValidationReport, build_cases, run_cases

DTYPES = {short: d.torch for short, d in BY_SHORT.items()}  # --dtype spellings (gla_export._dtypes)
DEFAULT_OPSET = 21
# hybrids' attention layers: plain ops, ONNX Attention/RotaryEmbedding (opset 23), or ONNX
# Runtime's com.microsoft::GroupQueryAttention (docs/export.md §3.1)
ATTENTION_OPS = ("decomposed", "onnx", "gqa")
MIN_OPSET = 18  # ReduceMean with axes as an input, Pad with axes, Split/Shape attributes used here
VALIDATION_FILE = "validation.json"


class ExportValidationError(ValidationError):
    """Validation failed; ``report`` holds every comparison."""

    def __init__(self, message: str, report: ValidationReport):
        super().__init__(message)
        self.report = report


@dataclass
class ExportResult:
    out_dir: Path
    metadata: dict[str, Any]
    validation: ValidationReport | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def prefill_path(self) -> Path:
        return self.out_dir / PREFILL_FILE

    @property
    def step_path(self) -> Path:
        return self.out_dir / STEP_FILE

    @property
    def weights_path(self) -> Path:
        return self.out_dir / WEIGHTS_FILE

    @property
    def metadata_path(self) -> Path:
        return self.out_dir / METADATA_FILE

    @property
    def sizes(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in sorted(self.out_dir.iterdir()) if p.is_file()}


def parse_dtype(value: Any, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    aliases = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}
    key = aliases.get(str(value), str(value))
    if key not in DTYPES:
        raise UsageError(f"{what} must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[key]


def check_opset(gla_op: str, opset: int | None) -> int:
    latest = onnx.defs.onnx_opset_version()
    if gla_op == "onnx":
        opset = ONNX_OP_OPSET if opset is None else opset
        lo, hi = ONNX_OP_OPSET, latest
    else:
        opset = DEFAULT_OPSET if opset is None else opset
        # past 26 ONNX Runtime 1.31 loads a model only with ALLOW_RELEASED_ONNX_OPSET_ONLY=0
        lo, hi = MIN_OPSET, DECOMPOSED_MAX_OPSET
    if not isinstance(opset, int) or not lo <= opset <= hi:
        raise UsageError(f"--opset {opset} is not valid for --gla-op {gla_op}: use {lo}..{hi}")
    return opset


def _is_export_dir(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, force: bool, source: Any = None) -> None:
    """``out_dir`` is new, empty, or (with ``force``) an export; never the checkpoint or above it."""
    check_output_dir(out_dir, force=force, ours=_is_export_dir, what=f"a gla-export directory (no {METADATA_FILE})",
                     inputs=[Path(source)] if isinstance(source, (str, os.PathLike)) else [])


def _float32_reference(model: GLAForCausalLM) -> GLAForCausalLM:
    """The exported weights in float32: the validation reference (see validate.build_cases)."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


def _load(model_or_path: Any, dtype: torch.dtype) -> tuple[GLAForCausalLM, Path | None]:
    if isinstance(model_or_path, GLAForCausalLM):
        model = model_or_path
        if model.lm_head.weight.dtype != dtype:
            model = cast_model(copy.deepcopy(model), dtype)  # the caller's model is left as it was
        return model, None
    if model_or_path is not None and not isinstance(model_or_path, (str, os.PathLike)):
        raise UsageError(f"model must be a checkpoint directory or a GLAForCausalLM, got {type(model_or_path).__name__}")
    path = Path(model_or_path) if model_or_path is not None else sample_model_path()
    if not path.exists():
        what = "the bundled sample model" if model_or_path is None else "checkpoint"
        raise ModelError(f"{what} not found: {path}")
    try:
        # keep the checkpoint's tensors as the parameters (no second copy while loading), then
        # convert one parameter at a time: peak memory stays near one copy of the weights
        # the metadata records it: absolute, so that verify and bench find it from any directory
        return cast_model(load_model(path, dtype=None), dtype), path.resolve()
    except (CheckpointError, ConfigError) as e:
        raise ModelError(str(e)) from e


def _check_supported(model: GLAForCausalLM) -> None:
    c = model.config
    try:
        c.validate()  # again: a model's config may have been changed since it was built
    except ConfigError as e:
        raise ModelError(str(e)) from e
    if c.use_short_conv and c.conv_size < 2:
        raise ModelError(f"config field 'conv_size' = {c.conv_size}: export needs conv_size >= 2 when use_short_conv is set")


def _check_attention_op(c, attention_op: str) -> None:
    """What ONNX Runtime's GroupQueryAttention cannot take, refused before anything is built."""
    if attention_op != "gqa" or c.attn is None:
        return
    for i in c.attention_layers:
        d = c.attention_head_dim(i)
        if d % 8:
            raise UsageError(f"--attention-op gqa: layer {i}'s head size {d} is not a multiple of 8, which ONNX "
                             f"Runtime's GroupQueryAttention requires; use --attention-op decomposed")


@dataclass(frozen=True)
class ProgressEvent:
    """What ``export_model(progress=callback)`` reports: a step started (``completed`` 0), advanced
    (bytes written, for ``write``), or finished (``done``). The CLI draws them
    (gla_export.cli.render.StepProgress); the library draws nothing."""

    step: str
    completed: int = 0
    total: int | None = None
    done: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


class _Steps:
    def __init__(self, callback: ProgressCallback | None):
        self.callback = callback

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None):
        cb = self.callback
        if cb is None:
            yield lambda n: None
            return
        cb(ProgressEvent(description, 0, total))
        completed = 0

        def advance(n: int) -> None:
            nonlocal completed
            completed += n
            cb(ProgressEvent(description, completed, total))

        yield advance
        cb(ProgressEvent(description, total or completed, total, done=True))


def _progress(progress: bool | ProgressCallback | None, console: Any) -> tuple[ProgressCallback | None, Any]:
    """The callback and the context it needs. ``True`` (the former default) keeps the former rich
    display, drawn by the CLI's renderer; new code passes a callback or nothing."""
    if progress is True:
        from ..cli.render import StepProgress

        display = StepProgress(console)
        return display, display
    if progress in (False, None):
        return None, contextlib.nullcontext()
    if not callable(progress):
        raise UsageError(f"progress must be a callable taking a ProgressEvent (or a bool), got {progress!r}")
    return progress, contextlib.nullcontext()


def _model_proto(b: GraphBuilder, table: WeightTable, opset: int, ir_version: int, form: str, meta_json: str, kind: str) -> onnx.ModelProto:
    from .quantize import opset_imports

    graph = b.graph([table.tensor_proto(n) for n in b.used_weights])
    imports = [helper.make_opsetid("", opset)]
    if form == "custom":
        imports.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_VERSION))
    imports += opset_imports(b)  # com.microsoft for quantized weights (MatMulNBits)
    from .. import __version__

    model = helper.make_model(graph, opset_imports=imports, producer_name="gla-export", producer_version=__version__)
    model.ir_version = ir_version
    model.doc_string = f"GLA causal LM, {kind} graph (gla-export; metadata in metadata_props['{METADATA_KEY}'])"
    helper.set_model_props(model, {METADATA_KEY: meta_json, "gla_export.graph": kind, "gla_export.format_version": str(FORMAT_VERSION)})
    return model


def export_model(
    model_or_path: Any = None,
    out_dir: str | os.PathLike = "export",
    *,
    gla_op: str = "custom",
    dtype: Any = "fp32",
    state_dtype: Any = "fp32",
    opset: int | None = None,
    max_batch: int = 8,
    max_seq_len: int = 2048,
    attention_mask: bool = True,
    validate: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    progress: bool | ProgressCallback | None = True,
    runtime: str = "auto",
    console=None,
    attention_op: str = "decomposed",
    weights: Any = "fp",
) -> ExportResult:
    """Export a GLA causal LM to ONNX (docs/export.md).

    Args:
        model_or_path: a :class:`GLAForCausalLM`, a checkpoint directory (ours or fla's), or None
            for the bundled sample model.
        out_dir: the export directory (created; replaced only with ``force``).
        gla_op: ``custom`` (``gla::GatedLinearAttention``), ``onnx`` (``LinearAttention``, opset 27)
            or ``decomposed`` (standard ops only).
        dtype: activations and weights, ``fp32``/``fp16``/``bf16``; logits are always float32.
        state_dtype: the GLA recurrent state (float32 by default, also for fp16 activations).
        opset: default 21 (``custom``, ``decomposed``) or 27 (``onnx``).
        max_batch, max_seq_len: shape hints recorded for engine builders.
        attention_mask: give the prefill graph an ``attention_mask`` input (left padding).
        validate: run both graphs and compare with PyTorch; ``atol``/``rtol`` default per dtype.
        runtime: which runtime validates (``auto``, ``onnxruntime``, ``reference``).
        attention_op: hybrid models' softmax-attention layers as plain ops (``decomposed``: MatMul,
            Softmax; every runtime) or as the standard ``Attention``/``RotaryEmbedding`` nodes
            (``onnx``: opset >= 23; ONNX Runtime runs them, TensorRT builds them only for shapes and
            dtypes it has attention kernels for) or as ONNX Runtime's ``com.microsoft::GroupQueryAttention``
            (``gqa``: fused rotary and window, ONNX Runtime >= 1.32; head sizes a multiple of 8; the
            reference evaluator runs it too, as gla_export.export.reference_op models it).
        progress: a callable given a :class:`ProgressEvent` per step; False or None: nothing;
            True: the CLI's progress display on stderr (on ``console`` if given).
        weights: ``fp`` (the activations' type), ``int8``, ``int4`` or a
            :class:`~gla_export.export.quantize.QuantConfig` (weight-only quantization; docs/export.md).

    Raises:
        UsageError, ModelError, OutputExistsError, ExportValidationError (a ValidationError),
        ExportFailedError; each carries its CLI exit code.
    """
    t_start = time.perf_counter()
    if gla_op not in FORMS:
        raise UsageError(f"gla_op must be one of {', '.join(FORMS)}, got {gla_op!r}")
    act = parse_dtype(dtype, "dtype")
    sdt = parse_dtype(state_dtype, "state_dtype")
    opset = check_opset(gla_op, opset)
    if attention_op not in ATTENTION_OPS:
        raise UsageError(f"attention_op must be one of {', '.join(ATTENTION_OPS)}, got {attention_op!r}")
    if attention_op == "onnx" and opset < 23:
        raise UsageError(f"--attention-op onnx needs opset >= 23 (Attention, RotaryEmbedding), got --opset {opset}")
    from .quantize import quant_config

    qconfig = quant_config(weights)
    if qconfig is not None and qconfig.format == "qdq" and opset < 21:
        raise UsageError(f"--quant-format qdq needs opset >= 21 (blocked DequantizeLinear), got --opset {opset}")
    for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    # the coarser of the activation and state types sets the default tolerances
    coarse = max(act, sdt, key=[torch.float32, torch.float16, torch.bfloat16].index)
    d_atol, d_rtol = DEFAULT_TOLERANCES[coarse]
    default_tolerances = atol is None and rtol is None
    if qconfig is not None and default_tolerances:  # against the dequantized model: the kernels' error (quantize.TOLERANCES)
        from .quantize import TOLERANCES

        q_atol, q_rtol = TOLERANCES[qconfig.tolerance_key()]
        d_atol, d_rtol = max(d_atol, q_atol), max(d_rtol, q_rtol)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):  # NaN fails every comparison
        raise UsageError(f"atol and rtol must be >= 0 and finite, got atol={atol}, rtol={rtol}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force, model_or_path)

    timings: dict[str, float] = {}
    callback, display = _progress(progress, console)
    with display:
        prog = _Steps(callback)
        with prog.step("load model"):
            t = time.perf_counter()
            model, source = _load(model_or_path, act)
            _check_supported(model)
            _check_attention_op(model.config, attention_op)
            timings["load"] = time.perf_counter() - t

        with prog.step("build graphs"):
            t = time.perf_counter()
            spec = GraphSpec(model.config, act, sdt, gla_op, attention_mask, attention_op)
            table = WeightTable(WEIGHTS_FILE)
            register_weights(model, table)
            builders = {kind: build_graph(spec, table, kind) for kind in ("prefill", "step")}
            ir_version = min_ir_version(opset)
            tokenizer = detect_tokenizer(model.config, source)
            meta = build_metadata(
                spec, opset=opset, ir_version=ir_version, tokenizer=tokenizer,
                shape_hints={"batch": {"min": 1, "opt": 1, "max": max_batch},
                             "sequence": {"min": 1, "opt": min(128, max_seq_len), "max": max_seq_len}},
                source=str(source) if source is not None else None,
                num_parameters=table.numel,  # every parameter once (a tied lm_head is the embedding)
            )
            quantized = None
            if qconfig is not None:
                from .quantize import quantize_export

                quantized = quantize_export(model, table, builders, qconfig, act)
                table = quantized.table
                meta["quantization"] = quantized.metadata
            timings["build"] = time.perf_counter() - t

        tmp = staging_dir(out_dir)
        try:
            with prog.step("write", total=table.nbytes) as advance:
                t = time.perf_counter()
                table.write(tmp, advance)
                meta_json = json.dumps(meta, separators=(",", ":"))
                for kind, file in (("prefill", PREFILL_FILE), ("step", STEP_FILE)):
                    proto = _model_proto(builders[kind], table, opset, ir_version, gla_op, meta_json, kind)
                    (tmp / file).write_bytes(proto.SerializeToString())
                    del proto
                (tmp / METADATA_FILE).write_text(dumps(meta))
                copy_tokenizer(tokenizer, source, tmp)
                timings["write"] = time.perf_counter() - t
            with prog.step("check (onnx.checker, full)"):
                t = time.perf_counter()
                for file in (PREFILL_FILE, STEP_FILE):
                    try:
                        onnx.checker.check_model(str(tmp / file), full_check=True)
                    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                        raise ExportFailedError(f"{file} fails the ONNX checker: {first_line(e)}") from e
                timings["check"] = time.perf_counter() - t

            report = None
            if validate:
                with prog.step("validate"):
                    t = time.perf_counter()
                    reference = _float32_reference(model) if quantized is None else quantized.reference_model(model)
                    # with default tolerances a low-precision graph may also be as far off as PyTorch in that dtype
                    low_precision = act != torch.float32 or sdt != torch.float32
                    baseline = model if low_precision and default_tolerances and quantized is None else None
                    was_training = model.training
                    model.eval()
                    reference.eval()
                    try:
                        cases, notes = build_cases(reference, meta, source, baseline=baseline)
                    finally:
                        model.train(was_training)
                    # the PyTorch results are computed: let the weights go before the runtimes load them
                    del model, reference, baseline
                    gc.collect()
                    report = run_cases(tmp, cases, meta, atol=atol, rtol=rtol, runtime=runtime, notes=notes)
                    del cases
                    (tmp / VALIDATION_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
                    timings["validate"] = time.perf_counter() - t
                if not report.passed:
                    worst = max(report.failures, key=lambda c: c.max_abs / max(c.limit, 1e-30))
                    raise ExportValidationError(
                        f"validation failed: {len(report.failures)} of {len(report.checks)} comparisons exceed the tolerance "
                        f"(worst: {worst.case} {worst.output}: max|err| {worst.max_abs:.3e} > {worst.limit:.3e}); "
                        f"nothing was written to {out_dir}",
                        report,
                    )
            _move_into_place(tmp, out_dir, force, source)
        except GlaExportError:
            discard_staging(tmp)
            raise
        except OSError as e:
            discard_staging(tmp)
            raise ExportFailedError(f"writing the export failed: {e}") from e
        except BaseException:
            discard_staging(tmp)
            raise
    timings["total"] = time.perf_counter() - t_start
    return ExportResult(out_dir, meta, report, timings)


def _move_into_place(tmp: Path, out_dir: Path, force: bool, source: Path | None) -> None:
    """Rename the finished export to ``out_dir``; an old export is swapped out first and removed
    only once the new one is in place."""
    _check_out_dir(out_dir, force, source)  # again: something may have appeared while we worked
    swap_into_place(tmp, out_dir)
