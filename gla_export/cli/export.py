"""``gla-export export``: a GLA model to prefill/step ONNX graphs (docs/export.md)."""

from __future__ import annotations

import click


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command()
@click.argument("model", required=False, type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=str), help="Export directory to create.")
@click.option("--gla-op", type=click.Choice(["custom", "onnx", "decomposed"]), default="custom", show_default=True,
              help="custom: gla::GatedLinearAttention (our ORT library / TensorRT plugin); onnx: standard LinearAttention "
                   "(opset 27); decomposed: standard ops only, no plugin needed.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Activations and weights (logits are always float32).")
@click.option("--state-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="The GLA recurrent state.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 21; 27 for --gla-op onnx).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Shape hint for engine builders.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=2048, show_default=True, help="Shape hint for engine builders.")
@click.option("--attention-mask/--no-attention-mask", default=True, show_default=True,
              help="Give the prefill graph an attention_mask input (left-padded batches).")
@click.option("--attention-op", type=click.Choice(["decomposed", "onnx", "gqa"]), default="decomposed",
              show_default=True,
              help="Hybrid models' attention layers: plain ops, ONNX Attention/RotaryEmbedding (opset >= 23), or ONNX "
                   "Runtime's com.microsoft::GroupQueryAttention (ONNX Runtime only).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Run the graphs and compare with PyTorch.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default per dtype).")
@click.option("--rtol", type=float, default=None, help="Tolerance relative to the largest reference value (default per dtype).")
@click.option("--runtime", type=click.Choice(["auto", "onnxruntime", "reference"]), default="auto", show_default=True,
              help="What runs the graphs for validation.")
@click.option("--weights", type=click.Choice(["fp", "int8", "int4"]), default="fp", show_default=True,
              help="Weight-only quantization of the linear layers (fp: the --dtype).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256", "per-channel"]), default=None,
              help="Weights sharing one scale along the input dimension [int4: 32, int8: 128]; per-channel: int8 with --quant-format qdq.")
@click.option("--quant-format", type=click.Choice(["matmulnbits", "qdq"]), default=None,
              help="matmulnbits: com.microsoft::MatMulNBits for ONNX Runtime [default]; qdq: DequantizeLinear+MatMul for TensorRT.")
@click.option("--quant-method", type=click.Choice(["rtn", "hqq", "gptq", "awq"]), default=None,
              help="rtn: round to nearest [default]; hqq: half-quadratic (asymmetric); gptq, awq: calibrated on --calibration text.")
@click.option("--calibration", type=click.Path(dir_okay=False, exists=True, path_type=str), default=None,
              help="Calibration text for gptq and awq (default: a slice of the sample model's training text).")
@click.option("--symmetric/--asymmetric", default=None, help="Symmetric (no zero point) [default] or asymmetric quantization.")
@click.option("--quantize-gate/--no-quantize-gate", default=None, help="Also quantize the gate's low-rank projections [no].")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits accuracy_level (4: int8 dot products on the CPU) [4].")
@click.option("-f", "--force", is_flag=True, help="Replace an existing export in OUTPUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no validation table: only the final line (a failed validation still prints its table).")
def export(model, out_dir, gla_op, dtype, state_dtype, opset, max_batch, max_seq_len, attention_mask, attention_op, validate,
           atol, rtol, runtime, weights, block_size, quant_format, quant_method, calibration, symmetric, quantize_gate,
           accuracy_level, force, quiet) -> None:
    """Export MODEL (a checkpoint directory; default: the bundled sample model) to ONNX.

    Writes prefill.onnx and step.onnx sharing weights.onnx.data, and metadata.json. Validation
    failures exit with code 4 and write nothing.
    """
    from ..export import ExportValidationError, export_model
    from ..export.quantize import quant_config
    from . import console
    from .render import StepProgress, validation_table

    err = console(stderr=True)
    try:
        quant = quant_config(weights, block_size=None if block_size is None else (0 if block_size == "per-channel" else int(block_size)),
                             format=quant_format, method=quant_method, calibration=calibration, symmetric=symmetric,
                             quantize_gate=quantize_gate, accuracy_level=accuracy_level)
        with StepProgress(err, enabled=not quiet) as show:
            result = export_model(
                model, out_dir, gla_op=gla_op, dtype=dtype, state_dtype=state_dtype, opset=opset,
                max_batch=max_batch, max_seq_len=max_seq_len, attention_mask=attention_mask, validate=validate,
                atol=atol, rtol=rtol, force=force, progress=None if quiet else show, runtime=runtime,
                attention_op=attention_op, weights=quant or "fp",
            )
    except ExportValidationError as e:
        err.print(validation_table(e.report))
        raise
    out = console()
    if result.validation is not None and not quiet:
        out.print(validation_table(result.validation))
        for note in result.validation.notes:
            out.print(f"[dim]note: {note}[/dim]")
        runtimes = ", ".join(f"{k}: {v}" for k, v in result.validation.runtimes.items())
        out.print(f"[dim]ran on {runtimes}[/dim]")
    sizes = ", ".join(f"{name} {_size(n)}" for name, n in result.sizes.items())
    out.print(f"[green]exported[/green] {result.out_dir} ({gla_op}, {dtype}) in {result.timings['total']:.1f} s: {sizes}", soft_wrap=True)
