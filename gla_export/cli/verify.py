"""``gla-export verify``: PyTorch vs every available runtime, on Polygraphy (docs/verify-bench.md)."""

from __future__ import annotations

import click

from . import RUNTIMES


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--model",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="The checkpoint to compare with (default: the one the export recorded).",
)
@click.option(
    "-b",
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(RUNTIMES),
    help="Backends to verify (repeatable). Default: every one available here; the others are listed as skipped. "
    "A backend named here that cannot run is an error (exit code 5).",
)
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True, help="Rows of the prefill batch.")
@click.option(
    "--prompt-len",
    type=click.IntRange(min=1),
    default=65,
    show_default=True,
    help="Tokens of the first prefill (65 crosses a 64-token chunk).",
)
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Decode steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
@click.option(
    "--atol", type=float, default=None, help="Absolute tolerance (default per dtype: 1e-4 fp32, 1e-2 fp16, 5e-2 bf16)."
)
@click.option(
    "--rtol",
    type=float,
    default=None,
    help="Relative tolerance (default per dtype, as --atol); see --check-error-stat.",
)
@click.option(
    "--check-error-stat",
    type=click.Choice(["scaled", "elemwise", "max", "mean", "median"]),
    default="scaled",
    show_default=True,
    help="scaled: every element within atol + rtol·max|reference| of its output (the export validation's rule); "
    "the others are Polygraphy's statistics, with --atol/--rtol as they are.",
)
@click.option(
    "--engines",
    "engines_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="TensorRT engines (default: EXPORT_DIR/tensorrt, as gla-export build writes them).",
)
@click.option(
    "--plugin",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="libgla_tensorrt.so (default: the one built with the package).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where PyTorch runs the reference.",
)
@click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True, help="CUDA device.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Also write the report as JSON.",
)
@click.option(
    "--save-dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Save the prefill/step inputs and PyTorch outputs as Polygraphy JSON, with polygraphy_run.sh to replay them.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@click.pass_context
def verify(
    ctx,
    export_dir,
    model,
    backends,
    batch,
    prompt_len,
    steps,
    seed,
    atol,
    rtol,
    check_error_stat,
    engines_dir,
    plugin,
    device,
    device_id,
    json_path,
    save_dir,
    quiet,
) -> None:
    """Compare EXPORT_DIR, run by ONNX Runtime (CPU, CUDA) and TensorRT, with the PyTorch model.

    Prefill, single steps and a whole decode (each backend carrying its own states); logits
    and every layer's state. Prints a table of errors; exits with code 4 past the tolerance.
    """
    import json
    from pathlib import Path

    from .._files import check_output_path
    from ..runtime.verify import raise_if_failed
    from ..runtime.verify import verify as run_verify
    from rich.markup import escape

    from . import console
    from .render import verify_table

    err = console(stderr=True)
    verbose = bool((ctx.find_root().obj or {}).get("verbose"))
    if save_dir is not None:
        check_output_path(Path(save_dir))
    report = run_verify(
        export_dir,
        model=model,
        backends=list(backends) or None,
        batch=batch,
        prompt_len=prompt_len,
        steps=steps,
        seed=seed,
        atol=atol,
        rtol=rtol,
        check_error_stat=check_error_stat,
        engines_dir=engines_dir,
        trt_plugin=plugin,
        device=device,
        device_id=device_id,
        save_dir=save_dir,
        verbose=verbose,
        progress=None if quiet else (lambda msg: err.print(f"[dim]verify: {msg}[/dim]")),
    )
    out = console()
    out.print(verify_table(report))
    out.print(f"[dim]reference: {report.reference}[/dim]")
    for b in report.backends:
        if not b.available:
            out.print(f"[yellow]skipped[/yellow] {b.name}: {escape(b.detail)}")
        elif b.error:
            out.print(f"[red]failed[/red] {b.name} ({escape(b.detail)}): {escape(b.error)}")
        else:
            out.print(f"[dim]ran {b.name}: {escape(b.detail)}[/dim]")
    if report.polygraphy_commands:
        out.print(f"[dim]polygraphy equivalents in {Path(save_dir) / 'polygraphy_run.sh'}[/dim]")
    quality = None
    if report.passed and json.loads((Path(export_dir) / "metadata.json").read_text()).get("quantization"):
        from ..export.quality import report_for_verify  # quantized weights: what they cost against the float model

        quality = report_for_verify(export_dir, json.loads((Path(export_dir) / "metadata.json").read_text()))
        for what, value in quality.rows() if quality is not None else []:
            out.print(f"quantization: {what}: {value}")
    if json_path:
        Path(json_path).write_text(json.dumps({**report.as_dict(), **({"quality": quality.as_dict()} if quality else {})}, indent=2) + "\n")
    raise_if_failed(report)
    out.print(f"[green]verified[/green] {export_dir} against {', '.join(report.ran)} in {report.seconds:.1f} s")
